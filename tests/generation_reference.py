"""A step-by-step stand-in for ``mambalrp.explain_generation`` with the contract's result shape.

Greedy generation (or a given continuation) where step ``i`` is explained by ``mambalrp.explain``
on the prompt and the ``i`` tokens before it; cells a step cannot see are zero. Used to test the
command line and the demo independently of the library's own implementation.
Importable from test modules because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import mambalrp


def reference_generation(model, input_ids, *, max_new_tokens=20, continuation=None, rules="mambalrp", **_):
    """Explain every generated token of a greedy generation, one ``explain`` call per step."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    steps = len(continuation) if continuation is not None else max_new_tokens
    width = len(ids) + steps
    rows, logits, generated = [], [], []
    for i in range(steps):
        target = None if continuation is None else int(continuation[i])
        exp = mambalrp.explain(model, ids[None], target, rules=rules)
        row = torch.zeros(width)
        row[: len(ids)] = exp.relevance[0]
        rows.append(row)
        logits.append(exp.logit[0])
        generated.append(int(exp.target[0]))
        ids = torch.cat([ids, exp.target])
    return SimpleNamespace(
        relevance=torch.stack(rows), logit=torch.stack(logits), generated_ids=torch.tensor(generated),
        rules=rules, verified=True, tokens=None, step_scores=None,
    )

"""Models and inputs the suite runs on.

* ``sst-mamba1`` / ``sst-mamba2``: zoo sentiment classifiers on the held-out test split of the
  sentence-polarity data (downloaded at run time by :mod:`benchmarks.zoo.data`).
* ``kv-mamba1`` / ``kv-mamba2`` (two planted pairs) and ``kv1-mamba1`` (one pair): zoo key-value
  retrieval classifiers on the zoo's held-out test draw of :mod:`mambalrp.models.synthetic`
  (seed 10000); the queried value's position is the ground-truth evidence.
* ``kv-tiny``: when no zoo model is present (or for the smoke test), a small Mamba-1 retrieval
  model trained on the fly from fixed seeds in well under a minute.

Inputs are grouped into batches of equal length, so no padding is involved in explanations.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mambalrp.models import synthetic
from mambalrp.models.classifier import MambaSequenceClassifier

#: Seed of the zoo's held-out key-value test draw.
KV_TEST_SEED = 10_000
#: The on-the-fly model: one planted pair in 12 tokens (the value must be carried over the
#: distractors to the query), learnt to 100 % test accuracy in 150 steps (about 20 s on one core).
TINY_SPEC = synthetic.TaskSpec(seq_len=12, n_keys=4, n_values=4, n_distractors=8, n_pairs=1)
TINY_ARCH = dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
TINY_TRAIN = dict(steps=150, batch_size=32, lr=1e-2, seed=0)


@dataclass
class Task:
    """One model with its inputs.

    Attributes:
        name: Task name used in tables.
        model: Classifier in eval mode.
        neutral_id: Token used to remove tokens (the padding token).
        examples: ``(ids, evidence)`` per example: an unpadded ``(T,)`` id tensor and the
            ground-truth evidence position (or ``None``).
        info: Description for the results JSON (source, accuracy, ...).
        roles: Per example, named positions of interest (retrieval: the queried value, its key,
            the key in the query, the final ``?``); empty for tasks without ground truth.
    """

    name: str
    model: nn.Module
    neutral_id: int
    examples: list[tuple[torch.Tensor, int | None]]
    info: dict[str, Any] = field(default_factory=dict)
    roles: list[dict[str, int]] = field(default_factory=list)

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """Yield ``(example indices, ids (b, T), evidence (b,) or None)`` of equal-length groups."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (ids, _) in enumerate(self.examples):
            groups[ids.numel()].append(i)
        for length in sorted(groups):
            idx = groups[length]
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                ids = torch.stack([self.examples[i][0] for i in chunk])
                ev = [self.examples[i][1] for i in chunk]
                yield chunk, ids, None if ev[0] is None else torch.tensor(ev)


def kv_task(name: str, model: nn.Module, spec: synthetic.TaskSpec, n: int, seed: int, info: dict) -> Task:
    """Key-value retrieval task on ``n`` examples drawn with ``seed``."""
    examples = synthetic.generate(spec, n, seed)
    items = [(torch.tensor(e.input_ids), e.value_position) for e in examples]
    ids, labels = synthetic.to_tensors(examples)
    with torch.no_grad():
        acc = (model(ids).argmax(-1) == labels).float().mean().item()
    roles = [{"value": e.value_position, "pair_key": e.key_position, "query_key": e.query_key_position,
              "query_mark": spec.seq_len - 1} for e in examples]
    return Task(name, model, neutral_id=0, examples=items, roles=roles,
                info={**info, "task_spec": spec.to_dict(), "data_seed": seed, "accuracy_on_sample": acc})


def zoo_kv(name: str, n: int) -> Task:
    """A zoo key-value model on the zoo's held-out draw."""
    from mambalrp.models.zoo import load_model, model_info

    model, _ = load_model(name)
    meta = model_info(name)
    spec = synthetic.TaskSpec(**meta["task_spec"])
    return kv_task(name, model, spec, n, KV_TEST_SEED,
                   {"source": f"zoo:{name}", "zoo_test_accuracy": meta.get("metrics", {}).get("test_accuracy")})


def zoo_sst(name: str, n: int | None) -> Task:
    """A zoo sentiment classifier on the first ``n`` held-out test sentences (all if ``None``)."""
    from benchmarks.zoo import data
    from mambalrp.models.zoo import load_model, model_info

    model, tok = load_model(name)
    meta = model_info(name)
    pad_id = tok.token_to_id(meta["pad_token"])
    test = data.sentence_splits()["test"]
    test = test if n is None else test[:n]
    items, labels = [], []
    for ex in test:
        enc = tok.encode(ex.text)
        ids = [i for i, m in zip(enc.ids, enc.attention_mask) if m]
        items.append((torch.tensor(ids), None))
        labels.append(ex.label)
    correct = 0
    with torch.no_grad():
        for (ids, _), y in zip(items, labels):
            correct += int(model(ids[None]).argmax(-1).item() == y)
    return Task(name, model, neutral_id=pad_id, examples=items,
                info={"source": f"zoo:{name}", "data": "sentence polarity v1.0, held-out test split",
                      "accuracy_on_sample": correct / len(items),
                      "zoo_test_accuracy": meta.get("metrics", {}).get("test_accuracy")})


def train_tiny_kv(spec: synthetic.TaskSpec = TINY_SPEC, steps: int | None = None, seed: int | None = None) -> nn.Module:
    """Train a small Mamba-1 key-value retrieval classifier from fixed seeds (CPU, about 20 s).

    Args:
        spec: Task shape.
        steps: Optimiser steps (default ``TINY_TRAIN["steps"]``).
        seed: Seed of initialisation and data (default ``TINY_TRAIN["seed"]``).

    Returns:
        The trained model in eval mode.
    """
    from mambalrp.models.zoo import build_backbone

    cfg = dict(TINY_TRAIN)
    steps = cfg["steps"] if steps is None else steps
    seed = cfg["seed"] if seed is None else seed
    torch.manual_seed(seed)
    rng = random.Random(seed)
    backbone = build_backbone("mamba", vocab_size=len(synthetic.vocabulary(spec)), pad_token_id=0, eos_token_id=0,
                              **TINY_ARCH)
    model = MambaSequenceClassifier(backbone, num_labels=spec.n_values)
    fast = [m for m in model.modules() if hasattr(m, "use_mambapy")]
    try:
        import mambapy  # noqa: F401

        for m in fast:
            m.use_mambapy = True
    except ImportError:
        pass
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        ids, y = synthetic.to_tensors([synthetic.make_example(spec, rng) for _ in range(cfg["batch_size"])])
        loss = nn.functional.cross_entropy(model(ids), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    for m in fast:
        m.use_mambapy = False
    return model.eval()


def tiny_kv(n: int) -> Task:
    """The on-the-fly key-value task (model trained here)."""
    t0 = time.perf_counter()
    model = train_tiny_kv()
    seconds = time.perf_counter() - t0
    return kv_task("kv-tiny", model, TINY_SPEC, n, KV_TEST_SEED,
                   {"source": "trained on the fly", "arch": TINY_ARCH, "training": TINY_TRAIN,
                    "train_seconds": seconds})


def task_names(quick: bool, names: list[str] | None = None) -> list[str]:
    """Names of the tasks to run: every zoo sentiment / retrieval classifier present, else ``kv-tiny``.

    Args:
        quick: Smoke run (only the first retrieval task).
        names: Explicit task names, returned unchanged.

    Returns:
        Task names.
    """
    from mambalrp.models.zoo import available_models

    if names:
        return list(names)
    zoo = available_models()
    found = [m for m in ("kv1-mamba1", "kv-mamba1", "kv-mamba2", "sst-mamba1", "sst-mamba2") if m in zoo]
    if quick:
        found = [m for m in found if m.startswith("kv")][:1]
    return found or ["kv-tiny"]


def load_task(name: str, n_sst: int | None, n_kv: int) -> Task:
    """Load one task by name (zoo names ``kv-*`` / ``sst-*``, or ``kv-tiny``).

    Args:
        name: Task name.
        n_sst: Sentences for sentiment tasks (``None``: the whole test split).
        n_kv: Examples for retrieval tasks.

    Returns:
        The task.
    """
    if name == "kv-tiny":
        return tiny_kv(n_kv)
    if name.startswith(("kv-", "kv1-")):
        return zoo_kv(name, n_kv)
    if name.startswith("sst-"):
        return zoo_sst(name, n_sst)
    raise ValueError(f"unknown task {name!r}")

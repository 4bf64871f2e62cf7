"""docs/howto-classifier.md, executed literally: every python block of the page, in order."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto-classifier.md"


def test_page_runs_and_its_assertions_hold():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 3
    ns: dict = {"__name__": "howto"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
    exp, second = ns["exp"], ns["second"]
    logits = ns["classifier"](ns["ids"], attention_mask=ns["mask"])
    assert torch.equal(exp.target, logits.argmax(-1))
    torch.testing.assert_close(exp.logit, logits.max(-1).values)
    torch.testing.assert_close(second.logit, logits[[0, 1], [2, 0]])
    # "exact to float rounding" with the biases at zero, as the page says.
    import mambalrp
    from mambalrp.testing import zero_biases

    classifier = zero_biases(ns["classifier"])
    zeroed = mambalrp.explain(classifier, ns["ids"], attention_mask=ns["mask"])
    assert (zeroed.conservation_delta.abs() <= 1e-4 * zeroed.logit.abs()).all()

"""docs/delta-rule.md, executed literally: every python block of the page, in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mambalrp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "delta-rule.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_page_runs_and_its_claims_hold():
    pytest.importorskip("transformers").Qwen3NextConfig  # noqa: B018 - the page needs it
    ns: dict = {"__name__": "delta_rule_page"}
    try:
        for i, block in enumerate(code_blocks(PAGE.read_text())):
            exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
        # The page's own asserts ran; check its claims once more, independently.
        exp, toy, toy_ids = ns["exp"], ns["toy"], ns["toy_ids"]
        torch.testing.assert_close(exp.relevance.sum(-1), exp.logit, rtol=1e-4, atol=1e-5)
        assert ns["toy_error"] < 1e-4
        leaky = mambalrp.check_rules(toy, toy_ids, rules=mambalrp.MAMBALRP.without("silu"))
        assert {("SiluBackward0", "mixers.0"), ("SiluBackward0", "mixers.1")} <= {(u.op, u.module) for u in leaky.uncovered}
    finally:
        mambalrp.unregister_adapter("toy-delta-mixer")
    with pytest.raises(mambalrp.UnsupportedModelError, match="mixers.0"):
        mambalrp.explain(ns["toy"], ns["toy_ids"])

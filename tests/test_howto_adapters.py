"""docs/adapters.md, executed literally: every python block of the page, in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mambalrp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture
def page_namespace():
    ns: dict = {"__name__": "howto"}
    try:
        yield ns
    finally:
        mambalrp.unregister_adapter("toy-mixer")


def test_page_has_the_walkthrough():
    blocks = code_blocks(PAGE.read_text())
    assert len(blocks) >= 6
    joined = "\n".join(blocks)
    for needle in ("register_adapter(", "mambalrp.explain(", "mambalrp.lrp(", "conservation_delta"):
        assert needle in joined


def test_page_runs_and_its_claims_hold(page_namespace, capsys):
    ns = page_namespace
    for i, block in enumerate(code_blocks(PAGE.read_text())):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
    # The page's own asserts ran; check the results it shows once more, independently.
    model, ids, exp = ns["model"], ns["ids"], ns["exp"]
    assert "'layers.0.mixer' (ToyMixer)" in ns["message"]
    assert ns["forward_diff"] < 1e-5
    assert exp.relevance.shape == ids.shape
    torch.testing.assert_close(exp.relevance.sum(-1), exp.logit, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = model(ids)[:, -1]
    torch.testing.assert_close(exp.logit, logits.max(-1).values)
    assert ns["gi_error"] > 10 * ns["relative_error"]
    # Section 5's claim: with F.silu where R.act stands, check_rules names it in every mixer.
    leaky = mambalrp.check_rules(model, ids, rules=mambalrp.MAMBALRP.without("silu"))
    flagged = {(u.op, u.module) for u in leaky.uncovered}
    assert {("SiluBackward0", "layers.0.mixer"), ("SiluBackward0", "layers.1.mixer")} <= flagged
    assert {b.name for b in leaky.leaking_blocks} == {"layers.0", "layers.1"}
    # Section 8: the instance-scoped adapter explains its model only, conserving.
    conv_exp = ns["conv_exp"]
    assert conv_exp.verified and ns["conv_error"] < 1e-4
    torch.testing.assert_close(conv_exp.relevance.sum(-1), conv_exp.logit, rtol=1e-4, atol=1e-5)
    assert [a.name for a in mambalrp.registered_adapters(ns["conv_model"])][0] == "short-conv"
    assert "contains no Mamba layer" in ns["refused_second"]
    # After unregistering, the model is unsupported again.
    mambalrp.unregister_adapter("toy-mixer")
    with pytest.raises(mambalrp.UnsupportedModelError, match="docs/adapters.md"):
        mambalrp.explain(model, ids)


def test_plan_names_first_unmatched_module_of_a_foreign_model():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), Odd())

        def forward(self, ids):
            return self.body(self.embed(ids))

    with pytest.raises(mambalrp.UnsupportedModelError) as info:
        mambalrp.explain(Net(), torch.tensor([[1, 2]]))
    assert "'body.1' (Odd)" in str(info.value)
    assert "docs/adapters.md" in str(info.value)

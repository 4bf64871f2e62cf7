"""Shared fixtures: tiny random models and a snapshot of a model's full state."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from mambalrp.testing import tiny_mamba, tiny_mamba2  # noqa: E402

FAMILIES = {
    "mamba": lambda seed, **kw: tiny_mamba(seed, **kw),
    "falcon_mamba": lambda seed, **kw: tiny_mamba(seed, falcon=True, **kw),
    "mamba2": lambda seed, **kw: tiny_mamba2(seed, **kw),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """Name of a model family with a factory in FAMILIES."""
    return request.param


def snapshot(model: torch.nn.Module) -> dict:
    """Everything explain() must leave unchanged, as exact copies."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for k, m in model.named_modules()
        },
        "forward_attrs": {k: m.__dict__.get("forward") for k, m in model.named_modules()},
    }


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    """Assert the model's state equals the snapshot bitwise."""
    after = snapshot(model)
    assert after["params"].keys() == before["params"].keys()
    for k, v in before["params"].items():
        assert torch.equal(after["params"][k], v), f"{k} changed"
    assert after["requires_grad"] == before["requires_grad"]
    for k, g in before["grads"].items():
        a = after["grads"][k]
        assert (a is None and g is None) or (a is not None and g is not None and torch.equal(a, g)), f"grad of {k}"
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["forward_attrs"] == before["forward_attrs"]

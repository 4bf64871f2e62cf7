"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import assert_same_state, snapshot
from mambalrp.testing import tiny_mamba


class _Snapshot:
    def __init__(self, model: torch.nn.Module):
        self.model, self.state = model, snapshot(model)

    def check(self) -> None:
        assert_same_state(self.model, self.state)


def assert_same_state_simple(model: torch.nn.Module) -> _Snapshot:
    """Snapshot ``model`` now; ``.check()`` later asserts it is bitwise unchanged."""
    return _Snapshot(model)


def loop_selective_scan(x, dt, A, B, C, D):
    """Loop reference of Mamba-1's scan: x, dt (b, d, T); A (d, n); B, C (b, n, T)."""
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    for t in range(x.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * x[:, :, t])
    return torch.stack(ys, -1)


class Squash(nn.Module):
    """``tanh(proj(x))``: a non-linearity no rule covers."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class SquashedHead(nn.Module):
    """A tiny Mamba backbone, then :class:`Squash` (module ``squash``) before the LM head."""

    def __init__(self, zero_biases: bool = True):
        super().__init__()
        self.inner = tiny_mamba(0, zero_biases=zero_biases)
        self.squash = Squash(16)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        hidden = self.inner.backbone(input_ids, **kwargs).last_hidden_state
        return self.inner.lm_head(self.squash(hidden))


def relative_conservation_error(exp) -> float:
    """Largest ``|logit - sum(R)| / |logit|`` over the explanation's rows."""
    return (exp.conservation_delta.abs() / exp.logit.abs()).max().item()

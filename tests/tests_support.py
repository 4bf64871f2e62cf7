"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from conftest import assert_same_state, snapshot


class _Snapshot:
    def __init__(self, model: torch.nn.Module):
        self.model, self.state = model, snapshot(model)

    def check(self) -> None:
        assert_same_state(self.model, self.state)


def assert_same_state_simple(model: torch.nn.Module) -> _Snapshot:
    """Snapshot ``model`` now; ``.check()`` later asserts it is bitwise unchanged."""
    return _Snapshot(model)

"""Progress bars: shown when asked or on a terminal, quiet otherwise or when MAMBALRP_PROGRESS=0."""

from __future__ import annotations

import io
import sys

import torch

import mambalrp
from mambalrp.progress import ENV_VAR, progress_bar, progress_enabled
from mambalrp.testing import tiny_mamba


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_enabled(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled(None)  # not a terminal
    assert progress_enabled(True) and not progress_enabled(False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_enabled(None)
    monkeypatch.setenv(ENV_VAR, "0")
    assert not progress_enabled(None) and progress_enabled(True)
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_enabled(None) and not progress_enabled(False)


def test_bar_writes_only_when_enabled(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert list(progress_bar(range(3), desc="work")) == [0, 1, 2]
    assert quiet.getvalue() == ""
    loud = Terminal()
    monkeypatch.setattr(sys, "stderr", loud)
    with progress_bar(total=4, desc="work", unit="token") as bar:
        bar.update(4)
    assert "work" in loud.getvalue() and "/4" in loud.getvalue() and "token" in loud.getvalue()
    monkeypatch.setenv(ENV_VAR, "0")
    off = Terminal()
    monkeypatch.setattr(sys, "stderr", off)
    list(progress_bar(range(3), desc="work"))
    assert off.getvalue() == ""


def test_generation_progress(monkeypatch):
    model = tiny_mamba(41)
    prompt = torch.tensor([1, 2, 3, 4])
    monkeypatch.delenv(ENV_VAR, raising=False)
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    mambalrp.explain_generation(model, prompt, max_new_tokens=3, progress=True, verify=False)
    text = err.getvalue()
    assert "generating" in text and "explaining" in text and "/3" in text
    err.truncate(0)
    err.seek(0)
    mambalrp.explain_generation(model, prompt, max_new_tokens=3, progress=False, verify=False)
    assert "explaining" not in err.getvalue()


def test_recompute_progress(monkeypatch):
    """With recompute, the bar counts each recomputed layer twice (forward, then backward); the
    relevance is unchanged and the model's forwards are restored."""
    model = tiny_mamba(42)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.delenv(ENV_VAR, raising=False)
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    plain = mambalrp.explain(model, ids, verify=False)
    assert err.getvalue() == ""
    import mambalrp.recompute as recompute

    bars = []

    def recording(*args, **kwargs):
        bars.append(progress_bar(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(recompute, "progress_bar", recording)
    shown = mambalrp.explain(model, ids, recompute=True, progress=True, verify=False)
    assert "layers (forward, recompute)" in err.getvalue()
    assert bars[0].total == 4 and bars[0].n == 4  # 2 layers, each run in the forward and the backward
    assert torch.equal(shown.relevance, plain.relevance)
    assert all("forward" not in m.__dict__ for m in model.modules())
    err.truncate(0)
    err.seek(0)
    mambalrp.explain(model, ids, recompute=True, verify=False)  # short input: no bar by default
    assert err.getvalue() == ""

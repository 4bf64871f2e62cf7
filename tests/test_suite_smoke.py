"""Smoke test of the faithfulness suite: the quick run on a retrieval model, with real checks.

Runs ``python -m benchmarks.suite --quick`` (marked slow; the default run uses its first 8
examples in one process, same checks) in-process on the zoo's ``kv1-mamba1`` (else
``kv-mamba2``) retrieval model when present (both solve their task on the whole sample), else on a tiny retrieval model trained on the fly
(about 20 s), writing into a temporary directory. No downloads.

The orderings asserted were measured on this fixed sample (32 examples, seed 0) for each of
these models, with margins of several standard errors.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.faithfulness import metrics
from benchmarks.faithfulness.runner import main
from mambalrp.models.zoo import available_models

TASK = next((m for m in ("kv1-mamba1", "kv-mamba2") if m in available_models()), "kv-tiny")


@pytest.fixture(scope="module", params=[pytest.param("full", marks=pytest.mark.slow), "smoke"])
def quick(request, tmp_path_factory):
    """The quick run (32 examples, slow), or its smoke version: the first 8 examples, one process."""
    out = tmp_path_factory.mktemp("suite")
    extra = ["--n-kv", "8", "--jobs", "1"] if request.param == "smoke" else []
    results = main(["--quick", "--tasks", TASK, "--out", str(out), *extra])
    return out, results


def test_outputs_written(quick):
    out, results = quick
    for name in ("faithfulness_quick.json", "faithfulness_quick.md", "faithfulness_quick_conservation.png",
                 f"faithfulness_quick_curves_{TASK}.png"):
        assert (out / name).stat().st_size > 0, name
    payload = json.loads((out / "faithfulness_quick.json").read_text())
    assert payload["config"]["quick"] and payload["config"]["seed"] == 0
    assert "torch" in payload["machine"]
    stats = payload["tasks"][TASK]["stats"]
    assert len(stats) == 14 and all(torch.isfinite(torch.tensor(v["dA_F"])) for v in stats.values())


def test_model_solves_task(quick):
    _, results = quick
    assert results["tasks"][TASK]["info"]["accuracy_on_sample"] >= 0.9


def test_faithfulness_ordering(quick):
    _, results = quick
    s = {m: v["dA_F"] for m, v in results["tasks"][TASK]["stats"].items()}
    sem = {m: v["dA_F_sem"] for m, v in results["tasks"][TASK]["stats"].items()}
    assert s["mambalrp"] > s["gradient_x_input"] + 2 * sem["gradient_x_input"]
    assert s["mambalrp"] > s["random"] + 3 * sem["random"]
    assert abs(s["random"]) < 3 * sem["random"] + 0.2  # random order scores about 0


def test_conservation(quick):
    _, results = quick
    c = results["tasks"][TASK]["conservation"]
    # Without biases, MambaLRP conserves to float precision; Gradient x Input does not at all.
    assert c["biases_zeroed/mambalrp"]["rel_max"] < 1e-4
    assert c["biases_zeroed/gradient"]["rel_median"] > 0.1
    # With the trained biases, relevance is absorbed by them, but far less than GI's error.
    assert c["as_trained/mambalrp"]["abs_median"] < 0.1 * c["as_trained/gradient"]["abs_median"]


def test_area_and_orders():
    curve = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(metrics.area(curve), torch.tensor([1.0, 0.5]))
    morf, lerf = metrics.orders(torch.tensor([[0.1, 0.3, 0.2]]))
    assert morf.tolist() == [[1, 2, 0]] and lerf.tolist() == [[0, 2, 1]]
    hits = metrics.hit_rates(torch.tensor([[0.1, 0.3, 0.2], [0.9, 0.3, 0.2]]), torch.tensor([1, 2]))
    assert hits["top1"].tolist() == [True, False] and hits["top3"].tolist() == [True, True]

"""zennit integration: MambaLRP through zennit's attributors (skipped without zennit)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("zennit")
from zennit.attribution import Gradient, SmoothGrad  # noqa: E402

import mambalrp  # noqa: E402
from mambalrp.testing import tiny_mamba, tiny_mamba2  # noqa: E402
from mambalrp.zennit import EmbeddingsToLogit, MambaLRPCanonizer, MambaLRPComposite  # noqa: E402
from tests_support import assert_same_state_simple  # noqa: E402

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("factory", [tiny_mamba, tiny_mamba2])
def test_gradient_attributor_with_composite_is_mambalrp(factory):
    model = factory(0, zero_biases=True)
    before = assert_same_state_simple(model)
    reference = mambalrp.explain(model, IDS)
    emb = model.get_input_embeddings()(IDS).detach()
    wrapped = EmbeddingsToLogit(model)
    one_hot = torch.nn.functional.one_hot(reference.target, 64).float()
    with Gradient(wrapped, MambaLRPComposite()) as attributor:
        logits, grad = attributor(emb, one_hot)
    before.check()  # zennit removed the canonizer: forwards restored
    relevance = (emb * grad).sum(-1)
    torch.testing.assert_close(relevance, reference.relevance, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(relevance.sum(-1), reference.logit, rtol=1e-4, atol=1e-6)
    # Without the composite the same attributor gives Gradient x Input.
    with Gradient(wrapped) as attributor:
        _, plain = attributor(emb, one_hot)
    gi = mambalrp.explain(model, IDS, rules="gradient")
    torch.testing.assert_close((emb * plain).sum(-1), gi.relevance, rtol=1e-4, atol=1e-6)


def test_smoothgrad_baseline_runs_and_canonizer_is_reversible():
    model = tiny_mamba(0)
    emb = model.get_input_embeddings()(IDS).detach()
    wrapped = EmbeddingsToLogit(model)
    with SmoothGrad(wrapped, n_iter=3, noise_level=0.1) as attributor:
        _, grad = attributor(emb, torch.ones(2, 64))
    assert grad.shape == emb.shape and torch.isfinite(grad).all()
    canonizer = MambaLRPCanonizer("ln-only")
    before = assert_same_state_simple(model)
    (applied,) = canonizer.apply(model)
    assert any("forward" in m.__dict__ for m in model.modules())
    applied.remove()
    applied.remove()  # idempotent
    before.check()

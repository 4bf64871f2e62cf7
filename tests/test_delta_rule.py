"""The gated delta rule primitive: chunked forward and LRP backward against the sequential
reference, the true-gradient mode, transformers' own torch path, shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mambalrp
from mambalrp.functional.delta_rule import (
    GatedDeltaRuleFn,
    gated_delta_rule,
    gated_delta_rule_fwd_torch,
    gated_delta_rule_lrp_bwd_torch,
    gated_delta_rule_ref,
)


def _inputs(b=2, T=37, hk=2, h=4, dk=8, dv=6, per_channel=False, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, T, hk, dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(b, T, hk, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(b, T, h, dv, generator=gen, dtype=dtype)
    shape = (b, T, h, dk) if per_channel else (b, T, h)
    g = -torch.rand(shape, generator=gen, dtype=dtype)
    beta = torch.rand(b, T, h, generator=gen, dtype=dtype) * 2.0  # [0, 2]: negative eigenvalues too
    return q, k, v, g, beta


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-decay", "per-channel-decay"])
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_forward_and_adjoint_equal_the_sequential_reference(per_channel, chunk):
    q, k, v, g, beta = _inputs(per_channel=per_channel)
    ref = gated_delta_rule_ref(q, k, v, g, beta)
    out = gated_delta_rule_fwd_torch(q, k, v, g, beta, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    grad = torch.randn_like(ref)
    v_ref = v.clone().requires_grad_()
    (gated_delta_rule_ref(q, k, v_ref, g, beta) * grad).sum().backward()
    dv = gated_delta_rule_lrp_bwd_torch(grad, q, k, g, beta, chunk=chunk)
    torch.testing.assert_close(dv, v_ref.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-decay", "per-channel-decay"])
def test_lrp_backward_gives_values_only_and_conserves(per_channel):
    q, k, v, g, beta = (t.requires_grad_() for t in _inputs(per_channel=per_channel, T=20))
    out = gated_delta_rule(q, k, v, g, beta)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    assert q.grad is None and k.grad is None and g.grad is None and beta.grad is None
    # o is linear in v: the relevance v * dv sums to the output's o * g (exactly, up to rounding).
    torch.testing.assert_close((v * v.grad).sum(), (out * grad).sum(), rtol=1e-12, atol=1e-12)


def test_gradient_mode_is_the_true_gradient():
    inputs = _inputs(T=19, per_channel=True)
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    grad = torch.randn(2, 19, 4, 6, dtype=torch.float64)
    (gated_delta_rule(*a, rule="gradient") * grad).sum().backward()
    (gated_delta_rule_ref(*b, detach=False) * grad).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-10)
    assert a[0].grad.abs().sum() > 0  # queries do get a gradient here


def test_rule_set_routes_the_delta_rule():
    q, k, v, g, beta = (t.requires_grad_() for t in _inputs(T=9))
    mambalrp.MAMBALRP.delta_rule(q, k, v, g, beta).sum().backward()
    assert q.grad is None and v.grad is not None
    mambalrp.rules.GRADIENT.delta_rule(q, k, v, g, beta).sum().backward()
    assert q.grad is not None


def test_matches_transformers_torch_paths():
    modeling = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta = _inputs(T=70, dtype=torch.float32)
    beta = beta / 2.0
    chunked, _ = modeling.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    recurrent, _ = modeling.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    ours = gated_delta_rule(modeling.l2norm(q) * q.shape[-1] ** -0.5, modeling.l2norm(k), v, g, beta)
    torch.testing.assert_close(ours, chunked, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours, recurrent, rtol=0, atol=2e-6)


def test_half_precision_values_keep_their_dtype_and_accumulate_in_float32():
    q, k, v, g, beta = _inputs(T=24, dtype=torch.float32)
    v16 = v.to(torch.bfloat16).requires_grad_()
    out = gated_delta_rule(q, k, v16, g, beta)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert v16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, gated_delta_rule_ref(q, k, v16.float(), g, beta), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, g, b: (q[..., :4], k, v, g, b), "q and k must both be"),
        (lambda q, k, v, g, b: (q, k, v[:, :, :3], g, b), "heads a multiple of 2"),
        (lambda q, k, v, g, b: (q, k, v, g, b[:, :5]), "beta must be"),
        (lambda q, k, v, g, b: (q, k, v, g[..., None, None], b), "g must be"),
    ],
)
def test_bad_shapes_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(*change(*_inputs(T=6)))


def test_function_class_is_exported():
    assert mambalrp.functional.GatedDeltaRuleFn is GatedDeltaRuleFn


def test_kept_and_recomputed_chunk_quantities_give_the_same_backward(monkeypatch):
    """Short inputs keep the forward's chunk quantities for the backward; long ones recompute them."""
    from mambalrp.functional import delta_rule

    q, k, v, g, beta = _inputs(T=40)
    grads = []
    for limit in (delta_rule.KEEP_CHUNKS_BYTES, 0):
        monkeypatch.setattr(delta_rule, "KEEP_CHUNKS_BYTES", limit)
        vv = v.clone().requires_grad_()
        out = gated_delta_rule(q, k, vv, g, beta)
        assert (out.grad_fn.chunks is not None) == (limit > 0)
        out.sum().backward()
        grads.append(vv.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)

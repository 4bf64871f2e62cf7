"""Gradient x Input runs on the project's chunked scans and stays exactly the model's gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

import mambalrp
from mambalrp import functional as ops
from mambalrp.functional import scan_core, ssd
from mambalrp.functional.selective_scan import SelectiveScanGradFn, selective_scan_grad
from mambalrp.functional.ssd import SSDScanGradFn, ssd_scan_fwd_torch, ssd_scan_grad, ssd_scan_lrp_bwd_torch

f64 = torch.float64


def _autograd_gradient_x_input(model, ids: torch.Tensor) -> torch.Tensor:
    """Gradient x Input of the arg-max logit at the last position, by plain autograd through the
    unpatched model."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, use_cache=False).logits[:, -1]
    score = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(score, emb)
    return (emb * grad).sum(-1).detach()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_rules_equal_autograd_of_the_model(family, monkeypatch):
    # Several chunks in both scans: Mamba-1 chunks of 16 steps, Mamba-2 of 64.
    monkeypatch.setattr(scan_core, "CHUNK_ELEMENTS", 1)
    model = FAMILIES[family](5, use_conv_bias=True).to(f64)
    ids = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(3))
    exp = mambalrp.explain(model, ids, rules="gradient", verify=False)
    ref = _autograd_gradient_x_input(model, ids)
    scale = ref.abs().max()
    assert scale > 0
    assert (exp.relevance.double() - ref).abs().max() <= 1e-5 * scale
    assert exp.relevance[:, :60].abs().max() > 1e-6 * scale  # early tokens matter: the scans carry the gradient


def _ssm_inputs(b=2, d=5, T=37, n=3, dtype=f64):
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    dt = torch.rand(b, d, T, generator=gen, dtype=dtype) * 0.5
    return r(b, d, T), dt, -torch.rand(d, n, generator=gen, dtype=dtype) * 3, r(b, n, T), r(b, n, T), r(d)


def _ssd_inputs(b=2, T=37, h=4, p=3, g=2, n=5, dtype=f64):
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    dt = torch.rand(b, T, h, generator=gen, dtype=dtype)
    return r(b, T, h, p), dt, -torch.rand(h, generator=gen, dtype=dtype) * 2, r(b, T, g, n), r(b, T, g, n), r(h)


def _grads(fn, inputs, wanted, g):
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(inputs, wanted)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
    return out.detach(), grads


@pytest.mark.parametrize("chunk", [1, 6, 64])
@pytest.mark.parametrize("with_d", [True, False])
def test_selective_scan_grad_fn_against_reference(chunk, with_d):
    x, dt, A, B, C, D = _ssm_inputs()
    D = D if with_d else None
    g = torch.randn_like(x)
    wanted = (True, True, False, True, True) if not with_d else (True, True, True, True, True, True)
    args = (x, dt, A, B, C) if not with_d else (x, dt, A, B, C, D)
    y, grads = _grads(lambda *a: selective_scan_grad(*a, chunk=chunk), args, wanted, g)
    y_r, grads_r = _grads(lambda *a: ops.selective_scan_ref(*a, detach=False), args, wanted, g)
    assert torch.allclose(y, y_r, atol=1e-12)
    assert len(grads) == sum(wanted)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 8, 64])
@pytest.mark.parametrize("d_shape", ["heads", "per_dim", None])
def test_ssd_scan_grad_fn_against_reference(chunk, d_shape):
    x, dt, A, B, C, D = _ssd_inputs()
    D = {"heads": D, "per_dim": torch.randn(4, 3, dtype=f64), None: None}[d_shape]
    g = torch.randn_like(x)
    args = (x, dt, A, B, C) if D is None else (x, dt, A, B, C, D)
    wanted = (True, True, False, True, True, True)[: len(args)]
    y, grads = _grads(lambda *a: ssd_scan_grad(*a, chunk=chunk), args, wanted, g)
    y_r, grads_r = _grads(lambda *a: ops.ssd_scan_ref(*a, detach=False), args, wanted, g)
    assert torch.allclose(y, y_r, atol=1e-12)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, atol=1e-10)


def test_grad_fns_gradcheck():
    x, dt, A, B, C, D = _ssm_inputs(b=1, d=2, T=9, n=2)
    inputs = tuple(t.clone().requires_grad_() for t in (x, dt, A, B, C, D))
    assert torch.autograd.gradcheck(lambda *a: SelectiveScanGradFn.apply(*a, 4), inputs)
    x, dt, A, B, C, D = _ssd_inputs(b=1, T=9, h=2, p=2, g=1, n=2)
    inputs = tuple(t.clone().requires_grad_() for t in (x, dt, A, B, C, D))
    assert torch.autograd.gradcheck(lambda *a: SSDScanGradFn.apply(*a, 4), inputs)


def test_grad_fns_keep_input_dtypes():
    x, dt, A, B, C, D = (t.to(torch.bfloat16).requires_grad_() for t in _ssm_inputs(dtype=torch.float32))
    y = selective_scan_grad(x, dt, A, B, C, D)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (x, dt, A, B, C, D))
    x, dt, A, B, C, D = (t.to(torch.bfloat16).requires_grad_() for t in _ssd_inputs(dtype=torch.float32))
    ssd_scan_grad(x, dt, A, B, C, D).sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (x, dt, A, B, C, D))


@pytest.mark.parametrize("factor_range", [ssd.FACTOR_RANGE, 7.0, -1.0], ids=["factored", "mixed", "segment"])
@pytest.mark.parametrize("elements", [1, 40 * 8 * 4])
def test_ssd_blocks_of_chunks(elements, factor_range, monkeypatch):
    # Blocks of one chunk and of several (the last block and the last chunk padded): the same
    # forward, rule and true gradient as the sequential reference, with the decays factored per
    # step, as (L, L) segments, or each where the block's decays allow (7: some blocks each way).
    monkeypatch.setattr(scan_core, "CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(ssd, "FACTOR_RANGE", factor_range)
    x, dt, A, B, C, D = _ssd_inputs(T=45)
    y = ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk=8)
    assert torch.allclose(y, ops.ssd_scan_ref(x, dt, A, B, C, D), atol=1e-12)
    g = torch.randn_like(x)
    _, (dx_r,) = _grads(lambda x: ops.ssd_scan_ref(x, dt, A, B, C, D), (x,), (True,), g)
    assert torch.allclose(ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk=8), dx_r, atol=1e-12)
    wanted = (True,) * 6
    _, grads = _grads(lambda *a: ssd_scan_grad(*a, chunk=8), (x, dt, A, B, C, D), wanted, g)
    _, grads_r = _grads(lambda *a: ops.ssd_scan_ref(*a, detach=False), (x, dt, A, B, C, D), wanted, g)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, atol=1e-10)

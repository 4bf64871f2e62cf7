"""Each rule operator against its reference and the closed form of the brief."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambalrp import functional as ops
from mambalrp.functional.selective_scan import selective_scan_grad
from mambalrp.functional.ssd import ssd_scan_grad

f64 = torch.float64


def _grads(fn, *inputs, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out.detach(), grads


def test_silu_identity_rule():
    x = torch.randn(4, 7, dtype=f64)
    g = torch.randn(4, 7, dtype=f64)
    y, (dx,) = _grads(ops.silu_identity, x, g=g)
    assert torch.equal(y, F.silu(x))
    assert torch.allclose(dx, g * torch.sigmoid(x))  # closed form
    _, (dx_ref,) = _grads(ops.silu_identity_ref, x, g=g)
    assert torch.allclose(dx, dx_ref)
    assert torch.allclose(x * dx, y * g)  # conservation, element-wise


def test_half_gate_rule():
    a, b, g = torch.randn(3, 5, dtype=f64), torch.randn(3, 5, dtype=f64), torch.randn(3, 5, dtype=f64)
    y, (da, db) = _grads(ops.half_gate, a, b, g=g)
    assert torch.equal(y, a * b)
    assert torch.allclose(da, 0.5 * g * b) and torch.allclose(db, 0.5 * g * a)
    _, (da_r, db_r) = _grads(ops.half_gate_ref, a, b, g=g)
    assert torch.allclose(da, da_r) and torch.allclose(db, db_r)
    assert torch.allclose(a * da + b * db, y * g)


def test_half_gate_broadcast():
    a, b = torch.randn(2, 3, 4, dtype=f64), torch.randn(1, 3, 1, dtype=f64)
    g = torch.randn(2, 3, 4, dtype=f64)
    _, (da, db) = _grads(ops.half_gate, a, b, g=g)
    _, (da_r, db_r) = _grads(ops.half_gate_ref, a, b, g=g)
    assert db.shape == b.shape and torch.allclose(db, db_r) and torch.allclose(da, da_r)


@pytest.mark.parametrize("group_size", [None, 3])
def test_rmsnorm_ln_rule(group_size):
    x, w = torch.randn(2, 5, 6, dtype=f64), torch.randn(6, dtype=f64)
    g = torch.randn(2, 5, 6, dtype=f64)
    eps = 1e-5
    y, (dx, _) = _grads(lambda x, w: ops.rmsnorm_lrp(x, w, eps, group_size), x, w, g=g)
    gs = group_size or 6
    xg = x.view(2, 5, -1, gs)
    rstd = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    assert torch.allclose(y, w * (xg * rstd).view_as(x))
    assert torch.allclose(dx, ((g * w).view(2, 5, -1, gs) * rstd).view_as(x))  # closed form
    _, (dx_r, _) = _grads(lambda x, w: ops.rmsnorm_lrp_ref(x, w, eps, group_size), x, w, g=g)
    assert torch.allclose(dx, dx_r)
    assert torch.allclose((x * dx).sum(-1), (y * g).sum(-1))
    # The plain norm has the same forward but the true gradient (which does not conserve).
    y2, (dx2, _) = _grads(lambda x, w: ops.rmsnorm(x, w, eps, group_size), x, w, g=g)
    assert torch.allclose(y2, y) and not torch.allclose(dx2, dx)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rmsnorm_rules(norm_before_gate):
    x, z, w = torch.randn(2, 4, 8, dtype=f64), torch.randn(2, 4, 8, dtype=f64), torch.randn(8, dtype=f64)
    g = torch.randn(2, 4, 8, dtype=f64)
    eps, gs = 1e-6, 4
    fn = lambda x, z: ops.gated_rmsnorm(x, z, w, eps, gs, norm_before_gate)  # noqa: E731
    ref = lambda x, z: ops.gated_rmsnorm_ref(x, z, w, eps, gs, norm_before_gate)  # noqa: E731
    y, (dx, dz) = _grads(fn, x, z, g=g)
    y_r, (dx_r, dz_r) = _grads(ref, x, z, g=g)
    assert torch.allclose(y, y_r) and torch.allclose(dx, dx_r) and torch.allclose(dz, dz_r)
    s = F.silu(z)
    inner = x * s if not norm_before_gate else x
    rstd = torch.rsqrt(inner.view(2, 4, 2, gs).pow(2).mean(-1, keepdim=True) + eps)
    scale = (w * g).view(2, 4, 2, gs) * rstd
    if not norm_before_gate:
        assert torch.allclose(dx, 0.5 * scale.view_as(x) * s)
        assert torch.allclose(dz, 0.5 * scale.view_as(x) * x * torch.sigmoid(z))
    # Half to each branch: x and z each receive half of the output relevance.
    assert torch.allclose((x * dx).sum(), 0.5 * (y * g).sum())
    assert torch.allclose((z * dz).sum(), 0.5 * (y * g).sum())


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_epsilon_and_gamma_rules(op):
    torch.manual_seed(0)
    if op == "linear":
        x, w, b = torch.randn(3, 5, 6, dtype=f64), torch.randn(4, 6, dtype=f64), torch.randn(4, dtype=f64)
        out_shape = (3, 5, 4)
    else:
        x, w, b = torch.randn(2, 6, 9, dtype=f64), torch.randn(6, 1, 4, dtype=f64), torch.randn(6, dtype=f64)
        out_shape = (2, 6, 9)
    g = torch.randn(out_shape, dtype=f64)
    plain = (lambda x: F.linear(x, w, b)) if op == "linear" else (lambda x: ops.causal_conv1d(x, w, b))
    for eps in (1e-9, 0.3):
        y, (dx,) = _grads(lambda x: ops.epsilon_linear(x, w, b, eps, op), x, g=g)
        _, (dx_r,) = _grads(lambda x: ops.epsilon_linear_ref(x, w, b, eps, op), x, g=g)
        assert torch.equal(y, plain(x)) and torch.allclose(dx, dx_r)
    for gamma in (0.0, 0.25, 1.0):
        y, (dx,) = _grads(lambda x: ops.gamma_linear(x, w, b, gamma, op), x, g=g)
        _, (dx_r,) = _grads(lambda x: ops.gamma_linear_ref(x, w, b, gamma, op), x, g=g)
        assert torch.equal(y, plain(x)) and torch.allclose(dx, dx_r)
        if gamma == 0.0:  # gamma = 0 is LRP-0 (the plain gradient)
            _, (dx0,) = _grads(plain, x, g=g)
            assert torch.allclose(dx, dx0)
    # Without bias and epsilon -> 0 both rules conserve relevance per output.
    zb = torch.zeros_like(b)
    for fn in (lambda x: ops.epsilon_linear(x, w, zb, 1e-12, op), lambda x: ops.gamma_linear(x, w, zb, 0.25, op)):
        y, (dx,) = _grads(fn, x, g=g)
        assert torch.allclose((x * dx).sum(), (y * g).sum(), rtol=1e-6)


def _ssm_inputs(b=2, d=5, T=37, n=3, dtype=f64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, dt = r(b, d, T), torch.rand(b, d, T, generator=gen, dtype=dtype) * 0.5
    A = -torch.rand(d, n, generator=gen, dtype=dtype) * 3
    return x, dt, A, r(b, n, T), r(b, n, T), r(d)


def _ssd_inputs(b=2, T=37, h=4, p=3, g=2, n=5, dtype=f64, seed=0, d_per_dim=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, dt = r(b, T, h, p), torch.rand(b, T, h, generator=gen, dtype=dtype)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2
    D = r(h, p) if d_per_dim else r(h)
    return x, dt, A, r(b, T, g, n), r(b, T, g, n), D


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("with_d", [True, False])
def test_selective_scan_forward_and_rule(T, with_d):
    x, dt, A, B, C, D = _ssm_inputs(T=T)
    D = D if with_d else None
    y = ops.selective_scan_lrp(x, dt, A, B, C, D)
    assert torch.allclose(y, ops.selective_scan_ref(x, dt, A, B, C, D), atol=1e-12)
    # The rule's backward equals autograd through the sequential reference with detached coefficients.
    g = torch.randn_like(y)
    _, (dx,) = _grads(lambda x: ops.selective_scan_lrp(x, dt, A, B, C, D), x, g=g)
    _, (dx_r,) = _grads(lambda x: ops.selective_scan_ref(x, dt, A, B, C, D), x, g=g)
    assert torch.allclose(dx, dx_r, atol=1e-12)


def test_selective_scan_rule_gradcheck():
    x, dt, A, B, C, D = _ssm_inputs(b=2, d=3, T=11, n=3)
    assert torch.autograd.gradcheck(lambda x: ops.selective_scan_lrp(x, dt, A, B, C, D), (x.clone().requires_grad_(),))


def test_selective_scan_rule_gives_dx_only():
    x, dt, A, B, C, D = (t.requires_grad_() for t in _ssm_inputs(T=9))
    ops.selective_scan_lrp(x, dt, A, B, C, D).sum().backward()
    assert x.grad is not None and all(t.grad is None for t in (dt, A, B, C, D))


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_selective_scan_chunks(chunk):
    from mambalrp.functional.selective_scan import selective_scan_fwd_torch, selective_scan_lrp_bwd_torch

    x, dt, A, B, C, D = _ssm_inputs(T=29)
    y = selective_scan_fwd_torch(x, dt, A, B, C, D, chunk=chunk)
    assert torch.allclose(y, ops.selective_scan_ref(x, dt, A, B, C, D), atol=1e-12)
    g = torch.randn_like(y)
    _, (dx_r,) = _grads(lambda x: ops.selective_scan_ref(x, dt, A, B, C, D), x, g=g)
    assert torch.allclose(selective_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk=chunk), dx_r, atol=1e-12)


def test_selective_scan_true_gradient_mode():
    x, dt, A, B, C, D = _ssm_inputs(T=21)
    g = torch.randn(2, 5, 21, dtype=f64)
    y, grads = _grads(lambda *a: selective_scan_grad(*a, chunk=8), x, dt, A, B, C, D, g=g)
    y_r, grads_r = _grads(lambda *a: ops.selective_scan_ref(*a, detach=False), x, dt, A, B, C, D, g=g)
    assert torch.allclose(y, y_r, atol=1e-12)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, atol=1e-10)


def test_selective_scan_half_precision_accumulates_in_fp32():
    x, dt, A, B, C, D = (t.to(torch.bfloat16) for t in _ssm_inputs(T=33, dtype=torch.float32))
    y = ops.selective_scan_lrp(x, dt, A, B, C, D)
    assert y.dtype == torch.float32
    ref = ops.selective_scan_ref(*(t.float() for t in (x, dt, A, B, C, D)))
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    xr = x.clone().requires_grad_()
    ops.selective_scan_lrp(xr, dt, A, B, C, D).sum().backward()
    assert xr.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("d_per_dim", [False, True])
def test_ssd_scan_forward_and_rule(T, d_per_dim):
    x, dt, A, B, C, D = _ssd_inputs(T=T, d_per_dim=d_per_dim)
    y = ops.ssd_scan_lrp(x, dt, A, B, C, D)
    assert torch.allclose(y, ops.ssd_scan_ref(x, dt, A, B, C, D), atol=1e-12)
    g = torch.randn_like(y)
    _, (dx,) = _grads(lambda x: ops.ssd_scan_lrp(x, dt, A, B, C, D), x, g=g)
    _, (dx_r,) = _grads(lambda x: ops.ssd_scan_ref(x, dt, A, B, C, D), x, g=g)
    assert torch.allclose(dx, dx_r, atol=1e-12)


def test_ssd_scan_rule_gradcheck():
    x, dt, A, B, C, D = _ssd_inputs(b=2, T=11, h=2, p=2, g=1, n=3)
    assert torch.autograd.gradcheck(lambda x: ops.ssd_scan_lrp(x, dt, A, B, C, D), (x.clone().requires_grad_(),))


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_ssd_scan_chunks(chunk, factored, monkeypatch):
    from mambalrp.functional import ssd
    from mambalrp.functional.ssd import ssd_scan_fwd_torch, ssd_scan_lrp_bwd_torch

    if not factored:
        monkeypatch.setattr(ssd, "FACTOR_RANGE", -1.0)
    x, dt, A, B, C, D = _ssd_inputs(T=23)
    assert torch.allclose(ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk=chunk), ops.ssd_scan_ref(x, dt, A, B, C, D), atol=1e-12)
    g = torch.randn_like(x)
    _, (dx_r,) = _grads(lambda x: ops.ssd_scan_ref(x, dt, A, B, C, D), x, g=g)
    assert torch.allclose(ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk=chunk), dx_r, atol=1e-12)


@pytest.mark.parametrize("factor_range", [40.0, 0.5, -1.0], ids=["factored", "some-heads-fast", "all-heads-fast"])
@pytest.mark.parametrize("span_elements", [1, 200, 1 << 22], ids=["span-of-1-chunk", "span-of-some-chunks", "one-span"])
def test_ssd_scan_spans_and_fast_heads(factor_range, span_elements, monkeypatch):
    """Spans of chunks carry the state (and its gradient) between them; heads whose chunks decay
    too fast to factor take the segment form, alone or beside factored heads of their group."""
    from mambalrp.functional import ssd
    from mambalrp.functional.ssd import ssd_scan_fwd_torch, ssd_scan_grad, ssd_scan_lrp_bwd_torch

    monkeypatch.setattr(ssd, "FACTOR_RANGE", factor_range)
    monkeypatch.setattr(ssd, "SPAN_ELEMENTS", span_elements)
    x, dt, A, B, C, D = _ssd_inputs(b=2, T=29, h=6, p=3, g=3, n=4, d_per_dim=True)
    dt = dt * torch.linspace(0.05, 2.0, 6, dtype=dt.dtype)  # some heads decay fast, some slowly
    y_r = ops.ssd_scan_ref(x, dt, A, B, C, D)
    g = torch.randn_like(x)
    _, (dx_r,) = _grads(lambda x: ops.ssd_scan_ref(x, dt, A, B, C, D), x, g=g)
    torch.testing.assert_close(ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk=4), y_r, rtol=0, atol=1e-12)
    torch.testing.assert_close(ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk=4), dx_r, rtol=0, atol=1e-12)
    y, grads = _grads(lambda *a: ssd_scan_grad(*a, chunk=4), x, dt, A, B, C, D, g=g)
    _, grads_r = _grads(lambda *a: ops.ssd_scan_ref(*a, detach=False), x, dt, A, B, C, D, g=g)
    torch.testing.assert_close(y, y_r, rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_ssd_scan_true_gradient_mode():
    x, dt, A, B, C, D = _ssd_inputs(T=19)
    g = torch.randn_like(x)
    y, grads = _grads(lambda *a: ssd_scan_grad(*a, chunk=8), x, dt, A, B, C, D, g=g)
    y_r, grads_r = _grads(lambda *a: ops.ssd_scan_ref(*a, detach=False), x, dt, A, B, C, D, g=g)
    assert torch.allclose(y, y_r, atol=1e-12)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, atol=1e-10)


def test_scan_shape_errors():
    x, dt, A, B, C, D = _ssm_inputs(T=5)
    with pytest.raises(ValueError, match="A must be"):
        ops.selective_scan_lrp(x, dt, A.T, B, C, D)
    with pytest.raises(ValueError, match="B must be"):
        ops.selective_scan_lrp(x, dt, A, B[:, :, :3], C, D)
    x, dt, A, B, C, D = _ssd_inputs(T=5)
    with pytest.raises(ValueError, match="heads % groups"):
        ops.ssd_scan_lrp(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C, D)

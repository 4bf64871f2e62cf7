"""Public building blocks for adapters: the LayerNorm rule and depthwise convs with any padding.

* ``layer_norm_lrp`` / ``layer_norm`` / ``layer_norm_lrp_ref`` against
  ``torch.nn.functional.layer_norm`` in forward; the rule's backward against the closed form
  computed by hand; conservation up to what the bias absorbs.
* ``depthwise_conv1d`` with ``"causal"``, ``"same"`` and explicit padding against
  ``torch.nn.functional.conv1d`` / ``nn.Conv1d``; its gradient is exact LRP-0; the epsilon and
  gamma rules accept the padding.
* ``nn.LayerNorm`` modules are matched by the ``layernorm`` adapter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mambalrp
from mambalrp import functional as ops

f64 = torch.float64


def _grads(fn, *inputs, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out.detach(), grads


# LayerNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_layer_norm_forward_equals_torch(affine):
    x = torch.randn(3, 5, 8) * 3 + 1
    w = torch.randn(8) if affine != "none" else None
    b = torch.randn(8) if affine == "weight_bias" else None
    expected = F.layer_norm(x, (8,), w, b, 1e-5)
    for fn in (ops.layer_norm_lrp, ops.layer_norm, ops.layer_norm_lrp_ref):
        torch.testing.assert_close(fn(x, w, b, 1e-5), expected, rtol=1e-6, atol=1e-6)


def test_layer_norm_rule_by_hand_and_conservation():
    d, eps = 6, 1e-5
    x, w, b = torch.randn(2, 4, d, dtype=f64) + 0.5, torch.randn(d, dtype=f64), torch.randn(d, dtype=f64)
    g = torch.randn(2, 4, d, dtype=f64)
    y, (dx,) = _grads(lambda x: ops.layer_norm_lrp(x, w, b, eps), x, g=g)
    # By hand: 1/std constant, the centring x - mean(x) = (I - 11^T / d) x is linear.
    centre = torch.eye(d, dtype=f64) - torch.full((d, d), 1.0 / d, dtype=f64)
    std = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    by_hand = (g * w / std) @ centre.T
    torch.testing.assert_close(dx, by_hand)
    _, (dx_ref,) = _grads(lambda x: ops.layer_norm_lrp_ref(x, w, b, eps), x, g=g)
    torch.testing.assert_close(dx, dx_ref)
    # Conservation: the input receives the output's relevance less the bias's share.
    torch.testing.assert_close((x * dx).sum(-1), ((y - b) * g).sum(-1))
    # The true gradient has the same forward and does not conserve.
    y2, (dx2,) = _grads(lambda x: ops.layer_norm(x, w, b, eps), x, g=g)
    assert torch.equal(y2, y) and not torch.allclose((x * dx2).sum(-1), ((y - b) * g).sum(-1))


def test_layer_norm_half_precision_and_ruleset_switch():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w, b = torch.randn(8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    out = mambalrp.MAMBALRP.layer_norm(x.requires_grad_(), w, b, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.layer_norm(x.detach(), (8,), w, b, 1e-5), rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    plain = mambalrp.GRADIENT.layer_norm(x.detach().double().requires_grad_(), w.double(), b.double(), 1e-5)
    assert plain.grad_fn is not None and "LayerNormLRP" not in type(plain.grad_fn).__name__


def test_nn_layernorm_modules_are_matched():
    from mambalrp.adapters import LayerNormAdapter, find_adapter

    assert isinstance(find_adapter(nn.LayerNorm(8)), LayerNormAdapter)
    assert isinstance(find_adapter(nn.LayerNorm(8, elementwise_affine=False)), LayerNormAdapter)
    assert find_adapter(nn.LayerNorm((4, 8))) is None  # over two dimensions: refused


# Depthwise conv ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel", [3, 4])
def test_depthwise_conv_paddings_equal_torch(kernel):
    b, d, T = 2, 5, 9
    x, w, bias = torch.randn(b, d, T), torch.randn(d, 1, kernel), torch.randn(d)
    same = nn.Conv1d(d, d, kernel, groups=d, padding="same")
    causal = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)
    with torch.no_grad():
        for conv in (same, causal):
            conv.weight.copy_(w)
            conv.bias.copy_(bias)
        torch.testing.assert_close(ops.depthwise_conv1d(x, w, bias, "same"), same(x))
        torch.testing.assert_close(ops.depthwise_conv1d(x, w, bias, "causal"), causal(x)[..., :T])
        torch.testing.assert_close(ops.depthwise_conv1d(x, w.squeeze(1), bias), ops.causal_conv1d(x, w, bias))
        # Explicit (left, right): the anti-causal conv sees t .. t + k - 1.
        anti = ops.depthwise_conv1d(x, w, None, (0, kernel - 1))
        torch.testing.assert_close(anti, F.conv1d(F.pad(x, (0, kernel - 1)), w, groups=d))
        assert ops.depthwise_conv1d(x, w, None, (1, 0)).shape[-1] == T + 1 - (kernel - 1)
    assert ops.conv_padding("same", 4) == (1, 2) and ops.conv_padding("causal", 4) == (3, 0)
    for bad in ("valid", (1,), (-1, 2), (1.0, 2)):
        with pytest.raises(ValueError, match="padding must be"):
            ops.conv_padding(bad, kernel)


@pytest.mark.parametrize("time_major", [False, True], ids=["channel-major", "time-major"])
@pytest.mark.parametrize("padding", ["causal", "same", (0, 3), (2, 5), (3, 3)])
def test_depthwise_conv_matches_torch_in_every_gradient_and_keeps_the_layout(padding, time_major):
    """The shifted multiply-adds equal torch's conv in value and in the gradients of the input,
    the weight and the bias; a time-major input (a transposed view, as the mixers pass it) gives
    a time-major result and input gradient."""
    b, d, T, k = 2, 5, 9, 4
    x = torch.randn(b, T, d, dtype=f64).transpose(1, 2) if time_major else torch.randn(b, d, T, dtype=f64)
    w, bias = torch.randn(d, 1, k, dtype=f64), torch.randn(d, dtype=f64)
    left, right = ops.conv_padding(padding, k)
    args = [t.clone().requires_grad_() for t in (x, w, bias)]
    ref_args = [t.clone().requires_grad_() for t in (x, w, bias)]
    out = ops.depthwise_conv1d(*args, padding)
    ref = F.conv1d(F.pad(ref_args[0], (left, right)), ref_args[1], ref_args[2], groups=d)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, args, g, retain_graph=True), torch.autograd.grad(ref, ref_args, g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if time_major:
        assert out.transpose(1, 2).is_contiguous()
        assert torch.autograd.grad(out, args[0], g.transpose(1, 2).contiguous().transpose(1, 2))[0].transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="does not fit"):
        ops.depthwise_conv1d(x[..., :1], w, None, (0, 0))


@pytest.mark.parametrize("padding", ["same", (2, 1)])
def test_depthwise_conv_gradient_is_exact_lrp0_and_rules_accept_padding(padding):
    d, k = 4, 4
    x, w = torch.randn(2, d, 7, dtype=f64), torch.randn(d, 1, k, dtype=f64)
    g = torch.randn_like(ops.depthwise_conv1d(x, w, None, padding))
    y, (dx,) = _grads(lambda x: mambalrp.MAMBALRP.conv1d(x, w, None, padding), x, g=g)
    torch.testing.assert_close((x * dx).sum(), (y * g).sum())  # linear, no bias: conserving
    # The epsilon and gamma rules use the same padding in forward and backward.
    for rule_fn, ref_fn, p in ((ops.epsilon_linear, ops.epsilon_linear_ref, 1e-3), (ops.gamma_linear, ops.gamma_linear_ref, 0.25)):
        out, (dx_rule,) = _grads(lambda x: rule_fn(x, w, None, p, "conv", padding), x, g=g)
        torch.testing.assert_close(out, y)
        _, (dx_ref,) = _grads(lambda x: ref_fn(x, w, None, p, "conv", padding), x, g=g)
        torch.testing.assert_close(dx_rule, dx_ref)
    eps_rules = mambalrp.MAMBALRP.with_linear(mambalrp.Epsilon(1e-3))
    torch.testing.assert_close(eps_rules.conv1d(x, w, None, padding), y)


@pytest.mark.parametrize("with_bias", [False, True])
def test_split_linear_equals_the_linear_map_and_multiplies_only_parts_with_a_gradient(with_bias, monkeypatch):
    """The parts are the linear map's output split; the input gradient (and the weight's) equals
    torch's when every part gets a gradient and when some are held constant, and a constant
    part costs no matrix product in the backward."""
    x = torch.randn(2, 5, 6, dtype=f64)
    w = torch.randn(9, 6, dtype=f64)
    bias = torch.randn(9, dtype=f64) if with_bias else None
    sizes = [4, 3, 2]
    for used in ([0, 1, 2], [0, 2], [1]):
        args = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        ref_args = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        parts = ops.split_linear(args[0], args[1], bias, sizes)
        ref_parts = F.linear(ref_args[0], ref_args[1], bias).split(sizes, dim=-1)
        for got, want in zip(parts, ref_parts):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        grads = [torch.randn_like(parts[i]) for i in used]
        got = torch.autograd.grad([parts[i] for i in used], args, grads)
        want = torch.autograd.grad([ref_parts[i] for i in used], ref_args, grads)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    products = []
    monkeypatch.setattr(torch, "mm", lambda *a, **k: products.append(a[1].shape) or torch.matmul(*a, **k))
    z, _, dt = ops.split_linear(x.clone().requires_grad_(), w, None, sizes)
    (z.sum() + 0 * dt.detach().sum()).backward()
    assert products == [(4, 6)]  # only z's rows of the weight
    with pytest.raises(ValueError, match="do not split"):
        ops.split_linear(x, w, None, [4, 4])

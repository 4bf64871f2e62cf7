"""Attention operators (AttnLRP, CP-LRP) and the generic identity rule for activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambalrp.functional import (
    attention,
    identity_rule,
    identity_rule_ref,
    softmax_lrp,
    softmax_lrp_ref,
    uniform_matmul,
    uniform_matmul_ref,
)

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def _grads(fn, inputs, g):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out, tuple(torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads))


def test_uniform_matmul_forward_backward_and_conservation():
    a, b, g = _rand(2, 3, 5, 4), _rand(2, 3, 4, 6), _rand(2, 3, 5, 6)
    out, (da, db) = _grads(uniform_matmul, (a, b), g)
    assert torch.equal(out, a @ b)
    _, (ra, rb) = _grads(uniform_matmul_ref, (a, b), g)
    torch.testing.assert_close(da, ra)
    torch.testing.assert_close(db, rb)
    # Each factor gets exactly half of the output relevance.
    torch.testing.assert_close((a * da).sum(), 0.5 * (out * g).sum())
    torch.testing.assert_close((b * db).sum(), 0.5 * (out * g).sum())


def test_softmax_rule_is_the_linearised_softmax():
    """R_s = s * (R_p - p * sum R_p) with R_p = p * g: the AttnLRP softmax rule."""
    s, g = _rand(3, 7), _rand(3, 7)
    p, (ds,) = _grads(softmax_lrp, (s,), g)
    torch.testing.assert_close(p, torch.softmax(s, -1))
    r_p = p * g
    torch.testing.assert_close(s * ds, s * (r_p - p * r_p.sum(-1, keepdim=True)))
    _, (ref,) = _grads(softmax_lrp_ref, (s,), g)
    torch.testing.assert_close(ds, ref)
    # The dropped constant term: the rule does not conserve in general.
    assert ((s * ds).sum() - r_p.sum()).abs() > 1e-3


def test_softmax_rule_masks():
    s, g = _rand(1, 2, 4, 4), _rand(1, 2, 4, 4)
    bool_mask = torch.ones(4, 4, dtype=torch.bool).tril()
    p, (ds,) = _grads(lambda t: softmax_lrp(t, bool_mask), (s,), g)
    assert torch.all(p[..., ~bool_mask] == 0) and torch.all(ds[..., ~bool_mask] == 0)
    additive = torch.zeros(4, 4, dtype=torch.float64).masked_fill(~bool_mask, torch.finfo(torch.float64).min)
    p2, (ds2,) = _grads(lambda t: softmax_lrp(t, additive), (s,), g)
    torch.testing.assert_close(p2, p)
    torch.testing.assert_close(ds2, ds)


def _attn_inputs():
    return _rand(2, 4, 5, 8), _rand(2, 2, 5, 8), _rand(2, 2, 5, 8), _rand(2, 4, 5, 8)


@pytest.mark.parametrize("rule", ["attnlrp", "cp", "gradient"])
def test_attention_forward_matches_sdpa(rule):
    q, k, v, _ = _attn_inputs()
    out, _ = attention(q, k, v, None, 8**-0.5, is_causal=True, rule=rule)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref)


def test_cp_rule_conserves_through_values_only():
    q, k, v, g = _attn_inputs()
    out, (dq, dk, dv) = _grads(lambda *t: attention(*t, None, 0.3, is_causal=True, rule="cp"), (q, k, v), g)
    assert dq.abs().max() == 0 and dk.abs().max() == 0
    torch.testing.assert_close((v * dv).sum(), (out * g).sum())


def test_attnlrp_relevance_budget():
    """Half the output relevance reaches the values; the other half enters the softmax, whose rule
    hands s * ds on to q and k (uniform rule: half each)."""
    q, k, v, g = _attn_inputs()
    scale = 0.3
    out, (dq, dk, dv) = _grads(lambda *t: attention(*t, None, scale, is_causal=True, rule="attnlrp"), (q, k, v), g)
    torch.testing.assert_close((v * dv).sum(), 0.5 * (out * g).sum())
    # Reconstruct the softmax input relevance and check q and k share it equally.
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * scale
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    g_p = 0.5 * g @ v.repeat_interleave(2, 1).transpose(-1, -2)
    ds = p * (g_p - (p * g_p).sum(-1, keepdim=True))
    r_s = (s * ds).sum()
    torch.testing.assert_close((q * dq).sum(), 0.5 * r_s)
    torch.testing.assert_close((k * dk).sum(), 0.5 * r_s)


@pytest.mark.parametrize("fn", [F.silu, F.gelu, F.relu, lambda t: F.relu(t) ** 2])
def test_identity_rule_passes_relevance_unchanged(fn):
    x, g = _rand(4, 9), _rand(4, 9)
    x[0, 0] = 0.0
    y, (dx,) = _grads(lambda t: identity_rule(t, fn), (x,), g)
    assert torch.equal(y, fn(x))
    torch.testing.assert_close(x * dx, y * g)
    assert dx[0, 0] == 0
    _, (ref,) = _grads(lambda t: identity_rule_ref(t, fn), (x[1:],), g[1:])
    torch.testing.assert_close(dx[1:], ref)

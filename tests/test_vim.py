"""Bidirectional (Vision Mamba style) blocks on a tiny patch classifier built here.

The mixer below uses Vim's attribute names (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``,
``D_b``, ``if_devide_out``) and a plain, loop-based reference forward; mambalrp matches it by
structure. Relevance is read at the patch embedding with ``explain(..., input_layer=...)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mambalrp
from tests_support import assert_same_state_simple, loop_selective_scan

D_MODEL, D_INNER, D_STATE, RANK, KERNEL = 16, 32, 4, 2, 4


class BiMixer(nn.Module):
    def __init__(self, divide: bool = True):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = D_INNER, D_STATE, RANK
        self.bimamba_type, self.if_devide_out, self.activation = "v2", divide, "silu"
        self.in_proj = nn.Linear(D_MODEL, 2 * D_INNER, bias=False)
        self.out_proj = nn.Linear(D_INNER, D_MODEL, bias=False)
        for s in ("", "_b"):
            setattr(self, "conv1d" + s, nn.Conv1d(D_INNER, D_INNER, KERNEL, groups=D_INNER, padding=KERNEL - 1))
            setattr(self, "x_proj" + s, nn.Linear(D_INNER, RANK + 2 * D_STATE, bias=False))
            setattr(self, "dt_proj" + s, nn.Linear(RANK, D_INNER))
            a = "A_log" if s == "" else "A_b_log"
            setattr(self, a, nn.Parameter(torch.rand(D_INNER, D_STATE) * 2 - 1))
            setattr(self, "D" + s, nn.Parameter(torch.randn(D_INNER)))

    def _branch(self, xz, conv, x_proj, dt_proj, A_log, D):
        T = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :T])
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [RANK, D_STATE, D_STATE], dim=-1)
        dt = F.softplus(dt_proj(dt)).transpose(1, 2)
        y = loop_selective_scan(x, dt, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D)
        return y * F.silu(z)

    def forward(self, hidden_states, inference_params=None):
        xz = self.in_proj(hidden_states).transpose(1, 2)
        out = self._branch(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        out_b = self._branch(xz.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        y = out + out_b.flip(-1)
        if self.if_devide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int = 4, channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(channels, D_MODEL, patch, stride=patch)

    def forward(self, pixels):
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (b, patches, d)


class Block(nn.Module):
    def __init__(self, divide: bool):
        super().__init__()
        self.norm = nn.RMSNorm(D_MODEL, eps=1e-5)
        self.mixer = BiMixer(divide)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class VimTokens(nn.Module):
    """Patch embedding, a class token inserted in the middle, and a position embedding."""

    def __init__(self, patches: int = 16):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, D_MODEL))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, patches + 1, D_MODEL))

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        mid = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1) + self.pos_embed


class TinyVim(nn.Module):
    """Vim-style classifier: tokens, bidirectional blocks, final norm, head on the class token."""

    def __init__(self, classes: int = 5, layers: int = 2, divide: bool = True):
        super().__init__()
        self.tokens = VimTokens()
        self.layers = nn.ModuleList(Block(divide) for _ in range(layers))
        self.norm_f = nn.RMSNorm(D_MODEL, eps=1e-5)
        self.head = nn.Linear(D_MODEL, classes)

    def forward(self, pixels):
        x = self.tokens(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm_f(x)[:, x.shape[1] // 2])


def make(seed=0, zero_biases=False, divide=True):
    torch.manual_seed(seed)
    model = TinyVim(divide=divide).eval()
    if zero_biases:  # biases after the input layer; dt biases only shape the step size
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") and "dt_proj" not in name and not name.startswith("tokens."):
                    p.zero_()
    return model


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("divide", [True, False])
def test_forward_unchanged_and_restored(divide):
    model = make(divide=divide)
    before = assert_same_state_simple(model)
    with torch.no_grad():
        ref = model(PIXELS)
        with mambalrp.lrp(model):
            patched = model(PIXELS)
        after = model(PIXELS)
    assert (patched - ref).abs().max().item() <= 1e-5
    assert torch.equal(after, ref)
    before.check()


@pytest.mark.parametrize("divide", [True, False])
def test_conservation_at_patch_embedding(divide):
    model = make(zero_biases=True, divide=divide)
    before = assert_same_state_simple(model)
    exp = mambalrp.explain(model, PIXELS, input_layer=model.tokens)
    before.check()
    assert exp.relevance.shape == (2, 17)  # one relevance per patch, and the class token at 8
    assert exp.position is None
    rel = (exp.conservation_delta.abs() / exp.logit.abs()).max().item()
    assert rel <= 1e-4, rel
    with torch.no_grad():
        torch.testing.assert_close(exp.logit, model(PIXELS).max(-1).values)
    # Gradient x Input does not conserve on the same model.
    gi = mambalrp.explain(model, PIXELS, input_layer=model.tokens, rules="gradient")
    assert (gi.conservation_delta.abs() / gi.logit.abs()).max().item() > 100 * max(rel, 1e-7)


def test_both_directions_carry_relevance():
    """Patches after the class token reach it only through the reverse scan, those before only
    through the forward scan."""
    model = make(zero_biases=True)
    exp = mambalrp.explain(model, PIXELS, input_layer=model.tokens)
    total = exp.relevance.abs().sum()
    assert exp.relevance[:, 9:].abs().sum() > 1e-2 * total
    assert exp.relevance[:, :8].abs().sum() > 1e-2 * total


def test_check_rules_clean():
    model = make(zero_biases=True)
    report = mambalrp.check_rules(model, PIXELS, input_layer=model.tokens)
    assert report.ok, str(report)
    assert [b.name for b in report.blocks] == ["layers.0", "layers.1"]


def test_relevance_at_the_patch_embedding():
    """Read at the patches alone, the class token and position embedding absorb relevance like biases."""
    model = make(zero_biases=True)
    at_tokens = mambalrp.explain(model, PIXELS, input_layer=model.tokens)
    at_patches = mambalrp.explain(model, PIXELS, input_layer=model.tokens.patch_embed)
    assert at_patches.relevance.shape == (2, 16)
    assert at_patches.conservation_delta.abs().max() > 1e-4
    # The patches' share is the same, the tokens' own relevance minus cls and position terms.
    torch.testing.assert_close(at_patches.logit, at_tokens.logit)


def test_input_layer_errors():
    model = make()
    with pytest.raises(mambalrp.InputError, match="submodule"):
        mambalrp.explain(model, PIXELS, input_layer=nn.Linear(2, 2))
    with pytest.raises(mambalrp.InputError, match="attention_mask"):
        mambalrp.explain(model, PIXELS, input_layer=model.tokens, attention_mask=torch.ones(2, 17))

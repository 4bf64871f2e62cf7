"""Tiny random models for tests, examples and the demo (requires ``transformers``)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mamba(
    seed: int = 0,
    *,
    vocab_size: int = 64,
    hidden_size: int = 16,
    state_size: int = 4,
    num_hidden_layers: int = 2,
    expand: int = 2,
    falcon: bool = False,
    zero_biases: bool = False,
    **config: object,
) -> nn.Module:
    """A random ``MambaForCausalLM`` (or ``FalconMambaForCausalLM``) in eval mode.

    Weights are drawn at a larger scale than HF's initialisation so that every layer matters.
    """
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

    cfg_cls, model_cls = (FalconMambaConfig, FalconMambaForCausalLM) if falcon else (MambaConfig, MambaForCausalLM)
    if falcon:
        # FalconMamba normalises dt over time_step_rank channels: a rank of 1 would make that
        # norm a sign function, whose output flips on rounding noise.
        config.setdefault("time_step_rank", 4)
    cfg = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        state_size=state_size,
        num_hidden_layers=num_hidden_layers,
        expand=expand,
        conv_kernel=4,
        **config,
    )
    return randomise(model_cls(cfg), seed, zero_biases)


def tiny_mamba2(
    seed: int = 0,
    *,
    vocab_size: int = 64,
    hidden_size: int = 32,
    state_size: int = 8,
    num_hidden_layers: int = 2,
    head_dim: int = 8,
    n_groups: int = 2,
    chunk_size: int = 8,
    zero_biases: bool = False,
    **config: object,
) -> nn.Module:
    """A random ``Mamba2ForCausalLM`` in eval mode (expand 2, ``2 * hidden / head_dim`` heads)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = Mamba2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        state_size=state_size,
        num_hidden_layers=num_hidden_layers,
        expand=2,
        head_dim=head_dim,
        num_heads=2 * hidden_size // head_dim,
        n_groups=n_groups,
        chunk_size=chunk_size,
        conv_kernel=4,
        **config,
    )
    return randomise(Mamba2ForCausalLM(cfg), seed, zero_biases)


def randomise(model: nn.Module, seed: int = 0, zero_biases: bool = False) -> nn.Module:
    """Give ``model`` random weights large enough that every layer matters; return it in eval mode.

    ``A_log`` uniform in [-1, 1], norm weights near 1, ``dt`` biases in [-3, -1], other biases
    small (or zero with ``zero_biases``), matrices scaled by ``1 / sqrt(fan_in)``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2.0 - 1.0)
            elif name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2.0 - 3.0)
            elif name.endswith("bias"):
                p.copy_(0.0 if zero_biases else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / max(1.0, fan_in**0.5))
    return model.eval()


def zero_biases(model: nn.Module) -> nn.Module:
    """Zero every bias that lies on the relevance path (all biases except ``dt`` biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.endswith(("dt_bias", "dt_proj.bias")):
                p.zero_()
    return model

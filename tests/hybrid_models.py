"""Tiny random transformers hybrids (Mamba layers mixed with attention, MLPs and MoE; Falcon-H1; Zamba).

Importable from test modules because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import warnings

import torch
import transformers as T
from packaging.version import Version

from mambalrp.testing import randomise


def jamba() -> T.PreTrainedModel:
    """Mamba-1 (with dt/B/C norms), attention without rotary, gated MLP and MoE layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.JambaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
            expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=4,
            mamba_expand=2, mamba_dt_rank=4,
            use_mamba_kernels=False,  # transformers 4.x raises on a CPU with the default True
        )
    return T.JambaForCausalLM(cfg)


def bamba() -> T.PreTrainedModel:
    """Mamba-2 layers and one rotary attention layer, gated MLPs."""
    cfg = T.BambaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
    )
    return T.BambaForCausalLM(cfg)


def nemotron_h() -> T.PreTrainedModel:
    """Mamba-2, attention, squared-ReLU MLP and MoE blocks."""
    cfg = T.NemotronHConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        head_dim=4, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
        layers_block_type=["mamba", "attention", "mlp", "mamba", "moe"], n_routed_experts=4,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, num_experts_per_tok=2, n_group=1,
        topk_group=1,
    )
    return T.NemotronHForCausalLM(cfg)


def zamba2() -> T.PreTrainedModel:
    """Mamba-2 layers and shared attention blocks fed with the embeddings, LoRA adapters, rotary."""
    cfg = T.Zamba2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, mamba_d_state=8, mamba_headdim=8, mamba_ngroups=2, n_mamba_heads=4, chunk_size=8,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], num_mem_blocks=1, adapter_rank=4,
        use_shared_attention_adapter=True, use_mem_rope=True,
    )
    return T.Zamba2ForCausalLM(cfg)


def granitemoehybrid() -> T.PreTrainedModel:
    """Mamba-2 and rotary attention layers, MoE plus shared MLP, Granite's multipliers."""
    cfg = T.GraniteMoeHybridConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, shared_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2,
        mamba_d_state=8, mamba_chunk_size=8, position_embedding_type="rope",
    )
    return T.GraniteMoeHybridForCausalLM(cfg)


def _falcon_h1(**shape: object) -> T.PreTrainedModel:
    """Falcon-H1: Mamba-2 and rotary attention in parallel in every layer, muP multipliers
    everywhere (embedding, lm_head, attention in/out, key, SSM in/out, per-segment mup_vector on
    the mixer's in_proj from ``ssm_multipliers``, MLP gate/down)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.FalconH1Config(vocab_size=64, num_hidden_layers=2, mamba_d_conv=4, mamba_chunk_size=8, **shape)
    return T.FalconH1ForCausalLM(cfg)


def falcon_h1_tiny() -> T.PreTrainedModel:
    """The tiny shape: no gated norm in the mixer (``mamba_rms_norm=False``: ``y * silu(z)``),
    attention heads of ``hidden / heads``, the Mamba width ``mamba_expand * hidden``, tied
    embeddings, and every bias switch the published configs leave off switched on
    (``projectors_bias``, ``mamba_proj_bias``, ``attention_bias``, ``mlp_bias``), so the adapters
    are seen to account for them."""
    return _falcon_h1(
        hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=None,
        mamba_expand=2, mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=1, mamba_rms_norm=False,
        mamba_conv_bias=True, mamba_proj_bias=True, projectors_bias=True, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, embedding_multiplier=2.0, lm_head_multiplier=0.125,
    )


def falcon_h1_0_5b() -> T.PreTrainedModel:
    """Falcon-H1-0.5B's shape, widths divided by 64: no gated norm (``mamba_rms_norm=False``),
    attention narrower than the model (``head_dim`` given: 2 heads of 4 in a width of 16, as 8
    heads of 64 in 1024), ``mamba_d_ssm`` = 1.5 x hidden (1536 for 1024) in heads of 8, one
    group, chunked scan, ``mamba_use_mlp`` (a published flag transformers ignores), and the
    published muP multipliers."""
    return _falcon_h1(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        mamba_d_ssm=24, mamba_n_heads=3, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_rms_norm=False,
        mamba_norm_before_gate=False, mamba_conv_bias=True, mamba_proj_bias=False, projectors_bias=False,
        mamba_use_mlp=True, embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625,
        attention_in_multiplier=1.0, attention_out_multiplier=0.9375, key_multiplier=0.390625,
        ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587,
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        mlp_multipliers=[0.8838834764831844, 0.5859375],
    )


def falcon_h1_7b() -> T.PreTrainedModel:
    """Falcon-H1-7B's shape, scaled down: the mixer's gated RMSNorm (``mamba_rms_norm=True``,
    ``mamba_norm_before_gate=False``) over ``mamba_n_groups=2`` groups (B and C in 2 groups too),
    attention narrower than the model (``head_dim`` given), ``mamba_d_ssm`` = 2 x hidden, chunked
    scan, ``mamba_use_mlp``, and muP multipliers on every path."""
    return _falcon_h1(
        hidden_size=16, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2, mamba_rms_norm=True,
        mamba_norm_before_gate=False, mamba_conv_bias=True, mamba_proj_bias=False, projectors_bias=False,
        mamba_use_mlp=True, embedding_multiplier=5.6, lm_head_multiplier=0.04, attention_in_multiplier=0.8,
        attention_out_multiplier=0.9, key_multiplier=0.4, ssm_in_multiplier=1.25, ssm_out_multiplier=0.24,
        ssm_multipliers=[0.35, 0.25, 0.7, 0.5, 0.35], mlp_multipliers=[0.9, 0.6],
    )


def zamba() -> T.PreTrainedModel:
    """Zamba v1: multi-head Mamba-1 mixers (3-D ``A_log``, per-head ``x_proj_weight`` and
    ``dt_proj_weight``, interleaved ``in_proj``), shared attention blocks fed with the
    concatenation of the hidden state and the embeddings, GELU gated MLP."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.ZambaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, n_mamba_heads=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], hidden_act="gelu",
        )
    return T.ZambaForCausalLM(cfg)


_CONFIGS = {
    jamba: "JambaConfig", bamba: "BambaConfig", nemotron_h: "NemotronHConfig", zamba2: "Zamba2Config",
    granitemoehybrid: "GraniteMoeHybridConfig", falcon_h1_tiny: "FalconH1Config", falcon_h1_0_5b: "FalconH1Config",
    falcon_h1_7b: "FalconH1Config", zamba: "ZambaConfig",
}
# The families this transformers release has (NemotronH arrived in 5.x, Falcon-H1 after 4.52).
HYBRIDS = {f.__name__: f for f, config in _CONFIGS.items() if hasattr(T, config)}


def own_forward_is_wrong(family: str) -> bool:
    """Whether this transformers release's own CPU forward of ``family`` computes something else
    than the architecture (mambalrp's verification then refuses to explain it).

    Zamba2 and NemotronH before 5.17: the torch path of their Mamba-2 mixer sums the recurrence
    between chunks over the wrong chunk axis, so every token past the first ``chunk_size`` (8 in
    these tiny models) is wrong; fixed in transformers 5.17 (on a GPU, mamba_ssm's kernels compute
    it right). Verification probes at least 32 tokens, so the models are refused whatever the
    input's length.
    """
    return family in ("zamba2", "nemotron_h") and Version(T.__version__) < Version("5.17")


def make(family: str, seed: int = 0, zero_biases: bool = False) -> torch.nn.Module:
    """A randomised tiny model of ``family`` in eval mode (weights large enough that every layer matters)."""
    return randomise(HYBRIDS[family](), seed, zero_biases)

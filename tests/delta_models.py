"""Tiny random transformers models with gated delta rules (Qwen3-Next, Qwen3.5, OLMo-hybrid) and
LFM2's gated short convolution.

Importable from test modules because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import warnings

import torch
import transformers as T

from mambalrp.testing import randomise


def qwen3_next() -> T.PreTrainedModel:
    """Gated DeltaNet (2 value heads per key head), gated attention with partial rotary, MoE with a
    gated shared expert and a dense MLP layer, zero-centred RMSNorms."""
    cfg = T.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[2],
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    return T.Qwen3NextForCausalLM(cfg)


def qwen3_5() -> T.PreTrainedModel:
    """Qwen3.5's text model: Gated DeltaNet with separate projections, gated attention, dense MLPs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.Qwen3_5TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "linear_attention", "full_attention"],
        )
    return T.Qwen3_5ForCausalLM(cfg)


def olmo_hybrid() -> T.PreTrainedModel:
    """OLMo-hybrid: Gated DeltaNet with a separate gate projection and negative eigenvalues
    allowed (beta in [0, 2]), attention with whole-width q/k norms, post-norm blocks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.OlmoHybridConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=4, linear_allow_neg_eigval=True, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        )
    return T.OlmoHybridForCausalLM(cfg)


_CONFIGS = {qwen3_next: "Qwen3NextConfig", qwen3_5: "Qwen3_5TextConfig", olmo_hybrid: "OlmoHybridConfig"}
DELTA_MODELS = {f.__name__: f for f, config in _CONFIGS.items() if hasattr(T, config)}


def make(family: str, seed: int = 0, zero_biases: bool = False) -> torch.nn.Module:
    """A randomised tiny model of ``family`` in eval mode. Zero-centred norm weights are drawn
    near 0 (their scale is ``1 + weight``)."""
    model = randomise(DELTA_MODELS[family](), seed, zero_biases)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ in ("Qwen3NextRMSNorm", "Qwen3_5RMSNorm"):
                module.weight.copy_(0.2 * torch.randn(module.weight.shape, generator=gen))
    return model


def lfm2() -> T.PreTrainedModel:
    """LFM2: gated short convolutions (with biases) and attention with q/k layernorms, SwiGLU MLPs."""
    cfg = T.Lfm2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, conv_L_cache=3, conv_bias=True, block_auto_adjust_ff_dim=False,
        layer_types=["conv", "full_attention", "conv"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return T.Lfm2ForCausalLM(cfg)


_CONFIGS[lfm2] = "Lfm2Config"
DELTA_MODELS = {f.__name__: f for f, config in _CONFIGS.items() if hasattr(T, config)}


def kimi_linear() -> T.PreTrainedModel:
    """Kimi Linear: KDA (per-channel decays, sigmoid-gated output norm), multi-head latent
    attention without rotary, a dense MLP then MoE layers with a shared expert."""
    cfg = T.KimiLinearConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, num_local_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mlp_layer_types=["dense", "sparse", "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return T.KimiLinearForCausalLM(cfg)


_CONFIGS[kimi_linear] = "KimiLinearConfig"
DELTA_MODELS = {f.__name__: f for f, config in _CONFIGS.items() if hasattr(T, config)}

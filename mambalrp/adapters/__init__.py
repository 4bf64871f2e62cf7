"""Model support: adapters matched by structure, registered in one registry.

Built-in adapters, registered at import:
    * :class:`~mambalrp.adapters.hf_mamba.HFMambaMixerAdapter`: transformers Mamba-1 mixers.
    * :class:`~mambalrp.adapters.hf_mamba2.HFMamba2MixerAdapter`: transformers Mamba-2 mixers.
    * :class:`~mambalrp.adapters.mamba_ssm_mamba1.MambaSSMMixerAdapter`: mamba_ssm Mamba-1 mixers.
    * :class:`~mambalrp.adapters.mamba_ssm_mamba2.MambaSSMMamba2Adapter`: mamba_ssm Mamba-2 mixers,
      and the layers around them in ``mamba_ssm_model`` (Block, MixerModel, GatedMLP, MHA).
    * :class:`~mambalrp.adapters.mamba_ssm_mamba3.MambaSSMMamba3Adapter`: mamba_ssm Mamba-3 mixers
      (SISO and MIMO).
    * :class:`~mambalrp.adapters.vim.VimBiMambaAdapter`: Vision Mamba bidirectional mixers.
    * :class:`~mambalrp.adapters.zamba.ZambaMambaMixerAdapter`: Zamba (v1) multi-head Mamba-1 mixers.
    * :class:`~mambalrp.adapters.hf_attention.HFAttentionAdapter`: attention layers of hybrids;
      :class:`~mambalrp.adapters.inline_attention.InlineAttentionAdapter`: attention computed
      inline (Jamba on transformers 4.x).
    * :class:`~mambalrp.adapters.mlp.GatedMLPAdapter`, :class:`~mambalrp.adapters.mlp.FusedGatedMLPAdapter`:
      gated MLPs; :class:`~mambalrp.adapters.moe.ExpertsAdapter`: mixture-of-experts banks;
      :class:`~mambalrp.adapters.moe_router.RouterExpertListAdapter`,
      :class:`~mambalrp.adapters.moe_parallel.ParallelExpertsAdapter`: the MoE blocks of Jamba and
      GraniteMoeHybrid in older transformers releases;
      :class:`~mambalrp.adapters.activations.ActivationAdapter`: activations outside mixers.
    * :class:`~mambalrp.adapters.norms.RMSNormAdapter`: RMSNorms;
      :class:`~mambalrp.adapters.norms.LayerNormAdapter`: ``torch.nn.LayerNorm``;
      :class:`~mambalrp.adapters.zero_centred_norm.ZeroCentredRMSNormAdapter`: ``(1 + weight)`` RMSNorms.
    * :class:`~mambalrp.adapters.gated_deltanet.GatedDeltaNetAdapter`: Gated DeltaNet mixers (Qwen3-Next,
      Qwen3.5, OLMo-hybrid); :class:`~mambalrp.adapters.gated_attention.GatedAttentionAdapter`: attention
      with a sigmoid output gate; :class:`~mambalrp.adapters.moe_shared_gate.SharedGateMoEAdapter`: MoE
      blocks with a gated shared expert.
    * :class:`~mambalrp.adapters.short_conv.ShortConvAdapter`: LFM2's gated short convolution, with
      :class:`~mambalrp.adapters.swiglu_mlp.SwiGLUMLPAdapter` and
      :class:`~mambalrp.adapters.hf_attention_out_proj.HFAttentionOutProjAdapter` around it.
    * :class:`~mambalrp.adapters.kda.KimiDeltaAttentionAdapter`: Kimi Linear's KDA mixers, with
      :class:`~mambalrp.adapters.hf_attention_latent.LatentAttentionAdapter` for its MLA layers.
    * :class:`~mambalrp.adapters.norms.LinearAdapter`: ``nn.Linear`` (epsilon / gamma rules only).

See ``docs/adapters.md`` for writing and registering a new one.
"""

from mambalrp.adapters.activations import ActivationAdapter
from mambalrp.adapters.base import (
    Adapter,
    activation_problem,
    conv_problem,
    direction_problem,
    first_problem,
    has_attrs,
    mask_padding,
)
from mambalrp.adapters.gated_attention import GatedAttentionAdapter
from mambalrp.adapters.gated_deltanet import GatedDeltaNetAdapter
from mambalrp.adapters.hf_attention import HFAttentionAdapter
from mambalrp.adapters.hf_attention_latent import LatentAttentionAdapter
from mambalrp.adapters.hf_attention_out_proj import HFAttentionOutProjAdapter
from mambalrp.adapters.hf_mamba import HFMambaMixerAdapter
from mambalrp.adapters.hf_mamba2 import HFMamba2MixerAdapter
from mambalrp.adapters.mamba_ssm_mamba1 import MambaSSMMixerAdapter
from mambalrp.adapters.mamba_ssm_mamba2 import MambaSSMMamba2Adapter
from mambalrp.adapters.mamba_ssm_mamba3 import MambaSSMMamba3Adapter
from mambalrp.adapters.mamba_ssm_model import (
    MambaSSMAttentionAdapter,
    MambaSSMBackboneAdapter,
    MambaSSMBlockAdapter,
    MambaSSMGatedMLPAdapter,
)
from mambalrp.adapters.mlp import FusedGatedMLPAdapter, GatedMLPAdapter
from mambalrp.adapters.inline_attention import InlineAttentionAdapter
from mambalrp.adapters.kda import KimiDeltaAttentionAdapter
from mambalrp.adapters.moe import ExpertsAdapter
from mambalrp.adapters.moe_parallel import ParallelExpertsAdapter
from mambalrp.adapters.moe_router import RouterExpertListAdapter
from mambalrp.adapters.moe_shared_gate import SharedGateMoEAdapter
from mambalrp.adapters.short_conv import ShortConvAdapter
from mambalrp.adapters.swiglu_mlp import SwiGLUMLPAdapter
from mambalrp.adapters.vim import VimBiMambaAdapter
from mambalrp.adapters.zamba import ZambaMambaMixerAdapter
from mambalrp.adapters.zero_centred_norm import ZeroCentredRMSNormAdapter
from mambalrp.adapters.norms import LayerNormAdapter, LinearAdapter, RMSNormAdapter
from mambalrp.adapters.registry import (
    find_adapter,
    match_adapter,
    register_adapter,
    registered_adapters,
    supported_families,
    unregister_adapter,
)

_BUILTIN = (
    LinearAdapter(),
    ActivationAdapter(),
    RMSNormAdapter(),
    LayerNormAdapter(),
    GatedMLPAdapter(),
    FusedGatedMLPAdapter(),
    ExpertsAdapter(),
    RouterExpertListAdapter(),
    ParallelExpertsAdapter(),
    HFAttentionAdapter(),
    InlineAttentionAdapter(),
    HFMambaMixerAdapter(),
    HFMamba2MixerAdapter(),
    MambaSSMMixerAdapter(),
    MambaSSMMamba2Adapter(),
    MambaSSMMamba3Adapter(),
    MambaSSMBlockAdapter(),
    MambaSSMBackboneAdapter(),
    MambaSSMGatedMLPAdapter(),
    MambaSSMAttentionAdapter(),
    VimBiMambaAdapter(),
    ZambaMambaMixerAdapter(),
    # Gated delta rules and the layers around them (tried before the general ones above).
    ZeroCentredRMSNormAdapter(),
    SharedGateMoEAdapter(),
    GatedAttentionAdapter(),
    GatedDeltaNetAdapter(),
    # LFM2: gated short convolution, w1/w3/w2 MLP, attention with out_proj.
    SwiGLUMLPAdapter(),
    HFAttentionOutProjAdapter(),
    ShortConvAdapter(),
    # Kimi Linear: KDA (per-channel decays) and multi-head latent attention.
    LatentAttentionAdapter(),
    KimiDeltaAttentionAdapter(),
)
for _adapter in _BUILTIN:
    register_adapter(_adapter)

__all__ = [
    "ActivationAdapter",
    "Adapter",
    "ExpertsAdapter",
    "FusedGatedMLPAdapter",
    "GatedAttentionAdapter",
    "GatedDeltaNetAdapter",
    "GatedMLPAdapter",
    "HFAttentionAdapter",
    "HFAttentionOutProjAdapter",
    "HFMamba2MixerAdapter",
    "HFMambaMixerAdapter",
    "InlineAttentionAdapter",
    "LayerNormAdapter",
    "KimiDeltaAttentionAdapter",
    "LatentAttentionAdapter",
    "LinearAdapter",
    "MambaSSMAttentionAdapter",
    "MambaSSMBackboneAdapter",
    "MambaSSMBlockAdapter",
    "MambaSSMGatedMLPAdapter",
    "MambaSSMMamba2Adapter",
    "MambaSSMMamba3Adapter",
    "MambaSSMMixerAdapter",
    "ParallelExpertsAdapter",
    "RMSNormAdapter",
    "RouterExpertListAdapter",
    "SharedGateMoEAdapter",
    "ShortConvAdapter",
    "SwiGLUMLPAdapter",
    "VimBiMambaAdapter",
    "ZambaMambaMixerAdapter",
    "ZeroCentredRMSNormAdapter",
    "activation_problem",
    "conv_problem",
    "direction_problem",
    "find_adapter",
    "first_problem",
    "has_attrs",
    "match_adapter",
    "mask_padding",
    "register_adapter",
    "registered_adapters",
    "supported_families",
    "unregister_adapter",
]

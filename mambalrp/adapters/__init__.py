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
    * :class:`~mambalrp.adapters.hf_attention.HFAttentionAdapter`: attention layers of hybrids;
      :class:`~mambalrp.adapters.inline_attention.InlineAttentionAdapter`: attention computed
      inline (Jamba on transformers 4.x).
    * :class:`~mambalrp.adapters.mlp.GatedMLPAdapter`, :class:`~mambalrp.adapters.mlp.FusedGatedMLPAdapter`:
      gated MLPs; :class:`~mambalrp.adapters.moe.ExpertsAdapter`: mixture-of-experts banks;
      :class:`~mambalrp.adapters.moe_router.RouterExpertListAdapter`,
      :class:`~mambalrp.adapters.moe_parallel.ParallelExpertsAdapter`: the MoE blocks of Jamba and
      GraniteMoeHybrid in older transformers releases;
      :class:`~mambalrp.adapters.activations.ActivationAdapter`: activations outside mixers.
    * :class:`~mambalrp.adapters.norms.RMSNormAdapter`: RMSNorms.
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
from mambalrp.adapters.hf_attention import HFAttentionAdapter
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
from mambalrp.adapters.moe import ExpertsAdapter
from mambalrp.adapters.moe_parallel import ParallelExpertsAdapter
from mambalrp.adapters.moe_router import RouterExpertListAdapter
from mambalrp.adapters.vim import VimBiMambaAdapter
from mambalrp.adapters.norms import LinearAdapter, RMSNormAdapter
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
)
for _adapter in _BUILTIN:
    register_adapter(_adapter)

__all__ = [
    "ActivationAdapter",
    "Adapter",
    "ExpertsAdapter",
    "FusedGatedMLPAdapter",
    "GatedMLPAdapter",
    "HFAttentionAdapter",
    "HFMamba2MixerAdapter",
    "HFMambaMixerAdapter",
    "InlineAttentionAdapter",
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
    "VimBiMambaAdapter",
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

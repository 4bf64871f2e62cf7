"""Model support: adapters matched by structure, registered in one registry.

Built-in adapters, registered at import:
    * :class:`~mambalrp.adapters.hf_mamba.HFMambaMixerAdapter`: transformers Mamba-1 mixers.
    * :class:`~mambalrp.adapters.hf_mamba2.HFMamba2MixerAdapter`: transformers Mamba-2 mixers.
    * :class:`~mambalrp.adapters.norms.RMSNormAdapter`: RMSNorms.
    * :class:`~mambalrp.adapters.norms.LinearAdapter`: ``nn.Linear`` (epsilon / gamma rules only).

See ``docs/adapters.md`` for writing and registering a new one.
"""

from mambalrp.adapters.base import Adapter, has_attrs, mask_padding
from mambalrp.adapters.hf_mamba import HFMambaMixerAdapter
from mambalrp.adapters.hf_mamba2 import HFMamba2MixerAdapter
from mambalrp.adapters.norms import LinearAdapter, RMSNormAdapter
from mambalrp.adapters.registry import (
    find_adapter,
    register_adapter,
    registered_adapters,
    supported_families,
    unregister_adapter,
)

for _adapter in (LinearAdapter(), RMSNormAdapter(), HFMambaMixerAdapter(), HFMamba2MixerAdapter()):
    register_adapter(_adapter)

__all__ = [
    "Adapter",
    "HFMamba2MixerAdapter",
    "HFMambaMixerAdapter",
    "LinearAdapter",
    "RMSNormAdapter",
    "find_adapter",
    "has_attrs",
    "mask_padding",
    "register_adapter",
    "registered_adapters",
    "supported_families",
    "unregister_adapter",
]

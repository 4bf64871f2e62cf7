"""Circuit analysis of Mamba models: hooks, IOI, activation patching, EAP and relevance patching."""

from mambalrp.circuits.hooks import ActivationCache, HookedMamba, HookPoint
from mambalrp.circuits.layouts import TapLayout, conv_slices, register_tap_layout
from mambalrp.circuits.structure import ModelStructure, find_structure, register_structure

__all__ = [
    "ActivationCache",
    "HookPoint",
    "HookedMamba",
    "ModelStructure",
    "TapLayout",
    "conv_slices",
    "find_structure",
    "register_structure",
    "register_tap_layout",
]

"""Circuit analysis of Mamba models: hooks, IOI, activation patching, EAP and relevance patching.

Modules:
    * :mod:`~mambalrp.circuits.hooks`: :class:`HookedMamba` (TransformerLens-style hook points).
    * :mod:`~mambalrp.circuits.structure` / :mod:`~mambalrp.circuits.layouts`: how a model family
      plugs in (block structure; adapter taps to hook points).
    * :mod:`~mambalrp.circuits.ioi`: IOI prompts, corruptions and metrics.
    * :mod:`~mambalrp.circuits.patching`: activation patching sweeps, layer ablations, conv slices.
    * :mod:`~mambalrp.circuits.attribution`: node attribution patching (EAP, EAP-IG, RelP).
    * :mod:`~mambalrp.circuits.eap`: edge attribution patching and circuit search.
    * :mod:`~mambalrp.circuits.relp`: relevance patching.

See ``docs/circuits.md``.
"""

from mambalrp.circuits.attribution import METHODS, attribution_patching, coefficients
from mambalrp.circuits.eap import (
    CircuitSearch,
    EdgeAttribution,
    edge_attribution_patching,
    find_circuit,
    graph_edges,
    graph_nodes,
    run_circuit,
)
from mambalrp.circuits.hooks import ActivationCache, HookedMamba, HookPoint
from mambalrp.circuits.ioi import (
    CORRUPTIONS,
    IOIBatch,
    IOIMetric,
    IOIPair,
    IOIPrompt,
    WordTokenizer,
    accuracy,
    generate_pairs,
    logit_diff,
    normalized_logit_diff,
    single_token_names,
    tokenize_pairs,
)
from mambalrp.circuits.layouts import TapLayout, conv_slices, register_tap_layout
from mambalrp.circuits.patching import ablate_layers, conv_slice_patching, patch_sweep
from mambalrp.circuits.relp import RELP_GRADIENT_GATE, edge_relevance_patching, relevance_patching
from mambalrp.circuits.structure import ModelStructure, find_structure, register_structure

__all__ = [
    "CORRUPTIONS",
    "METHODS",
    "RELP_GRADIENT_GATE",
    "ActivationCache",
    "CircuitSearch",
    "EdgeAttribution",
    "HookPoint",
    "HookedMamba",
    "IOIBatch",
    "IOIMetric",
    "IOIPair",
    "IOIPrompt",
    "ModelStructure",
    "TapLayout",
    "WordTokenizer",
    "ablate_layers",
    "accuracy",
    "attribution_patching",
    "coefficients",
    "conv_slice_patching",
    "conv_slices",
    "edge_attribution_patching",
    "edge_relevance_patching",
    "find_circuit",
    "find_structure",
    "generate_pairs",
    "graph_edges",
    "graph_nodes",
    "logit_diff",
    "normalized_logit_diff",
    "patch_sweep",
    "register_structure",
    "register_tap_layout",
    "relevance_patching",
    "run_circuit",
    "single_token_names",
    "tokenize_pairs",
]

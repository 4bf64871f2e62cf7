"""Relevance-propagation operators.

Every operator follows one convention: ``XxxFn`` is a ``torch.autograd.Function`` whose forward
returns exactly the value of the original operation and whose backward implements the LRP rule
in gradient form; ``xxx()`` is the thin wrapper used by adapters; ``xxx_ref()`` is a pure-torch
reference written with ``detach()`` that the tests compare against.

Gradient form means: when an operator maps ``x`` to ``y`` and receives the gradient ``g`` of
``y``, the returned ``dx`` satisfies ``x * dx = R_x`` where ``R_x`` is the relevance that the rule
assigns to ``x`` given the relevance ``y * g`` of the output. Chained operators therefore
propagate relevance when autograd chains their gradients, and ``embedding * grad`` at the input
is the explanation.
"""

from mambalrp.functional.activation import IdentityRuleFn, identity_rule, identity_rule_ref
from mambalrp.functional.attention import (
    SoftmaxLRPFn,
    UniformMatmulFn,
    attention,
    softmax_lrp,
    softmax_lrp_ref,
    uniform_matmul,
    uniform_matmul_ref,
)
from mambalrp.functional.delta_rule import (
    GatedDeltaRuleFn,
    gated_delta_rule,
    gated_delta_rule_lrp,
    gated_delta_rule_ref,
)
from mambalrp.functional.gate import HalfGateFn, half_gate, half_gate_ref
from mambalrp.functional.linear import (
    ConvPadding,
    EpsilonLinearFn,
    GammaLinearFn,
    SplitLinearFn,
    causal_conv1d,
    conv_padding,
    depthwise_conv1d,
    epsilon_linear,
    epsilon_linear_ref,
    gamma_linear,
    gamma_linear_ref,
    split_linear,
)
from mambalrp.functional.mamba3 import (
    Mamba3ScanLRPFn,
    mamba3_scan,
    mamba3_scan_lrp,
    mamba3_scan_ref,
)
from mambalrp.functional.norm import (
    LayerNormLRPFn,
    RMSNormLRPFn,
    gated_rmsnorm,
    gated_rmsnorm_ref,
    layer_norm,
    layer_norm_lrp,
    layer_norm_lrp_ref,
    rmsnorm,
    rmsnorm_lrp,
    rmsnorm_lrp_ref,
)
from mambalrp.functional.selective_scan import (
    SelectiveScanLRPFn,
    selective_scan,
    selective_scan_lrp,
    selective_scan_ref,
)
from mambalrp.functional.silu import SiLUIdentityFn, silu_identity, silu_identity_ref
from mambalrp.functional.ssd import SSDScanLRPFn, ssd_scan, ssd_scan_lrp, ssd_scan_ref

__all__ = [
    "ConvPadding",
    "EpsilonLinearFn",
    "GammaLinearFn",
    "GatedDeltaRuleFn",
    "HalfGateFn",
    "IdentityRuleFn",
    "LayerNormLRPFn",
    "Mamba3ScanLRPFn",
    "RMSNormLRPFn",
    "SSDScanLRPFn",
    "SelectiveScanLRPFn",
    "SiLUIdentityFn",
    "SoftmaxLRPFn",
    "SplitLinearFn",
    "UniformMatmulFn",
    "attention",
    "causal_conv1d",
    "conv_padding",
    "depthwise_conv1d",
    "epsilon_linear",
    "epsilon_linear_ref",
    "gamma_linear",
    "gamma_linear_ref",
    "gated_delta_rule",
    "gated_delta_rule_lrp",
    "gated_delta_rule_ref",
    "gated_rmsnorm",
    "gated_rmsnorm_ref",
    "half_gate",
    "half_gate_ref",
    "identity_rule",
    "identity_rule_ref",
    "layer_norm",
    "layer_norm_lrp",
    "layer_norm_lrp_ref",
    "mamba3_scan",
    "mamba3_scan_lrp",
    "mamba3_scan_ref",
    "rmsnorm",
    "rmsnorm_lrp",
    "rmsnorm_lrp_ref",
    "selective_scan",
    "selective_scan_lrp",
    "selective_scan_ref",
    "silu_identity",
    "silu_identity_ref",
    "softmax_lrp",
    "softmax_lrp_ref",
    "split_linear",
    "ssd_scan",
    "ssd_scan_lrp",
    "ssd_scan_ref",
    "uniform_matmul",
    "uniform_matmul_ref",
]

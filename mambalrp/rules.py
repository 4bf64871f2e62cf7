"""Rule sets: which LRP rule each component of a Mamba model uses.

A :class:`RuleSet` is what zennit calls a composite: it decides, per kind of operation, whether
the backward pass is the true gradient or an LRP rule. Adapters never call the operators in
:mod:`mambalrp.functional` directly; they call the methods of the active rule set, so a custom
rule set is a subclass that overrides a method.

Presets:
    ``"mambalrp"``: all MambaLRP rules (SiLU identity, half gate, LN-rule, SSM rule), LRP-0 linear.
    ``"gradient"``: no rule at all; ``embedding * grad`` is then Gradient x Input.
    ``"ln-only"``: only the LN-rule (the "LRP (LN-rule)" baseline of the paper).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mambalrp import functional as ops

from mambalrp.functional.attention import AttentionRule

Component = Literal["silu", "gate", "norm", "ssm", "attention"]
_ATTENTION_RULES = ("attnlrp", "cp", "gradient")


@dataclass(frozen=True)
class LRP0:
    """LRP-0 on linear maps: the plain gradient."""


@dataclass(frozen=True)
class Epsilon:
    """Epsilon rule on linear maps, in gradient form.

    Attributes:
        epsilon: Stabiliser added to the magnitude of each pre-activation.
    """

    epsilon: float = 1e-6


@dataclass(frozen=True)
class Gamma:
    """Generalised gamma rule on linear maps, in gradient form.

    Attributes:
        gamma: Boost of the contributions that share the sign of the pre-activation.
    """

    gamma: float = 0.25


LinearRule = LRP0 | Epsilon | Gamma


@dataclass(frozen=True)
class RuleSet:
    """Which rule each component uses.

    Attributes:
        name: Label reported in explanations.
        silu: Identity rule for SiLU and the other element-wise activations (else their gradient).
        gate: Half rule for multiplicative gates and MLP gates, uniform rule for other products of
            two signals, MoE routing weights held constant (else the products' gradients).
        norm: LN-rule for RMSNorms (else the gradient through the normaliser).
        ssm: SSM rule for the scans (else the gradient through dt, B, C and the decays).
        linear: Rule for ``nn.Linear`` layers and the depthwise conv1d.
        attention_rule: Rule for softmax attention in hybrid models: ``"attnlrp"`` (AttnLRP: uniform
            rule on both matrix products, softmax rule; the softmax does not conserve exactly),
            ``"cp"`` (attention weights constant; conserves exactly) or ``"gradient"``.
    """

    name: str = "mambalrp"
    silu: bool = True
    gate: bool = True
    norm: bool = True
    ssm: bool = True
    linear: LinearRule = LRP0()
    attention_rule: AttentionRule = "attnlrp"

    def without(self, *components: Component) -> RuleSet:
        """Return a copy with the named rules replaced by the plain gradient (for ablations)."""
        for c in components:
            if c not in ("silu", "gate", "norm", "ssm", "attention"):
                raise ValueError(f"unknown component {c!r}; expected silu, gate, norm, ssm or attention")
        name = self.name + "".join(f"-no-{c}" for c in components)
        changes: dict[str, object] = {c: False for c in components if c != "attention"}
        if "attention" in components:
            changes["attention_rule"] = "gradient"
        return dataclasses.replace(self, name=name, **changes)

    def with_attention(self, rule: AttentionRule) -> RuleSet:
        """Return a copy that uses ``rule`` (``"attnlrp"``, ``"cp"`` or ``"gradient"``) on attention."""
        if rule not in _ATTENTION_RULES:
            raise ValueError(f"attention rule must be one of {_ATTENTION_RULES}; got {rule!r}")
        return dataclasses.replace(self, name=f"{self.name}-attn-{rule}", attention_rule=rule)

    def with_linear(self, rule: LinearRule) -> RuleSet:
        """Return a copy that uses ``rule`` on linear layers."""
        if not isinstance(rule, (LRP0, Epsilon, Gamma)):
            raise TypeError(f"linear rule must be LRP0, Epsilon or Gamma; got {rule!r}")
        if isinstance(rule, Epsilon):
            suffix = f"-epsilon{rule.epsilon:g}"
        elif isinstance(rule, Gamma):
            suffix = f"-gamma{rule.gamma:g}"
        else:
            suffix = ""
        return dataclasses.replace(self, name=self.name + suffix, linear=rule)

    @property
    def conserving(self) -> bool:
        """Whether the rule set is meant to conserve relevance: every MambaLRP rule is on (the
        attention rule aside; explanations are verified for leaks only under such rule sets)."""
        return self.silu and self.gate and self.norm and self.ssm

    @property
    def patches_linear(self) -> bool:
        """Whether ``nn.Linear`` modules need their forward replaced (epsilon or gamma)."""
        return not isinstance(self.linear, LRP0)

    # The operations adapters use. Each returns exactly the original forward value.

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU activation."""
        return ops.silu_identity(x) if self.silu else F.silu(x)

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Multiplicative gate ``a * b``."""
        return ops.half_gate(a, b) if self.gate else a * b

    def activation(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Any element-wise activation ``fn`` with ``fn(0) = 0`` (GELU, ReLU, squared ReLU, ...)."""
        return ops.identity_rule(x, fn) if self.silu else fn(x)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Product ``a @ b`` of two signals (uniform rule)."""
        return ops.uniform_matmul(a, b) if self.gate else a @ b

    def routing_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Mixture-of-experts routing weights: constants under the rules."""
        return t.detach() if self.gate else t

    def attention(self, query, key, value, mask, scaling: float, is_causal: bool = False):
        """Scaled dot-product attention under :attr:`attention_rule` (see :mod:`mambalrp.functional.attention`).

        Returns:
            ``(output (b, h, Tq, d), weights (b, h, Tq, Tk))``.
        """
        return ops.attention(query, key, value, mask, scaling, is_causal=is_causal, rule=self.attention_rule)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None):
        """RMSNorm ``weight * x / rms(x)`` (per group of ``group_size`` channels)."""
        fn = ops.rmsnorm_lrp if self.norm else ops.rmsnorm
        return fn(x, weight, eps, group_size)

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        """LayerNorm over the last dimension, ``(x - mean(x)) / std(x) * weight + bias``: the
        LN-rule holds ``1 / std(x)`` constant (see :func:`mambalrp.functional.layer_norm_lrp`)."""
        fn = ops.layer_norm_lrp if self.norm else ops.layer_norm
        return fn(x, weight, bias, eps)

    def gated_rmsnorm(self, x, z, weight, eps: float, group_size: int | None = None, norm_before_gate: bool = False):
        """Mamba-2's gated RMSNorm ``norm(x * silu(z))`` (or ``norm(x) * silu(z)``)."""
        return ops.gated_rmsnorm(
            x, z, weight, eps, group_size, norm_before_gate,
            ln_rule=self.norm, half_rule=self.gate, identity_rule=self.silu,
        )

    def selective_scan(self, x, dt, A, B, C, D=None) -> torch.Tensor:
        """Mamba-1 selective scan (layout of :mod:`mambalrp.functional.selective_scan`)."""
        return ops.selective_scan(x, dt, A, B, C, D, rule="lrp" if self.ssm else "gradient")

    def ssd_scan(self, x, dt, A, B, C, D=None) -> torch.Tensor:
        """Mamba-2 SSD scan (layout of :mod:`mambalrp.functional.ssd`)."""
        return ops.ssd_scan(x, dt, A, B, C, D, rule="lrp" if self.ssm else "gradient")

    def delta_rule(self, q, k, v, g, beta) -> torch.Tensor:
        """Gated delta rule (layout of :mod:`mambalrp.functional.delta_rule`): values only under the SSM rule."""
        return ops.gated_delta_rule(q, k, v, g, beta, rule="lrp" if self.ssm else "gradient")

    def gate_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """A gate that scales a signal by a factor computed from another (a sigmoid output gate
        of attention, a shared expert's gate): held constant, like routing weights."""
        return t.detach() if self.gate else t

    def mamba3_scan(self, x, dt, A, trap, B, C, D=None) -> torch.Tensor:
        """Mamba-3 scan with per-token decays and the trapezoid term (layout of
        :mod:`mambalrp.functional.mamba3`)."""
        return ops.mamba3_scan(x, dt, A, trap, B, C, D, rule="lrp" if self.ssm else "gradient")

    def ssm_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """Detach a tensor that only feeds the SSM coefficients (dt, B, C) under the SSM rule."""
        return t.detach() if self.ssm else t

    def linear_map(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` with the linear rule."""
        return self._linear(x, weight, bias, "linear")

    def conv1d(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: ops.ConvPadding = "causal"
    ) -> torch.Tensor:
        """Depthwise conv1d ``(b, d, T)`` with the linear rule.

        Args:
            x: Input ``(b, d, T)``.
            weight: ``(d, 1, k)`` or ``(d, k)``.
            bias: ``(d,)`` or ``None`` (it absorbs relevance).
            padding: ``"causal"`` (Mamba's conv: ``k - 1`` zeros before), ``"same"`` (as
                ``nn.Conv1d(padding="same")``) or ``(left, right)`` zeros (see
                :func:`mambalrp.functional.depthwise_conv1d`).
        """
        return self._linear(x, weight, bias, "conv", padding)

    def _linear(self, x, weight, bias, op, padding: ops.ConvPadding = "causal") -> torch.Tensor:
        rule = self.linear
        if isinstance(rule, Epsilon):
            return ops.epsilon_linear(x, weight, bias, rule.epsilon, op, padding)
        if isinstance(rule, Gamma):
            return ops.gamma_linear(x, weight, bias, rule.gamma, op, padding)
        return F.linear(x, weight, bias) if op == "linear" else ops.depthwise_conv1d(x, weight, bias, padding)


MAMBALRP = RuleSet()
GRADIENT = RuleSet(name="gradient", silu=False, gate=False, norm=False, ssm=False, attention_rule="gradient")
LN_ONLY = RuleSet(name="ln-only", silu=False, gate=False, norm=True, ssm=False, attention_rule="gradient")

PRESETS: dict[str, RuleSet] = {
    "mambalrp": MAMBALRP,
    "gradient": GRADIENT,
    "gradient_x_input": GRADIENT,
    "gi": GRADIENT,
    "ln-only": LN_ONLY,
    "ln_only": LN_ONLY,
}


def get_rules(rules: str | RuleSet) -> RuleSet:
    """Resolve a preset name or a :class:`RuleSet`.

    Args:
        rules: ``"mambalrp"``, ``"gradient"`` (alias ``"gi"``), ``"ln-only"``, or a RuleSet.

    Returns:
        The rule set.
    """
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules.lower() in PRESETS:
        return PRESETS[rules.lower()]
    raise ValueError(
        f"unknown rules {rules!r}; use one of {sorted(set(PRESETS))} or a mambalrp.RuleSet"
    )

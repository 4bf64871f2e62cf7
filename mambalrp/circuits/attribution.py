"""Attribution patching of nodes: first-order estimates of activation-patching effects.

For an activation ``a`` (a hook, per layer and position) patched from the clean run to the
corrupted value, the effect on a metric ``m`` is estimated by one of three coefficient fields ``c``:

``score(l, t) = sum_{n, d} (a_corrupt - a_clean)[n, t, d] * c[n, t, d]``

* ``"eap"`` (attribution patching): ``c = d m / d a`` on the clean run;
* ``"eap-ig"``: ``c`` averaged over ``ig_steps`` runs whose input embeddings lie on the straight
  line from clean to corrupted (midpoint rule), as in EAP-IG;
* ``"relp"`` (relevance patching): ``c`` is the MambaLRP relevance flow, i.e. the backward pass of
  ``m`` under :func:`mambalrp.lrp` with the ``"mambalrp"`` rules (SiLU identity rule, half gate
  rule, LN-rule, SSM rule).

The true effect to compare with is ``patch_sweep(..., direction="corrupt_into_clean")`` minus the
clean metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from mambalrp.circuits.hooks import GLOBAL_NAMES, HookedMamba, HookPoint
from mambalrp.rules import RuleSet

Metric = Callable[[torch.Tensor], torch.Tensor]
Method = Literal["eap", "eap-ig", "relp"]
METHODS: tuple[str, ...] = ("eap", "eap-ig", "relp")


def coefficients(
    hooked: HookedMamba,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    metric: Metric,
    names: Sequence[str],
    method: Method = "eap",
    *,
    ig_steps: int = 5,
    relp_rules: str | RuleSet = "mambalrp",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clean activations and the coefficient field of ``method`` at the named hooks.

    Args:
        hooked: The hooked model.
        clean: Clean tokens ``(N, T)``.
        corrupt: Corrupted tokens ``(N, T)`` (used by ``"eap-ig"`` only).
        metric: Scalar function of the logits.
        names: Full hook names.
        method: ``"eap"``, ``"eap-ig"`` or ``"relp"``.
        ig_steps: Interpolation points of ``"eap-ig"``.
        relp_rules: Rule set of ``"relp"``.

    Returns:
        ``(activations, coefficients)``, both by hook name, detached.
    """
    names = list(names)
    if method == "eap":
        _, cache = hooked.run_with_cache(clean, names_filter=names, incl_bwd=True, metric=metric)
        return {n: cache[n] for n in names}, {n: cache[n + "_grad"] for n in names}
    if method == "relp":
        _, cache = hooked.run_with_cache(clean, names_filter=names, incl_bwd=True, metric=metric, rules=relp_rules)
        return {n: cache[n] for n in names}, {n: cache[n + "_grad"] for n in names}
    if method != "eap-ig":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    with torch.no_grad():
        _, clean_cache = hooked.run_with_cache(clean, names_filter=names + ["hook_embed"])
        _, corrupt_cache = hooked.run_with_cache(corrupt, names_filter=["hook_embed"])
    e0, e1 = clean_cache["hook_embed"], corrupt_cache["hook_embed"]
    total = {n: torch.zeros_like(clean_cache[n]) for n in names}
    for k in range(ig_steps):
        alpha = (k + 0.5) / ig_steps

        def interpolate(act: torch.Tensor, hp: HookPoint, alpha=alpha) -> torch.Tensor:
            return (e0 + alpha * (e1 - e0)).to(act.dtype).detach().requires_grad_(True)

        _, cache = hooked.run_with_cache(clean, names_filter=names, incl_bwd=True, metric=metric,
                                         fwd_hooks=[("hook_embed", interpolate)])
        for n in names:
            total[n] += cache[n + "_grad"] / ig_steps
    return {n: clean_cache[n] for n in names}, total


def attribution_patching(
    hooked: HookedMamba,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    metric: Metric,
    hook: str = "hook_resid_pre",
    method: Method = "eap",
    *,
    layers: Sequence[int] | None = None,
    ig_steps: int = 5,
    relp_rules: str | RuleSet = "mambalrp",
) -> torch.Tensor:
    """Estimated effect of patching ``hook`` at every (layer, position) with its corrupted value.

    Args:
        hooked: The hooked model.
        clean: Clean tokens ``(N, T)``.
        corrupt: Corrupted tokens ``(N, T)``.
        metric: Scalar function of the logits (e.g. :class:`~mambalrp.circuits.ioi.IOIMetric`).
        hook: Hook kind (``"hook_resid_pre"``, ``"hook_out_proj"``, ...) or a global hook name.
        method: ``"eap"``, ``"eap-ig"`` or ``"relp"`` (see the module docstring).
        layers: Layers (default: all).
        ig_steps: Interpolation points of ``"eap-ig"``.
        relp_rules: Rule set of ``"relp"``.

    Returns:
        ``(len(layers), T)`` estimates of ``metric(patched) - metric(clean)``.
    """
    if hook in GLOBAL_NAMES:
        names = [hook]
    else:
        layers = list(range(hooked.n_layers)) if layers is None else list(layers)
        names = [f"blocks.{l}.{hook}" for l in layers]
    acts, coef = coefficients(hooked, clean, corrupt, metric, names, method, ig_steps=ig_steps, relp_rules=relp_rules)
    with torch.no_grad():  # same forward path as the clean activations, so unchanged positions give 0
        rules = relp_rules if method == "relp" else None
        _, corrupt_cache = hooked.run_with_cache(corrupt, names_filter=names, rules=rules)
    rows = []
    for n in names:
        delta = (corrupt_cache[n] - acts[n]).float() * coef[n].float()
        rows.append(delta.sum(0).reshape(delta.shape[1], -1).sum(-1))
    return torch.stack(rows)

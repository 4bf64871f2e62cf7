"""Activation patching: (layer, position) sweeps, layer ablations and conv-slice patching.

Conventions: a *base* run is patched with activations from a *source* run. The two directions of
the usual experiments are

* ``"corrupt_into_clean"`` (noising): base = clean prompts, source = corrupted prompts; a large drop
  of the metric marks a necessary activation;
* ``"clean_into_corrupt"`` (denoising): base = corrupted, source = clean; a large rise marks a
  sufficient activation.

Every function takes a :class:`~mambalrp.circuits.hooks.HookedMamba` and a ``metric``: any
function of the logits returning a scalar tensor (e.g. :class:`~mambalrp.circuits.ioi.IOIMetric`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from mambalrp.circuits.hooks import GLOBAL_NAMES, HookedMamba, HookPoint

Metric = Callable[[torch.Tensor], torch.Tensor]
Direction = Literal["corrupt_into_clean", "clean_into_corrupt"]
Position = int | torch.Tensor


def _hook_name(kind: str, layer: int | None) -> str:
    return kind if layer is None else f"blocks.{layer}.{kind}"


def _base_source(clean: torch.Tensor, corrupt: torch.Tensor, direction: Direction) -> tuple[torch.Tensor, torch.Tensor]:
    if direction == "corrupt_into_clean":
        return clean, corrupt
    if direction == "clean_into_corrupt":
        return corrupt, clean
    raise ValueError(f"direction must be 'corrupt_into_clean' or 'clean_into_corrupt', got {direction!r}")


def _pos_index(pos: Position, n: int) -> torch.Tensor:
    if isinstance(pos, torch.Tensor):
        return pos.long().reshape(-1).expand(n)
    return torch.full((n,), int(pos), dtype=torch.long)


@torch.no_grad()
def patch_sweep(
    hooked: HookedMamba,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    metric: Metric,
    hook: str = "hook_resid_pre",
    *,
    direction: Direction = "corrupt_into_clean",
    layers: Sequence[int] | None = None,
    positions: Sequence[Position] | None = None,
    positions_per_run: int = 8,
) -> torch.Tensor:
    """Patch one hook at one (layer, position) at a time and record the metric.

    Args:
        hooked: The hooked model.
        clean: Clean tokens ``(N, T)``.
        corrupt: Corrupted tokens ``(N, T)``.
        metric: Scalar function of the base run's logits.
        hook: Hook kind (``"hook_resid_pre"``, ``"hook_ssm_input"``, ...; any hook of shape
            ``(N, T, ...)``), or a global hook name such as ``"hook_embed"`` (then one row).
        direction: ``"corrupt_into_clean"`` or ``"clean_into_corrupt"``.
        layers: Layers to sweep (default: all).
        positions: Positions to sweep: ints (same for every example) or ``(N,)`` tensors (one
            position per example, e.g. a name slot of :class:`~mambalrp.circuits.ioi.IOIBatch`).
            Default: ``0 .. T-1``.
        positions_per_run: How many positions are patched in one batched forward.

    Returns:
        ``(len(layers), len(positions))`` metric values of the patched runs.
    """
    base, source = _base_source(clean, corrupt, direction)
    n, t = base.shape
    is_global = hook in GLOBAL_NAMES
    layer_list: list[int | None] = [None] if is_global else list(range(hooked.n_layers) if layers is None else layers)
    pos_list = list(range(t)) if positions is None else list(positions)
    names = [_hook_name(hook, l) for l in layer_list]
    _, src_cache = hooked.run_with_cache(source, names_filter=names)
    out = torch.zeros(len(layer_list), len(pos_list))
    for li, name in enumerate(names):
        src = src_cache[name]
        for p0 in range(0, len(pos_list), positions_per_run):
            chunk = pos_list[p0 : p0 + positions_per_run]
            k = len(chunk)
            rows = torch.arange(n * k)
            cols = torch.cat([_pos_index(p, n) for p in chunk])
            src_rep = src.repeat(k, *([1] * (src.dim() - 1)))

            def patch(act: torch.Tensor, hp: HookPoint, rows=rows, cols=cols, src_rep=src_rep) -> torch.Tensor:
                act = act.clone()
                act[rows, cols] = src_rep[rows, cols].to(act.dtype)
                return act

            logits = hooked.run_with_hooks(base.repeat(k, 1), fwd_hooks=[(name, patch)])
            for j in range(k):
                out[li, p0 + j] = float(metric(logits[j * n : (j + 1) * n]))
    return out


@torch.no_grad()
def ablate_layers(
    hooked: HookedMamba,
    tokens: torch.Tensor,
    metric: Metric,
    kind: Literal["zero", "mean", "resample"] = "zero",
    *,
    layers: Sequence[int] | None = None,
    source: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Ablate the output of each whole layer (its mixer output, ``hook_out_proj``) in turn.

    Args:
        hooked: The hooked model.
        tokens: ``(N, T)`` tokens of the run to ablate.
        metric: Scalar function of the logits (e.g. accuracy or NLD).
        kind: ``"zero"`` (output 0, the layer removed), ``"mean"`` (output replaced by its mean over
            the prompts of ``source`` or ``tokens``, per position) or ``"resample"`` (each
            prompt's output replaced by that of another prompt: ``source[i]`` when ``source`` is
            given, else a random permutation of ``tokens`` that moves every prompt).
        layers: Layers to ablate (default: all).
        source: Prompts to take mean / resampled activations from (same shape as ``tokens``).
        seed: Seed of the resampling permutation.

    Returns:
        ``(len(layers),)`` metric values with each layer ablated.
    """
    layers = list(range(hooked.n_layers)) if layers is None else list(layers)
    names = [_hook_name("hook_out_proj", l) for l in layers]
    cache = None
    if kind in ("mean", "resample"):
        ref = tokens if source is None else source
        _, cache = hooked.run_with_cache(ref, names_filter=names)
    elif kind != "zero":
        raise ValueError(f"kind must be 'zero', 'mean' or 'resample', got {kind!r}")
    perm = None
    if kind == "resample" and source is None:
        n = tokens.shape[0]
        gen = torch.Generator().manual_seed(seed)
        perm = (torch.arange(n) + 1 + torch.randperm(max(n - 1, 1), generator=gen)[0]) % n if n > 1 else torch.arange(n)
    out = torch.zeros(len(layers))
    for i, name in enumerate(names):
        def replace(act: torch.Tensor, hp: HookPoint) -> torch.Tensor:
            if kind == "zero":
                return torch.zeros_like(act)
            src = cache[hp.name]
            if kind == "mean":
                return src.mean(0, keepdim=True).expand_as(act).to(act.dtype)
            return (src if perm is None else src[perm]).to(act.dtype)

        out[i] = float(metric(hooked.run_with_hooks(tokens, fwd_hooks=[(name, replace)])))
    return out


@torch.no_grad()
def conv_slice_patching(
    hooked: HookedMamba,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    metric: Metric,
    layer: int,
    *,
    direction: Direction = "corrupt_into_clean",
    positions: Sequence[Position] | None = None,
) -> torch.Tensor:
    """Patch each per-offset slice of one layer's depthwise conv at each position.

    The conv output at position ``t`` is ``sum_k w[:, k] * x[t + k - (K-1)] + bias``; slice ``k``
    (offset ``k - (K-1)``, i.e. ``-(K-1) .. 0``) is the term of the input ``K-1-k`` positions back.

    Args:
        hooked: The hooked model.
        clean: Clean tokens ``(N, T)``.
        corrupt: Corrupted tokens ``(N, T)``.
        metric: Scalar function of the logits.
        layer: The layer whose conv is split.
        direction: As in :func:`patch_sweep`.
        positions: Positions (ints or ``(N,)`` tensors); default all.

    Returns:
        ``(K, len(positions))`` metric values; row ``k`` is offset ``k - (K - 1)``.
    """
    base, source = _base_source(clean, corrupt, direction)
    n, t = base.shape
    name = _hook_name("hook_conv_slice", layer)
    _, cache = hooked.run_with_cache(source, names_filter=[name])
    src = cache[name]
    K = src.shape[2]
    pos_list = list(range(t)) if positions is None else list(positions)
    out = torch.zeros(K, len(pos_list))
    for k in range(K):
        for j, p in enumerate(pos_list):
            cols = _pos_index(p, n)

            def patch(act: torch.Tensor, hp: HookPoint, cols=cols, k=k) -> torch.Tensor:
                act = act.clone()
                rows = torch.arange(n)
                act[rows, cols, k] = src[rows, cols, k].to(act.dtype)
                return act

            out[k, j] = float(metric(hooked.run_with_hooks(base, fwd_hooks=[(name, patch)])))
    return out

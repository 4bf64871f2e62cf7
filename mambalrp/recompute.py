"""Per-layer recomputation: keep only each layer's input during the forward, recompute the layer
in the backward (activation checkpointing), so that very long inputs fit in memory.

Without it, the backward keeps every layer's intermediates (for a Mamba-1 layer about ten
``(T, d_inner)`` tensors), so memory grows as ``layers x T x d_inner``. With it, the forward keeps
one ``(T, d_model)`` input per layer and the backward recomputes one layer at a time:
``layers x T x d_model + T x d_inner``, for the cost of a second forward of every layer. The
relevance is the same: the rules are deterministic, so the recomputed intermediates equal the
first ones.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch.utils.checkpoint
from torch import nn

from mambalrp.context import patched_forwards
from mambalrp.progress import progress_bar

# Roles of the patched modules whose enclosing layer is recomputed.
_LAYER_ROLES = ("mixer", "attention")


def layers_to_recompute(model: nn.Module, targets: list[tuple[str, nn.Module, object]]) -> list[tuple[str, nn.Module]]:
    """The modules to recompute: for each patched mixer or attention module, the element of an
    ``nn.ModuleList`` that contains it (the residual block), or the module itself if none does.

    Args:
        model: The model.
        targets: The patch plan, as returned by :func:`mambalrp.context.plan`.

    Returns:
        ``(qualified_name, module)`` pairs, each module once, in model order.
    """
    modules = dict(model.named_modules())
    in_lists = {
        f"{name}.{child}" if name else child
        for name, module in modules.items()
        if isinstance(module, nn.ModuleList)
        for child, _ in module.named_children()
    }
    chosen: set[str] = set()
    for name, _, adapter in targets:
        if getattr(adapter, "role", None) not in _LAYER_ROLES:
            continue
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        chosen.add(next((p for p in prefixes if p in in_lists), name))
    # A block nested in another chosen block would be recomputed twice; keep the outer one.
    outer = {n for n in chosen if not any(n.startswith(o + ".") for o in chosen)}
    return [(name, module) for name, module in modules.items() if name in outer]


def spread(items: list, fraction: float) -> list:
    """``round(fraction * len(items))`` of ``items`` (at least one if ``fraction > 0``), evenly spaced.

    ``fraction = 0.5`` keeps every other item; ``1.0`` keeps all.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    count = max(1, round(fraction * len(items))) if items else 0
    return [item for i, item in enumerate(items) if (i + 1) * count // len(items) > i * count // len(items)]


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _counted(forward: Any, bar: Any) -> Any:
    """``forward`` that advances ``bar`` by one on every call (the forward, then the recomputation
    in the backward pass)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        bar.update(1)  # first: the recomputation stops as soon as it has what the backward needs
        return forward(*args, **kwargs)

    return run


@contextlib.contextmanager
def recompute_layers(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, object]],
    fraction: float = 1.0,
    progress: bool | None = False,
) -> Iterator[list[str]]:
    """Inside the block, the layers found by :func:`layers_to_recompute` (all of them, or an evenly
    spaced ``fraction``) run under ``torch.utils.checkpoint`` (non-reentrant); on exit each gets
    back exactly the ``forward`` attribute it had, also after an exception.

    Use it inside :func:`mambalrp.lrp` so that the recomputed forwards run under the rules too.

    Args:
        model: The model.
        targets: The patch plan, as returned by :func:`mambalrp.context.plan`.
        fraction: Share of the layers to recompute, in ``(0, 1]``: memory and the extra time
            both scale with it.
        progress: Show a progress bar over the recomputed layers' forwards (once in the forward
            pass, once more in the backward pass); see :mod:`mambalrp.progress`. Off by default.

    Yields:
        The qualified names of the recomputed layers.
    """
    layers = spread(layers_to_recompute(model, targets), fraction)
    with progress_bar(total=2 * len(layers), desc="layers (forward, recompute)", unit="layer", progress=progress) as bar, \
            patched_forwards() as patch:
        for _, module in layers:
            forward = _counted(module.forward, bar) if not bar.disable else module.forward
            patch(module, functools.partial(_checkpointed, forward))
        yield [name for name, _ in layers]

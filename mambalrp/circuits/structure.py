"""Where a model keeps its embedding, blocks, final norm and head.

Block-level hook points come from this structure (module hooks); mixer-internal hook points
come from the taps of the mixer's adapter. A new model family plugs in by registering a
structure finder with :func:`register_structure` (when its layout differs from the usual
``embedding -> [block(norm, mixer)] -> norm_f -> head`` one) and a tap layout for its mixer
adapter (see :mod:`mambalrp.circuits.layouts`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mambalrp.errors import UnsupportedModelError
from mambalrp.explain import input_embedding


@dataclass
class ModelStructure:
    """The parts of a Mamba language model that hooks attach to.

    Attributes:
        embedding: The input embedding (its output is ``hook_embed``).
        blocks: The residual blocks, in order. Each is called as ``block(hidden_states, ...)`` and
            returns the new residual stream (``resid_pre + mixer(norm(resid_pre))``).
        norms: The pre-mixer norm of each block.
        mixers: The sequence mixer (SSM layer) of each block.
        norm_f: The final norm, or ``None``.
        head: The unembedding (its output is ``hook_logits``), or ``None``.
        adapters: Name of the mixer adapter of each block (selects the tap layout).
    """

    embedding: nn.Module
    blocks: list[nn.Module]
    norms: list[nn.Module]
    mixers: list[nn.Module]
    norm_f: nn.Module | None
    head: nn.Module | None
    adapters: list[str]

    @property
    def n_layers(self) -> int:
        """Number of blocks."""
        return len(self.blocks)


StructureFinder = Callable[[nn.Module], "ModelStructure | None"]
_FINDERS: list[StructureFinder] = []


def register_structure(finder: StructureFinder) -> StructureFinder:
    """Register a function ``model -> ModelStructure | None``; it is tried before the built-in one."""
    _FINDERS.insert(0, finder)
    return finder


def find_structure(model: nn.Module) -> ModelStructure:
    """Locate embedding, blocks, norms, mixers, final norm and head of ``model``.

    Args:
        model: A supported Mamba language model (e.g. ``MambaForCausalLM``).

    Returns:
        The :class:`ModelStructure`.

    Raises:
        UnsupportedModelError: No registered finder and not the usual layout.
    """
    for finder in _FINDERS:
        found = finder(model)
        if found is not None:
            return found
    found = _default_finder(model)
    if found is None:
        raise UnsupportedModelError(
            f"cannot find the blocks of {type(model).__name__}: expected an nn.ModuleList of blocks, each with "
            "a 'norm' and a 'mixer' that a registered mixer adapter matches. Register a structure finder with "
            "mambalrp.circuits.register_structure."
        )
    return found


def _mixer_adapter(module: nn.Module) -> str | None:
    from mambalrp.adapters import find_adapter

    adapter = find_adapter(module)
    if adapter is not None and adapter.role == "mixer":
        return adapter.name
    return None


def _default_finder(model: nn.Module) -> ModelStructure | None:
    blocks_owner, blocks = None, None
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and all(
                hasattr(b, "norm") and hasattr(b, "mixer") and _mixer_adapter(b.mixer) for b in child
            ):
                blocks_owner, blocks = module, list(child)
                break
        if blocks is not None:
            break
    if blocks is None:
        return None
    try:
        embedding = input_embedding(model)
    except UnsupportedModelError:
        return None
    norm_f = next((getattr(blocks_owner, n) for n in ("norm_f", "norm", "final_norm") if hasattr(blocks_owner, n)), None)
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            head = getter()
    if head is None:
        head = getattr(model, "lm_head", None)
    return ModelStructure(
        embedding=embedding,
        blocks=blocks,
        norms=[b.norm for b in blocks],
        mixers=[b.mixer for b in blocks],
        norm_f=norm_f,
        head=head,
        adapters=[_mixer_adapter(b.mixer) or "" for b in blocks],
    )

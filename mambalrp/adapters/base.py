"""The adapter interface: how mambalrp recognises a layer and runs it under the rules."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from mambalrp.context import LRPContext

Role = Literal["mixer", "attention", "norm", "linear", "other"]


class Adapter(ABC):
    """Recognises one kind of module by its structure and re-implements its forward.

    Subclasses set :attr:`name`, :attr:`family` and :attr:`role`, implement :meth:`matches`
    (attribute names and shapes, never the class alone, so that look-alike classes from other
    libraries are matched too) and :meth:`forward`, which must compute exactly the module's
    original output while routing every operation on the relevance path through
    ``ctx.rules`` (see :class:`mambalrp.rules.RuleSet`).

    Attributes:
        name: Unique identifier, e.g. ``"hf-mamba-mixer"``.
        family: Human-readable model family, listed in error messages.
        role: ``"mixer"`` for a sequence mixer (an SSM layer), ``"attention"`` for a softmax
            attention layer, ``"norm"``, ``"linear"`` or ``"other"``. A model is supported when at
            least one mixer is matched.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    role: ClassVar[Role] = "other"

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Return whether this adapter can run ``module``."""

    @abstractmethod
    def forward(self, module: nn.Module, ctx: LRPContext, *args: Any, **kwargs: Any) -> Any:
        """Run ``module``'s forward under ``ctx.rules``; the output must equal the original."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def has_attrs(module: nn.Module, *names: str) -> bool:
    """Whether ``module`` has every attribute in ``names`` (same answer as ``hasattr``).

    Adapters are matched against every module of a model on each call, so the usual answer, "no",
    is found without raising: ``nn.Module.__getattr__`` signals a missing name with an exception.
    """
    if type(module).__getattr__ is not nn.Module.__getattr__:
        return all(hasattr(module, n) for n in names)  # a custom __getattr__ may answer anything
    d = module.__dict__
    for n in names:
        if n in d or n in d.get("_parameters", ()) or n in d.get("_modules", ()) or n in d.get("_buffers", ()):
            continue
        if not hasattr(type(module), n) or not hasattr(module, n):
            return False
    return True


def mask_padding(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions of ``(b, T, d)`` like HF's ``apply_mask_to_padding_states``."""
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


def refuse_non_silu(adapter_name: str, module: nn.Module) -> None:
    """Raise unless the mixer's activation is SiLU (the only one the rules cover)."""
    from mambalrp.errors import MambaLRPError

    if getattr(module, "activation", "silu") not in ("silu", "swish"):
        raise MambaLRPError(f"{adapter_name}: activation {module.activation!r} is not SiLU")

"""The one registry of adapters, searched in order (most recently registered first)."""

from __future__ import annotations

from torch import nn

from mambalrp.adapters.base import Adapter

_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter; it takes precedence over those registered before it.

    Registering an adapter with the name of an existing one replaces that one.

    Args:
        adapter: An instance of an :class:`~mambalrp.adapters.base.Adapter` subclass.

    Returns:
        The adapter, so the call can be used as a class decorator's body.
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected an Adapter instance, got {type(adapter).__name__}")
    unregister_adapter(adapter.name)
    _ADAPTERS.insert(0, adapter)
    return adapter


def unregister_adapter(name: str) -> bool:
    """Remove the adapter called ``name``; return whether one was removed."""
    for i, a in enumerate(_ADAPTERS):
        if a.name == name:
            del _ADAPTERS[i]
            return True
    return False


def registered_adapters() -> list[Adapter]:
    """The registered adapters in search order."""
    return list(_ADAPTERS)


def find_adapter(module: nn.Module) -> Adapter | None:
    """The first registered adapter that matches ``module`` and can run it exactly, or ``None``."""
    return match_adapter(module)[0]


def match_adapter(module: nn.Module) -> tuple[Adapter | None, list[tuple[Adapter, str]]]:
    """The first registered adapter that matches ``module`` and does not refuse it, and the
    ``(adapter, reason)`` of every adapter tried before it that matched but refused."""
    refused: list[tuple[Adapter, str]] = []
    for adapter in _ADAPTERS:
        if adapter.matches(module):
            reason = adapter.refuse(module)
            if reason is None:
                return adapter, refused
            refused.append((adapter, reason))
    return None, refused


def supported_families() -> list[str]:
    """Model families that have a registered mixer adapter."""
    seen: list[str] = []
    for a in reversed(_ADAPTERS):
        if a.role == "mixer" and a.family not in seen:
            seen.append(a.family)
    return seen

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
    """The first registered adapter that matches ``module``, or ``None``."""
    for adapter in _ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None


def supported_families() -> list[str]:
    """Model families that have a registered mixer adapter."""
    seen: list[str] = []
    for a in reversed(_ADAPTERS):
        if a.role == "mixer" and a.family not in seen:
            seen.append(a.family)
    return seen

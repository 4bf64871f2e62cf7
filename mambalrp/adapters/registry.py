"""The registry of adapters, searched in order (most recently registered first).

Adapters are registered for the whole process, or for one model instance
(``register_adapter(adapter, model=model)``): those apply to that model and its submodules only,
are tried before the process-wide ones, and are forgotten with the model (they are held through
a weak reference to it).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import nn

from mambalrp.adapters.base import Adapter

_ADAPTERS: list[Adapter] = []
_SCOPED: weakref.WeakKeyDictionary[nn.Module, list[Adapter]] = weakref.WeakKeyDictionary()


def register_adapter(adapter: Adapter, *, model: nn.Module | None = None) -> Adapter:
    """Register an adapter; it takes precedence over those registered before it.

    Registering an adapter with the name of an existing one (in the same scope) replaces that
    one.

    Args:
        adapter: An instance of an :class:`~mambalrp.adapters.base.Adapter` subclass.
        model: Register it for this model instance only (and its submodules): every mambalrp call
            on the model (``explain``, ``lrp``, ``verify``, ``check_rules``) tries it before the
            process-wide adapters, and other models never see it. Held as long as the model
            lives. ``None`` (default) registers it for every model.

    Returns:
        The adapter, so the call can be used as a class decorator's body.
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected an Adapter instance, got {type(adapter).__name__}")
    if model is None:
        unregister_adapter(adapter.name)
        _ADAPTERS.insert(0, adapter)
        return adapter
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    unregister_adapter(adapter.name, model=model)
    _SCOPED.setdefault(model, []).insert(0, adapter)
    return adapter


def unregister_adapter(name: str, *, model: nn.Module | None = None) -> bool:
    """Remove the adapter called ``name`` (registered for ``model``, or process-wide when
    ``model`` is ``None``); return whether one was removed."""
    adapters = _ADAPTERS if model is None else _SCOPED.get(model, [])
    for i, a in enumerate(adapters):
        if a.name == name:
            del adapters[i]
            if model is not None and not adapters:
                _SCOPED.pop(model, None)
            return True
    return False


def registered_adapters(model: nn.Module | None = None) -> list[Adapter]:
    """The registered adapters in search order: with ``model``, the ones registered for it first,
    then the process-wide ones."""
    return list(_SCOPED.get(model, ())) + list(_ADAPTERS) if model is not None else list(_ADAPTERS)


def adapter_scopes(model: nn.Module) -> list[tuple[str, list[Adapter]]]:
    """``(qualified_name, adapters)`` of ``model`` and every submodule that has adapters registered
    for it, innermost first."""
    if not _SCOPED:
        return []
    scopes = [(name, list(_SCOPED[m])) for name, m in model.named_modules() if m in _SCOPED]
    return sorted(scopes, key=lambda scope: -len(scope[0]) if scope[0] else 1)


def scoped_for(scopes: list[tuple[str, list[Adapter]]], name: str) -> list[Adapter]:
    """The instance-scoped adapters that apply to the module called ``name`` (those of its
    nearest registered ancestor first)."""
    found: list[Adapter] = []
    for prefix, adapters in scopes:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            found.extend(adapters)
    return found


def find_adapter(module: nn.Module, scoped: Sequence[Adapter] = ()) -> Adapter | None:
    """The first adapter (of ``scoped``, then the process-wide ones) that matches ``module`` and
    can run it exactly, or ``None``."""
    return match_adapter(module, scoped)[0]


def match_adapter(
    module: nn.Module, scoped: Sequence[Adapter] = ()
) -> tuple[Adapter | None, list[tuple[Adapter, str]]]:
    """The first adapter that matches ``module`` and does not refuse it, and the
    ``(adapter, reason)`` of every adapter tried before it that matched but refused.

    ``scoped`` (instance-scoped adapters, see :func:`scoped_for`) are tried before the
    process-wide registry."""
    refused: list[tuple[Adapter, str]] = []
    for adapter in [*scoped, *_ADAPTERS]:
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

"""A model's fingerprint: a value that changes whenever the model may compute something else.

Two things are cached on it, per model instance: the patch plan (which adapter runs which
module, :func:`mambalrp.context.plan`) and the verification verdict
(:mod:`mambalrp.verification`). Computing it costs a walk over the modules and tensors, far less
than matching every adapter against every module or re-running the verification probe.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

_SIMPLE = frozenset({bool, int, float, str, type(None)})


def _plain_attributes(obj: Any, *, private: bool) -> tuple:
    """``obj``'s instance attributes: numbers, strings and flags by value, anything else (a
    config, a function, a tuple of objects) by identity. Underscored names only with ``private``
    (a module's own are its parameter, buffer, submodule and hook tables, covered elsewhere)."""
    items = []
    for key, value in vars(obj).items():
        if key == "training" or (key[0] == "_" and not private):
            continue
        kind = type(value)  # not isinstance: some configs make attribute access slow
        if kind in _SIMPLE:
            items.append((key, value))
        elif kind in (tuple, list) and all(type(x) in _SIMPLE for x in value):
            items.append((key, tuple(value)))
        elif kind not in (dict, set):
            items.append((key, id(value)))
    return tuple(items)


@torch.no_grad()
def _sampled_values(tensors: list[torch.Tensor]) -> bytes:
    """The first and last element of every tensor, as bytes (one copy to the host per device
    and dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            corner = (0,) * t.dim()
            groups.setdefault((t.device, t.dtype), []).extend((t[corner], t[tuple(-1 for _ in corner)]))
    parts = [torch.stack(values).double().cpu().numpy().tobytes() for values in groups.values()]
    return hashlib.blake2b(b"".join(parts), digest_size=8).digest()


def fingerprint(model: nn.Module) -> int:
    """A value that changes whenever ``model`` may compute something else under the rules.

    It covers: the module tree (names, objects, classes and the code of their ``forward``,
    instance ``forward`` attributes, hooks, global hooks); every module's public attributes
    (numbers, strings and flags by value, e.g. an activation name, a conv's padding or a
    step-size limit; other objects such as a config or a function by identity) and its config's
    attributes; every parameter and buffer (object, version counter, dtype, device, shape, and
    its first and last values); and the registered adapters (process-wide and those registered
    for the model or its submodules). In-place updates (optimiser steps,
    ``load_state_dict``, ``copy_``) bump version counters; ``model.to()`` changes dtypes or
    devices; registering an adapter changes the registry. Writes through ``.data`` bypass
    version counters and are seen only where they change a sampled value: after such writes
    call :func:`mambalrp.forget` (or ``verify(model, force=True)``).
    """
    from mambalrp.adapters.registry import adapter_scopes, registered_adapters

    parts: list[Any] = []
    configs: dict[int, Any] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, m in model.named_modules():
        cls = type(m)
        parts.append((
            name, id(m), cls, getattr(cls.forward, "__code__", cls.forward), id(m.__dict__.get("forward")),
            tuple(m._forward_hooks), tuple(m._forward_pre_hooks), _plain_attributes(m, private=False),
        ))
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is not None:
                    parts.append((key, id(t), t._version, t.dtype, t.device, t.shape))
                    tensors[id(t)] = t
        config = m.__dict__.get("config")
        if config is not None and id(config) not in configs and hasattr(config, "__dict__"):
            configs[id(config)] = _plain_attributes(config, private=True)
    parts.append(tuple(configs.items()))
    parts.append(_sampled_values(list(tensors.values())))
    parts.append(tuple(id(a) for a in registered_adapters()))
    parts.append(tuple((name, tuple(id(a) for a in adapters)) for name, adapters in adapter_scopes(model)))
    module_hooks = torch.nn.modules.module
    parts.append((tuple(module_hooks._global_forward_hooks), tuple(module_hooks._global_forward_pre_hooks)))
    return hash(tuple(parts))

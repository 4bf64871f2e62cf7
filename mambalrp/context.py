"""Patching a model's modules for LRP inside a context manager, and restoring them exactly."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass, field

import torch
from torch import nn

from mambalrp.errors import MambaLRPError, UnsupportedModelError
from mambalrp.fingerprint import fingerprint
from mambalrp.rules import RuleSet, get_rules
from mambalrp.state import exclusive, restoring

TapFn = Callable[[nn.Module, str, torch.Tensor], torch.Tensor]

_MISSING = object()
HOWTO = "docs/adapters.md"


@dataclass
class LRPContext:
    """What a patched forward sees: the rule set, and an optional tap on intermediates.

    Attributes:
        rules: The active rule set.
        tap_fn: Called as ``tap_fn(module, name, tensor)`` on every named intermediate an adapter
            exposes; returns the tensor to use downstream. ``None`` means no taps (no cost).
        module_names: Qualified name of every patched module in the model.
    """

    rules: RuleSet
    tap_fn: TapFn | None = None
    module_names: dict[nn.Module, str] = field(default_factory=dict)

    def tap(self, module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Pass ``tensor`` through the tap (identity when none is installed)."""
        if self.tap_fn is None:
            return tensor
        return self.tap_fn(module, name, tensor)


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[int, list]]] = weakref.WeakKeyDictionary()


def planned(model: nn.Module, rules: RuleSet) -> tuple[list[tuple[str, nn.Module, object]], int]:
    """:func:`plan`, cached per model instance under its fingerprint
    (:func:`mambalrp.fingerprint.fingerprint`); returns the plan and that fingerprint."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stamp = fingerprint(model)
    cached = _PLANS.get(model, {}).get(rules.patches_linear)
    if cached is not None and cached[0] == stamp:
        return list(cached[1]), stamp
    targets = plan(model, rules)
    _PLANS.setdefault(model, {})[rules.patches_linear] = (stamp, targets)
    return list(targets), stamp


def forget_plan(model: nn.Module) -> None:
    """Drop the cached patch plans of ``model``."""
    _PLANS.pop(model, None)


def plan(model: nn.Module, rules: RuleSet) -> list[tuple[str, nn.Module, object]]:
    """Find the adapter of every module to patch; raise if the model is not supported.

    Args:
        model: The model.
        rules: The rule set (linear layers are patched only for epsilon / gamma rules).

    Returns:
        ``(qualified_name, module, adapter)`` for each module to patch, outermost first. Modules
        inside a matched mixer are left alone (the mixer's adapter calls them itself), except
        ``nn.Linear`` layers under epsilon / gamma rules.

    Adapters registered for ``model`` or one of its submodules
    (``register_adapter(adapter, model=...)``) are tried first for that subtree.

    Raises:
        UnsupportedModelError: No sequence mixer is matched; a module that looks like a sequence
            mixer (SSM parameters such as ``A_log`` or ``dt_bias``, or a forward that calls a scan)
            is not; or a mixer or attention adapter recognises a module but cannot run it exactly
            (a non-causal conv, a second scan direction, parameters it does not use, ...).
    """
    from mambalrp.adapters import match_adapter, supported_families
    from mambalrp.adapters.registry import adapter_scopes, scoped_for

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scopes = adapter_scopes(model)  # adapters registered for this model (or its submodules) only
    out: list[tuple[str, nn.Module, object]] = []
    inside_mixer: list[str] = []
    mixers = 0
    for name, module in model.named_modules():
        under = any(name.startswith(p + ".") for p in inside_mixer)
        if under and not rules.patches_linear:
            continue  # a mixer's adapter runs its submodules itself
        adapter, refusals = match_adapter(module, scoped_for(scopes, name) if scopes else ())
        role = getattr(adapter, "role", None)
        if role == "linear":
            if rules.patches_linear:
                out.append((name, module, adapter))
            continue
        if under:
            continue
        if adapter is not None:
            out.append((name, module, adapter))
            if role == "mixer":
                mixers += 1
                inside_mixer.append(name)
            continue
        refused = [(a, why) for a, why in refusals if a.role in ("mixer", "attention")]
        if refused:
            claimant, why = refused[0]
            raise UnsupportedModelError(
                f"{name!r} ({type(module).__name__}) looks like a layer of {claimant.family} to the adapter "
                f"{claimant.name!r}, but {why}, so mambalrp cannot explain it exactly. "
                f"Register an adapter that computes what this module computes with mambalrp.register_adapter "
                f"(see {HOWTO})."
            )
        looks = sequence_mixer_evidence(module)
        if looks:
            raise UnsupportedModelError(
                f"no adapter matches the sequence mixer {name!r} ({type(module).__name__}; {looks}). "
                f"Supported families: {'; '.join(supported_families())}. "
                f"Register one with mambalrp.register_adapter (see {HOWTO})."
            )
    if mixers == 0:
        first = first_unmatched(model)
        where = f" The first module no adapter matches is {first[0]!r} ({type(first[1]).__name__})." if first else ""
        raise UnsupportedModelError(
            f"{type(model).__name__} contains no Mamba layer that mambalrp recognises.{where} "
            f"Supported families: {'; '.join(supported_families())}. "
            f"To explain another architecture, write an adapter and register it with "
            f"mambalrp.register_adapter (see {HOWTO})."
        )
    return out


# Parameters (or buffers) that only state space layers have, and names of the scan functions
# such layers call (matched as substrings of the names a forward's code refers to).
_SSM_TENSORS = frozenset({"A_log", "A_b_log", "A_logs", "dt_bias", "log_dt", "A_re", "A_im"})
_SCAN_CALLS = ("selective_scan", "chunk_scan", "mamba_inner", "ssd_", "scan_fn", "selective_state_update",
               "delta_rule", "associative_scan", "recurrent_scan")


def sequence_mixer_evidence(module: nn.Module) -> str:
    """Why ``module`` looks like a sequence mixer (state space layer or linear recurrence), or
    ``""``: SSM parameters of its own (``A_log``, ``dt_bias``, ``A`` with ``D``, ...), or a
    forward whose code calls a scan function."""
    own = set(module._parameters) | set(module._buffers)
    hits = sorted(own & _SSM_TENSORS)
    if not hits and {"A", "D"} <= own:
        hits = ["A", "D"]
    if hits:
        return f"it has SSM parameters {', '.join(hits)}"
    forward = getattr(type(module), "forward", None)
    code = getattr(inspect.unwrap(forward), "__code__", None) if forward is not None else None
    if code is not None and not type(module).__module__.startswith("torch."):
        calls = [n for n in code.co_names if any(s in n.lower() for s in _SCAN_CALLS)]
        if calls:
            return f"its forward calls {', '.join(sorted(set(calls)))}"
    return ""


def _is_torch_builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


def first_unmatched(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module that likely needs an adapter: a custom module with parameters of its own
    subtree, no custom module below it, and no matching adapter.

    Custom means not a class of ``torch`` itself (``nn.Linear``, ``nn.Conv1d`` and the like run
    under the plain gradient, which is LRP-0). Returns ``(qualified_name, module)`` or ``None``.
    """
    from mambalrp.adapters import find_adapter
    from mambalrp.adapters.registry import adapter_scopes, scoped_for

    scopes = adapter_scopes(model)
    matched: list[str] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(p + ".") for p in matched):
            continue
        if find_adapter(module, scoped_for(scopes, name) if scopes else ()) is not None:
            matched.append(name)
            continue
        if _is_torch_builtin(module) or next(module.parameters(), None) is None:
            continue
        if all(_is_torch_builtin(m) for m in module.modules() if m is not module):
            return name, module
    return None


@contextlib.contextmanager
def lrp(
    model: nn.Module,
    rules: str | RuleSet = "mambalrp",
    tap_fn: TapFn | None = None,
    *,
    patch_plan: list[tuple[str, nn.Module, object]] | None = None,
) -> Iterator[LRPContext]:
    """Run ``model`` under LRP rules inside a ``with`` block.

    The forward of each matched module instance is replaced by its adapter's forward; nothing
    else changes (parameters, buffers, flags, hooks). On exit, also after an exception, every
    instance gets back exactly the ``forward`` attribute it had. While the block runs, other
    threads' mambalrp calls on the same model wait (see :func:`mambalrp.state.exclusive`).

    Unlike :func:`mambalrp.explain`, this does not verify that the rules reproduce the model's
    output; run :func:`mambalrp.verify` once for that.

    Example:
        >>> with mambalrp.lrp(model) as ctx:
        ...     logits = model(ids).logits   # same values; the backward now propagates relevance

    Args:
        model: A model containing supported Mamba layers.
        rules: A preset name or :class:`~mambalrp.rules.RuleSet`.
        tap_fn: Optional tap on the intermediates adapters expose (see :class:`LRPContext`).
        patch_plan: The result of :func:`plan` for this model and rule set, if the caller already
            has it (saves matching the adapters again).

    Yields:
        The :class:`LRPContext` shared by all patched forwards.
    """
    ctx = LRPContext(rules=get_rules(rules), tap_fn=tap_fn)
    with exclusive(model), patched_forwards() as patch:
        targets = planned(model, ctx.rules)[0] if patch_plan is None else patch_plan
        for name, module, adapter in targets:
            ctx.module_names[module] = name
            patch(module, _ruled_forward(adapter, module, ctx, name))
        yield ctx


def _ruled_forward(adapter: object, module: nn.Module, ctx: LRPContext, name: str) -> Callable[..., Any]:
    """``adapter.forward`` bound to ``module`` and ``ctx``, refusing recurrent state first."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        refuse_recurrent_state(name, module, args, kwargs)
        return adapter.forward(module, ctx, *args, **kwargs)

    return forward


# Keyword names under which libraries pass a recurrent cache or a KV cache (a second line of
# defence: caches are recognised by what they are, whatever the keyword, see is_recurrent_state).
_CACHE_KEYWORDS = ("cache", "cache_params", "inference_params", "past_key_values", "past_key_value", "layer_past")
_CACHE_ATTRS = ("conv_states", "ssm_states", "key_value_memory_dict", "seqlen_offset", "get_seq_length", "update_conv_state")


def is_recurrent_state(value: Any) -> bool:
    """Whether ``value`` is a recurrent or key-value cache: an instance of a class whose name
    contains ``Cache`` (transformers' caches) or ``InferenceParams`` (mamba_ssm), or an object
    with the attributes such caches keep (``conv_states``, ``ssm_states``, ...)."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes, torch.dtype, torch.device)):
        return False
    if any("Cache" in c.__name__ or "InferenceParams" in c.__name__ for c in type(value).__mro__):
        return True
    return any(hasattr(value, a) for a in _CACHE_ATTRS)


def refuse_recurrent_state(name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Raise :class:`MambaLRPError` if a patched module is called with a recurrent or KV cache.

    Explanations run on whole sequences: with a cache, a mixer would continue from a state that
    no relevance flows back into, and the adapters (which re-implement the full-sequence forward)
    would compute something else. The cache is recognised by what it is, in any argument
    position and under any keyword, so a library renaming its keyword does not hide it.
    """
    found = None
    for key, value in [(None, a) for a in args] + list(kwargs.items()):
        if is_recurrent_state(value) or (
            key in _CACHE_KEYWORDS and value is not None and not isinstance(value, bool)
            and not (isinstance(value, (tuple, list)) and len(value) == 0)
        ):
            found = (key, value)
            break
    if found is None:
        return
    key, value = found
    how = f"as {key}=" if key else "as a positional argument"
    raise MambaLRPError(
        f"{name or type(module).__name__!r} ({type(module).__name__}) was called with a recurrent cache "
        f"({type(value).__name__}, {how}). Explanations run on whole sequences without a cache: call the "
        "model with use_cache=False and no cache (mambalrp.explain does), and do not run generate() "
        "inside mambalrp.lrp()."
    )


@contextlib.contextmanager
def patched_forwards() -> Iterator[Callable[[nn.Module, Callable], None]]:
    """Yield ``patch(module, forward)``, which sets an instance ``forward`` on ``module``.

    On exit, also after an exception, every patched module gets back exactly the ``forward``
    attribute it had: none (the class's method), or the instance attribute a user had set.
    """
    with restoring([]) as undo:

        def patch(module: nn.Module, forward: Callable) -> None:
            previous = module.__dict__.get("forward", _MISSING)
            undo.append(lambda: _put_back(module, previous))
            module.forward = forward

        yield patch


def _put_back(module: nn.Module, previous: object) -> None:
    if previous is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous

"""The adapter interface: how mambalrp recognises a layer and runs it under the rules."""

from __future__ import annotations

import fnmatch
import inspect
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

    A look-alike has the names but may compute something else. :meth:`refuse` checks what
    determines the computation (conv causality, scan directions, norm grouping, multipliers,
    activation, parameters the forward would ignore: see :attr:`uses`); a module an adapter
    matches but refuses is not patched by it, and a refused mixer or attention layer stops
    :func:`mambalrp.lrp` with the reason. Whatever the checks miss, the verification of every
    explanation catches (see :mod:`mambalrp.verification`).

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
    uses: ClassVar[tuple[str, ...] | None] = None
    """Patterns (``fnmatch``) of the parameter and buffer names, relative to the module, that
    :meth:`forward` accounts for, e.g. ``("in_proj.*", "A_log")``. A matched module with any other
    parameter or buffer is refused: the forward would ignore it. ``None`` skips the check."""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Return whether ``module`` has the structure this adapter handles."""

    def refuse(self, module: nn.Module) -> str | None:
        """Why this adapter, although :meth:`matches` is true, cannot reproduce ``module``'s
        forward exactly (a clause such as ``"its conv1d is not causal (padding 1)"``), or
        ``None`` if it can. The default checks :attr:`uses`; subclasses add their own checks."""
        if self.uses is None:
            return None
        unknown = unaccounted(module, self.uses)
        if unknown:
            more = ", ..." if len(unknown) > 6 else ""
            return f"it has parameters or buffers the adapter's forward does not use ({', '.join(unknown[:6])}{more})"
        return None

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


def whole_output_needed(ctx: LRPContext, linear: nn.Module) -> bool:
    """Whether a projection must run as the module call it is and be tapped whole: a tap is
    installed (hooks on the intermediates), the module is not a plain ``nn.Linear``, carries
    hooks, or the rule set replaces linear layers (epsilon, gamma). Otherwise an adapter may
    compute it in parts with :func:`mambalrp.functional.split_linear`."""
    from torch.nn.modules import module as torch_module

    hooked = bool(
        linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks
        or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    )
    return ctx.tap_fn is not None or type(linear) is not nn.Linear or hooked or ctx.rules.patches_linear


def code_names(module: nn.Module) -> tuple[str, ...]:
    """Global, attribute and local names the code of ``module``'s ``forward`` refers to."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return () if code is None else code.co_names + code.co_varnames


def unaccounted(module: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of ``module``'s parameters and buffers (recursive) that match none of ``patterns``."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def conv_problem(conv: Any, channels: int | None = None, name: str = "conv1d") -> str | None:
    """Why ``conv`` is not the depthwise causal ``nn.Conv1d`` the mixer adapters compute
    (``padding = kernel - 1``, output cut to the input length), or ``None``. ``name`` is the
    conv's attribute name, for the message."""
    if not isinstance(conv, nn.Conv1d):
        return f"its {name} is a {type(conv).__name__}, not an nn.Conv1d"
    kernel = conv.kernel_size[0]
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
        return f"its {name} is not depthwise (groups {conv.groups}, channels {conv.in_channels} -> {conv.out_channels})"
    if channels is not None and conv.in_channels != channels:
        return f"its {name} has {conv.in_channels} channels where the mixer needs {channels}"
    if tuple(conv.stride) != (1,) or tuple(conv.dilation) != (1,):
        return f"its {name} has stride {tuple(conv.stride)} and dilation {tuple(conv.dilation)} (causal convs use 1)"
    if isinstance(conv.padding, str) or tuple(conv.padding) != (kernel - 1,) or conv.padding_mode != "zeros":
        return (
            f"its {name} is not causal (padding {conv.padding!r}, mode {conv.padding_mode!r} for kernel {kernel}; "
            f"a causal conv pads kernel - 1 = {kernel - 1} zeros)"
        )
    return None


# Attributes by which bidirectional or reversed variants of Mamba mixers announce themselves.
_DIRECTION_FLAGS = ("bidirectional", "bidirectional_strategy", "bidirectional_weight_tie", "bimamba", "reverse", "flip")


def direction_problem(module: nn.Module) -> str | None:
    """Why ``module`` does not scan once, forwards, over its input: a truthy ``bidirectional``,
    ``bidirectional_strategy``, ``bidirectional_weight_tie``, ``bimamba``, ``reverse`` or
    ``flip`` attribute, a ``bimamba_type`` other than ``None``/``"none"``, or code of its class
    (below ``torch``'s own) that flips tensors, as a scan over the reversed sequence does."""
    for flag in _DIRECTION_FLAGS:
        value = module.__dict__.get(flag, None)
        if value is not None and value is not False and not isinstance(value, (nn.Module, torch.Tensor)):
            return f"it is marked {flag}={value!r} (not a single forward scan)"
    kind = module.__dict__.get("bimamba_type", None)
    if kind is not None and str(kind).lower() != "none":
        return f"it is marked bimamba_type={kind!r} (not a single forward scan)"
    flips = _flipping_methods(type(module))
    if flips:
        return f"its {flips[0]} flips tensors (a scan over the reversed sequence?)"
    return None


_FLIPS = frozenset({"flip", "flipud", "fliplr"})


def _flipping_methods(cls: type) -> list[str]:
    found = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch") or klass is object:
            continue
        for name, value in vars(klass).items():
            code = getattr(inspect.unwrap(value), "__code__", None) if callable(value) else None
            if code is not None and _FLIPS & set(code.co_names):
                found.append(f"{klass.__name__}.{name}")
    return found


def activation_problem(module: nn.Module) -> str | None:
    """Why ``module``'s activation is not SiLU (the only one the mixer rules cover), or ``None``."""
    activation = getattr(module, "activation", "silu")
    if activation not in ("silu", "swish"):
        return f"its activation is {activation!r}, not SiLU"
    return None


def first_problem(*problems: str | None) -> str | None:
    """The first of ``problems`` that is not ``None``."""
    return next((p for p in problems if p is not None), None)


def mamba1_layout_problem(
    in_proj: Any, x_proj: Any, dt_proj: Any, A_log: torch.Tensor, D: Any, d: int, n: int, rank: int
) -> str | None:
    """Why a Mamba-1 branch's projections do not have the widths its adapter splits them into
    (``in_proj -> 2 d``, ``x_proj -> rank + 2 n``, ``dt_proj: rank -> d``), or ``None``."""
    widths = {
        "in_proj": (getattr(in_proj, "out_features", None), 2 * d),
        "x_proj": (getattr(x_proj, "out_features", None), rank + 2 * n),
        "dt_proj": (getattr(dt_proj, "in_features", None), rank),
    }
    for name, (got, want) in widths.items():
        if got is not None and got != want:
            return f"its {name} has width {got} where the Mamba layout needs {want}"
    if not isinstance(dt_proj, nn.Linear):
        return f"its dt_proj is a {type(dt_proj).__name__}, not an nn.Linear"
    if tuple(A_log.shape) != (d, n) or (D is not None and tuple(D.shape) != (d,)):
        shape = None if D is None else tuple(D.shape)
        return f"A_log {tuple(A_log.shape)} and D {shape} do not have the shapes ({d}, {n}) and ({d},)"
    return None

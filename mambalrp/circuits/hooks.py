"""Hooked execution of Mamba models, in the style of TransformerLens.

:class:`HookedMamba` wraps a supported model without changing it: hooks exist only inside its
calls (module hooks and adapter taps are installed on entry and removed on exit, also when a hook
function raises). With no hook registered the wrapped model runs exactly as it is (no hook and
no tap installed), so hooked and plain forwards are bitwise equal.

Block-level hook points (``hook_embed``, ``blocks.{l}.hook_resid_pre``, ``hook_layer_input``,
``hook_normalized_input``, ``hook_out_proj``, ``hook_resid_post``, ``hook_resid_final``,
``hook_norm_f``, ``hook_logits``) use module hooks on the original forward. Mixer-internal hook
points (``hook_in_proj_x`` ... ``hook_gate``) use the adapter taps: while one of them is
registered, the mixers run through their adapters (:func:`mambalrp.lrp`) with the ``"gradient"``
rule set unless other rules are given, which computes the same values up to float rounding.
See ``docs/circuits.md`` for the table of hook names and shapes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mambalrp.circuits.layouts import ON_REQUEST, TapLayout, tap_layout
from mambalrp.circuits.structure import ModelStructure, find_structure
from mambalrp.context import lrp
from mambalrp.rules import RuleSet

BLOCK_KINDS = (
    "hook_resid_pre", "hook_layer_input", "hook_normalized_input", "hook_out_proj", "hook_resid_post",
)
GLOBAL_NAMES = ("hook_embed", "hook_resid_final", "hook_norm_f", "hook_logits")


@dataclass(frozen=True)
class HookPoint:
    """Identifies the hook point a hook function is called on.

    Attributes:
        name: Full name, e.g. ``"blocks.3.hook_resid_pre"`` or ``"hook_embed"``.
        layer: Block index, or ``None`` for global hook points.
        kind: The name without the block prefix, e.g. ``"hook_resid_pre"``.
    """

    name: str
    layer: int | None
    kind: str


HookFn = Callable[[torch.Tensor, HookPoint], "torch.Tensor | None"]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
HookSpec = tuple[str | Callable[[str], bool], HookFn]


def _full_name(layer: int | None, kind: str) -> str:
    return kind if layer is None else f"blocks.{layer}.{kind}"


class ActivationCache(dict):
    """Activations by hook name (a ``dict``); gradients, when cached, under ``name + "_grad"``."""

    def stack(self, kind: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """Stack ``blocks.{l}.{kind}`` over layers into ``(n_layers, ...)``."""
        if layers is None:
            layers = sorted(int(k.split(".")[1]) for k in self if k.startswith("blocks.") and k.endswith("." + kind))
        return torch.stack([self[_full_name(l, kind)] for l in layers])


class _Run:
    """The hook set of one call: resolves names, fires hook functions, keeps per-layer scratch."""

    def __init__(self, fwd: dict[str, list[HookFn]], bwd: dict[str, list[HookFn]], points: dict[str, HookPoint]):
        self.fwd, self.bwd, self.points = fwd, bwd, points
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}

    def wants_name(self, name: str) -> bool:
        return name in self.fwd or name in self.bwd

    def wants(self, layer: int | None, kind: str) -> bool:
        return self.wants_name(_full_name(layer, kind))

    def scratch(self, layer: int) -> dict[str, torch.Tensor]:
        return self._scratch.setdefault(layer, {})

    def fire(self, layer: int | None, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        name = _full_name(layer, kind)
        if not self.wants_name(name):
            return tensor
        point = self.points[name]
        for fn in self.fwd.get(name, ()):
            out = fn(tensor, point)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != tensor.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"hook on {name} returned {got}; expected a tensor of shape {tuple(tensor.shape)}")
                out = out.to(tensor.dtype)
                if out.stride() != tensor.stride():  # keep the memory layout: downstream kernels then round alike
                    out = torch.empty_strided(tensor.shape, tensor.stride(), dtype=out.dtype, device=out.device).copy_(out)
                tensor = out
        for fn in self.bwd.get(name, ()):
            if tensor.requires_grad:
                tensor.register_hook(lambda g, fn=fn, point=point: fn(g, point))
        return tensor


class HookedMamba:
    """TransformerLens-style hooks on a supported Mamba language model.

    Example:
        >>> hm = HookedMamba(model)
        >>> logits, cache = hm.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"))
        >>> def patch(act, hook):
        ...     act = act.clone(); act[:, 4] = cache[hook.name][:, 4]; return act
        >>> logits = hm.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_resid_pre", patch)])

    Args:
        model: A supported model (``MambaForCausalLM``, ``Mamba2ForCausalLM``, FalconMamba, or a
            model whose structure and tap layout are registered). It is never modified outside
            calls of this wrapper.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.structure: ModelStructure = find_structure(model)
        self.layouts: list[TapLayout | None] = [tap_layout(a) for a in self.structure.adapters]
        self._mixer_layer = {id(m): l for l, m in enumerate(self.structure.mixers)}
        self._context_fwd: list[HookSpec] = []
        self._context_bwd: list[HookSpec] = []
        self.points: dict[str, HookPoint] = {}
        for kind in GLOBAL_NAMES:
            self.points[kind] = HookPoint(kind, None, kind)
        for l, layout in enumerate(self.layouts):
            for kind in BLOCK_KINDS + (layout.kinds if layout else ()):
                name = _full_name(l, kind)
                self.points[name] = HookPoint(name, l, kind)

    # ------------------------------------------------------------------ names and shapes
    @property
    def n_layers(self) -> int:
        """Number of blocks."""
        return self.structure.n_layers

    @property
    def hook_names(self) -> list[str]:
        """Every hook point of this model, in forward order of kinds."""
        return list(self.points)

    def hook_shapes(self, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        """Shape of every hook point for a ``(batch, seq)`` input (as documented in docs/circuits.md)."""
        emb = self.structure.embedding
        d_model = emb.weight.shape[1]
        vocab = self.structure.head.weight.shape[0] if self.structure.head is not None else emb.weight.shape[0]
        out = {"hook_embed": (batch, seq, d_model), "hook_resid_final": (batch, seq, d_model),
               "hook_norm_f": (batch, seq, d_model), "hook_logits": (batch, seq, vocab)}
        for l, layout in enumerate(self.layouts):
            for kind in BLOCK_KINDS:
                out[_full_name(l, kind)] = (batch, seq, d_model)
            if layout is not None:
                for kind, shape in layout.shapes(self.structure.mixers[l], batch, seq).items():
                    out[_full_name(l, kind)] = shape
        return out

    def _resolve(self, specs: Iterable[HookSpec]) -> dict[str, list[HookFn]]:
        out: dict[str, list[HookFn]] = {}
        for key, fn in specs:
            if callable(key):
                names = [n for n in self.points if key(n)]
            else:
                if key not in self.points:
                    raise KeyError(f"no hook point {key!r}; see HookedMamba.hook_names (e.g. 'blocks.0.hook_resid_pre')")
                names = [key]
            for n in names:
                out.setdefault(n, []).append(fn)
        return out

    def _filter(self, names_filter: NameFilter) -> list[str]:
        if names_filter is None:
            return [n for n, p in self.points.items() if p.kind not in ON_REQUEST]
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return [n for n in self.points if names_filter(n)]
        for n in names_filter:
            if n not in self.points:
                raise KeyError(f"no hook point {n!r}; see HookedMamba.hook_names")
        return list(names_filter)

    # ------------------------------------------------------------------ running
    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()) -> Iterator[HookedMamba]:
        """Inside the block, every call of this wrapper also applies these hooks."""
        n_fwd, n_bwd = len(self._context_fwd), len(self._context_bwd)
        self._context_fwd.extend(fwd_hooks)
        self._context_bwd.extend(bwd_hooks)
        try:
            yield self
        finally:
            del self._context_fwd[n_fwd:]
            del self._context_bwd[n_bwd:]

    def __call__(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the model (with the hooks of enclosing :meth:`hooks` blocks) and return logits."""
        return self.run_with_hooks(tokens, **kwargs)

    def run_with_hooks(
        self,
        tokens: torch.Tensor,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        *,
        rules: str | RuleSet | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Run the model with hook functions and return the logits.

        Args:
            tokens: ``(batch, seq)`` token ids.
            fwd_hooks: ``(name_or_filter, fn)`` pairs; ``fn(act, hook)`` returns ``None`` or a
                replacement of the same shape. A filter is a callable on hook names.
            bwd_hooks: Same for gradients: ``fn(grad, hook)`` is called when a backward pass
                reaches the activation (tensor hooks, so they fire on a later ``backward``); it
                returns ``None`` or a replacement gradient. With backward hooks the embedding
                output is made to require grad, so they fire even when no parameter does.
            rules: Run the mixers under these LRP rules (e.g. ``"mambalrp"`` for relevance
                patching). Default: the model's own forward, or the ``"gradient"`` rules when a
                mixer-internal hook is registered.
            **model_kwargs: Passed to the model (``use_cache=False`` is always passed).

        Returns:
            The logits ``(batch, seq, vocab)``.
        """
        bwd_specs = list(self._context_bwd) + list(bwd_hooks)
        grad_root = [("hook_embed", _grad_root)] if bwd_specs and torch.is_grad_enabled() else []
        fwd = self._resolve(grad_root + list(self._context_fwd) + list(fwd_hooks))
        bwd = self._resolve(bwd_specs)
        run = _Run(fwd, bwd, self.points)
        with self._installed(run, rules):
            out = self.model(tokens, **self._kwargs(model_kwargs))
        return _logits(out)

    def run_with_cache(
        self,
        tokens: torch.Tensor,
        names_filter: NameFilter = None,
        incl_bwd: bool = False,
        *,
        metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fwd_hooks: Sequence[HookSpec] = (),
        rules: str | RuleSet | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run the model and cache activations (and optionally their gradients).

        Args:
            tokens: ``(batch, seq)`` token ids.
            names_filter: ``None`` (every hook point except the on-request ones: conv slices,
                ``A_bar``, ``B_bar``, ``h``), a name, a list of names, or a callable on names.
            incl_bwd: Also cache ``d metric / d act`` under ``name + "_grad"`` (computed with
                :func:`torch.autograd.grad`, so no parameter ``.grad`` is touched).
            metric: Scalar function of the logits; required when ``incl_bwd``.
            fwd_hooks: Extra hook functions (they run before caching).
            rules: As in :meth:`run_with_hooks`; with ``incl_bwd`` and ``rules="mambalrp"`` the
                cached "gradients" are the MambaLRP relevance-flow coefficients.
            **model_kwargs: Passed to the model.

        Returns:
            ``(logits, cache)``; cached activations are detached.
        """
        if incl_bwd and metric is None:
            raise ValueError("incl_bwd=True needs a metric: a function of the logits returning a scalar")
        names = self._filter(names_filter)
        live: dict[str, torch.Tensor] = {}

        def store(act: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            live[hook.name] = act
            return None

        specs = list(fwd_hooks) + [(n, store) for n in names]
        if incl_bwd:
            specs = [("hook_embed", _grad_root)] + specs
        ctx = torch.enable_grad() if incl_bwd else contextlib.nullcontext()
        with ctx:
            logits = self.run_with_hooks(tokens, fwd_hooks=specs, rules=rules, **model_kwargs)
            cache = ActivationCache({k: v.detach() for k, v in live.items()})
            if incl_bwd:
                keys = [k for k, v in live.items() if v.requires_grad]
                value = metric(logits)
                grads = torch.autograd.grad(value, [live[k] for k in keys], allow_unused=True) if keys else []
                for k in live:
                    cache[k + "_grad"] = torch.zeros_like(live[k]).detach()
                for k, g in zip(keys, grads):
                    if g is not None:
                        cache[k + "_grad"] = g.detach()
        return logits.detach() if incl_bwd else logits, cache

    # ------------------------------------------------------------------ internals
    def _kwargs(self, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(model_kwargs)
        params = inspect.signature(self.model.forward).parameters
        if "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs.setdefault("use_cache", False)
        return kwargs

    @contextlib.contextmanager
    def _installed(self, run: _Run, rules: str | RuleSet | None) -> Iterator[None]:
        """Install module hooks and taps for ``run``; remove everything on exit."""
        s = self.structure
        handles: list[Any] = []
        mixer_internal = any(self.points[n].layer is not None and self.points[n].kind not in BLOCK_KINDS
                             for n in list(run.fwd) + list(run.bwd))
        try:
            if run.wants_name("hook_embed"):
                handles.append(s.embedding.register_forward_hook(_out_hook(run, None, "hook_embed")))
            for l in range(s.n_layers):
                if run.wants(l, "hook_resid_pre"):
                    handles.append(s.blocks[l].register_forward_pre_hook(_pre_hook(run, l, "hook_resid_pre"),
                                                                         with_kwargs=True))
                if run.wants(l, "hook_layer_input"):
                    handles.append(s.norms[l].register_forward_pre_hook(
                        _pre_hook(run, l, "hook_layer_input", alias=True), with_kwargs=True))
                if run.wants(l, "hook_normalized_input"):
                    handles.append(s.norms[l].register_forward_hook(_out_hook(run, l, "hook_normalized_input")))
                if run.wants(l, "hook_out_proj"):
                    handles.append(s.mixers[l].register_forward_hook(_out_hook(run, l, "hook_out_proj")))
                if run.wants(l, "hook_resid_post"):
                    handles.append(s.blocks[l].register_forward_hook(_out_hook(run, l, "hook_resid_post")))
            if s.norm_f is not None:
                if run.wants_name("hook_resid_final"):
                    handles.append(s.norm_f.register_forward_pre_hook(_pre_hook(run, None, "hook_resid_final"),
                                                                      with_kwargs=True))
                if run.wants_name("hook_norm_f"):
                    handles.append(s.norm_f.register_forward_hook(_out_hook(run, None, "hook_norm_f")))
            if s.head is not None and run.wants_name("hook_logits"):
                handles.append(s.head.register_forward_hook(_out_hook(run, None, "hook_logits")))

            if mixer_internal or rules is not None:
                tap = self._tap_fn(run) if mixer_internal else None
                with lrp(self.model, rules if rules is not None else "gradient", tap_fn=tap):
                    yield
            else:
                yield
        finally:
            for h in reversed(handles):
                h.remove()

    def _tap_fn(self, run: _Run):
        def tap(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
            layer = self._mixer_layer.get(id(module))
            if layer is None or self.layouts[layer] is None:
                return tensor
            return self.layouts[layer].tap(run, layer, module, name, tensor)

        return tap


def _grad_root(act: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
    """Make the embedding output require grad so that activations get gradients."""
    if act.requires_grad:
        return None
    return act.detach().requires_grad_(True)


def _out_hook(run: _Run, layer: int | None, kind: str):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (run.fire(layer, kind, output[0]), *output[1:])
        if isinstance(output, torch.Tensor):
            return run.fire(layer, kind, output)
        return None

    return hook


def _pre_hook(run: _Run, layer: int | None, kind: str, alias: bool = False):
    def hook(module, args, kwargs):
        if args:
            x = args[0]
            x = x.view_as(x) if alias else x
            return (run.fire(layer, kind, x), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        x = kwargs[key]
        x = x.view_as(x) if alias else x
        return args, {**kwargs, key: run.fire(layer, kind, x)}

    return hook


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")

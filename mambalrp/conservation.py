"""Measuring where relevance goes: the pieces that :func:`mambalrp.check_rules` and
:func:`mambalrp.verify` share.

* :func:`uncovered_operations` walks the backward graph of an explained score and lists the
  non-linear operations no rule covers, each attributed (inside :func:`attributing`) to the
  innermost module whose forward created it.
* :class:`BlockProbe` measures, for chosen blocks, the relevance that enters and leaves each one.
* :func:`additive_uses` finds the parameters and buffers that enter the computation additively
  (biases, but also position embeddings, class tokens, ``1 + weight`` norms): they absorb
  relevance by design. :func:`zeroed` replaces them by zeros for a probe and puts the very same
  tensor objects back afterwards, so that whatever non-conservation remains is a leak.
* :func:`relative_gap` compares a score with the relevance it was split into without dividing by
  a score near zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# Backward nodes of operations that are linear in each input that requires grad (or that only
# move, copy or select values). Names without the trailing version digit.
LINEAR_NODES = frozenset(
    """Addmm Mm Bmm Mv Matmul Linear Addbmm Baddbmm Convolution ConvolutionBackwardOverrideable
    View UnsafeView Reshape ReshapeAlias Transpose T Permute Expand Squeeze Unsqueeze Split
    SplitWithSizes Unbind Slice SliceScatter Select SelectScatter Index IndexSelect IndexPut Gather
    Scatter IndexAdd Cat Stack Clone ToCopy Copy CopySlices Add Sub Neg Sum Mean Cumsum Flip Roll Repeat
    RepeatInterleave ConstantPadNd Pad ReflectionPad1D Narrow AsStrided Alias Chunk Where
    MaskedFill MaskedScatter Tril Triu Diagonal Lift Detach Unfold Im2Col Col2Im UnsafeSplit
    Contiguous Einsum Tensordot Trace Diag SqueezeCopy ViewCopy""".split()
)
# Piecewise-linear and positively homogeneous: x * grad equals the output, so gradient = LRP-0.
HOMOGENEOUS_NODES = frozenset("Relu MaxPool2DWithIndices MaxPool1DWithIndices Threshold".split())
# Products and quotients: fine when only one factor (the numerator for Div) depends on the input.
BILINEAR_NODES = frozenset("Mul Bmm Mm Matmul Mv Addmm Baddbmm Addbmm Einsum Dot Linear Convolution".split())


@dataclass
class UncoveredOp:
    """Operations of one kind in one module whose backward is a plain, non-conserving gradient.

    Attributes:
        op: Backward node name, e.g. ``"SiluBackward0"``.
        module: Qualified name of the innermost module whose forward created it (``""``: the
            model's own forward).
        count: How many such nodes.
        reason: Why it is not covered.
    """

    op: str
    module: str
    count: int
    reason: str


@dataclass
class BlockConservation:
    """Relevance into and out of one block, per batch row.

    Attributes:
        name: Qualified module name (``#k`` appended for the k-th call of a block called repeatedly).
        relevance_out: ``(batch,)`` relevance leaving the block (``output * grad``).
        relevance_in: ``(batch,)`` relevance entering it (``input * grad`` over its tensor inputs).
    """

    name: str
    relevance_out: torch.Tensor
    relevance_in: torch.Tensor

    @property
    def relative_error(self) -> float:
        """Largest ``|in - out|`` over the batch, relative to the relevance moved (never to a
        value near zero alone: see :func:`relative_gap`)."""
        return relative_gap(self.relevance_out, self.relevance_in)


def relative_gap(score: torch.Tensor, relevance_sum: torch.Tensor, *magnitudes: torch.Tensor) -> float:
    """Largest ``|score - relevance_sum|`` over the batch relative to the scale of what was
    compared: ``max(|score|, |relevance_sum|, *magnitudes)`` per row (pass the sum of absolute
    relevances as a magnitude where it is known). A score near zero with relevance cancelling
    around it does not blow the ratio up; both near zero gives 0."""
    score, relevance_sum = score.detach().double(), relevance_sum.detach().double()
    scale = torch.maximum(score.abs(), relevance_sum.abs())
    for m in magnitudes:
        scale = torch.maximum(scale, m.detach().double().abs())
    gap = (score - relevance_sum).abs()
    tiny = torch.finfo(torch.float64).tiny
    return float(torch.where(scale > tiny, gap / scale.clamp_min(tiny), torch.zeros_like(gap)).max())


def rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Sum ``t`` per batch row in float64 (spread evenly if it has no batch dimension)."""
    t = t.detach().double()
    if t.dim() == 0 or t.shape[0] != batch:
        return t.sum().expand(batch) / batch
    return t.reshape(batch, -1).sum(-1)


# ---------------------------------------------------------------------------------------------
# Coverage: the backward graph


def _base_name(node: Any) -> str:
    name = node.name()
    stem = name.split("::")[-1]
    if stem.endswith("Backward"):
        return stem[: -len("Backward")]
    head, sep, tail = stem.rpartition("Backward")
    return head if sep and tail.isdigit() else stem


def _rule_function_names() -> set[str]:
    """Backward-node names of mambalrp's own autograd Functions (the rule operators)."""
    import mambalrp.functional  # noqa: F401  (registers the subclasses)

    names: set[str] = set()
    stack = list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("mambalrp"):
            names.add(cls.__name__ + "Backward")
    return names


class _Attribution(TorchFunctionMode):
    """Stamp every new backward node with the innermost module whose forward is running."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = self.stack[-1] if self.stack else ""
        for t in out if isinstance(out, (tuple, list)) else (out,):
            node = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if node is not None and "mambalrp.module" not in node.metadata:
                node.metadata["mambalrp.module"] = where
        return out


@contextlib.contextmanager
def attributing(model: nn.Module) -> Iterator[None]:
    """Inside, backward nodes created by the model carry the name of the module that made them
    (read by :func:`uncovered_operations`)."""
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module, args):
            stack.append(name)

        return hook

    def leave(module, args, output):
        stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        with _Attribution(stack):
            yield
    finally:
        for h in handles:
            h.remove()


def uncovered_operations(score: torch.Tensor) -> tuple[list[UncoveredOp], int]:
    """Walk the backward graph of ``score``; return the uncovered nodes grouped by op and module,
    and the number of nodes inspected. No backward pass is run."""
    ours = _rule_function_names()
    found: dict[tuple[str, str, str], int] = {}
    seen: set[int] = set()
    # Nodes created inside a composite op (einsum's bmm, ...) carry no stamp; they inherit the
    # module of the node that leads to them.
    todo = [(score.grad_fn, "")] if score.grad_fn is not None else []
    nodes = 0
    while todo:
        node, inherited = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes += 1
        module = node.metadata.get("mambalrp.module", inherited)
        todo.extend((n, module) for n, _ in node.next_functions if n is not None)
        name = node.name()
        if name in ours or name == "torch::autograd::AccumulateGrad":
            continue
        base = _base_name(node)
        reason = None
        factors = node.next_functions[1:] if base in ("Addmm", "Baddbmm", "Addbmm") else node.next_functions
        if base in BILINEAR_NODES and sum(1 for n, _ in factors if n is not None) > 1:
            reason = "product of two input-dependent factors (needs a rule such as the half rule)"
        elif base == "Div":
            if len(node.next_functions) > 1 and node.next_functions[1][0] is not None:
                reason = "division by an input-dependent value (e.g. a normaliser without the LN-rule)"
        elif base in LINEAR_NODES or base in HOMOGENEOUS_NODES or base in BILINEAR_NODES:
            pass
        else:
            reason = "non-linear operation with its plain gradient"
        if reason is not None:
            key = (name, module, reason)
            found[key] = found.get(key, 0) + 1
    uncovered = [UncoveredOp(op, module, count, reason) for (op, module, reason), count in found.items()]
    uncovered.sort(key=lambda u: (u.module, u.op))
    return uncovered, nodes


# ---------------------------------------------------------------------------------------------
# Conservation per block


def residual_blocks(model: nn.Module, targets: Sequence[tuple[str, nn.Module, object]]) -> list[str]:
    """The residual blocks: for every matched mixer or attention layer in the patch plan
    ``targets``, its nearest ancestor that is an element of an ``nn.ModuleList`` (then every
    element of that list, so that MLP-only blocks are included), else its parent."""
    modules = dict(model.named_modules())
    lists: list[str] = []
    loose: list[str] = []
    for name, _, adapter in targets:
        if getattr(adapter, "role", None) not in ("mixer", "attention"):
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            container = ".".join(parts[:i])
            if isinstance(modules.get(container), nn.ModuleList):
                if container not in lists:
                    lists.append(container)
                break
        else:
            parent = name.rpartition(".")[0]
            block = parent if parent else name
            if block not in loose:
                loose.append(block)
    blocks = [f"{c}.{child}" for c in lists for child, _ in modules[c].named_children()]
    return blocks + [b for b in loose if not any(b == x or b.startswith(x + ".") for x in blocks)]


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors a block passes on: a tensor, every tensor of a tuple (e.g. mamba_ssm's
    ``(hidden_states, residual)``), or ``.hidden_states`` / ``.last_hidden_state``."""
    if isinstance(output, torch.Tensor):
        found = [output]
    elif isinstance(output, (tuple, list)):
        found = [t for t in output if isinstance(t, torch.Tensor)]
    else:
        found = [getattr(output, n) for n in ("hidden_states", "last_hidden_state") if isinstance(getattr(output, n, None), torch.Tensor)][:1]
    unique: list[torch.Tensor] = []
    for t in found:
        if t.requires_grad and not any(t is u for u in unique):
            unique.append(t)
    return unique


class BlockProbe:
    """Hooks that record the tensor inputs and outputs of chosen blocks during one forward, so
    that :meth:`measure` can compare the relevance entering and leaving each block.

    Each tensor input of a block is replaced by an alias (a view) that only the block uses, so that
    the gradient at the alias counts the paths through the block alone, even when one input
    depends on another (e.g. Zamba2's layers also receive the embeddings). Outputs are aliased
    too: downstream code sees only the aliases, so the gradient at an alias counts downstream uses
    alone, even when one output feeds another inside the block (mamba_ssm's Block returns
    ``(mixer(norm(residual)), residual)``).

    Use as a context manager around the forward pass; the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, block_names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [b for b in block_names if b not in modules]
        if missing:
            raise ValueError(f"no module called {missing[0]!r} in the model")
        self.blocks = [(b, modules[b]) for b in block_names]
        self.records: dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {b: [] for b in block_names}
        self._pending: dict[str, list[list[torch.Tensor]]] = {b: [] for b in block_names}
        self._handles: list[Any] = []

    def __enter__(self) -> BlockProbe:
        try:
            for name, module in self.blocks:
                self._handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._leave(name), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, name: str):
        def alias(t: Any, inputs: list[torch.Tensor]) -> Any:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t = t.view_as(t)
                inputs.append(t)
            return t

        def hook(module, args, kwargs):
            inputs: list[torch.Tensor] = []
            args = tuple(alias(a, inputs) for a in args)
            kwargs = {k: alias(v, inputs) for k, v in kwargs.items()}
            self._pending[name].append(inputs)
            return args, kwargs

        return hook

    def _leave(self, name: str):
        def hook(module, args, kwargs, output):
            inputs = self._pending[name].pop() if self._pending[name] else []
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output = output.view_as(output)
            elif isinstance(output, tuple) and not hasattr(output, "_fields"):
                output = tuple(t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in output)
            outs = _output_tensors(output)
            if outs:
                self.records[name].append((inputs, outs))
            return output

        return hook

    def measure(self, score: torch.Tensor, batch: int) -> list[BlockConservation]:
        """Relevance in and out of every recorded block call (one backward pass per call)."""
        pairs = [(b, ins, outs) for b, _ in self.blocks for ins, outs in self.records[b]]
        flat = [t for _, _, outs in pairs for t in outs]
        if not flat:
            return []
        grads = iter(torch.autograd.grad(score.sum(), flat, retain_graph=True, allow_unused=True))
        zero = torch.zeros(batch, dtype=torch.float64, device=score.device)
        results: list[BlockConservation] = []
        calls: dict[str, int] = {}
        for name, ins, outs in pairs:
            used = [(o, g) for o, g in ((o, next(grads)) for o in outs) if g is not None]
            if not used:
                continue
            r_out = sum((rows(o * g, batch) for o, g in used), zero)
            r_in = zero
            if ins:
                g_ins = torch.autograd.grad(
                    [o for o, _ in used], ins, [g for _, g in used], retain_graph=True, allow_unused=True
                )
                r_in = sum((rows(x * g, batch) for x, g in zip(ins, g_ins) if g is not None), zero)
            call = calls.get(name, 0)
            calls[name] = call + 1
            suffix = "" if len(self.records[name]) == 1 else f"#{call}"
            results.append(BlockConservation(name + suffix, r_out.float(), r_in.float()))
        return results


# ---------------------------------------------------------------------------------------------
# Additive parameters: found by watching the forward, zeroed for a probe

# Functions whose every tensor argument is added into the result.
_ADDITIVE = frozenset(
    "add __add__ __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_ rsub cat concat concatenate "
    "stack hstack vstack".split()
)
# Functions with one additive argument: name -> (position, keyword).
_BIAS_ARGUMENT = {
    "linear": (2, "bias"),
    "conv1d": (2, "bias"),
    "conv2d": (2, "bias"),
    "conv3d": (2, "bias"),
    "conv_transpose1d": (2, "bias"),
    "conv_transpose2d": (2, "bias"),
    "layer_norm": (3, "bias"),
    "group_norm": (3, "bias"),
    "addmm": (0, "input"),
    "addmv": (0, "input"),
    "addbmm": (0, "input"),
    "baddbmm": (0, "input"),
}
# Functions whose result is (a view, copy or cast of) their first argument.
_DERIVING = frozenset(
    "view view_as reshape reshape_as expand expand_as broadcast_to unsqueeze squeeze transpose permute "
    "flatten unflatten contiguous to float half bfloat16 double type type_as clone repeat __getitem__ narrow "
    "t T mT detach chunk split unbind".split()
)


def _name(func: Any) -> str:
    return getattr(func, "__name__", "") or getattr(getattr(func, "__func__", None), "__name__", "")


class _AdditiveWatch(TorchFunctionMode):
    def __init__(self, tracked: dict[int, str]):
        super().__init__()
        self.tracked = tracked  # id(tensor) -> name of the parameter it comes from
        self.keep: list[torch.Tensor] = []  # keeps derived tensors alive so their ids stay unique
        self.found: set[str] = set()

    def _origin(self, value: Any) -> str | None:
        return self.tracked.get(id(value)) if isinstance(value, torch.Tensor) else None

    def _mark(self, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for v in value:
                self._mark(v)
            return
        origin = self._origin(value)
        if origin is not None:
            self.found.add(origin)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if name in _DERIVING:
            origin = self._origin(args[0]) if args else None
            if origin is not None:
                for t in outputs:
                    if isinstance(t, torch.Tensor):
                        self.tracked[id(t)] = origin
                        self.keep.append(t)
        elif any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
            # On the relevance path only: an addition to a detached coefficient (a dt bias, which
            # the SSM rule holds constant) absorbs no relevance.
            if name in _ADDITIVE:
                for a in list(args) + list(kwargs.values()):
                    self._mark(a)
            elif name in _BIAS_ARGUMENT:
                position, keyword = _BIAS_ARGUMENT[name]
                self._mark(args[position] if len(args) > position else kwargs.get(keyword))
        return out


def floating_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point parameter and buffer of ``model`` by qualified name (shared ones once)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


@contextlib.contextmanager
def additive_uses(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, watch the forward: the yielded dict fills with every floating parameter or buffer
    of ``model`` that is added into a result on the relevance path (``+``, ``-``, concatenation,
    the bias argument of linear maps, convolutions and norms), directly or through views and
    casts. Run the forward with the input requiring grad (and the parameters not): an addition
    whose result requires grad lies on the relevance path; one on the coefficient path (a ``dt``
    bias, which the SSM rule detaches) does not, and is left alone."""
    tensors = floating_tensors(model)
    watch = _AdditiveWatch({id(t): n for n, t in tensors.items()})
    found: dict[str, torch.Tensor] = {}
    try:
        with watch:
            yield found
    finally:
        found.update((n, tensors[n]) for n in sorted(watch.found))
        watch.keep.clear()


@contextlib.contextmanager
def zeroed(model: nn.Module, tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Replace each given parameter or buffer of ``model`` by zeros, in every module slot that
    holds it; put the very same tensor objects back on exit (bitwise restoration, nothing
    written into the originals). Only zeros of those tensors' sizes are allocated."""
    wanted = {id(t) for t in tensors}
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is not None and id(value) in wanted:
                    slots.append((store, key, value))
    zeros: dict[int, torch.Tensor] = {}
    try:
        for store, key, value in slots:
            if id(value) not in zeros:
                z = torch.zeros_like(value, memory_format=torch.preserve_format)
                zeros[id(value)] = nn.Parameter(z, requires_grad=False) if isinstance(value, nn.Parameter) else z
            store[key] = zeros[id(value)]
        yield
    finally:
        for store, key, value in slots:
            store[key] = value

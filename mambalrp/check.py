"""``check_rules()``: does every operation on the relevance path have a rule, and is relevance
conserved block by block?

Two independent checks on one forward pass under :func:`mambalrp.lrp`:

1. **Coverage.** The backward graph from the explained output down to the input embedding is
   walked node by node. A node passes if it is one of mambalrp's rule operators, an operation that
   is linear in the signal (matrix products with a constant weight, views, sums, convolutions, ...),
   or a product / quotient in which only one factor depends on the input. Everything else (a SiLU,
   softmax, exp, a product of two signals, a normaliser that depends on its input) is listed as
   *uncovered*: there the backward pass is a true gradient that does not conserve relevance.
   Each uncovered node is attributed to the innermost module whose forward created it.
2. **Conservation per block.** For each block (by default every residual block, e.g.
   ``backbone.layers.3``), the relevance that leaves the block (``output * grad`` over its tensor
   outputs) is compared with the relevance that enters it (``input * grad`` over its tensor
   inputs). Inputs and outputs are aliased at the block boundary so that only paths through the
   block itself are counted.

Biases on the relevance path absorb relevance by design: zero them (see
:func:`mambalrp.testing.zero_biases`) before reading the conservation part as a test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mambalrp.context import lrp, plan
from mambalrp.errors import UnsupportedModelError
from mambalrp.explain import Target, _call, _capture, _frozen, _inputs, _output_tensor, _positions, _select
from mambalrp.rules import RuleSet, get_rules

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
        name: Qualified module name.
        relevance_out: ``(batch,)`` relevance leaving the block (``output * grad``).
        relevance_in: ``(batch,)`` relevance entering it (``input * grad`` over its tensor inputs).
    """

    name: str
    relevance_out: torch.Tensor
    relevance_in: torch.Tensor

    @property
    def relative_error(self) -> float:
        """Largest ``|in - out| / |out|`` over the batch."""
        den = self.relevance_out.abs().clamp_min(1e-12)
        return float(((self.relevance_in - self.relevance_out).abs() / den).max())


@dataclass
class RuleReport:
    """Result of :func:`check_rules`.

    Attributes:
        rules: Name of the rule set checked.
        uncovered: Operations on the relevance path that no rule covers.
        blocks: Conservation of each block, in forward order.
        logit: ``(batch,)`` the explained output.
        input_relevance: ``(batch,)`` total relevance at the input embedding.
        rtol: Relative tolerance used by :attr:`ok`.
        nodes: Number of backward nodes inspected.
        notes: Remarks for the reader (biases that absorb relevance, no block found).
    """

    rules: str
    uncovered: list[UncoveredOp]
    blocks: list[BlockConservation]
    logit: torch.Tensor
    input_relevance: torch.Tensor
    rtol: float
    nodes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_relative_error(self) -> float:
        """Largest ``|sum R - logit| / |logit|`` over the batch."""
        den = self.logit.abs().clamp_min(1e-12)
        return float(((self.input_relevance - self.logit).abs() / den).max())

    @property
    def leaking_blocks(self) -> list[BlockConservation]:
        """Blocks whose relative conservation error exceeds :attr:`rtol`."""
        return [b for b in self.blocks if b.relative_error > self.rtol]

    @property
    def ok(self) -> bool:
        """No uncovered operation, and every block and the whole model conserve within ``rtol``."""
        return not self.uncovered and not self.leaking_blocks and self.total_relative_error <= self.rtol

    def __str__(self) -> str:
        lines = [
            f"mambalrp rule check ({self.rules}): {'OK' if self.ok else 'PROBLEMS FOUND'}",
            f"  backward nodes inspected: {self.nodes}",
        ]
        if self.uncovered:
            lines.append(f"  uncovered operations on the relevance path ({len(self.uncovered)}):")
            for u in self.uncovered:
                lines.append(f"    {u.op:<28} x{u.count:<4} in {u.module or '<model>'}: {u.reason}")
        else:
            lines.append("  uncovered operations on the relevance path: none")
        lines.append(f"  conservation per block (relative error, tolerance {self.rtol:g}):")
        for b in self.blocks:
            flag = "  LEAK" if b.relative_error > self.rtol else ""
            lines.append(
                f"    {b.name:<32} out {b.relevance_out.sum().item():+.6g}  in {b.relevance_in.sum().item():+.6g}"
                f"  err {b.relative_error:.2e}{flag}"
            )
        lines.append(
            f"  whole model: logit {self.logit.sum().item():+.6g}  sum R {self.input_relevance.sum().item():+.6g}"
            f"  err {self.total_relative_error:.2e}"
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"RuleReport(rules={self.rules!r}, ok={self.ok}, uncovered={len(self.uncovered)}, "
            f"leaking_blocks={[b.name for b in self.leaking_blocks]}, total_error={self.total_relative_error:.2e})"
        )


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
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module, args):
            stack.append(name)

        return hook

    def leave(module, args, output):
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _default_blocks(model: nn.Module, rules: RuleSet) -> list[str]:
    """The residual blocks: for every matched mixer or attention layer, its nearest ancestor that
    is an element of an ``nn.ModuleList`` (then every element of that list, so that MLP-only
    blocks are included), else its parent."""
    modules = dict(model.named_modules())
    lists: list[str] = []
    loose: list[str] = []
    for name, _, adapter in plan(model, rules):
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


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    t = t.detach().double()
    if t.dim() == 0 or t.shape[0] != batch:
        return t.sum().expand(batch) / batch
    return t.reshape(batch, -1).sum(-1)


def check_rules(
    model: nn.Module,
    input_ids: torch.Tensor,
    target: Target = None,
    *,
    position: int | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    rules: str | RuleSet = "mambalrp",
    blocks: Sequence[str] | None = None,
    rtol: float = 1e-4,
    input_layer: nn.Module | None = None,
) -> RuleReport:
    """Check that the rules cover every operation on the relevance path, and conserve per block.

    LXT-style coverage check: one forward under :func:`mambalrp.lrp`, then the backward graph of
    the explained output is inspected (no backward pass is needed for that part) and one backward
    pass per block measures its conservation.

    Example:
        >>> report = mambalrp.check_rules(model, ids)
        >>> print(report)           # lists uncovered ops by module and leaking blocks
        >>> assert report.ok

    Args:
        model: A supported model (as for :func:`mambalrp.explain`).
        input_ids: ``(batch, seq)`` token ids.
        target: What to explain (as for :func:`mambalrp.explain`).
        position: Position to explain (as for :func:`mambalrp.explain`).
        attention_mask: Optional ``(batch, seq)`` padding mask.
        rules: Rule set to check.
        blocks: Qualified names of the modules whose conservation to measure. Default: the residual
            blocks, i.e. every element of the ``nn.ModuleList`` that holds the matched mixers and
            attention layers (a matched layer outside such a list contributes its parent).
        rtol: Relative tolerance of :attr:`RuleReport.ok`.
        input_layer: Module whose output is the explained input (as for :func:`mambalrp.explain`).

    Returns:
        A :class:`RuleReport`; ``print`` it for a readable summary.
    """
    rule_set = get_rules(rules)
    embedding, ids, mask = _inputs(model, input_ids, attention_mask, input_layer)
    block_names = list(blocks) if blocks is not None else _default_blocks(model, rule_set)
    modules = dict(model.named_modules())
    missing = [b for b in block_names if b not in modules]
    if missing:
        raise ValueError(f"no module called {missing[0]!r} in the model")

    records: dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {b: [] for b in block_names}

    # Each tensor input of a block is replaced by an alias (a view) that only the block uses, so
    # that the gradient at the alias counts the paths through the block alone, even when one input
    # depends on another (e.g. Zamba2's layers also receive the embeddings).
    pending: dict[str, list[list[torch.Tensor]]] = {b: [] for b in block_names}

    def alias(t: Any, inputs: list[torch.Tensor]) -> Any:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t = t.view_as(t)
            inputs.append(t)
        return t

    def enter(name: str):
        def hook(module, args, kwargs):
            inputs: list[torch.Tensor] = []
            args = tuple(alias(a, inputs) for a in args)
            kwargs = {k: alias(v, inputs) for k, v in kwargs.items()}
            pending[name].append(inputs)
            return args, kwargs

        return hook

    def leave(name: str):
        def hook(module, args, kwargs, output):
            inputs = pending[name].pop() if pending[name] else []
            # Outputs are aliased too: downstream code sees only the aliases, so the gradient at an
            # alias counts downstream uses alone, even when one output feeds another inside the
            # block (mamba_ssm's Block returns (mixer(norm(residual)), residual)).
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output = output.view_as(output)
            elif isinstance(output, tuple) and not hasattr(output, "_fields"):
                output = tuple(t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in output)
            outs = _output_tensors(output)
            if outs:
                records[name].append((inputs, outs))
            return output

        return hook

    handles = []
    for b in block_names:
        handles.append(modules[b].register_forward_pre_hook(enter(b), with_kwargs=True))
        handles.append(modules[b].register_forward_hook(leave(b), with_kwargs=True))
    try:
        with _frozen(model), lrp(model, rule_set), _capture(embedding) as captured, _module_stack(model) as stack:
            with torch.enable_grad(), _Attribution(stack):
                output = _output_tensor(_call(model, ids, mask, keep_from=None)[0])
            with torch.enable_grad():
                if output.dim() == 3:
                    pos = _positions(position, mask, ids if input_layer is None else output[..., 0])
                    selected = output[torch.arange(ids.shape[0], device=output.device), pos.to(output.device)]
                else:
                    selected = output
                score, _ = _select(selected, target)
                if not captured:
                    raise UnsupportedModelError("the model's forward never called its input embedding")
                emb = captured[0]
                uncovered, n_nodes = _inspect(score)
                pairs = [(b, ins, outs) for b in block_names for ins, outs in records[b]]
                flat = [t for _, _, outs in pairs for t in outs]
                grads = torch.autograd.grad(score.sum(), [emb] + flat, retain_graph=True, allow_unused=True)
                out_grads = iter(grads[1:])
                batch = ids.shape[0]
                results: list[BlockConservation] = []
                seen_calls: dict[str, int] = {}
                for name, ins, outs in pairs:
                    g_outs = [next(out_grads) for _ in outs]
                    used = [(o, g) for o, g in zip(outs, g_outs) if g is not None]
                    if not used:
                        continue
                    r_out = sum((_rows(o * g, batch) for o, g in used), torch.zeros(batch, dtype=torch.float64, device=emb.device))
                    r_in = torch.zeros(batch, dtype=torch.float64, device=emb.device)
                    if ins:
                        g_ins = torch.autograd.grad(
                            [o for o, _ in used], ins, [g for _, g in used], retain_graph=True, allow_unused=True
                        )
                        for x, g in zip(ins, g_ins):
                            if g is not None:
                                r_in = r_in + _rows(x * g, batch)
                    call = seen_calls.get(name, 0)
                    seen_calls[name] = call + 1
                    suffix = "" if len(records[name]) == 1 else f"#{call}"
                    results.append(BlockConservation(name + suffix, r_out.float(), r_in.float()))
                total = _rows(emb * grads[0], batch) if grads[0] is not None else torch.zeros(batch, device=score.device)
    finally:
        for h in handles:
            h.remove()
    notes = []
    biased = [
        n for n, p in model.named_parameters()
        if n.endswith("bias") and not n.endswith(("dt_bias", "dt_proj.bias")) and bool(p.detach().any())
    ]
    if biased:
        notes.append(
            f"{len(biased)} non-zero bias tensors (e.g. {biased[0]}) absorb relevance; "
            "zero them (mambalrp.testing.zero_biases) to test conservation"
        )
    if not results:
        notes.append("no block output lies on the relevance path; pass blocks=[...] to choose them")
    return RuleReport(
        rules=rule_set.name,
        uncovered=uncovered,
        blocks=results,
        logit=score.detach().float(),
        input_relevance=total.float(),
        rtol=rtol,
        nodes=n_nodes,
        notes=notes,
    )


def _inspect(score: torch.Tensor) -> tuple[list[UncoveredOp], int]:
    """Walk the backward graph of ``score``; return the uncovered nodes grouped by op and module."""
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

"""``check_rules()``: does the model under the rules compute the model's outputs, does every
operation on the relevance path have a rule, and where does relevance go?

Four measurements on the explained input, under :func:`mambalrp.lrp`:

1. **Forward.** The output under the rules is compared with the model's own output.
2. **Coverage.** The backward graph from the explained output down to the input embedding is
   walked node by node. A node passes if it is one of mambalrp's rule operators, an operation that
   is linear in the signal (matrix products with a constant weight, views, sums, convolutions, ...),
   or a product / quotient in which only one factor depends on the input. Everything else (a SiLU,
   softmax, exp, a product of two signals, a normaliser that depends on its input) is listed as
   *uncovered*: there the backward pass is a true gradient that does not conserve relevance.
   Each uncovered node is attributed to the innermost module whose forward created it.
3. **Where the explained score goes.** With the model as it is, the score splits into the
   relevance of the input, the relevance absorbed by biases and other additively used parameters
   (``p * dscore/dp``, expected and reported), and a remainder, the *leak*, which exact rules
   keep at zero. Relative errors are taken against the scale of what was split, never against a
   score near zero alone.
4. **Conservation per block.** With the additive parameters replaced by zeros (the very tensor
   objects are put back afterwards), for each block (by default every residual block, e.g.
   ``backbone.layers.3``) the relevance that leaves the block (``output * grad``) is compared with
   the relevance that enters it (``input * grad``). Inputs and outputs are aliased at the block
   boundary so that only paths through the block itself are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mambalrp.conservation import (
    BlockConservation,
    BlockProbe,
    UncoveredOp,
    additive_uses,
    attributing,
    relative_gap,
    residual_blocks,
    uncovered_operations,
    zeroed,
)
from mambalrp.context import lrp, planned
from mambalrp.errors import InputError, UnsupportedModelError
from mambalrp.inputs import (
    Target,
    call_model,
    capture_embedding,
    check_model,
    output_tensor,
    positions,
    resolve_inputs,
    select,
)
from mambalrp.rules import RuleSet, get_rules
from mambalrp.state import autograd_enabled, exclusive, frozen
from mambalrp.verification import compute_dtype, tolerance

__all__ = ["BlockConservation", "RuleReport", "UncoveredOp", "check_rules"]


@dataclass
class RuleReport:
    """Result of :func:`check_rules`.

    Attributes:
        rules: Name of the rule set checked.
        uncovered: Operations on the relevance path that no rule covers.
        blocks: Conservation of each block with the additive parameters zeroed, in forward order.
        logit: ``(batch,)`` the explained output.
        input_relevance: ``(batch,)`` total relevance at the input embedding.
        absorbed: ``(batch,)`` relevance absorbed by biases and other additive parameters.
        relevance_magnitude: ``(batch,)`` sum of the absolute input relevances.
        rtol: Relative tolerance of the conservation checks in :attr:`ok`.
        forward_difference: Largest ``|output under the rules - model output|`` (real tokens).
        forward_scale: Largest ``|model output|``.
        forward_tolerance: Relative tolerance of the forward check (see :func:`mambalrp.verify.tolerance`).
        zeroed: Names of the additive parameters and buffers (zeroed for the block check).
        nodes: Number of backward nodes inspected.
        notes: Remarks for the reader.
        forward_error: Why the model's own forward failed, if it did (e.g. a kernel that needs a
            GPU); the forward check then fails, the others still run.
    """

    rules: str
    uncovered: list[UncoveredOp]
    blocks: list[BlockConservation]
    logit: torch.Tensor
    input_relevance: torch.Tensor
    absorbed: torch.Tensor
    relevance_magnitude: torch.Tensor
    rtol: float
    forward_difference: float
    forward_scale: float
    forward_tolerance: float
    zeroed: list[str] = field(default_factory=list)
    nodes: int = 0
    notes: list[str] = field(default_factory=list)
    forward_error: str = ""

    @property
    def leak(self) -> torch.Tensor:
        """``(batch,)`` ``logit - input_relevance - absorbed``: relevance lost (or created) by
        operations without a conserving rule."""
        return self.logit - self.input_relevance - self.absorbed

    @property
    def total_relative_error(self) -> float:
        """Largest relative leak over the batch, against ``max(|logit|, |input relevance + absorbed|,
        sum |input relevance|)`` (see :func:`~mambalrp.conservation.relative_gap`)."""
        return relative_gap(self.logit, self.input_relevance + self.absorbed, self.relevance_magnitude)

    @property
    def leaking_blocks(self) -> list[BlockConservation]:
        """Blocks whose relative conservation error exceeds :attr:`rtol`."""
        return [b for b in self.blocks if b.relative_error > self.rtol]

    @property
    def forward_ok(self) -> bool:
        """The output under the rules equals the model's own within the forward tolerance."""
        return not self.forward_error and self.forward_difference <= self.forward_tolerance * max(self.forward_scale, 1e-6)

    @property
    def ok(self) -> bool:
        """Same outputs, no uncovered operation, no leak, every block conserving within ``rtol``.
        Bias absorption is expected and does not count against it."""
        return self.forward_ok and not self.uncovered and not self.leaking_blocks and self.total_relative_error <= self.rtol

    def __str__(self) -> str:
        if self.forward_error:
            forward = f"  forward under the rules: not compared, the model's own forward failed ({self.forward_error})"
        else:
            forward = (
                f"  forward under the rules: max |difference| {self.forward_difference:.3g} for outputs of scale "
                f"{self.forward_scale:.3g} (tolerance {self.forward_tolerance:g} of the scale)"
                + ("" if self.forward_ok else "  DIFFERENT FUNCTION")
            )
        lines = [
            f"mambalrp rule check ({self.rules}): {'OK' if self.ok else 'PROBLEMS FOUND'}",
            forward,
            f"  backward nodes inspected: {self.nodes}",
        ]
        if self.uncovered:
            lines.append(f"  uncovered operations on the relevance path ({len(self.uncovered)}):")
            for u in self.uncovered:
                lines.append(f"    {u.op:<28} x{u.count:<4} in {u.module or '<model>'}: {u.reason}")
        else:
            lines.append("  uncovered operations on the relevance path: none")
        lines.append(
            f"  conservation per block with {len(self.zeroed)} additive parameters zeroed "
            f"(relative error, tolerance {self.rtol:g}):"
        )
        for b in self.blocks:
            flag = "  LEAK" if b.relative_error > self.rtol else ""
            lines.append(
                f"    {b.name:<32} out {b.relevance_out.sum().item():+.6g}  in {b.relevance_in.sum().item():+.6g}"
                f"  err {b.relative_error:.2e}{flag}"
            )
        lines.append(
            f"  whole model: logit {self.logit.sum().item():+.6g} = input relevance {self.input_relevance.sum().item():+.6g}"
            f" + absorbed by biases {self.absorbed.sum().item():+.6g} + leak {self.leak.sum().item():+.3g}"
            f"  (relative leak {self.total_relative_error:.2e}"
            + ("  LEAK)" if self.total_relative_error > self.rtol else ")")
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"RuleReport(rules={self.rules!r}, ok={self.ok}, forward_difference={self.forward_difference:.2e}, "
            f"uncovered={len(self.uncovered)}, leaking_blocks={[b.name for b in self.leaking_blocks]}, "
            f"total_error={self.total_relative_error:.2e})"
        )


def _explained(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, position: Any, pos: torch.Tensor | None, target: Target
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run the model; return ``(score, target ids, full output)`` as :func:`mambalrp.explain` selects them."""
    output = output_tensor(call_model(model, ids, mask, keep_from=None)[0])
    if output.dim() == 3:
        if pos is None:
            pos = positions(position, None, output[..., 0])
        selected = output[torch.arange(ids.shape[0], device=output.device), pos.to(output.device)]
    elif output.dim() == 2:
        if position is not None:
            raise InputError("position was given but the model's output has no sequence dimension; leave position=None")
        selected = output
    else:
        raise InputError(f"model output must be (batch, seq, vocab) or (batch, classes); got {tuple(output.shape)}")
    score, tgt = select(selected, target)
    return score, tgt, output


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
    """Check that the rules reproduce the model's outputs, cover every operation on the relevance
    path, and conserve: per block, and for the whole model with bias absorption separated.

    LXT-style coverage check plus measurements (see the module docstring): a forward of the model
    itself, forwards under :func:`mambalrp.lrp` with the parameters as they are and with the
    additive ones zeroed, one backward pass per batch row and one per block. For a trained model
    with biases, exact rules report OK: biases absorb relevance (reported as ``absorbed``), they
    do not leak it.

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
    check_model(model)
    rule_set = get_rules(rules)
    with exclusive(model), autograd_enabled():
        embedding, ids, mask = resolve_inputs(model, input_ids, attention_mask, input_layer)
        targets, _ = planned(model, rule_set)
        block_names = list(blocks) if blocks is not None else residual_blocks(model, targets)
        pos = positions(position, mask, ids) if input_layer is None else None
        with frozen(model):
            # 1. Forward: the model itself against the model under the rules; additive tensors found.
            reference, forward_error = None, ""
            with torch.no_grad():
                try:
                    reference = output_tensor(call_model(model, ids, mask, keep_from=None)[0])
                except Exception as err:  # noqa: BLE001 - reported
                    forward_error = f"{type(err).__name__}: {err}"
            with lrp(model, rule_set, patch_plan=targets), capture_embedding(embedding), additive_uses(model) as additive:
                under_rules = output_tensor(call_model(model, ids, mask, keep_from=None)[0]).detach()
            difference, scale = float("nan"), float("nan")
            if reference is not None:
                real = mask.bool() if mask is not None and reference.dim() >= 2 and reference.shape[:2] == mask.shape else None
                ref, got = (reference, under_rules) if real is None else (reference[real], under_rules[real])
                difference = float((ref.float() - got.float()).abs().max()) if ref.shape == got.shape else float("inf")
                scale = float(ref.float().abs().max())

            # 2-3. Coverage and where the score goes, with the parameters as they are.
            params = list(additive.values())
            flags = [t.requires_grad for t in params]
            try:
                for t in params:
                    t.requires_grad_(True)
                with lrp(model, rule_set, patch_plan=targets), capture_embedding(embedding) as captured:
                    score, tgt, _ = _explained(model, ids, mask, position, pos, target)
                    if not captured:
                        raise UnsupportedModelError("the model's forward never called its input embedding")
                    emb = captured[0]
                    batch = ids.shape[0]
                    relevance, absorbed, magnitude = [], [], []
                    for row in range(batch):
                        grads = torch.autograd.grad(score[row], [emb] + params, retain_graph=True, allow_unused=True)
                        r = (emb[row].detach().double() * grads[0][row].double()).sum(-1) if grads[0] is not None else None
                        relevance.append(float(r.sum()) if r is not None else 0.0)
                        magnitude.append(float(r.abs().sum()) if r is not None else 0.0)
                        absorbed.append(sum(float((p.detach().double() * g.double()).sum()) for p, g in zip(params, grads[1:]) if g is not None))
            finally:
                for t, flag in zip(params, flags):
                    t.requires_grad_(flag)

            # 4. Coverage and conservation per block, additive tensors zeroed (so that no parameter
            # requires grad: the graph holds only what depends on the input), the same target.
            fixed = target if callable(target) and not isinstance(target, torch.Tensor) else tgt
            with zeroed(model, params), lrp(model, rule_set, patch_plan=targets), capture_embedding(embedding):
                with attributing(model), BlockProbe(model, block_names) as probe:
                    block_score, _, _ = _explained(model, ids, mask, position, pos, fixed)
                uncovered, n_nodes = uncovered_operations(block_score)
                results = probe.measure(block_score, batch)

    device = score.device
    notes = []
    if params:
        notes.append(
            f"{len(params)} parameters or buffers enter additively (e.g. {sorted(additive)[0]}); relevance they absorb "
            "is reported as 'absorbed by biases', not as a leak"
        )
    if not results:
        notes.append("no block output lies on the relevance path; pass blocks=[...] to choose them")
    return RuleReport(
        rules=rule_set.name,
        uncovered=uncovered,
        blocks=results,
        logit=score.detach().float(),
        input_relevance=torch.tensor(relevance, device=device, dtype=torch.float64).float(),
        absorbed=torch.tensor(absorbed, device=device, dtype=torch.float64).float(),
        relevance_magnitude=torch.tensor(magnitude, device=device, dtype=torch.float64).float(),
        rtol=rtol,
        forward_difference=difference,
        forward_scale=scale,
        forward_tolerance=tolerance(compute_dtype(model)),
        forward_error=forward_error,
        zeroed=sorted(additive),
        nodes=n_nodes,
        notes=notes,
    )

"""Several outputs of ONE sequence explained with one forward and one batched backward pass.

A causal model's output at position ``p`` depends on the tokens ``0..p`` only, so the outputs at
``k`` positions of one sequence (the ``k`` steps of a generation, teacher-forced) come from one
forward pass. Under the rules the backward pass is linear in its cotangent: the ``k``
explanations are one backward pass carrying ``k`` cotangents at once (``torch.autograd.grad`` under
``torch.func.vmap``), reading the forward's saved tensors once instead of ``k`` times.

:func:`explain_outputs` does this for one row. The model's output head runs on the ``k``
explained positions only. It works where every backward on the way runs under batched
gradients: the built-in operations and the library's rule functions on the CPU (their torch
implementations are written for it). Otherwise (a Triton kernel, an operation whose batched
backward torch cannot run) it raises :class:`BatchedBackwardError` and the caller explains the
outputs another way (:func:`mambalrp.explain_generation` falls back to ``k`` copies of the
sequence in one batch, which any model supports). It never returns a partial or approximate
result: batched gradients are exact or fail.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from mambalrp.context import lrp, planned
from mambalrp.errors import InputError, UnsupportedModelError
from mambalrp.functional import dispatch
from mambalrp.inputs import (
    Target,
    _is_integer_dtype,
    call_model,
    capture_embedding,
    check_model,
    check_target,
    gather_head_input,
    output_tensor,
    resolve_inputs,
    select,
)
from mambalrp.rules import RuleSet, get_rules
from mambalrp.state import autograd_enabled, exclusive, frozen
from mambalrp.verification import ensure_verified

__all__ = ["BatchedBackwardError", "OutputsExplanation", "explain_outputs", "supports_batched_backward"]


class OutputsExplanation(NamedTuple):
    """What :func:`explain_outputs` returns."""

    relevance: torch.Tensor
    """``(k, T)`` float32 relevance of every token for each explained output."""
    scores: torch.Tensor
    """``(k,)`` the explained scores (the target logits, or the callable's scores)."""
    targets: torch.Tensor | None
    """``(k,)`` target ids; ``None`` for a callable target."""
    outputs: torch.Tensor
    """``(k, vocab)`` the model's outputs at the explained positions (detached), from the
    explained forward pass."""


class BatchedBackwardError(RuntimeError):
    """The model's backward pass under the rules cannot run with a batch of cotangents."""


def supports_batched_backward(ids: torch.Tensor) -> bool:
    """Whether :func:`explain_outputs` can be tried for inputs like ``ids``: on the CPU, where the
    rules run their torch implementations (the Triton kernels take one cotangent at a time)."""
    return ids.device.type == "cpu" and dispatch.get_backend() != "triton"


def explain_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    target: Target,
    *,
    attention_mask: torch.Tensor | None = None,
    rules: str | RuleSet = "mambalrp",
    verify: bool = True,
) -> OutputsExplanation:
    """Explain the outputs at ``k`` positions of one sequence: one forward, one batched backward.

    Row ``i`` of the result equals ``explain(model, input_ids, target[i], position=positions[i])``
    (the relevance of every token of the sequence for that output; tokens after
    ``positions[i]`` get exactly what causality gives them, zero up to rounding). The model is
    checked, verified (cached verdict) and restored exactly as by :func:`mambalrp.explain`.

    Args:
        model: A supported causal model with a ``(batch, seq, vocab)`` output.
        input_ids: ``(1, T)`` or ``(T,)`` token ids: one sequence.
        positions: ``(k,)`` positions to explain, each in ``[0, T)``.
        target: ``(k,)`` ids (one per position), one int for all, ``None`` (arg-max), or a
            callable mapping the ``(k, vocab)`` outputs to ``(k,)`` scores, score ``i`` from row
            ``i`` alone (checked, as by :func:`mambalrp.explain`).
        attention_mask: ``(1, T)`` 0/1 padding mask, or ``None``.
        rules: The rule set.
        verify: Verify the model under the rules first (cached).

    Returns:
        An :class:`OutputsExplanation`: relevance ``(k, T)``, scores, target ids, and the outputs
        at the explained positions (the forward under the rules, verified equal to the model's).

    Raises:
        BatchedBackwardError: The backward pass cannot carry a batch of cotangents (see the module
            docstring); nothing was changed and the caller may explain the outputs another way.
        InputError, UnsupportedModelError, VerificationError: As for :func:`mambalrp.explain`.
    """
    check_model(model)
    rule_set = get_rules(rules)
    check_target(target)
    with exclusive(model), autograd_enabled():
        embedding, ids, mask = resolve_inputs(model, input_ids, attention_mask, None)
        if ids.shape[0] != 1:
            raise InputError(f"explain_outputs explains one sequence; got a batch of {ids.shape[0]}")
        length = ids.shape[1]
        pos = _positions(positions, length, ids.device)
        if mask is not None and not bool(mask[0, pos].all()):
            raise InputError(f"positions {pos.tolist()} include a padding token")
        plan, stamp = planned(model, rule_set)
        with frozen(model):
            if verify:
                ensure_verified(model, plan, stamp, embedding, ids, input_layer=False, leaks=rule_set.conserving)
            with (
                lrp(model, rule_set, patch_plan=plan),
                capture_embedding(embedding) as captured,
                gather_head_input(model, pos, length, one_row=True) as gathered,
            ):
                output, first = call_model(model, ids, mask, keep_from=int(pos.min()))
                output = output_tensor(output)
                if output.dim() != 3:
                    raise InputError(
                        f"explain_outputs needs an output with a sequence dimension; got shape {tuple(output.shape)}"
                    )
                if gathered:  # the head ran on the k explained positions only: (1, k, vocab)
                    selected = output[0]
                else:
                    index = pos - (length - output.shape[1]) if first else pos
                    selected = output[0, index.to(output.device)]
                score, tgt = select(selected, target)
                if not captured:
                    raise UnsupportedModelError("the model's forward never called its input embedding")
                emb = captured[0]
                grad = _batched_grad(score, emb, gathered[0] if gathered else None)
    relevance = (emb.detach().float() * grad.float()).sum(-1)[:, 0]
    return OutputsExplanation(relevance, score.detach().float(), tgt, selected.detach())


def _batched_grad(score: torch.Tensor, emb: torch.Tensor, head_input: torch.Tensor | None) -> torch.Tensor:
    """``(k, *emb.shape)``: the gradient of each of the ``k`` scores at ``emb``, in one batched
    backward pass.

    With ``head_input`` (the ``(1, k, d)`` input of a position-wise head, score ``i`` reading row
    ``i`` only) the head's part is one ordinary backward pass (row ``i`` of the gradient of the
    summed scores is score ``i``'s own), and the batched pass starts at ``head_input`` with ``k``
    cotangents of one row each. This spares ``k x k x vocab`` zeros the head's batched backward
    would fill.
    """
    k = score.shape[0]
    try:
        with warnings.catch_warnings():
            # Operations without a batching rule fall back to a loop over the cotangents (exact,
            # slower); torch warns about each.
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            if head_input is not None:
                (rows,) = torch.autograd.grad(score.sum(), head_input, retain_graph=True)
                eye = torch.eye(k, dtype=rows.dtype, device=rows.device)
                cotangents = eye[:, None, :, None] * rows  # (k, 1, k, d): cotangent i is row i
                start = head_input
            else:
                cotangents, start = torch.eye(k, dtype=score.dtype, device=score.device), score
            (grad,) = torch.func.vmap(lambda v: torch.autograd.grad(start, emb, grad_outputs=v))(cotangents)
    except RuntimeError as err:
        raise BatchedBackwardError(f"the backward pass under the rules cannot take batched cotangents: {err}") from err
    return grad


def _positions(positions: Any, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.numel() == 0:
        raise InputError("positions must be a non-empty (k,) tensor of ints")
    if not _is_integer_dtype(positions.dtype):
        raise InputError(f"positions must hold integers; got dtype {positions.dtype}")
    pos = positions.to(device=device, dtype=torch.long)
    if bool(((pos < 0) | (pos >= length)).any()):
        raise InputError(f"positions {pos.tolist()} out of range for a sequence of length {length}")
    return pos

"""Faithfulness and conservation metrics.

Input flipping (deletion), as in the MambaLRP paper: tokens are removed in order of relevance,
most relevant first (MoRF) or least relevant first (LeRF), and the logit of the explained class
is tracked. "Removing" a token means **replacing it by a neutral token** (the padding token of
the model's vocabulary), keeping the sequence length and every other token in place; the same
is done for every method. The curve is sampled at the removed fractions ``0, 1/K, ..., 1`` of the
example's tokens (``round(f * T)`` tokens), and its area uses the trapezoid rule over ``[0, 1]``,
so areas are in logit units. ``dA_F = A_LeRF - A_MoRF`` (higher is better; random is about 0).

Insertion, the ``dA_I`` variant: starting from an empty input, tokens are inserted most
relevant first (MoRF) or least relevant first (LeRF); an input is the sub-sequence of the
inserted tokens in their original order (the other tokens are deleted, the sequence is
shorter; the empty input is one neutral token). ``dA_I = A_MoRF^ins - A_LeRF^ins``. With
replacement instead of deletion, insertion would just be deletion read backwards, so the two
variants use the two removal modes on purpose.

Ties in the scores are broken by position (stable sort), identically for MoRF and LeRF.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.faithfulness.methods import target_logits


@dataclass
class Curves:
    """Per-example flipping curves, each ``(batch, K + 1)``."""

    morf: torch.Tensor
    lerf: torch.Tensor
    ins_morf: torch.Tensor
    ins_lerf: torch.Tensor

    def areas(self) -> dict[str, torch.Tensor]:
        """Per-example areas and differences ``A_MoRF, A_LeRF, dA_F, A_ins_MoRF, A_ins_LeRF, dA_I``."""
        a = {k: area(getattr(self, k)) for k in ("morf", "lerf", "ins_morf", "ins_lerf")}
        return {
            "A_MoRF": a["morf"], "A_LeRF": a["lerf"], "dA_F": a["lerf"] - a["morf"],
            "A_ins_MoRF": a["ins_morf"], "A_ins_LeRF": a["ins_lerf"], "dA_I": a["ins_morf"] - a["ins_lerf"],
        }


def area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of ``(batch, K + 1)`` curves sampled uniformly on ``[0, 1]``."""
    k = curve.shape[-1] - 1
    return (curve[..., :-1] + curve[..., 1:]).sum(-1) / (2 * k)


def orders(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token orders ``(batch, T)``: most relevant first, least relevant first."""
    morf = torch.sort(-scores.float(), dim=-1, stable=True).indices
    lerf = torch.sort(scores.float(), dim=-1, stable=True).indices
    return morf, lerf


def deletion_curve(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                   neutral_id: int, steps: int) -> torch.Tensor:
    """Target logit after replacing the first ``round(f * T)`` tokens of ``order`` by ``neutral_id``."""
    b, T = ids.shape
    counts = [round(k * T / steps) for k in range(steps + 1)]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T).expand(b, T).contiguous())  # rank of each position
    batch = []
    for n in counts:
        batch.append(torch.where(rank < n, torch.full_like(ids, neutral_id), ids))
    flipped = torch.stack(batch, 1).reshape(b * (steps + 1), T)
    return target_logits(model, flipped, target.repeat_interleave(steps + 1)).reshape(b, steps + 1)


def insertion_curve(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                    neutral_id: int, steps: int) -> torch.Tensor:
    """Target logit of the sub-sequence made of the first ``round(f * T)`` tokens of ``order``.

    Sub-sequences keep the original token order and are left-padded with an attention mask.
    """
    b, T = ids.shape
    counts = [round(k * T / steps) for k in range(steps + 1)]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T).expand(b, T).contiguous())
    padded = torch.full((b, steps + 1, T), neutral_id, dtype=ids.dtype)
    mask = torch.zeros((b, steps + 1, T), dtype=torch.long)
    for i in range(b):
        for k, n in enumerate(counts):
            kept = ids[i][rank[i] < n]
            if kept.numel() == 0:
                kept = ids.new_tensor([neutral_id])
            padded[i, k, T - kept.numel():] = kept
            mask[i, k, T - kept.numel():] = 1
    logits = target_logits(model, padded.reshape(-1, T), target.repeat_interleave(steps + 1),
                           attention_mask=mask.reshape(-1, T))
    return logits.reshape(b, steps + 1)


def flipping_curves(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, scores: torch.Tensor,
                    neutral_id: int, steps: int = 10) -> Curves:
    """All four curves of one batch of explanations.

    Args:
        model: Classifier.
        ids: ``(batch, T)`` unpadded ids.
        target: ``(batch,)`` explained classes.
        scores: ``(batch, T)`` token relevance.
        neutral_id: Replacement token.
        steps: Number of fraction steps ``K``.

    Returns:
        The curves.
    """
    morf, lerf = orders(scores)
    return Curves(
        morf=deletion_curve(model, ids, target, morf, neutral_id, steps),
        lerf=deletion_curve(model, ids, target, lerf, neutral_id, steps),
        ins_morf=insertion_curve(model, ids, target, morf, neutral_id, steps),
        ins_lerf=insertion_curve(model, ids, target, lerf, neutral_id, steps),
    )


def conservation_stats(relevance_sum: torch.Tensor, logit: torch.Tensor) -> dict[str, float]:
    """Error statistics of ``sum_i R_i`` against the explained logit.

    Returns:
        ``abs_*``: statistics of ``|logit - sum R|``; ``rel_*``: of ``|logit - sum R| / |logit|``;
        ``n``: number of examples.
    """
    err = (logit.double() - relevance_sum.double()).abs()
    rel = err / logit.double().abs().clamp_min(1e-12)
    return {
        "n": int(err.numel()),
        "abs_median": float(err.median()), "abs_mean": float(err.mean()), "abs_max": float(err.max()),
        "rel_median": float(rel.median()), "rel_mean": float(rel.mean()), "rel_max": float(rel.max()),
    }


def hit_rates(scores: torch.Tensor, evidence: torch.Tensor, ks: tuple[int, ...] = (1, 3)) -> dict[str, torch.Tensor]:
    """Per-example hits: is the evidence position among the ``k`` highest scores.

    Args:
        scores: ``(batch, T)`` relevance.
        evidence: ``(batch,)`` evidence positions.
        ks: Values of ``k``.

    Returns:
        ``{"top1": (batch,) bool, "top3": ...}``.
    """
    top = torch.sort(-scores.float(), dim=-1, stable=True).indices
    return {f"top{k}": (top[:, :k] == evidence[:, None]).any(-1) for k in ks}


def position_ranks(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rank (1 = most relevant) of ``positions (batch,)`` in each row of ``scores (batch, T)``."""
    order = torch.sort(-scores.float(), dim=-1, stable=True).indices
    return (order == positions[:, None]).float().argmax(-1) + 1

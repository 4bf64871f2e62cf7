"""``explain()``: one forward and one backward pass under the rules, relevance at the embeddings."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from mambalrp.context import lrp, planned
from mambalrp.errors import InputError, UnsupportedModelError
from mambalrp.explanation import Explanation
from mambalrp.inputs import (
    Target,
    call_model,
    capture_embedding,
    check_model,
    check_target,
    gather_head_input,
    input_embedding,
    output_tensor,
    positions,
    resolve_inputs,
    select,
)
from mambalrp.recompute import recompute_layers
from mambalrp.rules import RuleSet, get_rules
from mambalrp.state import autograd_enabled, exclusive, frozen
from mambalrp.tokens import token_strings
from mambalrp.verification import ensure_verified

__all__ = ["LONG_INPUT", "Target", "explain", "input_embedding"]

LONG_INPUT = 16384
"""Inputs of this many tokens or more explained with ``recompute`` show a progress bar by default."""


def explain(
    model: nn.Module,
    input_ids: torch.Tensor,
    target: Target = None,
    *,
    position: int | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    rules: str | RuleSet = "mambalrp",
    return_hidden: bool = False,
    input_layer: nn.Module | None = None,
    recompute: bool | float = False,
    verify: bool = True,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> Explanation:
    """Explain one output of ``model`` per batch item with MambaLRP.

    Runs one forward and one backward pass. The model is put in eval mode, called with
    ``use_cache=False``, computes no parameter gradients, and is left exactly as it was (modes,
    ``train()`` overrides, ``requires_grad`` flags, hooks, forwards), also when this function
    raises. Calls on one model from several threads run one after the other. Inside
    ``torch.inference_mode()`` the call leaves inference mode for its duration.

    Before the explanation is returned, the library verifies that the model under the rules
    computes the same outputs as the model itself and that no relevance leaks through a module
    no rule covers (see :mod:`mambalrp.verification`). The first call for a model (and after the model
    changes) runs that check on a short probe, a few forward passes; later calls reuse the cached
    verdict.

    Args:
        model: A supported Mamba model (e.g. ``MambaForCausalLM``, ``Mamba2ForCausalLM``, or a
            ``MambaModel`` inside your own module with a head). Its output must be a tensor,
            a tuple starting with one, or an object or dict with ``logits`` (else
            ``last_hidden_state``).
        input_ids: ``(batch, seq)`` or ``(seq,)`` integer token ids.
        target: What to explain at ``position``: ``None`` for the arg-max, an ``int`` id for all
            rows, a ``(batch,)`` tensor of ids, or a callable mapping the ``(batch, vocab)``
            output at ``position`` to ``(batch,)`` scores (e.g. a logit difference), score ``i``
            computed from row ``i`` alone (checked: a callable mixing rows raises ``InputError``).
        position: Sequence position to explain: an ``int`` (negative counts from the end) for
            all rows, or a ``(batch,)`` tensor. Default: the last non-padded token of each row.
            Ignored for models whose output has no sequence dimension (classifiers); giving it
            then raises.
        attention_mask: ``(batch, seq)`` of 0/1 marking padding (0). Left padding is usual for
            Mamba; padded tokens get zero relevance.
        rules: ``"mambalrp"`` (default), ``"gradient"`` (Gradient x Input), ``"ln-only"``, or a
            :class:`~mambalrp.rules.RuleSet`.
        return_hidden: Also return ``(batch, seq, d_model)`` per-dimension relevance.
        input_layer: Read relevance at the output of this module instead of the input embedding,
            for models whose inputs are not token ids (e.g. the patch embedding of a Vision Mamba
            classifier). ``input_ids`` is then any tensor the model takes as its first argument
            (e.g. pixel values), the module's output should be ``(batch, tokens, dim)``, relevance
            is summed over its last dimension, and ``attention_mask`` must be ``None``. The
            explanation's ``input_ids`` field then holds that input tensor.
        recompute: Keep only each layer's input during the forward and recompute the layer in
            the backward (activation checkpointing, see :mod:`mambalrp.recompute`). Memory
            falls from about ``layers x T x d_inner`` to ``layers x T x d_model``, for about one
            more forward pass of time; the relevance is the same. For very long inputs (e.g.
            128k tokens on a GPU). A float in ``(0, 1]`` recomputes that share of the layers
            (evenly spaced): memory saved and time added both scale with it.
        verify: Verify the model under the rules first (default). ``False`` skips it; the
            explanation then records ``verified=False``.
        tokenizer: A Hugging Face tokenizer (``convert_ids_to_tokens``) or a
            ``tokenizers.Tokenizer`` (``id_to_token``): the explanation keeps the token strings of
            each row (:attr:`~mambalrp.explanation.Explanation.tokens`), used by ``render``,
            ``to_pandas`` and ``aggregate("words")``. Not with ``input_layer``.
        progress: With ``recompute``, a progress bar over the recomputed layers (forward, then
            backward). ``None`` (default): shown for inputs of :data:`LONG_INPUT` tokens or more
            when standard error is a terminal and ``MAMBALRP_PROGRESS`` is not ``0``; ``True`` /
            ``False`` force it (see :mod:`mambalrp.progress`).

    Returns:
        An :class:`~mambalrp.explanation.Explanation`.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        UnsupportedModelError: No adapter matches the model's Mamba layers, an adapter cannot run
            a layer exactly, or the model's tensors cannot carry a backward pass (meta or
            inference tensors).
        VerificationError: The model under the rules computes another function, or relevance
            leaks (the message names the modules and the measured differences).
        InputError: Invalid ids, mask, position or target.
    """
    check_model(model)
    rule_set = get_rules(rules)
    fraction = _recompute_fraction(recompute)
    check_target(target)
    if tokenizer is not None:
        if input_layer is not None:
            raise InputError("tokenizer is not supported together with input_layer (the inputs are not token ids)")
        token_strings(tokenizer, [])  # a tokenizer of an unknown kind fails before the model runs
    with exclusive(model), autograd_enabled():
        embedding, ids, mask = resolve_inputs(model, input_ids, attention_mask, input_layer)
        targets, stamp = planned(model, rule_set)  # fail before anything is touched
        pos = positions(position, mask, ids) if input_layer is None else None
        with frozen(model):
            if verify:  # cached after the first call for this model state
                ensure_verified(
                    model, targets, stamp, embedding, ids, input_layer=input_layer is not None, leaks=rule_set.conserving
                )
            shown = progress if progress is not None else (None if ids.shape[1] >= LONG_INPUT else False)
            layers = recompute_layers(model, targets, fraction, shown) if fraction else contextlib.nullcontext()
            head = gather_head_input(model, pos, ids.shape[1]) if _gather_head(pos) else contextlib.nullcontext([])
            with lrp(model, rule_set, patch_plan=targets), layers, capture_embedding(embedding) as captured, head as gathered:
                output, first = call_model(model, ids, mask, keep_from=None if pos is None else int(pos.min()))
                output = output_tensor(output)
                if output.dim() == 3:
                    if pos is None:  # input_layer: positions count along the output's sequence
                        pos = positions(position, None, output[..., 0])
                        index = pos.to(output.device)
                    elif gathered and output.shape[1] == 1:  # the head saw each row's position only
                        index = torch.zeros_like(pos).to(output.device)
                    else:
                        index = (pos - (ids.shape[1] - output.shape[1])).to(output.device) if first else pos.to(output.device)
                    selected = output[torch.arange(ids.shape[0], device=output.device), index]
                elif output.dim() == 2:
                    if position is not None:
                        raise InputError(
                            "position was given but the model's output has no sequence dimension "
                            f"(shape {tuple(output.shape)}); leave position=None"
                        )
                    pos, selected = None, output
                else:
                    raise InputError(f"model output must be (batch, seq, vocab) or (batch, classes); got {tuple(output.shape)}")
                score, tgt = select(selected, target)
                if not captured:
                    raise UnsupportedModelError("the model's forward never called its input embedding")
                emb = captured[0]
                (grad,) = torch.autograd.grad(score.sum(), emb)
        hidden = emb.detach().float() * grad.float()  # outside inference mode: a normal tensor
        return Explanation(
            relevance=hidden.sum(-1),
            logit=score.detach().float(),
            target=tgt,
            position=pos,
            input_ids=ids,
            attention_mask=mask,
            rules=rule_set.name,
            hidden_relevance=hidden if return_hidden else None,
            verified=bool(verify),
            tokens=None if tokenizer is None else [token_strings(tokenizer, row) for row in ids.tolist()],
        )


def _gather_head(pos: torch.Tensor | None) -> bool:
    """Whether rows explain different positions (then the head runs on each row's one position)."""
    return pos is not None and pos.numel() > 1 and bool((pos != pos[0]).any())


def _recompute_fraction(recompute: Any) -> float:
    """``recompute`` as the share of layers to recompute (0 for none)."""
    if isinstance(recompute, bool):
        return 1.0 if recompute else 0.0
    if isinstance(recompute, (int, float)) and 0.0 < recompute <= 1.0:
        return float(recompute)
    raise InputError(f"recompute must be True, False or a share of the layers in (0, 1]; got {recompute!r}")

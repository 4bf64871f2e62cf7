"""``explain()``: one forward and one backward pass under the rules, relevance at the embeddings."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mambalrp.context import lrp, plan
from mambalrp.errors import InputError, UnsupportedModelError
from mambalrp.explanation import Explanation
from mambalrp.recompute import recompute_layers
from mambalrp.rules import RuleSet, get_rules

Target = int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


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
) -> Explanation:
    """Explain one output of ``model`` per batch item with MambaLRP.

    Runs one forward and one backward pass. The model is put in eval mode, called with
    ``use_cache=False``, computes no parameter gradients, and is left exactly as it was (modes,
    ``requires_grad`` flags, hooks, forwards), also when this function raises.

    Args:
        model: A supported Mamba model (e.g. ``MambaForCausalLM``, ``Mamba2ForCausalLM``, or a
            ``MambaModel`` inside your own module with a head). Its output must be a tensor,
            a tuple starting with one, or an object with ``.logits`` (else ``.last_hidden_state``).
        input_ids: ``(batch, seq)`` or ``(seq,)`` integer token ids.
        target: What to explain at ``position``: ``None`` for the arg-max, an ``int`` id for all
            rows, a ``(batch,)`` tensor of ids, or a callable mapping the ``(batch, vocab)``
            output at ``position`` to ``(batch,)`` scores (e.g. a logit difference).
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

    Returns:
        An :class:`~mambalrp.explanation.Explanation`.

    Raises:
        UnsupportedModelError: No adapter matches the model's Mamba layers.
        InputError: Invalid ids, mask, position or target.
    """
    rule_set = get_rules(rules)
    embedding, ids, mask = _inputs(model, input_ids, attention_mask, input_layer)
    targets = plan(model, rule_set)  # fail before anything is touched
    fraction = _recompute_fraction(recompute)

    pos = _positions(position, mask, ids) if input_layer is None else None
    layers = recompute_layers(model, targets, fraction) if fraction else contextlib.nullcontext()
    with _frozen(model), lrp(model, rule_set, patch_plan=targets), layers, _capture(embedding) as captured:
        with torch.enable_grad():
            output, first = _call(model, ids, mask, keep_from=None if pos is None else int(pos.min()))
            output = _output_tensor(output)
            if output.dim() == 3:
                if pos is None:  # input_layer: positions count along the output's sequence
                    pos = _positions(position, None, output[..., 0])
                    index = pos.to(output.device)
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
            score, tgt = _select(selected, target)
            if not captured:
                raise UnsupportedModelError("the model's forward never called its input embedding")
            emb = captured[0]
            (grad,) = torch.autograd.grad(score.sum(), emb)

    hidden = emb.detach().float() * grad.float()
    return Explanation(
        relevance=hidden.sum(-1),
        logit=score.detach().float(),
        target=tgt,
        position=pos,
        input_ids=ids,
        attention_mask=mask,
        rules=rule_set.name,
        hidden_relevance=hidden if return_hidden else None,
    )


def _recompute_fraction(recompute: Any) -> float:
    """``recompute`` as the share of layers to recompute (0 for none)."""
    if isinstance(recompute, bool):
        return 1.0 if recompute else 0.0
    if isinstance(recompute, (int, float)) and 0.0 < recompute <= 1.0:
        return float(recompute)
    raise InputError(f"recompute must be True, False or a share of the layers in (0, 1]; got {recompute!r}")


def _inputs(
    model: nn.Module, input_ids: Any, attention_mask: Any, input_layer: nn.Module | None
) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The module whose output is explained, the checked inputs and the checked mask."""
    if input_layer is None:
        embedding = input_embedding(model)
        ids = _check_ids(input_ids, embedding)
        return embedding, ids, _check_mask(attention_mask, ids)
    if not isinstance(input_layer, nn.Module) or not any(m is input_layer for m in model.modules()):
        raise InputError("input_layer must be a submodule of the model")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() == 0:
        raise InputError("with input_layer, the model input must be a tensor with a batch dimension")
    if attention_mask is not None:
        raise InputError("attention_mask is not supported together with input_layer")
    return input_layer, input_ids, None


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input embedding: ``get_input_embeddings()``, the only ``nn.Embedding``, or a
    submodule's ``get_input_embeddings()``; raises :class:`UnsupportedModelError` otherwise."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            emb = getter()
            if isinstance(emb, nn.Embedding):
                return emb
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0]
    for m in model.modules():
        if m is not model and callable(getattr(m, "get_input_embeddings", None)):
            with contextlib.suppress(NotImplementedError, AttributeError):
                emb = m.get_input_embeddings()
                if isinstance(emb, nn.Embedding):
                    return emb
    raise UnsupportedModelError(
        f"cannot find the input embedding of {type(model).__name__}: found {len(embeddings)} nn.Embedding "
        "modules and no get_input_embeddings()"
    )


def _check_ids(input_ids: Any, embedding: nn.Embedding) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, seq) or (seq,); got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token")
    vocab = embedding.num_embeddings
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise InputError(f"input_ids contains id {bad}, outside the model's vocabulary [0, {vocab})")
    return input_ids.long().to(embedding.weight.device)


def _check_mask(mask: Any, ids: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 1 and ids.shape[0] == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must contain only 0 (padding) and 1 (token)")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"attention_mask marks every token of row(s) {empty} as padding")
    return mask.to(device=ids.device, dtype=torch.long)


def _positions(position: int | torch.Tensor | None, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    if position is None:
        if mask is None:
            return torch.full((b,), t - 1, dtype=torch.long, device=ids.device)
        idx = torch.arange(t, device=ids.device).expand(b, t)
        return torch.where(mask.bool(), idx, -1).max(-1).values
    if isinstance(position, torch.Tensor):
        if position.dtype.is_floating_point or position.numel() not in (1, b):
            raise InputError(f"position tensor must hold 1 or {b} integers; got shape {tuple(position.shape)} {position.dtype}")
        pos = position.flatten().long().to(ids.device).expand(b).clone()
    elif isinstance(position, int) and not isinstance(position, bool):
        pos = torch.full((b,), position, dtype=torch.long, device=ids.device)
    else:
        raise InputError(f"position must be an int, a tensor or None; got {type(position).__name__}")
    if bool(((pos < -t) | (pos >= t)).any()):
        raise InputError(f"position {pos.tolist()} out of range for sequences of length {t}")
    pos = pos % t
    if mask is not None and not bool(mask.gather(1, pos[:, None]).all()):
        raise InputError(f"position {pos.tolist()} points at a padding token")
    return pos


def _select(selected: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, vocab = selected.shape
    if callable(target) and not isinstance(target, torch.Tensor):
        score = target(selected)
        if not isinstance(score, torch.Tensor) or score.shape not in ((b,), (b, 1)):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise InputError(f"a callable target must return a ({b},) tensor of scores; got {got}")
        return score.reshape(b), None
    if target is None:
        tgt = selected.detach().argmax(-1)
    elif isinstance(target, torch.Tensor):
        if target.dtype.is_floating_point or target.numel() not in (1, b):
            raise InputError(f"target tensor must hold 1 or {b} integer ids; got shape {tuple(target.shape)} {target.dtype}")
        tgt = target.flatten().long().to(selected.device).expand(b).clone()
    elif isinstance(target, int) and not isinstance(target, bool):
        tgt = torch.full((b,), target, dtype=torch.long, device=selected.device)
    else:
        raise InputError(f"target must be None, an int, a tensor or a callable; got {type(target).__name__}")
    if bool(((tgt < 0) | (tgt >= vocab)).any()):
        raise InputError(f"target {tgt.tolist()} out of range for an output of size {vocab}")
    return selected.gather(1, tgt[:, None]).squeeze(1), tgt


def _call(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, keep_from: int | None
) -> tuple[Any, bool]:
    """Call the model; return its output and whether only positions ``keep_from..`` were computed.

    Models that accept ``logits_to_keep`` (HF causal LMs) compute the head only where needed,
    which saves a ``(batch, seq, vocab)`` tensor and its gradient. ``keep_from=None`` keeps all.
    """
    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if "use_cache" in params or var_kw:
        kwargs["use_cache"] = False
    if mask is not None:
        if "attention_mask" not in params and not var_kw:
            raise InputError(f"{type(model).__name__}.forward takes no attention_mask")
        kwargs["attention_mask"] = mask
    trimmed = "logits_to_keep" in params and keep_from is not None
    if trimmed:
        kwargs["logits_to_keep"] = ids.shape[1] - keep_from
    return model(ids, **kwargs), trimmed


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"cannot find logits in the model output of type {type(output).__name__}")


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; the exact previous state restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _capture(embedding: nn.Embedding) -> Iterator[list[torch.Tensor]]:
    """Make the embedding output a leaf that requires grad, and record it."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = embedding.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()

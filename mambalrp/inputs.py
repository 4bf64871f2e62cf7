"""The arguments of an explanation: checking ids, masks, positions and targets, calling the model
and reading its output.

Everything here validates before the model is touched, and raises :class:`~mambalrp.errors.InputError`
(a ``ValueError``) with a message that names the argument and what was wrong with it.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mambalrp.errors import InputError, UnsupportedModelError

Target = int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None

_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)
_INT64 = (-(2**63), 2**63 - 1)


def check_model(model: Any) -> nn.Module:
    """``model`` itself if it is a ``torch.nn.Module`` whose weights can carry a backward pass.

    Raises:
        TypeError: ``model`` is not a module.
        UnsupportedModelError: Its parameters are on the meta device (not loaded) or are
            inference tensors (created under ``torch.inference_mode()``), which autograd refuses.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise UnsupportedModelError(
                f"{type(model).__name__} has tensors on the meta device (e.g. {name!r}): its weights were never "
                "loaded. Load them (e.g. from_pretrained or load_state_dict(..., assign=True)) before explaining."
            )
        if t.is_inference():
            raise UnsupportedModelError(
                f"{type(model).__name__}'s tensors are inference tensors (e.g. {name!r}): the model was created or "
                "loaded under torch.inference_mode(), and autograd cannot use such tensors. Create or load it "
                "outside inference mode (torch.no_grad() is fine)."
            )
    return model


def resolve_inputs(
    model: nn.Module, input_ids: Any, attention_mask: Any, input_layer: nn.Module | None
) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The module whose output is explained, the checked inputs and the checked mask.

    The returned ids and mask are copies: an explanation never aliases the caller's tensors.
    """
    if input_layer is None:
        embedding = input_embedding(model)
        ids = check_ids(input_ids, embedding)
        return embedding, ids, check_mask(attention_mask, ids)
    if input_layer is model:
        raise InputError("input_layer must be a submodule of the model, not the model itself")
    if not isinstance(input_layer, nn.Module) or not any(m is input_layer for m in model.modules()):
        raise InputError("input_layer must be a submodule of the model")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() == 0:
        raise InputError("with input_layer, the model input must be a tensor with a batch dimension")
    if input_ids.device.type == "meta":
        raise InputError("the model input is a meta tensor (it holds no data)")
    if attention_mask is not None:
        raise InputError("attention_mask is not supported together with input_layer")
    return input_layer, input_ids.clone(), None


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


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_ids(input_ids: Any, embedding: nn.Embedding) -> torch.Tensor:
    """``(batch, seq)`` int64 ids on the embedding's device (a copy), or :class:`InputError`."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if not _is_integer_dtype(input_ids.dtype):
        raise InputError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    if input_ids.device.type == "meta":
        raise InputError("input_ids is a meta tensor (it holds no data)")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, seq) or (seq,); got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token")
    wide_unsigned = input_ids.dtype in _UNSIGNED_WIDE
    ids = input_ids.to(torch.int64)  # uint16/32/64 have no min/max kernels; int64 holds every valid id
    vocab = embedding.num_embeddings
    lo, hi = int(ids.min()), int(ids.max())
    if wide_unsigned and lo < 0:  # a uint64 id of 2**63 or more wraps to a negative int64
        raise InputError(f"input_ids contains an id of 2**63 or more, outside the model's vocabulary [0, {vocab})")
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise InputError(f"input_ids contains id {bad}, outside the model's vocabulary [0, {vocab})")
    return ids.to(embedding.weight.device, copy=True)


def check_mask(mask: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """The padding mask as int64 0/1 on the ids' device (a copy), or :class:`InputError`."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.device.type == "meta" or mask.dtype.is_complex:
        raise InputError(f"attention_mask must be a real tensor of 0 and 1; got {mask.dtype} on {mask.device}")
    if mask.dim() == 1 and ids.shape[0] == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}")
    if mask.dtype in _UNSIGNED_WIDE:
        mask = mask.to(torch.int64)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must contain only 0 (padding) and 1 (token)")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"attention_mask marks every token of row(s) {empty} as padding")
    return mask.to(device=ids.device, dtype=torch.long, copy=True)


def _index(value: Any, what: str) -> int | None:
    """``value`` as a Python int if it is an integer scalar (int, numpy integer; not bool), else ``None``."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    if not _INT64[0] <= number <= _INT64[1]:
        raise InputError(f"{what} {number} is out of range")
    return number


def _index_tensor(value: torch.Tensor, count: int, what: str, device: torch.device) -> torch.Tensor:
    if not _is_integer_dtype(value.dtype) or value.numel() not in (1, count) or value.device.type == "meta":
        raise InputError(
            f"{what} tensor must hold 1 or {count} integers; got shape {tuple(value.shape)} {value.dtype}"
            + (" on the meta device" if value.device.type == "meta" else "")
        )
    return value.flatten().to(torch.int64).to(device).expand(count).clone()


def positions(position: Any, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` non-negative positions to explain: the given ones, or each row's last token."""
    b, t = ids.shape
    if position is None:
        if mask is None:
            return torch.full((b,), t - 1, dtype=torch.long, device=ids.device)
        idx = torch.arange(t, device=ids.device).expand(b, t)
        return torch.where(mask.bool(), idx, -1).max(-1).values
    if isinstance(position, torch.Tensor):
        pos = _index_tensor(position, b, "position", ids.device)
    else:
        number = _index(position, "position")
        if number is None:
            raise InputError(f"position must be an int, a tensor or None; got {type(position).__name__}")
        pos = torch.full((b,), number, dtype=torch.long, device=ids.device)
    if bool(((pos < -t) | (pos >= t)).any()):
        raise InputError(f"position {pos.tolist()} out of range for sequences of length {t}")
    pos = pos % t
    if mask is not None and not bool(mask.gather(1, pos[:, None]).all()):
        raise InputError(f"position {pos.tolist()} points at a padding token")
    return pos


def check_target(target: Any) -> None:
    """Reject targets of a kind :func:`select` cannot use, before the model runs."""
    if target is None or isinstance(target, torch.Tensor):
        return
    if isinstance(target, type):
        raise InputError(f"target must be None, an int, a tensor or a callable on the logits; got the type {target.__name__}")
    if callable(target):
        return
    if _index(target, "target") is None:
        raise InputError(f"target must be None, an int, a tensor or a callable; got {type(target).__name__}")


def select(selected: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(batch,)`` scores to explain from the ``(batch, vocab)`` output, and the target ids."""
    b, vocab = selected.shape
    check_target(target)
    if callable(target) and not isinstance(target, torch.Tensor):
        score = target(selected)
        if not isinstance(score, torch.Tensor) or score.shape not in ((b,), (b, 1)):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise InputError(f"a callable target must return a ({b},) tensor of scores; got {got}")
        if not score.requires_grad:
            raise InputError(
                "the callable target returned scores that do not depend on the model's output "
                "(nothing to explain); compute them from the logits it receives"
            )
        score = score.reshape(b)
        if b > 1 and selected.requires_grad:
            _check_rowwise(score, selected)
        return score, None
    if target is None:
        tgt = selected.detach().argmax(-1)
    elif isinstance(target, torch.Tensor):
        tgt = _index_tensor(target, b, "target", selected.device)
    else:
        tgt = torch.full((b,), _index(target, "target"), dtype=torch.long, device=selected.device)
    if bool(((tgt < 0) | (tgt >= vocab)).any()):
        raise InputError(f"target {tgt.tolist()} out of range for an output of size {vocab}")
    return selected.gather(1, tgt[:, None]).squeeze(1), tgt


def _check_rowwise(score: torch.Tensor, selected: torch.Tensor) -> None:
    """Refuse a callable target whose score ``i`` reads other rows than row ``i``.

    One backward pass carries every row's score (the gradient of their sum), which is each row's
    own gradient only if score ``i`` depends on row ``i`` alone. Checked on the scores alone: the
    gradient at ``selected`` of ``sum_i w_i score_i`` must be ``w_i`` times row ``i`` of that of
    ``sum_i score_i`` (distinct weights ``w``); two backward passes through the callable only.
    """
    weights = torch.arange(1, score.shape[0] + 1, dtype=score.dtype, device=score.device)
    plain, weighted = (
        torch.autograd.grad((score * w).sum(), selected, retain_graph=True, allow_unused=True)[0]
        for w in (torch.ones_like(weights), weights)
    )
    if plain is None or weighted is None:
        return
    expected = plain * weights.view(-1, *([1] * (plain.dim() - 1)))
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    if ((weighted - expected).abs().max() / scale).item() > 1e-4:
        raise InputError(
            "the callable target mixes rows: score i must be computed from row i of the outputs "
            "alone (each row is explained on its own; e.g. logits[:, a] - logits[:, b])"
        )


def call_model(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, keep_from: int | None
) -> tuple[Any, bool]:
    """Call the model; return its output and whether only positions ``keep_from..`` were computed.

    Models that accept ``logits_to_keep`` (HF causal LMs) or ``num_last_tokens`` (mamba_ssm's
    ``MambaLMHeadModel``) compute the head only where needed, which saves a ``(batch, seq, vocab)``
    tensor and its gradient. ``keep_from=None`` keeps all.
    """
    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if "use_cache" in params or var_kw:
        kwargs["use_cache"] = False
    if mask is not None:
        if not accepts_mask(model):
            raise InputError(f"{type(model).__name__}.forward takes no attention_mask")
        kwargs["attention_mask"] = mask
    # HF causal LMs take logits_to_keep; mamba_ssm's MambaLMHeadModel the same as num_last_tokens.
    keep_name = next((k for k in ("logits_to_keep", "num_last_tokens") if k in params), None)
    trimmed = keep_name is not None and keep_from is not None
    if trimmed:
        kwargs[keep_name] = ids.shape[1] - keep_from
    try:
        return model(ids, **kwargs), trimmed
    except TypeError as err:
        # A forward that takes **kwargs may hand them to modules that do not know use_cache
        # (mamba_ssm's MambaLMHeadModel passes them to every mixer): call it without.
        if "use_cache" in params or "use_cache" not in str(err):
            raise
    del kwargs["use_cache"]
    return model(ids, **kwargs), trimmed


def accepts_mask(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes an ``attention_mask`` (by name or through ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters
    return "attention_mask" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def output_tensor(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, ``.logits`` / ``["logits"]`` (else
    ``last_hidden_state``), or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(
        f"cannot find logits in the model output of type {type(output).__name__}: return a tensor, a tuple "
        "starting with one, or an object or dict with 'logits' (or 'last_hidden_state')"
    )


@contextlib.contextmanager
def capture_embedding(embedding: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Make the embedding's output a leaf that requires grad, and record it."""
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


@contextlib.contextmanager
def gather_head_input(
    model: nn.Module, positions: torch.Tensor | None, length: int, one_row: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Feed the model's output head only each row's explained position.

    A causal LM computes its head (``(d_model, vocab)``) at every kept position; when rows
    explain different positions (several steps of a generation in one batch), that is ``rows x
    rows`` head outputs and their gradients for ``rows`` needed ones. Inside the block a forward
    pre-hook on ``get_output_embeddings()`` (an ``nn.Linear``) selects, from a ``(batch, kept,
    d_model)`` input, each row's position, so the head runs on ``(batch, 1, d_model)``. The hook is
    removed on exit. The yielded list holds the head's input once the head ran on the selected
    rows (the output's sequence dimension is then 1 and index 0 is each row's position); anything
    else (another input shape, no such head) is left untouched.

    Args:
        model: The model.
        positions: ``(batch,)`` explained positions, or ``None`` (nothing is done).
        length: Sequence length of the input ids.
        one_row: The input is one row and ``positions`` are ``k`` positions of it: the head then
            runs on ``(1, k, d_model)``, its output's index ``i`` being ``positions[i]``.
    """
    done: list[torch.Tensor] = []
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    if positions is not None and callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            head = getter()
    if not isinstance(head, nn.Linear):
        yield done
        return

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if done or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        hidden = args[0]
        batch, kept = hidden.shape[0], hidden.shape[1]
        if batch != (1 if one_row else positions.shape[0]) or not 0 < kept <= length:
            return None
        index = (positions - (length - kept)).to(hidden.device)
        if bool(((index < 0) | (index >= kept)).any()):
            return None
        rows = torch.arange(batch, device=hidden.device)
        selected = hidden[:, index] if one_row else hidden[rows, index][:, None]
        done.append(selected)
        return (selected, *args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield done
    finally:
        handle.remove()

"""``explain_generation()``: every token of a generation explained, many steps per backward pass.

A causal model's output at position ``p`` depends on the tokens ``0..p`` only, so once the
continuation is known (generated greedily, sampled, or given), step ``i``'s logit is the output at
position ``prompt_len - 1 + i`` of ONE sequence, prompt followed by the continuation (teacher
forcing). Its relevance is the gradient-form relevance of that logit at the embedding, exactly
what :func:`mambalrp.explain` computes for a ``position`` and a ``target``.

Several steps share one backward pass. On the CPU, ``k`` steps (``steps_per_backward``) are
explained by ONE forward pass of the sequence cut after the last position they need and ONE
backward pass carrying their ``k`` cotangents at once (:mod:`mambalrp.shared_forward`): the
rules' backward is linear in its cotangent, so this is exact. Where the backward cannot take a
batch of cotangents (on a GPU, where the Triton kernels take one at a time, or under rules whose
backward cannot batch, such as ``"gradient"``), the sequence is replicated ``k`` times along the
batch instead and replica ``j`` explains step ``a + j`` (``explain`` takes one position and one
target per row). Either way memory is at most that of one explanation of ``k`` sequences, so it
stays bounded however many tokens are explained.

Generation itself runs on the unpatched model under ``torch.no_grad()``: through the model's own
``generate`` and its recurrent cache for Hugging Face models (each token is still chosen here,
so greedy and seeded sampling do not depend on the transformers release), else by recomputing the
whole prefix at each step. Pass ``continuation=`` to explain a continuation produced elsewhere or a
reference answer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.errors import InputError
from mambalrp.explain import explain
from mambalrp.explanation import Explanation
from mambalrp.inputs import _index, call_model, check_ids, check_mask, check_model, input_embedding, output_tensor
from mambalrp.progress import progress_bar
from mambalrp.rules import RuleSet, get_rules
from mambalrp.shared_forward import BatchedBackwardError, explain_outputs, supports_batched_backward
from mambalrp.state import exclusive, frozen
from mambalrp.tokens import token_strings

__all__ = ["default_steps_per_backward", "explain_generation"]

MAX_STEPS_PER_BACKWARD = 16
TOKENS_PER_BACKWARD = 2048


def default_steps_per_backward(sequence_length: int) -> int:
    """Steps explained by one backward pass when ``steps_per_backward`` is not given.

    ``min(16, 2048 // sequence_length)``, at least 1: one backward pass then carries at most 2,048
    tokens' worth of cotangents (16 of a 128-token sequence), so its memory is at most that of one
    ``explain`` of about 2,048 tokens, and of ``explain`` on the sequence itself beyond that. On
    the CPU 16 steps per pass were fastest for the zoo's language model (8 to 32 measured): more
    steps per pass mean fewer forward passes but more positions each cotangent walks through
    without needing them.
    """
    return max(1, min(MAX_STEPS_PER_BACKWARD, TOKENS_PER_BACKWARD // max(1, sequence_length)))


def explain_generation(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 20,
    continuation: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    contrast: int | torch.Tensor | None = None,
    rules: str | RuleSet = "mambalrp",
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    steps_per_backward: int | None = None,
    progress: bool | None = None,
    verify: bool = True,
) -> Explanation:
    """Generate a continuation of one prompt (or take a given one) and explain every token of it.

    Row ``i`` of the result explains generated token ``i``: the relevance of the prompt and of
    the tokens generated before it for the logit of that token (or, with ``contrast``, for the
    difference of its logit and an alternative's). It equals ``explain(model, sequence[:, :P + i],
    target=token_i)`` for each step (``P`` the prompt length), computed with one backward pass
    per ``steps_per_backward`` steps instead of one forward and one backward pass per step.

    The model is left exactly as it was, as with :func:`mambalrp.explain` (each backward pass
    goes through :func:`~mambalrp.shared_forward.explain_outputs` or ``explain``, with their
    checks, verification and restoration).

    Args:
        model: A supported causal language model (output ``(batch, seq, vocab)`` logits).
        input_ids: The prompt, ``(T,)`` or ``(1, T)`` token ids.
        max_new_tokens: Number of tokens to generate (exactly that many: generation does not stop
            at an end-of-sequence token). Ignored when ``continuation`` is given.
        continuation: ``(N,)`` or ``(1, N)`` ids to explain instead of generating (teacher
            forcing): a reference answer, or the output of ``model.generate``.
        do_sample: Sample each token instead of taking the arg-max (greedy).
        temperature: Sampling temperature (``> 0``), with ``do_sample``.
        top_k: Sample among the ``top_k`` most likely tokens only, with ``do_sample``.
        seed: Seed of the sampling generator. ``None`` draws one from torch's global generator
            (so ``torch.manual_seed`` makes runs repeatable); the seed used is recorded in
            :attr:`Explanation.generation`.
        contrast: Explain ``logit[token] - logit[alternative]`` instead of ``logit[token]``: one
            alternative id for all steps, or an ``(N,)`` tensor, one per step.
        rules: ``"mambalrp"`` (default), ``"gradient"``, ``"ln-only"``, or a
            :class:`~mambalrp.rules.RuleSet`.
        tokenizer: A Hugging Face tokenizer or a ``tokenizers.Tokenizer``: keeps the token strings
            on the result (:attr:`Explanation.tokens`).
        attention_mask: ``(T,)`` or ``(1, T)`` 0/1 padding mask of the prompt (generated tokens
            are never padding).
        steps_per_backward: Steps explained by one backward pass (``k`` cotangents of one forward
            pass, or ``k`` copies of the sequence in one batch; see the module docstring). Default
            :func:`default_steps_per_backward`: at most 16, and at most 2,048 tokens' worth of
            cotangents. Costs up to ``k`` times the memory of one explanation.
        progress: Show progress bars (generation, explanation); ``None``: when standard error is a
            terminal and ``MAMBALRP_PROGRESS`` is not ``0`` (see :mod:`mambalrp.progress`).
        verify: Verify the model under the rules first (default, cached); ``False`` skips it.

    Returns:
        An :class:`~mambalrp.explanation.Explanation` of kind ``"generation"``: ``relevance``
        ``(N, P + N)`` (entries at positions step ``i`` cannot see, ``>= P + i``, are exactly 0),
        ``logit`` the explained values, ``target`` and ``generated_ids`` the continuation,
        ``position`` ``P - 1 + i``, ``input_ids`` ``(1, P + N)`` prompt then continuation,
        ``step_scores`` (probability of each token, entropy of each step's distribution: from the
        logits the tokens were generated from, or for a given continuation from the explained
        forward passes, which verification checks equal the model's).

    Raises:
        InputError: Invalid prompt, mask, continuation, contrast or option; a model without a
            sequence dimension in its output.
        UnsupportedModelError, VerificationError: As for :func:`mambalrp.explain`.
    """
    check_model(model)
    rule_set = get_rules(rules)
    embedding = input_embedding(model)
    prompt = check_ids(input_ids, embedding)
    if prompt.shape[0] != 1:
        raise InputError(
            f"explain_generation explains one prompt: input_ids must be (T,) or (1, T); got shape "
            f"{tuple(input_ids.shape)}"
        )
    mask = check_mask(attention_mask, prompt)
    if mask is not None and not bool(mask[0, -1]):
        raise InputError("the prompt's last token is padding: pad on the left (or drop the padding)")
    if continuation is not None:
        if do_sample:
            raise InputError("continuation is given (teacher forcing): do_sample does not apply")
        tokens = check_ids(continuation, embedding)
        if tokens.shape[0] != 1:
            raise InputError(f"continuation must be (N,) or (1, N); got shape {tuple(continuation.shape)}")
        new = tokens[0]
    else:
        count = _index(max_new_tokens, "max_new_tokens")
        if count is None or count < 1:
            raise InputError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        new = None
    _check_sampling(temperature, top_k)
    if steps_per_backward is not None:
        k = _index(steps_per_backward, "steps_per_backward")
        if k is None or k < 1:
            raise InputError(f"steps_per_backward must be a positive int or None; got {steps_per_backward!r}")
    vocab = embedding.num_embeddings
    n = int(new.shape[0]) if new is not None else count
    alternatives = _check_contrast(contrast, n, vocab, prompt.device)
    if tokenizer is not None:
        token_strings(tokenizer, [])  # a tokenizer of an unknown kind fails before the model runs

    meta: dict[str, Any]
    with exclusive(model):
        if new is None:
            if seed is None and do_sample:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            new, step_logits = _generate(model, prompt, mask, count, do_sample, temperature, top_k, seed, progress)
            meta = {
                "mode": "sampled" if do_sample else "greedy",
                "temperature": float(temperature) if do_sample else None,
                "top_k": int(top_k) if do_sample and top_k is not None else None,
                "seed": int(seed) if do_sample else None,
            }
        else:
            step_logits = None  # from the explained forward passes below, else one forward more
            meta = {"mode": "teacher-forced", "temperature": None, "top_k": None, "seed": None}
        sequence = torch.cat([prompt, new[None].to(prompt.device)], dim=1)
        full_mask = None if mask is None else torch.cat([mask, torch.ones((1, n), dtype=mask.dtype, device=mask.device)], 1)
        p = prompt.shape[1]
        k = steps_per_backward if steps_per_backward is not None else default_steps_per_backward(p + n)
        relevance = torch.zeros((n, p + n), dtype=torch.float32)
        scores = torch.zeros(n, dtype=torch.float32)
        shared = supports_batched_backward(sequence)
        forward_logits: list[torch.Tensor] = []
        with progress_bar(total=n, desc="explaining", unit="token", progress=progress) as bar:
            for a in range(0, n, k):
                b = min(n, a + k)
                length = p + b - 1
                rows = b - a
                targets = new[a:b].to(sequence.device)
                target: Any = targets
                if alternatives is not None:
                    target = _difference(targets, alternatives[a:b].to(sequence.device))
                positions = torch.arange(p - 1 + a, p - 1 + b, device=sequence.device)
                window = None if full_mask is None else full_mask[:, :length]
                if shared:
                    try:
                        rel, logit, _, outputs = explain_outputs(
                            model, sequence[:, :length], positions, target,
                            attention_mask=window, rules=rule_set, verify=verify,
                        )  # fmt: skip
                        if step_logits is None:  # a given continuation: its step scores come from here
                            forward_logits.append(outputs.float().cpu())
                    except BatchedBackwardError:
                        shared = False  # this model's backward takes one cotangent: copies from here on
                if not shared:
                    exp = explain(
                        model,
                        sequence[:, :length].expand(rows, length),
                        target,
                        position=positions,
                        attention_mask=None if window is None else window.expand(rows, length),
                        rules=rule_set,
                        verify=verify,
                    )
                    rel, logit = exp.relevance, exp.logit
                relevance[a:b, :length] = rel.detach().float().cpu()
                scores[a:b] = logit.detach().float().cpu()
                bar.update(rows)
        if step_logits is None:
            # Every group through explain_outputs: their forwards gave the logits; else one more.
            step_logits = torch.cat(forward_logits) if shared else _teacher_forced_logits(model, prompt, mask, new)
    # Positions a step cannot see hold exactly zero (causality gives zeros; this makes it exact).
    steps = torch.arange(n)[:, None]
    relevance[torch.arange(p + n)[None, :] >= p + steps] = 0.0
    probabilities = torch.softmax(step_logits.float(), dim=-1)
    chosen = probabilities.gather(1, new.cpu()[:, None]).squeeze(1)
    entropy = -(probabilities * torch.log_softmax(step_logits.float(), dim=-1)).nan_to_num().sum(-1)
    sequence = sequence.cpu()
    return Explanation(
        relevance=relevance,
        logit=scores,
        target=new.cpu().clone(),
        position=torch.arange(p - 1, p - 1 + n),
        input_ids=sequence,
        attention_mask=None if full_mask is None else full_mask.cpu(),
        rules=rule_set.name,
        verified=bool(verify),
        tokens=None if tokenizer is None else [token_strings(tokenizer, sequence[0].tolist())],
        kind="generation",
        generated_ids=new.cpu().clone(),
        step_scores={"probability": chosen, "entropy": entropy},
        contrast=None if alternatives is None else alternatives.cpu(),
        generation=meta,
    )


def _difference(targets: torch.Tensor, alternatives: torch.Tensor):
    """A callable target: each row's logit of its token minus that of its alternative."""

    def score(logits: torch.Tensor) -> torch.Tensor:
        t, c = targets.to(logits.device)[:, None], alternatives.to(logits.device)[:, None]
        return (logits.gather(1, t) - logits.gather(1, c)).squeeze(1)

    return score


def _check_sampling(temperature: Any, top_k: Any) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"temperature must be a number > 0; got {temperature!r}")
    if top_k is not None:
        k = _index(top_k, "top_k")
        if k is None or k < 1:
            raise InputError(f"top_k must be a positive int or None; got {top_k!r}")


def _check_contrast(contrast: Any, n: int, vocab: int, device: torch.device) -> torch.Tensor | None:
    """``(n,)`` alternative ids, or ``None``."""
    if contrast is None:
        return None
    if isinstance(contrast, torch.Tensor):
        if contrast.dtype.is_floating_point or contrast.dtype.is_complex or contrast.dtype == torch.bool:
            raise InputError(f"contrast must hold integer token ids; got dtype {contrast.dtype}")
        if contrast.numel() not in (1, n):
            raise InputError(f"contrast must be one id or {n} ids (one per step); got shape {tuple(contrast.shape)}")
        alt = contrast.flatten().to(torch.int64).to(device).expand(n).clone()
    else:
        value = _index(contrast, "contrast")
        if value is None:
            raise InputError(f"contrast must be None, an int or a tensor of ids; got {type(contrast).__name__}")
        alt = torch.full((n,), value, dtype=torch.long, device=device)
    if bool(((alt < 0) | (alt >= vocab)).any()):
        raise InputError(f"contrast {alt.tolist()} outside the model's vocabulary [0, {vocab})")
    return alt


def _last_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, keep_from: int) -> torch.Tensor:
    """``(positions, vocab)`` logits of positions ``keep_from..`` of the single row ``ids``."""
    output, trimmed = call_model(model, ids, mask, keep_from=keep_from)
    logits = output_tensor(output)
    if logits.dim() != 3:
        raise InputError(
            f"explain_generation needs a causal language model (output (batch, seq, vocab)); the model's output "
            f"has shape {tuple(logits.shape)}"
        )
    return logits[0] if trimmed else logits[0, keep_from:]


def _teacher_forced_logits(model: nn.Module, prompt: torch.Tensor, mask: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The model's logits at the positions that predict each token of ``new`` (one forward)."""
    p, n = prompt.shape[1], new.shape[0]
    ids = torch.cat([prompt, new[None, :-1].to(prompt.device)], dim=1)
    full = None if mask is None else torch.cat([mask, torch.ones((1, n - 1), dtype=mask.dtype, device=mask.device)], 1)
    with frozen(model), torch.no_grad():
        return _last_logits(model, ids, full, p - 1).float().cpu()


def _generate(
    model: nn.Module,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    count: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    seed: int | None,
    progress: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` tokens from the unpatched model, and the ``(count, vocab)`` logits each was
    chosen from.

    Hugging Face models (``GenerationMixin``) generate through their own ``generate`` with its
    recurrent cache, one token per step; the choice of each token is made here (a logits
    processor that records the raw logits and leaves only the chosen token), so greedy and
    sampled tokens are the same as on the fallback path. Other models recompute the whole prefix
    at each step.
    """
    generator = None
    if do_sample:
        generator = torch.Generator(device=prompt.device)
        generator.manual_seed(seed)

    def choose(last: torch.Tensor) -> torch.Tensor:
        if not do_sample:
            return last.argmax()
        scaled = last / temperature
        if top_k is not None and top_k < scaled.shape[0]:
            kth = torch.topk(scaled, top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)[0]

    chosen: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    with frozen(model), torch.no_grad(), progress_bar(total=count, desc="generating", unit="token", progress=progress) as bar:
        if _generate_with_cache(model, prompt, mask, count, choose, chosen, logits, bar):
            return torch.stack(chosen).to(torch.long), torch.stack(logits)
        ids, full = prompt, mask
        for _ in range(count):
            last = _last_logits(model, ids, full, ids.shape[1] - 1)[-1].float()
            token = choose(last)
            chosen.append(token)
            logits.append(last.cpu())
            bar.update(1)
            ids = torch.cat([ids, token.view(1, 1).to(ids.device)], dim=1)
            if full is not None:
                full = torch.cat([full, torch.ones((1, 1), dtype=full.dtype, device=full.device)], dim=1)
    return torch.stack(chosen).to(torch.long), torch.stack(logits)


def _generate_with_cache(
    model: nn.Module,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    count: int,
    choose: Any,
    chosen: list[torch.Tensor],
    logits: list[torch.Tensor],
    bar: Any,
) -> bool:
    """Generate through a Hugging Face model's ``generate`` (its cache); ``False`` if the model has
    none or it fails before producing a token (then the caller recomputes)."""
    try:
        from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList
    except ImportError:
        return False
    if not isinstance(model, GenerationMixin):
        return False

    class Choose(LogitsProcessor):
        """Record the raw logits, choose the token, leave only it for greedy decoding."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            last = scores[0].float()
            token = choose(last)
            chosen.append(token)
            logits.append(last.cpu())
            bar.update(1)
            forced = torch.full_like(scores, float("-inf"))
            forced[0, token] = 0.0
            return forced

    # A bare configuration: no processors or warpers. The model's own end-of-sequence token may
    # still stop generate() (unset fields come from the model's generation config): then it is
    # called again on the longer prefix until ``count`` tokens are chosen.
    ids, full = prompt, mask
    while len(chosen) < count:
        before = len(chosen)
        config = GenerationConfig(
            max_new_tokens=count - before, min_new_tokens=0, do_sample=False, num_beams=1, pad_token_id=0,
        )
        kwargs: dict[str, Any] = {"generation_config": config, "logits_processor": LogitsProcessorList([Choose()])}
        if full is not None:
            kwargs["attention_mask"] = full
        try:
            out = model.generate(ids, **kwargs)
        except Exception:  # noqa: BLE001 - any failure before a token is chosen: recompute instead
            if chosen:
                raise
            return False
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = torch.stack(chosen[before:]).to(sequences.device) if len(chosen) > before else None
        if new is None or not torch.equal(sequences[0, ids.shape[1] :], new):
            raise RuntimeError("generate() did not follow the chosen tokens")  # a processor was skipped
        ids = sequences[:1]
        if full is not None:
            full = torch.cat([full, torch.ones((1, new.shape[0]), dtype=full.dtype, device=full.device)], 1)
    return True

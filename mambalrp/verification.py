"""Verification: before an explanation is returned, establish that it explains the model.

Two properties are checked on a short probe, once per model instance and state (the verdict is
cached, see :func:`mambalrp.fingerprint.fingerprint`), and a failure raises :class:`VerificationError`:

1. **The same function.** The model's output under the rules equals its output without them.
   Adapters re-implement forwards from weights; a look-alike module that an adapter claims but
   that computes something else (another conv padding, a second scan direction, a multiplier the
   adapter does not apply) changes the output, and the explanation would explain a function the
   model does not compute. On a mismatch every patched module is run alone on the inputs it
   received and compared with its own forward, to name the culprit.
2. **No leak.** With every parameter and buffer that enters the computation additively
   (biases, position embeddings, ...; found by watching the forward) replaced by zeros, the
   relevance at the input sums to the explained score. A non-linear module that no adapter
   covers (an older attention class, a router, a custom activation) lets relevance leak and
   breaks that sum; the error names the leaking blocks and the uncovered operations.

The probe is one or two rows of random ids (seeded; a left-padded second row when the model
takes an attention mask) of 32, 64, ..., 1024 tokens, the bucket of the explained input's length
(see :func:`probe_bucket`), or, for models explained from an ``input_layer``, the first example
of the call. Each bucket is verified once per model state. The probe never modifies the model: additive
tensors are swapped for zeros in their module slots and the very same objects put back.
"""

from __future__ import annotations

import functools
import weakref
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
    rows,
    uncovered_operations,
    zeroed,
)
from mambalrp.context import HOWTO, LRPContext, forget_plan, lrp, planned
from mambalrp.errors import InputError, MambaLRPError
from mambalrp.inputs import (
    accepts_mask,
    call_model,
    capture_embedding,
    check_model,
    input_embedding,
    output_tensor,
    resolve_inputs,
)
from mambalrp.rules import MAMBALRP, RuleSet
from mambalrp.state import autograd_enabled, exclusive, frozen

PROBE_TOKENS = 32
"""Shortest probe bucket: inputs of up to this many tokens are verified on a probe of their length."""

LONGEST_PROBE = 1024
"""Longest probe: inputs longer than this are verified on a probe of this many tokens."""


def probe_bucket(length: int) -> int:
    """The verdict bucket of an input of ``length`` tokens: the smallest power of two times
    :data:`PROBE_TOKENS` that holds it, at most :data:`LONGEST_PROBE`. A bucket is verified on a
    probe of its full length (the input's length if the model cannot run the longer probe), so
    every input in it is covered, including effects that only appear in longer sequences (a
    chunked scan's later chunks)."""
    bucket = PROBE_TOKENS
    while bucket < min(length, LONGEST_PROBE):
        bucket *= 2
    return bucket

_SEED = 20240601


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of both checks for a model computing in ``dtype``: ``1e-3`` for 32- and
    64-bit floats (rounding differences are ~1e-6), ``5e-2`` for float16 and bfloat16 (8 and 11
    bits of mantissa, accumulated over the layers)."""
    return 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype among ``model``'s parameters (float32 if it has none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for low in (torch.bfloat16, torch.float16):
        if low in dtypes:
            return low
    return torch.float32 if not dtypes or torch.float32 in dtypes else next(iter(dtypes))


class VerificationError(MambaLRPError):
    """The model under the rules computes another function than the model, or relevance leaks
    through a module no rule covers. ``.verification`` holds the measurements."""

    def __init__(self, message: str, verification: Verification):
        super().__init__(message)
        self.verification = verification


@dataclass
class ModuleMismatch:
    """A patched module whose adapter's output differs from the module's own forward.

    Attributes:
        module: Qualified name.
        kind: Class name of the module.
        adapter: Name of the adapter that claimed it.
        difference: Largest absolute difference of the outputs (``inf`` if the adapter raised).
        scale: Largest absolute value of the module's own output.
        error: The adapter's exception message, if it raised.
    """

    module: str
    kind: str
    adapter: str
    difference: float
    scale: float
    error: str = ""

    def __str__(self) -> str:
        if self.error:
            return f"{self.module!r} ({self.kind}) under adapter {self.adapter!r} raised: {self.error}"
        return (
            f"{self.module!r} ({self.kind}) under adapter {self.adapter!r}: max |difference| {self.difference:.3g} "
            f"(its output's scale {self.scale:.3g})"
        )


@dataclass
class Verification:
    """What :func:`verify` measured on the probe.

    Attributes:
        model: Class name of the model.
        probe: Description of the probe input, e.g. ``"2 x 32 tokens"``.
        dtype: The model's least precise parameter dtype (it sets the tolerance).
        forward_difference: Largest absolute difference between the output under the rules and
            the model's own output (real tokens only).
        forward_scale: Largest absolute value of the model's own output.
        leak: Relative gap between the explained probe score and the summed input relevance,
            with the additive parameters zeroed (see :func:`~mambalrp.conservation.relative_gap`).
        tolerance: Relative tolerance of both checks (see :func:`tolerance`).
        zeroed: Names of the parameters and buffers zeroed for the leak probe.
        mismatches: Modules whose adapter disagrees with their forward (only measured when the
            whole model's outputs differ).
        leaking_blocks: Blocks that do not conserve (only measured when there is a leak).
        uncovered: Non-linear operations no rule covers, by module.
        reference_error: Why the model's own forward failed on the probe (e.g. a kernel that
            needs a GPU), if it did; the outputs could then not be compared.
    """

    model: str
    probe: str
    dtype: torch.dtype
    forward_difference: float
    forward_scale: float
    leak: float
    tolerance: float
    zeroed: list[str] = field(default_factory=list)
    mismatches: list[ModuleMismatch] = field(default_factory=list)
    leaking_blocks: list[BlockConservation] = field(default_factory=list)
    uncovered: list[UncoveredOp] = field(default_factory=list)
    reference_error: str = ""

    @property
    def forward_ok(self) -> bool:
        """The output under the rules equals the model's, within the tolerance of its scale."""
        return not self.reference_error and self.forward_difference <= self.tolerance * max(self.forward_scale, 1e-6)

    @property
    def conserves(self) -> bool:
        """No relevance leaks beyond the tolerance with the additive parameters zeroed."""
        return self.leak <= self.tolerance

    @property
    def ok(self) -> bool:
        """Both checks passed."""
        return self.forward_ok and self.conserves

    def problems(self, *, leaks: bool = True) -> list[str]:
        """One paragraph per failed check, naming modules and measured numbers (empty if ok)."""
        out: list[str] = []
        if self.reference_error:
            out.append(
                f"the model's own forward failed on the probe ({self.probe}): {self.reference_error}. Without it, "
                "the output under the rules cannot be compared with the model's (run on the device the model is meant "
                "for, e.g. a GPU for mamba_ssm's fused kernels)."
            )
        elif not self.forward_ok:
            text = (
                f"under the rules the model computes a different function: max |output difference| "
                f"{self.forward_difference:.3g} on the probe ({self.probe}), for outputs of scale {self.forward_scale:.3g} "
                f"(tolerance {self.tolerance:g} of the scale)."
            )
            if self.mismatches:
                text += " Modules whose adapter does not reproduce their own forward: " + "; ".join(
                    str(m) for m in self.mismatches[:5]
                ) + ("; ..." if len(self.mismatches) > 5 else "") + "."
            else:
                text += " Every patched module reproduces its own forward alone; the difference comes from how they interact."
            out.append(text)
        if leaks and not self.conserves:
            text = (
                f"relevance leaks: with biases and other additive parameters zeroed, the input relevance misses the "
                f"explained score by {self.leak:.3g} of its scale (tolerance {self.tolerance:g}) on the probe ({self.probe})."
            )
            if self.leaking_blocks:
                text += " Leaking blocks: " + ", ".join(
                    f"{b.name!r} ({b.relative_error:.3g})" for b in self.leaking_blocks[:8]
                ) + "."
            if self.uncovered:
                text += " Operations no rule covers: " + ", ".join(
                    f"{u.op} x{u.count} in {u.module or '<model>'!r}" for u in self.uncovered[:8]
                ) + ("..." if len(self.uncovered) > 8 else "") + "."
            out.append(text)
        return out

    def __str__(self) -> str:
        head = f"mambalrp verification of {self.model} ({self.probe}, {self.dtype}): {'OK' if self.ok else 'FAILED'}"
        lines = [
            head,
            f"  forward: max |difference| {self.forward_difference:.3g}, output scale {self.forward_scale:.3g}, "
            f"tolerance {self.tolerance:g} of the scale",
            f"  leak with {len(self.zeroed)} additive tensors zeroed: {self.leak:.3g} (tolerance {self.tolerance:g})",
        ]
        lines.extend(f"  problem: {p}" for p in self.problems())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The cached verdict


_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[int, Verification]]] = weakref.WeakKeyDictionary()


def forget(model: nn.Module) -> None:
    """Drop the cached verdicts (and patch plans) of ``model``: the next explanation verifies again.

    Needed only after changes the fingerprint cannot see (see :func:`mambalrp.fingerprint.fingerprint`),
    such as writes through ``.data`` that leave the sampled values unchanged.
    """
    _VERDICTS.pop(model, None)
    forget_plan(model)


def ensure_verified(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, object]],
    stamp: int,
    input_module: nn.Module,
    inputs: torch.Tensor,
    *,
    input_layer: bool,
    leaks: bool = True,
    force: bool = False,
) -> Verification:
    """The (cached) verification of ``model`` for inputs like ``inputs``; raises
    :class:`VerificationError` if it failed.

    ``targets`` and ``stamp`` are what :func:`mambalrp.context.planned` returned (the patch plan
    and the fingerprint it was cached under). Call with the model frozen and locked."""
    bucket = probe_bucket(inputs.shape[1]) if not input_layer else None
    key = ("input_layer", tuple(inputs.shape[1:])) if input_layer else ("tokens", bucket)
    verdicts = _VERDICTS.setdefault(model, {})
    cached = verdicts.get(key)
    if cached is not None and cached[0] == stamp and not force:
        verification = cached[1]
    else:
        measure = functools.partial(_measure, model, targets, input_module, inputs, input_layer=input_layer)
        try:
            verification = measure(length=bucket)
        except Exception:  # noqa: BLE001 - e.g. positions beyond what the model takes: retry below
            if bucket is None or inputs.shape[1] >= bucket:
                raise
            verification = None
        if verification is None or (verification.reference_error and bucket and inputs.shape[1] < bucket):
            verification = measure(length=inputs.shape[1])  # as long as the explained input
        verdicts[key] = (stamp, verification)
    problems = verification.problems(leaks=leaks)
    if problems:
        raise VerificationError(_message(verification, problems), verification)
    return verification


def _message(v: Verification, problems: list[str]) -> str:
    lines = [f"mambalrp cannot verify an explanation of {v.model}:"]
    lines += [f"- {p}" for p in problems]
    lines.append(
        f"What to do: if a module above is one that no adapter covers, or that an adapter claims but computes "
        f"differently, write an adapter for it and register it with mambalrp.register_adapter (see {HOWTO}); "
        "print(mambalrp.check_rules(model, input_ids)) shows the details. To explain anyway, pass verify=False "
        "(the explanation then records verified=False)."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The measurements


COMPARED_POSITIONS = 16
"""Positions at the end of a long probe whose outputs are compared, for models that accept
``logits_to_keep`` (the others: all positions)."""

MASKED_PROBE_TOKENS = 32
"""Length of the extra two-row probe (one row left-padded) that checks the padding path."""


def _probes(model: nn.Module, input_module: nn.Module, inputs: torch.Tensor, input_layer: bool, length: int | None):
    """The probe batches as ``(inputs, mask)``: one row of ``length`` random ids, and, when the
    model takes an attention mask, two rows of up to :data:`MASKED_PROBE_TOKENS` ids with the
    second left-padded (the padding path does not depend on the length, so it is checked short)."""
    if input_layer:
        return [(inputs[:1], None)]
    vocab = input_module.num_embeddings
    device = input_module.weight.device
    gen = torch.Generator().manual_seed(_SEED)
    batches = [(torch.randint(0, vocab, (1, length), generator=gen).to(device), None)]
    short = min(length, MASKED_PROBE_TOKENS)
    if short >= 4 and accepts_mask(model):
        ids = torch.randint(0, vocab, (2, short), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, : short // 4] = 0
        batches.append((ids.to(device), mask.to(device)))
    return batches


def _real(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The output at real (unpadded) tokens, flattened."""
    if mask is not None and out.dim() >= 2 and out.shape[:2] == mask.shape:
        return out[mask.bool().to(out.device)]
    return out


class _CallRecorder:
    """Records the inputs and output of every call of the planned modules (for localisation)."""

    def __init__(self, targets: list[tuple[str, nn.Module, object]]):
        self.targets = targets
        self.calls: list[tuple[str, nn.Module, object, tuple, dict, Any]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _CallRecorder:
        for name, module, adapter in self.targets:
            def hook(mod, args, kwargs, output, name=name, adapter=adapter):
                self.calls.append((name, mod, adapter, args, kwargs, output))

            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [t for t in (getattr(value, "last_hidden_state", None),) if isinstance(t, torch.Tensor)]


def _localise(calls, tol: float) -> list[ModuleMismatch]:
    """Run each recorded module call through its adapter alone and compare with its own output."""
    ctx = LRPContext(rules=MAMBALRP)
    found: list[ModuleMismatch] = []
    seen: set[str] = set()
    for name, module, adapter, args, kwargs, output in calls:
        if name in seen:
            continue
        expected = _tensors(output)
        try:
            with torch.no_grad():
                got = _tensors(adapter.forward(module, ctx, *args, **kwargs))
        except Exception as err:  # noqa: BLE001 - reported, not raised
            seen.add(name)
            found.append(ModuleMismatch(name, type(module).__name__, adapter.name, float("inf"), 0.0, f"{type(err).__name__}: {err}"))
            continue
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            seen.add(name)
            found.append(ModuleMismatch(name, type(module).__name__, adapter.name, float("inf"), 0.0, "output has another shape"))
            continue
        if not expected:
            continue
        diff = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected))
        scale = max(float(e.float().abs().max()) for e in expected)
        if diff > tol * max(scale, 1e-6):
            seen.add(name)
            found.append(ModuleMismatch(name, type(module).__name__, adapter.name, diff, scale))
    return found


def _measure(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, object]],
    input_module: nn.Module,
    inputs: torch.Tensor,
    *,
    input_layer: bool,
    length: int | None,
) -> Verification:
    patched = [t for t in targets if getattr(t[2], "role", None) != "linear"]
    batches = _probes(model, input_module, inputs, input_layer, length)
    ids, mask = batches[0]
    if input_layer:
        probe = f"1 input of shape {tuple(ids.shape[1:])}"
    else:
        probe = f"1 x {ids.shape[1]} tokens" + (
            f", and 2 x {batches[1][0].shape[1]} with one row left-padded" if len(batches) > 1 else ""
        )

    # 1. The same function, on every probe batch; additive tensors found on the way.
    tol = tolerance(compute_dtype(model))
    difference, scale, mismatches, reference_error = 0.0, 0.0, [], ""
    for k, (probe_ids, probe_mask) in enumerate(batches):
        # Causal models pass every mismatch on to the last positions: where the model can compute
        # its head for the last positions only, compare those (a long probe's full logits cost).
        keep = None if probe_mask is not None else max(0, probe_ids.shape[1] - COMPARED_POSITIONS)
        try:
            with torch.no_grad():
                reference = output_tensor(call_model(model, probe_ids, probe_mask, keep)[0])
        except Exception as err:  # noqa: BLE001 - reported: the comparison is impossible, not wrong
            if probe_mask is not None and isinstance(err, TypeError) and "attention_mask" in str(err):
                # A forward that takes **kwargs without knowing masks (mamba_ssm's MambaLMHeadModel
                # hands them to mixers that reject it): the padded probe does not apply.
                continue
            reference_error = f"{type(err).__name__}: {err}"
            reference = None
        if k == 0:  # with the input requiring grad: the additions on the relevance path are found
            with lrp(model, MAMBALRP, patch_plan=patched), capture_embedding(input_module), autograd_enabled():
                with additive_uses(model) as additive:
                    under_rules = output_tensor(call_model(model, probe_ids, probe_mask, keep)[0]).detach()
        else:
            with torch.no_grad(), lrp(model, MAMBALRP, patch_plan=patched):
                under_rules = output_tensor(call_model(model, probe_ids, probe_mask, keep)[0])
        if reference is None:
            difference = float("inf")
            continue
        ref, got = _real(reference, probe_mask).float(), _real(under_rules, probe_mask).float()
        if ref.shape != got.shape:
            diff = float("inf")
        else:
            diff = float((ref - got).abs().max()) if ref.numel() else 0.0
        scale = max(scale, float(ref.abs().max()) if ref.numel() else 0.0)
        difference = max(difference, diff)
        if not diff <= tol * max(scale, 1e-6) and not mismatches:  # name the modules (one more forward)
            with torch.no_grad(), _CallRecorder(patched) as recorder:
                call_model(model, probe_ids, probe_mask, keep)
            mismatches = _localise(recorder.calls, tol)
            recorder.calls.clear()

    # 2. No leak: additive tensors zeroed, exact attention rule, a random linear read-out.
    exact: RuleSet = MAMBALRP.with_attention("cp")
    blocks = residual_blocks(model, patched)
    with zeroed(model, additive.values()), lrp(model, exact, patch_plan=patched), capture_embedding(input_module) as captured:
        with autograd_enabled(), attributing(model), BlockProbe(model, blocks) as probe_blocks:
            out = output_tensor(call_model(model, ids, None, ids.shape[1] - 1 if not input_layer else None)[0])
        with autograd_enabled():
            if out.dim() == 3:
                out = out[:, -1]
            gen = torch.Generator().manual_seed(_SEED + 1)
            readout = torch.randn(out.shape[-1], generator=gen).to(out.device)
            score = (out.float() * readout).sum(-1)
            if not captured or not score.requires_grad:
                raise MambaLRPError(
                    f"{type(model).__name__}: the output does not depend on the input module's output; "
                    "nothing can be explained from there"
                )
            uncovered, _ = uncovered_operations(score)
            emb = captured[0]
            (grad,) = torch.autograd.grad(score.sum(), emb, retain_graph=True)
            batch = emb.shape[0]
            relevance = emb.detach().double() * grad.double()
            total = rows(relevance.sum(-1), batch)
            magnitude = rows(relevance.sum(-1).abs(), batch)
            leak = relative_gap(score, total, magnitude)
            leaking = []
            if leak > tol:
                leaking = [b for b in probe_blocks.measure(score, batch) if b.relative_error > tol]
    return Verification(
        model=type(model).__name__,
        probe=probe,
        dtype=compute_dtype(model),
        forward_difference=difference,
        forward_scale=scale,
        leak=leak,
        tolerance=tol,
        zeroed=sorted(additive),
        mismatches=mismatches,
        leaking_blocks=leaking,
        uncovered=uncovered,
        reference_error=reference_error,
    )


def verify(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    *,
    input_layer: nn.Module | None = None,
    force: bool = False,
) -> Verification:
    """Verify that mambalrp explains ``model`` faithfully, without raising.

    :func:`mambalrp.explain` runs this automatically (once per model state, then cached) and
    raises :class:`VerificationError` when it fails; call it yourself to inspect the
    measurements, or with ``force=True`` after changing the model in ways the cache cannot see
    (writes through ``.data``).

    Example:
        >>> v = mambalrp.verify(model)
        >>> print(v)                 # forward difference, leak, and what failed
        >>> assert v.ok

    Args:
        model: The model.
        inputs: For models explained from an ``input_layer``: an example input batch (the
            first example is the probe). For token models: optional ids whose length selects
            the probe bucket (see :func:`probe_bucket`; default :data:`PROBE_TOKENS` tokens);
            the probe's ids are random.
        input_layer: As for :func:`mambalrp.explain`.
        force: Measure again even if a verdict for this model state is cached.

    Returns:
        The :class:`Verification` (check ``.ok``).

    Raises:
        UnsupportedModelError: No adapter matches the model (nothing to verify).
        InputError: ``input_layer`` is given without ``inputs``.
    """
    check_model(model)
    with exclusive(model), torch.inference_mode(False):
        if input_layer is not None:
            if inputs is None:
                raise InputError("verify(..., input_layer=...) needs example inputs")
            module, probe_inputs, _ = resolve_inputs(model, inputs, None, input_layer)
        else:
            module = input_embedding(model)
            length = PROBE_TOKENS if inputs is None else max(1, int(inputs.shape[-1]))
            probe_inputs = torch.zeros(1, length, dtype=torch.long)
        targets, stamp = planned(model, MAMBALRP)
        with frozen(model):
            try:
                return ensure_verified(
                    model, targets, stamp, module, probe_inputs, input_layer=input_layer is not None, force=force
                )
            except VerificationError as err:
                return err.verification

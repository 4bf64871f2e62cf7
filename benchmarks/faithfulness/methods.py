"""Attribution methods compared by the suite.

Every method has the signature ``method(model, ids, target) -> (batch, T)`` float32 token scores,
where ``model`` is a classifier returning ``(batch, classes)`` logits, ``ids`` is an unpadded
``(batch, T)`` id tensor and ``target`` the ``(batch,)`` classes to explain. Higher score means
"more evidence for the target".

Gradients are taken with the model run under :func:`mambalrp.lrp` with the ``"gradient"`` rule
set, whose forward equals the model's and whose backward is the true gradient. Methods that need
modified embeddings (SmoothGrad, Integrated Gradients) use a forward hook on the input embedding
that returns the modified tensor (:func:`embedding_override`); the core API is unchanged.

Hidden-attention methods follow Ali, Zimerman and Wolf (2024): per layer and channel, the
selective scan is ``y_t = sum_{s<=t} alpha[t, s] x_s`` (plus the ``D`` skip, left out) with
``alpha[t, s] = C_t . (prod_{r=s+1..t} Abar_r) Bbar_s``, computed from the scan's taps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import mambalrp
from mambalrp.explain import input_embedding
from mambalrp.rules import GRADIENT, MAMBALRP, RuleSet

Method = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

#: SmoothGrad: number of noisy copies and noise scale (fraction of the example's embedding range).
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_SIGMA = 0.15
#: Integrated Gradients: Riemann midpoint steps from the zero embedding.
IG_STEPS = 32


@contextlib.contextmanager
def embedding_override(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the input embedding's output by ``fn(output)`` inside the block."""
    handle = input_embedding(model).register_forward_hook(lambda m, a, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def target_logits(model: nn.Module, ids: torch.Tensor, target: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``target`` for a batch of (possibly left-padded) inputs, without gradients."""
    with torch.no_grad(), mambalrp.lrp(model, GRADIENT):
        out = model(ids) if attention_mask is None else model(ids, attention_mask=attention_mask)
        out = out if isinstance(out, torch.Tensor) else out.logits
    return out.gather(1, target.reshape(-1, 1)).squeeze(1).float()


def embedding_gradient(
    model: nn.Module,
    ids: torch.Tensor,
    target: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rules: RuleSet = GRADIENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the target logits w.r.t. the (optionally transformed) input embeddings.

    Args:
        model: Classifier.
        ids: ``(batch, T)`` ids.
        target: ``(batch,)`` classes.
        transform: Maps the clean embeddings ``(batch, T, D)`` to the embeddings fed to the model.
        rules: Rule set the backward pass uses (true gradient by default).

    Returns:
        ``(embeddings fed to the model, gradient)``, both ``(batch, T, D)``.
    """
    fed: list[torch.Tensor] = []

    def swap(out: torch.Tensor) -> torch.Tensor:
        x = transform(out.detach()) if transform is not None else out.detach()
        leaf = x.detach().requires_grad_(True)
        fed.append(leaf)
        return leaf

    with torch.enable_grad(), mambalrp.lrp(model, rules), embedding_override(model, swap):
        score = _logits(model, ids).gather(1, target.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, fed[0])
    return fed[0].detach(), grad


def clean_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of ``ids`` ``(batch, T, D)``."""
    with torch.no_grad():
        return input_embedding(model)(ids)


# ----------------------------------------------------------------------------------------------
# baselines


def random_scores(seed: int = 0) -> Method:
    """Uniform random scores (a fixed generator per call of the returned method's factory)."""
    gen = torch.Generator().manual_seed(seed)

    def method(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.rand(ids.shape, generator=gen)

    return method


def lrp_method(rules: str | RuleSet) -> Method:
    """``mambalrp.explain`` with the given rules (``"gradient"`` is Gradient x Input)."""

    def method(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mambalrp.explain(model, ids, target, rules=rules).relevance

    return method


def saliency(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the logit's gradient at each token embedding (unsigned)."""
    _, grad = embedding_gradient(model, ids, target)
    return grad.float().norm(dim=-1)


def smoothgrad(samples: int = SMOOTHGRAD_SAMPLES, sigma: float = SMOOTHGRAD_SIGMA, seed: int = 0) -> Method:
    """SmoothGrad x Input: ``sum_D e * mean_k grad(e + eps_k)``, ``eps ~ N(0, (sigma * range(e))^2)``.

    ``range(e)`` is the max minus min of the example's clean embedding values (Smilkov et al.
    recommend 10-20 %).
    """
    gen = torch.Generator().manual_seed(seed)

    def method(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        emb = clean_embeddings(model, ids)
        span = (emb.flatten(1).max(1).values - emb.flatten(1).min(1).values).reshape(b, 1, 1, 1)
        noise = torch.randn((samples, *emb.shape), generator=gen).transpose(0, 1) * sigma * span
        noise = noise.reshape(b * samples, *emb.shape[1:])
        rep_ids = ids.repeat_interleave(samples, 0)
        _, grad = embedding_gradient(model, rep_ids, target.repeat_interleave(samples), lambda e: e + noise)
        return (emb * grad.reshape(b, samples, *emb.shape[1:]).mean(1)).sum(-1).float()

    return method


def integrated_gradients(steps: int = IG_STEPS) -> Method:
    """Integrated Gradients from the all-zero embedding, midpoint rule with ``steps`` points."""

    def method(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        emb = clean_embeddings(model, ids)
        alphas = (torch.arange(steps, dtype=emb.dtype) + 0.5) / steps
        scale = alphas.repeat(b).reshape(b * steps, 1, 1)
        _, grad = embedding_gradient(model, ids.repeat_interleave(steps, 0), target.repeat_interleave(steps),
                                     lambda e: e * scale)
        return (emb * grad.reshape(b, steps, *emb.shape[1:]).mean(1)).sum(-1).float()

    return method


def occlusion(neutral_id: int) -> Method:
    """Drop of the target logit when one token is replaced by ``neutral_id``."""

    def method(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, T = ids.shape
        base = target_logits(model, ids, target)
        occluded = ids.repeat_interleave(T, 0).reshape(b, T, T).clone()
        occluded[:, torch.arange(T), torch.arange(T)] = neutral_id
        logits = target_logits(model, occluded.reshape(b * T, T), target.repeat_interleave(T))
        return base[:, None] - logits.reshape(b, T)

    return method


# ----------------------------------------------------------------------------------------------
# hidden attention of Mamba (Ali, Zimerman, Wolf 2024)


def _collect_taps(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, with_grad: bool):
    """Run the model under the true gradient with taps; return per-layer tap dicts in order."""
    layers: dict[nn.Module, dict[str, Any]] = {}

    def tap(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        entry = layers.setdefault(module, {"module": module})
        if name in ("ssm_input", "delta", "B", "C"):
            entry[name] = tensor.detach()
        elif name == "y" and with_grad:
            entry["y_shape"] = tuple(tensor.shape)
            tensor.register_hook(lambda g, entry=entry: entry.__setitem__("y_grad", g.detach()))
        return tensor

    fed: list[torch.Tensor] = []

    def leaf(out: torch.Tensor) -> torch.Tensor:
        x = out.detach().requires_grad_(with_grad)
        fed.append(x)
        return x

    with torch.enable_grad(), mambalrp.lrp(model, GRADIENT, tap_fn=tap), embedding_override(model, leaf):
        score = _logits(model, ids).gather(1, target.reshape(-1, 1)).sum()
        if with_grad:
            score.backward()
    return list(layers.values())


def hidden_attention(entry: dict[str, Any]) -> torch.Tensor:
    """Per-channel hidden attention ``alpha (b, T, T, channels)`` of one mixer from its taps.

    Mamba-1: channels are the ``d_inner`` channels. Mamba-2: channels are heads (every channel of
    a head shares the head's matrix).
    """
    module = entry["module"]
    dt, B, C = entry["delta"].float(), entry["B"].float(), entry["C"].float()
    A = -torch.exp(module.A_log.float())
    b, T = dt.shape[:2]
    S = dt.cumsum(1)  # (b, T, ch)
    diff = S[:, :, None, :] - S[:, None, :, :]  # (b, t, s, ch): sum_{r=s+1..t} dt_r
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    diff = torch.where(causal[None, :, :, None], diff, torch.zeros((), dtype=diff.dtype))
    if A.dim() == 2:  # Mamba-1: A (d, n), B, C (b, T, n)
        decay = torch.exp(diff[..., None] * A)  # (b, t, s, d, n)
        alpha = torch.einsum("btsdn,btn,bsn->btsd", decay, C, B)
    else:  # Mamba-2: A (h,), B, C (b, T, g * n)
        h, g = A.shape[0], module.n_groups
        Bg, Cg = B.reshape(b, T, g, -1), C.reshape(b, T, g, -1)
        cb = torch.einsum("btgn,bsgn->btsg", Cg, Bg).repeat_interleave(h // g, dim=-1)  # (b, t, s, h)
        alpha = torch.exp(diff * A) * cb
    alpha = alpha * dt[:, None, :, :]
    return alpha * causal[None, :, :, None]


def _scan_io(entry: dict[str, Any], heads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan input ``x`` and output gradient ``g`` as ``(b, T, ch, p)`` (p = 1 for Mamba-1)."""
    x = entry["ssm_input"].float()
    g = entry["y_grad"].float()
    if g.shape != x.shape:  # Mamba-1 output layout is (b, d, T)
        g = g.transpose(1, 2)
    b, T, d = x.shape
    p = 1 if heads is None else d // heads
    return x.reshape(b, T, -1, p), g.reshape(b, T, -1, p)


def _rollout_scores(mats: list[torch.Tensor], residual: str) -> torch.Tensor:
    b, T, _ = mats[0].shape
    eye = torch.eye(T).expand(b, T, T)
    R = eye.clone()
    for m in mats:
        if residual == "average":  # Abnar & Zuidema: 0.5 * (A + I), A row-normalised
            A = m / m.sum(-1, keepdim=True).clamp_min(1e-12)
            R = (0.5 * A + 0.5 * eye) @ R
        else:  # Chefer et al.: R <- R + A R
            R = R + m @ R
    return R[:, -1, :]  # the classifier reads the last position


def attention_rollout(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Attention rollout over Mamba's hidden attention: mean over channels of ``|alpha|``."""
    entries = _collect_taps(model, ids, target, with_grad=False)
    with torch.no_grad():
        mats = [hidden_attention(e).abs().mean(-1) for e in entries]
        return _rollout_scores(mats, "average")


def grad_attention_rollout(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient x attention rollout: per layer ``mean_channels (dL/dalpha * alpha)^+``, Chefer rollout.

    With ``y_t = sum_s alpha[t, s] x_s`` per channel, ``dL/dalpha[t, s] = g_t * x_s`` with ``g``
    the gradient at the scan output and ``x`` the scan input.
    """
    entries = _collect_taps(model, ids, target, with_grad=True)
    mats = []
    with torch.no_grad():
        for e in entries:
            alpha = hidden_attention(e)  # (b, t, s, ch)
            heads = None if e["module"].A_log.dim() == 2 else e["module"].A_log.shape[0]
            x, g = _scan_io(e, heads)  # (b, T, ch, p)
            contrib = alpha[..., None] * g[:, :, None] * x[:, None, :]  # (b, t, s, ch, p)
            mats.append(contrib.clamp_min(0).mean((-1, -2)))
    return _rollout_scores(mats, "chefer")


# ----------------------------------------------------------------------------------------------


def build_methods(neutral_id: int, seed: int = 0, quick: bool = False) -> dict[str, Method]:
    """All methods of the suite, in table order.

    Args:
        neutral_id: Token used by occlusion.
        seed: Seed of random scores and SmoothGrad noise.
        quick: Fewer SmoothGrad samples and IG steps (smoke runs).

    Returns:
        Ordered ``{name: method}``.
    """
    return {
        "random": random_scores(seed),
        "saliency": saliency,
        "gradient_x_input": lrp_method("gradient"),
        "smoothgrad_x_input": smoothgrad(4 if quick else SMOOTHGRAD_SAMPLES, seed=seed),
        "integrated_gradients": integrated_gradients(8 if quick else IG_STEPS),
        "occlusion": occlusion(neutral_id),
        "attn_rollout": attention_rollout,
        "grad_x_attn_rollout": grad_attention_rollout,
        "lrp_ln_rule": lrp_method("ln-only"),
        "mambalrp": lrp_method("mambalrp"),
        "mambalrp_no_silu": lrp_method(MAMBALRP.without("silu")),
        "mambalrp_no_gate": lrp_method(MAMBALRP.without("gate")),
        "mambalrp_no_norm": lrp_method(MAMBALRP.without("norm")),
        "mambalrp_no_ssm": lrp_method(MAMBALRP.without("ssm")),
    }

"""zennit integration (optional extra ``mambalrp[zennit]``): MambaLRP as a zennit canonizer.

zennit computes attributions with its *attributors* (``Gradient``, ``SmoothGrad``,
``IntegratedGradients``, ...) under a *composite* that changes the backward pass. MambaLRP's rules
are written in gradient form and change module forwards (see :func:`mambalrp.lrp`), which is what
a zennit canonizer does: :class:`MambaLRPCanonizer` enters :func:`mambalrp.lrp` when zennit
registers it and leaves it (restoring every module exactly) when zennit removes it.

With :class:`MambaLRPComposite` and zennit's ``Gradient`` attributor, ``input * attribution`` is
the MambaLRP relevance of the attributor's input (embeddings, for a wrapper such as
:class:`EmbeddingsToLogit`), so zennit's attributors and MambaLRP share one interface; SmoothGrad
and Integrated Gradients run with the plain gradient (no composite) as the paper's baselines.

Do not combine this canonizer with zennit's own layer rules (``Epsilon``, ``ZPlus``, ...): those
hooks pass relevance, not gradients, and mixed with gradient-form rules give wrong numbers. Use
:meth:`mambalrp.RuleSet.with_linear` for epsilon / gamma rules instead.

Example:
    >>> from zennit.attribution import Gradient
    >>> wrapped = EmbeddingsToLogit(model)              # inputs_embeds -> last-position logits
    >>> emb = model.get_input_embeddings()(ids)
    >>> with Gradient(wrapped, MambaLRPComposite()) as attributor:
    ...     logits, grad = attributor(emb, lambda out: torch.eye(out.shape[-1])[target])
    >>> relevance = (emb * grad).sum(-1)                  # equals mambalrp.explain(model, ids, target)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

try:
    from zennit.canonizers import Canonizer
    from zennit.core import Composite
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("mambalrp.zennit needs zennit: pip install 'mambalrp[zennit]'") from err

from mambalrp.context import lrp
from mambalrp.rules import RuleSet, get_rules


class MambaLRPCanonizer(Canonizer):
    """A zennit canonizer that runs the model under :func:`mambalrp.lrp` while registered.

    Args:
        rules: Preset name or :class:`~mambalrp.rules.RuleSet` (default ``"mambalrp"``).
    """

    def __init__(self, rules: str | RuleSet = "mambalrp"):
        super().__init__()
        self.rules = get_rules(rules)
        self.model: nn.Module | None = None
        self._stack: contextlib.ExitStack | None = None

    def apply(self, root_module: nn.Module) -> list[MambaLRPCanonizer]:
        """Register a copy of this canonizer on ``root_module``; return it (zennit removes it later)."""
        instance = self.copy()
        instance.model = root_module
        instance.register()
        return [instance]

    def register(self) -> None:
        """Enter :func:`mambalrp.lrp` on the model."""
        if self.model is None:
            raise RuntimeError("MambaLRPCanonizer.register() called before apply()")
        if self._stack is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(lrp(self.model, self.rules))
        self._stack = stack

    def remove(self) -> None:
        """Leave :func:`mambalrp.lrp`: every patched module gets its original forward back."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def copy(self) -> MambaLRPCanonizer:
        """A fresh, unregistered canonizer with the same rules."""
        return MambaLRPCanonizer(self.rules)


class MambaLRPComposite(Composite):
    """A zennit composite with MambaLRP as its only canonizer (and no layer hooks).

    Args:
        rules: Preset name or :class:`~mambalrp.rules.RuleSet`.
        canonizers: Further zennit canonizers, applied before MambaLRP.
    """

    def __init__(self, rules: str | RuleSet = "mambalrp", canonizers: list[Any] | None = None):
        super().__init__(module_map=None, canonizers=[*(canonizers or []), MambaLRPCanonizer(rules)])


class EmbeddingsToLogit(nn.Module):
    """Wraps a language model so that its input is the embedding tensor and its output the logits
    at one position, as zennit's attributors expect (a float input, a ``(batch, classes)`` output).

    Args:
        model: A model whose forward accepts ``inputs_embeds`` (transformers models do).
        position: Sequence position whose logits are returned (default: the last).
    """

    def __init__(self, model: nn.Module, position: int = -1):
        super().__init__()
        self.model = model
        self.position = position

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``(batch, seq, d_model)`` embeddings to ``(batch, vocab)`` logits at :attr:`position`."""
        out = self.model(inputs_embeds=inputs_embeds, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, self.position]

"""Sequence classifier on top of a Hugging Face Mamba or Mamba-2 backbone."""

from __future__ import annotations

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return, per row, the position of the last non-padded token.

    Works for left padding (the last token is at ``seq_len - 1``) and for right padding
    (the last position whose mask is 1).

    Args:
        attention_mask: ``(batch, seq_len)`` tensor, 1 for real tokens and 0 for padding.

    Returns:
        ``(batch,)`` long tensor of positions. A row with no real token maps to 0.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


class MambaSequenceClassifier(nn.Module):
    """Linear classification head on the final hidden state of the last real token.

    The backbone runs over the whole sequence (it is causal, so the last token's state summarises
    the prefix); the head reads the backbone's output (after its final RMSNorm) at the last
    non-padded position. The project batches with LEFT padding; right padding is handled too.

    Args:
        backbone: A ``transformers`` ``MambaModel`` or ``Mamba2Model``.
        num_labels: Number of output classes.

    Attributes:
        backbone: The wrapped backbone.
        head: ``nn.Linear(hidden_size, num_labels)``.
        num_labels: Number of output classes.
    """

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_labels = num_labels
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    @property
    def config(self):
        """The backbone's configuration object."""
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Compute class logits.

        Args:
            input_ids: ``(batch, seq_len)`` token ids. May be omitted when ``inputs_embeds`` is
                passed in ``kwargs`` (useful for attribution methods that work on embeddings).
            attention_mask: Optional ``(batch, seq_len)`` mask, 1 for real tokens and 0 for
                padding. Without it every position counts as real.
            **kwargs: Forwarded to the backbone (for example ``inputs_embeds``). ``use_cache``
                defaults to ``False``.

        Returns:
            ``(batch, num_labels)`` logits.
        """
        kwargs.setdefault("use_cache", False)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if attention_mask is None:
            last = hidden[:, -1]
        else:
            index = last_token_index(attention_mask)
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        # The backbone's residual stream may stay in float32 (``residual_in_fp32``) while the
        # weights are half precision: the head computes in its own dtype.
        return self.head(last.to(self.head.weight.dtype))

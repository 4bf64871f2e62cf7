"""Tiny Hugging Face checkpoint directories for the loading and command-line tests.

Importable from test modules because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["<unk>", "<pad>"] + "the cat sat on a mat and dog ran home".split()


def word_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :data:`WORDS` (whitespace pre-tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")


def save_tiny_mamba(path: Path, seed: int = 0):
    """Save a random ``MambaForCausalLM`` (``mambalrp.testing.tiny_mamba``) and a tokenizer; return the model."""
    from mambalrp.testing import tiny_mamba

    model = tiny_mamba(seed, vocab_size=len(WORDS))
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return model


def save_tiny_gpt2(path: Path):
    """Save a one-layer random GPT-2 (a family mambalrp refuses) and a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(path)
    word_tokenizer().save_pretrained(path)

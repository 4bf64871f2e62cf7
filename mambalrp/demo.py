"""``python -m mambalrp.demo``: explain one prediction and print the token heatmap."""

from __future__ import annotations

import argparse
import os
import sys

import torch

import mambalrp


def run(color: bool | None = None) -> str:
    """Explain the next-token prediction of a small random Mamba model on a toy sentence.

    Args:
        color: Force ANSI colours on or off; default: on when stdout is a terminal.

    Returns:
        The text that was printed.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from mambalrp.testing import tiny_mamba, zero_biases

    words = "the cat sat on the mat because it was warm and the dog ran to the door".split()
    vocab = sorted(set(words))
    ids = torch.tensor([[vocab.index(w) for w in words]])
    model = zero_biases(tiny_mamba(0, vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4))
    exp = mambalrp.explain(model, ids)
    color = sys.stdout.isatty() if color is None else color
    lines = [
        "MambaLRP demo: a small random-weight Mamba (4 layers, d_model 32), next-token logit.",
        f"explained target: {vocab[int(exp.target[0])]!r}",
        exp.render(tokens=words, color=color),
        f"conservation: logit {exp.logit[0].item():+.6f} = sum of relevance "
        f"{exp.relevance[0].sum().item():+.6f} (delta {exp.conservation_delta[0].item():+.2e})",
    ]
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="mambalrp.demo", description=__doc__)
    parser.add_argument("--no-color", action="store_true", help="plain text instead of ANSI colours")
    args = parser.parse_args(argv)
    run(color=False if args.no_color else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

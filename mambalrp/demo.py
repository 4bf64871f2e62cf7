"""``python -m mambalrp.demo``: explain a bundled sentiment classifier and print token heatmaps."""

from __future__ import annotations

import argparse
import os
import sys

import torch

import mambalrp

SENTENCES = (
    "a gorgeous , witty , seductive movie .",
    "a boring , poorly written mess .",
    "the plot is dull and the acting is flat .",
)


def run(model_name: str = "sst-mamba1", sentences: tuple[str, ...] = SENTENCES, color: bool | None = None) -> str:
    """Classify ``sentences`` with a bundled model and explain each prediction with MambaLRP.

    The explained score is the logit difference of the predicted class over the other class, so
    red tokens speak for the prediction and blue ones against it.

    Args:
        model_name: A sentiment model of the zoo (``sst-mamba1`` or ``sst-mamba2``).
        sentences: Lower-cased, tokenised English sentences (the corpus' style).
        color: Force ANSI colours on or off; default: on when stdout is a terminal.

    Returns:
        The text that was printed.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from mambalrp.models.zoo import load_model, model_info

    model, tokenizer = load_model(model_name)
    info = model_info(model_name)
    labels = info["labels"]
    batch = tokenizer.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    with torch.no_grad():
        probs = model(ids, attention_mask=mask).softmax(-1)
    pred = probs.argmax(-1)
    sign = (2 * pred - 1).float()  # +1 explains positive - negative, -1 the reverse
    exp = mambalrp.explain(model, ids, lambda lg: sign * (lg[:, 1] - lg[:, 0]), attention_mask=mask)

    color = sys.stdout.isatty() if color is None else color
    accuracy = info.get("test_accuracy", info.get("metrics", {}).get("test_accuracy"))
    header = f"MambaLRP demo: {model_name}, a {info['architecture']} sentiment classifier trained by this project"
    if isinstance(accuracy, float):
        header += f" ({accuracy:.1%} on held-out sentences)"
    lines = [header, "red: evidence for the predicted class; blue: against it", ""]
    rendered = exp.render(tokens=[encoding.tokens for encoding in batch], color=color).split("\n\n")
    for i, encoding in enumerate(batch):
        lines.append(f"{labels[int(pred[i])]} ({probs[i, pred[i]].item():.0%})")
        lines.append(rendered[i])
        lines.append(
            f"conservation: logit difference {exp.logit[i].item():+.4f} = token relevance "
            f"{exp.relevance[i].sum().item():+.4f} + biases {exp.conservation_delta[i].item():+.4f}"
        )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="mambalrp.demo", description=__doc__)
    parser.add_argument("--model", default="sst-mamba1", help="sst-mamba1 or sst-mamba2")
    parser.add_argument("--no-color", action="store_true", help="plain text instead of ANSI colours")
    parser.add_argument("sentence", nargs="*", help="sentences to explain instead of the built-in ones")
    args = parser.parse_args(argv)
    run(args.model, tuple(args.sentence) or SENTENCES, color=False if args.no_color else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

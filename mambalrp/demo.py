"""``python -m mambalrp.demo``: explain a bundled sentiment classifier and print token heatmaps.

Then explain a short generation of the bundled language model, token by token, and write it as
an HTML page (``build/demo/generation.html`` unless ``--html`` says otherwise) whose path is
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import mambalrp
from mambalrp import visualize

HTML_PATH = "build/demo/generation.html"
PROMPT = "the movie is"

SENTENCES = (
    "a gorgeous , witty , seductive movie .",
    "a boring , poorly written mess .",
    "the plot is dull and the acting is flat .",
)


def run(
    model_name: str = "sst-mamba1",
    sentences: tuple[str, ...] = SENTENCES,
    color: bool | None = None,
    rules: str = "mambalrp",
) -> str:
    """Classify ``sentences`` with a bundled model and explain each prediction with MambaLRP.

    The explained score is the logit difference of the predicted class over the other class, so
    red tokens speak for the prediction and blue ones against it.

    Args:
        model_name: A sentiment model of the zoo (``sst-mamba1`` or ``sst-mamba2``).
        sentences: Lower-cased, tokenised English sentences (the corpus' style).
        color: Force ANSI colours on or off; default: on when stdout is a terminal.
        rules: The rule set (``"mambalrp"``, ``"gradient"``, ``"ln-only"``).

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
    exp = mambalrp.explain(model, ids, lambda lg: sign * (lg[:, 1] - lg[:, 0]), attention_mask=mask, rules=rules)

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


def run_generation(
    model_name: str = "lm-mamba1",
    prompt: str = PROMPT,
    max_new_tokens: int = 8,
    html_path: str | os.PathLike = HTML_PATH,
    rules: str = "mambalrp",
    progress: bool | None = False,
) -> str | None:
    """Explain a short greedy generation of a bundled language model and write it as HTML.

    Each generated token is explained by the tokens before it (prompt and generated so far).
    Needs :func:`mambalrp.explain_generation`; without it, prints a note and returns ``None``.

    Args:
        model_name: A language model of the zoo (``lm-mamba1`` or ``lm-mamba2``).
        prompt: The prompt (lower-cased English, the corpus' style).
        max_new_tokens: Tokens to generate.
        html_path: Where to write the HTML page (parent directories are created).
        rules: The rule set.
        progress: Show a progress bar (``None``: when stderr is a terminal).

    Returns:
        The path of the written page, or ``None`` when generations cannot be explained here.
    """
    explain_generation = getattr(mambalrp, "explain_generation", None)
    if explain_generation is None:
        print("generation: skipped (this mambalrp has no explain_generation)")
        return None
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from mambalrp.loading import encode, token_strings
    from mambalrp.models.zoo import load_model

    model, tokenizer = load_model(model_name)
    ids = torch.tensor(encode(tokenizer, prompt))
    exp = explain_generation(model, ids, max_new_tokens=max_new_tokens, rules=rules, tokenizer=tokenizer, progress=progress)
    matrix = exp.relevance.detach().float().cpu().numpy()
    tokens = getattr(exp, "tokens", None)
    if not tokens or isinstance(tokens[0], list):
        tokens = token_strings(tokenizer, ids.tolist() + [int(i) for i in exp.generated_ids.reshape(-1)])
    rows, values, labels = visualize.generation_rows(tokens, matrix, len(ids))
    labels = [f"step {i + 1}: {visualize.display_token(t)!r}" for i, t in enumerate(labels)]
    generated = "".join(visualize.display_token(t) for t in tokens[len(ids):])
    page = visualize.html_document(
        rows,
        values,
        row_labels=labels,
        title=f"{model_name}: {prompt!r} → {generated!r}",
        caption=f"Each row explains one generated token by the tokens before it ({exp.rules} rules).",
    )
    path = Path(html_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    print(f"generation: {prompt!r} -> {generated!r}, {len(labels)} tokens explained")
    print(f"wrote {path}")
    return str(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (shared by ``python -m mambalrp.demo`` and ``mambalrp demo``)."""
    parser.add_argument("--model", default="sst-mamba1", help="sentiment model of the zoo: sst-mamba1 (default) or sst-mamba2")
    parser.add_argument("--lm", default="lm-mamba1", help="language model of the zoo for the generation: lm-mamba1 (default) or lm-mamba2")
    parser.add_argument("--html", default=HTML_PATH, metavar="PATH", help=f"where to write the generation's HTML page (default: {HTML_PATH})")
    parser.add_argument("--no-generation", action="store_true", help="skip the generation part")
    parser.add_argument("--no-color", action="store_true", help="plain text instead of ANSI colours")
    parser.add_argument("--rules", default="mambalrp", choices=("mambalrp", "gradient", "ln-only"), help="rule set (default: mambalrp)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("sentence", nargs="*", help="sentences to explain instead of the built-in ones")


def run_args(args: argparse.Namespace) -> int:
    """Run the demo for parsed arguments (see :func:`add_arguments`); return the exit status."""
    run(args.model, tuple(args.sentence) or SENTENCES, color=False if args.no_color else None, rules=args.rules)
    if not args.no_generation:
        run_generation(args.lm, html_path=args.html, rules=args.rules, progress=False if args.quiet else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="mambalrp.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

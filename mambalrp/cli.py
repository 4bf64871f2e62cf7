"""The ``mambalrp`` command line: ``explain``, ``explain-generation`` and ``demo``.

Usage::

    mambalrp explain --model sst-mamba1 --text "a gorgeous , witty film ." --out film.html
    mambalrp explain-generation --model lm-mamba1 --text "the movie is" --max-new-tokens 8 --format json
    mambalrp demo

Exit status: 0 on success; 2 when the command line itself is malformed (an unknown option, a
missing required option, a bad choice, a figure format without ``--out``), with argparse's usage
message; 1 when a well-formed command cannot be carried out (no such model or path, an
unsupported model, empty text, a target not in the vocabulary, a file that cannot be written),
with one line ``mambalrp: error: ...`` on stderr.

A new command is one more :class:`Command` in :data:`COMMANDS`: a name, a help line, a function
that adds its arguments to its subparser, and a function that runs it and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

PROG = "mambalrp"
FORMATS = ("text", "html", "png", "pdf", "svg", "json")
FIGURES = ("png", "pdf", "svg")
SUFFIXES = {".txt": "text", ".json": "json", ".html": "html", ".htm": "html", ".png": "png", ".pdf": "pdf", ".svg": "svg"}
RULES = ("mambalrp", "gradient", "ln-only")


class UsageError(Exception):
    """A combination of options that cannot work (reported like argparse's errors, exit status 2)."""


class Command(NamedTuple):
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# Shared options and helpers


def _add_common(parser: argparse.ArgumentParser, *, generation: bool) -> None:
    parser.add_argument(
        "--model", required=True, metavar="PATH_OR_NAME",
        help="a zoo model name (e.g. sst-mamba1, lm-mamba1) or a local Hugging Face checkpoint directory",
    )
    parser.add_argument("--text", required=True, help="the input text" + (" (the prompt)" if generation else ""))
    parser.add_argument(
        "--task", choices=("causal-lm", "sequence-classification"),
        help="for checkpoints: the head to load (default: from config.json's architectures)",
    )
    parser.add_argument("--rules", default="mambalrp", choices=RULES, help="rule set (default: mambalrp)")
    parser.add_argument(
        "--format", choices=FORMATS,
        help="output format (default: from --out's suffix, else text); png, pdf and svg need --out",
    )
    parser.add_argument("--out", metavar="FILE", help="write here instead of stdout (parent directories are created)")
    parser.add_argument(
        "--normalization", default="row", choices=("row", "global", "none"),
        help="colour scale of html and figures: per row (default), over all rows, or values as given",
    )
    parser.add_argument("--no-color", action="store_true", help="text format: no ANSI colours (default: colours on a terminal)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status messages on stderr")


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        fmt = args.format
    elif args.out is not None:
        suffix = Path(args.out).suffix.lower()
        if suffix not in SUFFIXES:
            raise UsageError(f"cannot tell the format from {args.out!r}; give --format ({', '.join(FORMATS)})")
        fmt = SUFFIXES[suffix]
    else:
        fmt = "text"
    if fmt in FIGURES and args.out is None:
        raise UsageError(f"--format {fmt} writes a file: give --out FILE")
    return fmt


def _prepare_environment(quiet: bool) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is installed with the CLI's extras
        pass


def _load(args: argparse.Namespace):
    from mambalrp.loading import load

    return load(args.model, task=args.task)


def _class_labels(model, source: str) -> list[str] | None:
    """Class names of a classifier, or ``None`` for a language model."""
    from mambalrp.models.zoo import ZOO_DIR

    path = Path(source).expanduser()
    info_file = path / "model.json" if path.is_dir() else ZOO_DIR / source / "model.json"
    if info_file.is_file():
        labels = json.loads(info_file.read_text()).get("labels")
        return list(labels) if labels else None
    config = getattr(model, "config", None)
    if type(model).__name__.endswith("ForSequenceClassification") and getattr(config, "id2label", None):
        return [str(config.id2label[i]) for i in sorted(config.id2label)]
    return None


def _vocabulary_id(tokenizer, token: str) -> int | None:
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(token)
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def _resolve_target(spec: str | None, labels: list[str] | None, tokenizer) -> int | None:
    """``--target`` as a class or token id: a class name, an integer id, or a token string."""
    from mambalrp.errors import InputError
    from mambalrp.loading import encode

    if spec is None:
        return None
    if labels is not None:
        if spec in labels:
            return labels.index(spec)
        if spec.isdigit() and int(spec) < len(labels):
            return int(spec)
        raise InputError(f"target {spec!r} is not a class of this model (classes: {', '.join(labels)})")
    if spec.isdigit():
        return int(spec)
    found = _vocabulary_id(tokenizer, spec)  # a token as the vocabulary spells it (e.g. "\u0120good")
    if found is not None:
        return int(found)
    ids = encode(tokenizer, spec, special_tokens=False) if spec.strip() else []
    if len(ids) == 1:
        return ids[0]
    raise InputError(f"target {spec!r} is not one token of the vocabulary (it encodes to {len(ids)} tokens); give a token id")


def _write(args: argparse.Namespace, fmt: str, payload: str | Any) -> None:
    """Write text (a string) or a figure (a matplotlib Figure) to ``--out`` or stdout."""
    if fmt in FIGURES:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload.savefig(path, format=fmt, dpi=200)
    elif args.out is None:
        sys.stdout.write(payload if payload.endswith("\n") else payload + "\n")
        return
    else:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(payload if payload.endswith("\n") else payload + "\n", encoding="utf-8")
    if not args.quiet:
        print(f"{PROG}: wrote {path}", file=sys.stderr)


def _paint_row(tokens: Sequence[str], values: Sequence[float], color: bool) -> str:
    """One row of tokens for the terminal: ANSI backgrounds, or ``token[+0.12]`` text."""
    from mambalrp.visualize import color_of, display_token, normalize

    (scaled,), _ = normalize([values], "row")
    parts = []
    for tok, v in zip(tokens, scaled):
        shown = display_token(tok)
        if not color:
            parts.append(f"{shown}[{v:+.2f}]")
            continue
        hexa = color_of(float(v))
        r, g, b = int(hexa[1:3], 16), int(hexa[3:5], 16), int(hexa[5:7], 16)
        parts.append(f"\033[48;2;{r};{g};{b}m\033[38;2;0;0;0m{shown}\033[0m")
    # Byte-level BPE tokens carry their spaces; word-level ones need a separator.
    carries_spaces = any(display_token(t).startswith(" ") for t in tokens)
    return ("" if color and carries_spaces else " ").join(parts)


def _float(x: Any) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------------------------------------
# explain


def _add_explain(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, generation=False)
    parser.add_argument(
        "--target",
        help="what to explain: a class name or index for classifiers; for language models a token id, a token as "
        "the vocabulary spells it, or a text that encodes to one token (mind the leading space: ' good') "
        "(default: the highest-scoring class or next token)",
    )
    parser.add_argument("--position", type=int, help="language models: the position to explain (default: the last token)")


def _run_explain(args: argparse.Namespace) -> int:
    fmt = _output_format(args)
    _prepare_environment(args.quiet)
    import torch

    import mambalrp
    from mambalrp.loading import encode, token_strings

    model, tokenizer = _load(args)
    ids = encode(tokenizer, args.text)
    labels = _class_labels(model, args.model)
    target = _resolve_target(args.target, labels, tokenizer)
    exp = mambalrp.explain(model, torch.tensor([ids]), target, position=args.position, rules=args.rules)
    tokens = token_strings(tokenizer, ids)
    relevance = exp.relevance[0].detach().float().cpu().tolist()
    logit = float(exp.logit[0])
    delta = float(exp.conservation_delta[0])
    tgt = None if exp.target is None else int(exp.target[0])
    pos = None if exp.position is None else int(exp.position[0])
    if labels is not None and tgt is not None:
        what = f"class {labels[tgt]!r} ({tgt})"
    elif tgt is not None:
        what = f"next token {token_strings(tokenizer, [tgt])[0]!r} (id {tgt}) at position {pos}"
    else:
        what = "the output"
    if fmt == "json":
        data = exp.to_dict() if hasattr(exp, "to_dict") else {
            "kind": "output",
            "input_ids": [ids],
            "tokens": [tokens],
            "relevance": [relevance],
            "logit": [logit],
            "target": None if tgt is None else [tgt],
            "position": None if pos is None else [pos],
            "rules": exp.rules,
            "verified": bool(exp.verified),
        }
        data.setdefault("tokens", [tokens])
        data.update(
            model=args.model, text=args.text, conservation_delta=[delta],
            target_label=None if labels is None or tgt is None else labels[tgt],
        )
        _write(args, fmt, json.dumps(data))
    elif fmt == "text":
        color = sys.stdout.isatty() and args.out is None and not args.no_color
        lines = [
            f"{args.model}: explaining {what}, logit {logit:+.4f} ({exp.rules} rules, verified: {exp.verified})",
            _paint_row(tokens, relevance, color),
            f"conservation: logit {logit:+.4f} = token relevance {sum(relevance):+.4f} + biases {delta:+.4f}",
        ]
        _write(args, fmt, "\n".join(lines))
    else:
        from mambalrp import visualize

        title = f"{args.model}: {what}"
        if fmt == "html":
            caption = (
                f"Relevance of each token for {what} (logit {logit:+.4f}) by {exp.rules} rules: the tokens carry "
                f"{sum(relevance):+.4f}, biases {delta:+.4f}. Verified: {'yes' if exp.verified else 'no'}."
            )
            page = visualize.html_document(
                [tokens], [relevance], row_labels=[args.text], title=title, normalization=args.normalization, caption=caption
            )
            _write(args, fmt, page)
        else:
            _write(args, fmt, visualize.plot_sequence(tokens, relevance, normalization=args.normalization, title=title))
    return 0


# ---------------------------------------------------------------------------------------------
# explain-generation


def _add_explain_generation(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, generation=True)
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate (default: 20)")
    parser.add_argument("--continuation", metavar="TEXT", help="explain this continuation of the prompt instead of generating one")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, help="random seed for --sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens only")


def _run_explain_generation(args: argparse.Namespace) -> int:
    fmt = _output_format(args)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    _prepare_environment(args.quiet)
    import torch

    import mambalrp
    from mambalrp.errors import MambaLRPError
    from mambalrp.loading import encode, token_strings

    explain_generation = getattr(mambalrp, "explain_generation", None)
    if explain_generation is None:
        raise MambaLRPError("this version of mambalrp cannot explain generations (no mambalrp.explain_generation)")
    model, tokenizer = _load(args)
    ids = encode(tokenizer, args.text)
    continuation = None
    if args.continuation is not None:
        continuation = torch.tensor(encode(tokenizer, args.continuation, special_tokens=False))
    exp = explain_generation(
        model,
        torch.tensor(ids),
        max_new_tokens=args.max_new_tokens,
        continuation=continuation,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        rules=args.rules,
        tokenizer=tokenizer,
        progress=False if args.quiet else None,
    )
    matrix = exp.relevance.detach().float().cpu().numpy()
    generated = [int(i) for i in torch.as_tensor(exp.generated_ids).reshape(-1).tolist()]
    tokens = getattr(exp, "tokens", None)
    if not tokens or not isinstance(tokens[0], str):
        tokens = token_strings(tokenizer, ids + generated)
    prompt_len = len(ids)
    logits = [float(x) for x in torch.as_tensor(exp.logit).reshape(-1).tolist()]
    scores = getattr(exp, "step_scores", None) or {}
    from mambalrp import visualize

    if fmt == "json":
        if hasattr(exp, "to_dict"):
            data = exp.to_dict()
        else:
            data = {
                "kind": "generation",
                "input_ids": ids,
                "generated_ids": generated,
                "tokens": tokens,
                "relevance": matrix.tolist(),
                "logit": logits,
                "rules": exp.rules,
                "verified": bool(getattr(exp, "verified", False)),
                "step_scores": {k: [_float(x) for x in torch.as_tensor(v).reshape(-1).tolist()] for k, v in scores.items()},
            }
        data.setdefault("tokens", tokens)
        data.update(model=args.model, text=args.text, prompt_length=prompt_len)
        _write(args, fmt, json.dumps(data))
        return 0
    rows, values, labels = visualize.generation_rows(tokens, matrix, prompt_len)
    generated_text = "".join(visualize.display_token(t) for t in tokens[prompt_len:])
    title = f"{args.model}: {args.text!r} \u2192 {generated_text!r}"
    if fmt == "text":
        color = sys.stdout.isatty() and args.out is None and not args.no_color
        lines = [f"{title} ({exp.rules} rules); each line explains one generated token by the tokens before it"]
        for i, (row, vals, label) in enumerate(zip(rows, values, labels)):
            lines.append(f"[{i + 1}] {visualize.display_token(label)!r} (logit {logits[i]:+.3f}): {_paint_row(row, vals, color)}")
        _write(args, fmt, "\n".join(lines))
    elif fmt == "html":
        row_labels = [f"step {i + 1}: {visualize.display_token(t)!r}, logit {logits[i]:+.3f}" for i, t in enumerate(labels)]
        page = visualize.html_document(
            rows, values, row_labels=row_labels, title=title, normalization=args.normalization,
            caption=f"Each row explains one generated token by the prompt and the tokens generated before it ({exp.rules} rules).",
        )
        _write(args, fmt, page)
    else:
        shown = matrix.copy()
        for i in range(shown.shape[0]):
            shown[i, prompt_len + i:] = float("nan")  # positions step i cannot see
        fig = visualize.plot_matrix(
            shown, row_labels=labels, col_labels=tokens, title=title, normalization=args.normalization
        )
        _write(args, fmt, fig)
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def _add_demo(parser: argparse.ArgumentParser) -> None:
    from mambalrp.demo import add_arguments

    add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    _prepare_environment(args.quiet)
    from mambalrp.demo import run_args

    return run_args(args)


def _add_explain_dataset(parser: argparse.ArgumentParser) -> None:
    from mambalrp.dataset_cli import add_arguments

    add_arguments(parser)


def _run_explain_dataset(args: argparse.Namespace) -> int:
    from mambalrp.dataset_cli import run

    return run(args)


COMMANDS: list[Command] = [
    Command("explain", "explain one output (a class or the next token) of a model for a text", _add_explain, _run_explain),
    Command(
        "explain-generation", "generate (or take) a continuation and explain every generated token",
        _add_explain_generation, _run_explain_generation,
    ),
    Command("demo", "explain the bundled sentiment classifier and a short generation", _add_demo, _run_demo),
    Command(
        "explain-dataset", "explain every text of a data file on Ray Data (one Parquet row per example)",
        _add_explain_dataset, _run_explain_dataset,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of all commands in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Faithful LRP explanations of Mamba models from the command line.",
        epilog="exit status: 0 success, 1 the command could not be carried out, 2 malformed command line",
    )
    from mambalrp import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(_command=command, _parser=child)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 runtime error, 2 usage error)."""
    from mambalrp.errors import MambaLRPError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and argparse's usage errors
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args._command.run(args)
    except UsageError as error:
        args._parser.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (MambaLRPError, OSError, ValueError, ImportError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

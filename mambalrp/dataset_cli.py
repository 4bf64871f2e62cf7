"""The ``mambalrp explain-dataset`` subcommand: :func:`mambalrp.explain_dataset` from the shell.

Example::

    mambalrp explain-dataset --model sst-mamba1 --data texts.jsonl --out relevance/

The command line (:mod:`mambalrp.cli`) declares its options with :func:`add_arguments` and runs it
with :func:`run`; :func:`add_parser` registers it on any ``argparse`` subparsers. Exit status as for
every command: 0 done, 1 the command could not be carried out (no data file, Ray missing, a model
that cannot be explained), 2 a malformed command line (a data file of an unknown kind).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mambalrp.dataset_rows import ON_ERROR

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``explain-dataset`` on ``subparsers``; return its parser."""
    parser = subparsers.add_parser(
        "explain-dataset",
        help="explain every text of a dataset on Ray (one Parquet row per example)",
        description=(
            "Explain every text of a data file with MambaLRP on Ray Data and write one Parquet file per "
            "shard into --out (one row per example: the input columns, tokens, relevance, logit, target, "
            "conservation delta, error). Ray starts locally unless --address names a cluster. Rerunning "
            "into the same --out skips the rows already written. Needs the 'mambalrp[ray]' extra."
        ),
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``explain-dataset`` on ``parser``."""
    parser.add_argument("--model", required=True, help="zoo name (e.g. sst-mamba1) or local checkpoint directory")
    parser.add_argument("--data", required=True, help="input file: " + ", ".join(DATA_SUFFIXES) + " (.txt: one text per line)")
    parser.add_argument("--out", required=True, help="output directory (Parquet shards and a manifest)")
    parser.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    parser.add_argument(
        "--target",
        default=None,
        help="what to explain: omitted for the prediction, a class / token id, a label name, or a column of per-row targets",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward/backward pass (default: 16)")
    parser.add_argument("--workers", type=int, default=None, help="number of workers (default: one per GPU, else per CPU)")
    parser.add_argument("--max-length", type=int, default=None, help="most tokens per row (default: the tokenizer's limit)")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="record",
        help="bad rows: record an error per row (default), truncate long rows and record it, or raise",
    )
    parser.add_argument("--rules", default="mambalrp", help="rule set: mambalrp (default), gradient, ln-only")
    parser.add_argument("--address", default=None, help="address of a running Ray cluster (default: start Ray locally)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def _target(value: str | None) -> int | str | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def run(args: argparse.Namespace) -> int:
    """Run ``explain-dataset``; return the exit status (0: done, 1: could not be carried out, 2: unknown data kind)."""
    from mambalrp.errors import InputError

    data = Path(args.data)
    if data.suffix.lower() not in DATA_SUFFIXES:
        print(f"mambalrp: error: --data must end in one of {', '.join(DATA_SUFFIXES)}: {data}", file=sys.stderr)
        return 2
    if not data.is_file():
        print(f"mambalrp: error: no data file {data}", file=sys.stderr)
        return 1
    try:
        from mambalrp.dataset import explain_dataset

        out = explain_dataset(
            args.model,
            str(data),
            text_column=args.text_column,
            target=_target(args.target),
            batch_size=args.batch_size,
            workers=args.workers,
            max_length=args.max_length,
            on_error=args.on_error,
            rules=args.rules,
            output=args.out,
            address=args.address,
            progress=False if args.quiet else True,
        )
    except (ImportError, InputError) as err:
        print(f"mambalrp: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        import pyarrow.parquet as pq

        errors = pq.read_table(args.out, columns=["error"]).column("error")  # skips the _manifest
        print(f"{len(errors)} rows in {args.out} ({len(errors) - errors.null_count} with an error)", file=sys.stderr)
    del out
    return 0

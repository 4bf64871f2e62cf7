"""The ``mambalrp`` command line: ``mambalrp demo``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand."""
    parser = argparse.ArgumentParser(prog="mambalrp")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain one prediction of a bundled model")
    demo.add_argument("--no-color", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from mambalrp.demo import main as demo_main

        return demo_main(["--no-color"] if args.no_color else [])
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""One entry point, one subcommand per stage: `skdcgn <command> --help`.

Each command module in `skdcgn.commands` has `register(subparsers)`, which adds its parser and
sets `func`. A `SkdcgnError` (or a failed write) becomes a one-line message and exit code 2;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import SkdcgnError

COMMANDS = ["run", "data", "teacher", "distill", "counterfactuals", "classify", "bench"]  # modules in skdcgn.commands, in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skdcgn",
        description="Source-free knowledge distillation of counterfactual generative networks.")
    parser.add_argument("--version", action="version", version=f"skdcgn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"skdcgn.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("skdcgn: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (SkdcgnError, OSError) as e:
        if args.debug:
            raise
        msg = str(e) if isinstance(e, SkdcgnError) else f"{getattr(e, 'filename', '') or ''} {e.strerror or e}".strip()
        print(f"skdcgn: error: {msg}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

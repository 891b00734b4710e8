"""One entry point, one subcommand per stage: `skdcgn <command> --help`.

Each command module in `skdcgn.commands` has `register(subparsers)`, which adds its parser and
sets `func`. A `SkdcgnError` (or a failed write) becomes a one-line message and exit code 2;
`--debug` shows the traceback instead. SIGTERM and SIGHUP stop a command like Ctrl-C does (a
clean stop, exit code 128 + signal number, and the same command resumes).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from typing import Iterator

from . import __version__
from .errors import SkdcgnError

COMMANDS = ["run", "data", "teacher", "distill", "counterfactuals", "classify", "bench", "evaluate"]  # modules in skdcgn.commands, in --help order


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


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[list[int]]:
    """While the block runs, SIGTERM (and SIGHUP) raise KeyboardInterrupt like SIGINT does.

    Every stage already stops cleanly on KeyboardInterrupt: an atomic write in progress is
    discarded, no manifest is written, and the next run resumes from the last checkpoint. The
    list yielded holds the number of the signal received (for the exit code, 128 + signal).
    """
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:  # already stopping: let the clean-up finish
            return
        received.append(signum)
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread (e.g. main() called from a worker thread)
            pass
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with _terminate_as_interrupt() as received:
        return _run(args, received)


def _close_progress_bars() -> None:
    """End any progress bar left open by the failed command, so the message gets its own line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only; never hide the real message
        pass


def _run(args: argparse.Namespace, received: list[int]) -> int:
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        _close_progress_bars()
        what = signal.Signals(received[0]).name if received else "interrupted"
        print(f"skdcgn: {'stopped by ' + what if received else what}; run the same command again to resume",
              file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    except (SkdcgnError, OSError) as e:
        if args.debug:
            raise
        _close_progress_bars()
        msg = str(e) if isinstance(e, SkdcgnError) else f"{getattr(e, 'filename', '') or ''} {e.strerror or e}".strip()
        print(f"skdcgn: error: {msg}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

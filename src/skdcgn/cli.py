"""One entry point, one subcommand per stage: `skdcgn <command> --help`.

Each command module in `skdcgn.commands` has `register(subparsers)`, which adds its parser and
sets `func`. A `SkdcgnError` (or a failed write) becomes a one-line message and exit code 2;
`--debug` shows the traceback instead. SIGTERM and SIGHUP stop a command like Ctrl-C does (a
clean stop, exit code 128 + signal number, and the same command resumes), from the first
instruction of `main` on.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
from typing import Callable, Iterator, NoReturn

from ._version import __version__
from .errors import SkdcgnError, first_line

COMMANDS = ["run", "data", "teacher", "distill", "counterfactuals", "label_noise", "classify", "imagenet", "bench", "evaluate"]  # modules in skdcgn.commands, in --help order


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a malformed command line is one line too (`skdcgn: error: …; see … --help`),
    like every other bad input, instead of the usage block; exit code 2 as argparse's. Subcommand
    parsers inherit it (argparse makes them of their parent's class)."""

    def error(self, message: str) -> NoReturn:
        """Print the one line for `message` and exit with code 2."""
        self.exit(2, f"skdcgn: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The `skdcgn` argument parser with one subparser per module in `COMMANDS` (imported here)."""
    parser = _OneLineParser(
        prog="skdcgn",
        description="Source-free knowledge distillation of counterfactual generative networks.")
    parser.add_argument("--version", action="version", version=f"skdcgn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write every training log as TensorBoard event files, in a tensorboard/ folder "
                             "beside it (needs pip install 'skdcgn[tensorboard]')")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"skdcgn.commands.{name}").register(sub)
    return parser


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[list[int]]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise one KeyboardInterrupt, and any
    further one is ignored.

    Every stage already stops cleanly on KeyboardInterrupt: an atomic write in progress is
    discarded, no manifest is written, and the next run resumes from the last checkpoint. A second
    signal (Ctrl-C pressed twice) must not interrupt that clean-up, nor print a second traceback.
    The list yielded holds the number of the signal received (for the exit code, 128 + signal).
    """
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:  # already stopping: let the clean-up finish
            return
        received.append(signum)
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
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
    """Run one command (`argv`, default `sys.argv[1:]`); return its exit code.

    0: done; 2: bad input (one line `skdcgn: error: …` on stderr); 128 + N: stopped by signal N
    (130 for Ctrl-C, 143 for SIGTERM), from the first instruction on: parsing the arguments and
    importing a command's modules are covered too.
    """
    with _signals_as_interrupt() as received:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            quiet = bool(getattr(args, "quiet", False) or getattr(args, "no_progress", False))
            with _console_logging(quiet):
                return _run(args, received)
        except KeyboardInterrupt:
            return _interrupted(received)


class _ConsoleHandler(logging.Handler):
    """skdcgn's log records on the console: INFO as they are on stdout (progress of a stage),
    WARNING and above as `skdcgn: …` on stderr. The streams are looked up at each record, so a
    redirected or captured sys.stdout is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"skdcgn: {text}"
            else:
                stream = sys.stdout
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break a command
            self.handleError(record)


@contextlib.contextmanager
def _console_logging(quiet: bool) -> Iterator[None]:
    """While a command runs, the `skdcgn` loggers print to the console (INFO, or WARNING and above
    with `--quiet`/`--no-progress`); the handler goes afterwards, so library users keep theirs."""
    root = logging.getLogger("skdcgn")
    handler, level = _ConsoleHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def console_main() -> None:
    """The `skdcgn` console script: `main`, then exit. After an interrupt, further Ctrl-C are
    ignored while the interpreter shuts down (atexit handlers), so none prints a traceback."""
    code = main()
    if code > 128:
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


def _interrupted(received: list[int]) -> int:
    """The one line and the exit code (128 + signal) of a command stopped by a signal."""
    _close_progress_bars()
    sig = received[0] if received else signal.SIGINT
    what = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    print(f"skdcgn: {what}; run the same command again to resume", file=sys.stderr)
    return 128 + sig


def _close_progress_bars() -> None:
    """End any progress bar left open by the failed command, so the message gets its own line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only; never hide the real message
        pass


def _run(args: argparse.Namespace, received: list[int]) -> int:
    from .runlog import enable_tensorboard

    try:
        enable_tensorboard(bool(getattr(args, "tensorboard", False)))
        result = args.func(args)
    except KeyboardInterrupt:
        return _interrupted(received)
    except (SkdcgnError, OSError) as e:
        if args.debug:
            raise
        _close_progress_bars()
        msg = str(e) if isinstance(e, SkdcgnError) else f"{getattr(e, 'filename', '') or ''} {e.strerror or e}".strip()
        print(f"skdcgn: error: {msg}", file=sys.stderr)
        return 2
    finally:
        enable_tensorboard(False)
    return int(result or 0)


def script_exit(main: Callable[[], object], prog: str) -> None:
    """Run a script's `main()` and exit like `skdcgn`: its return value (an int, else 0) as the exit
    code, a `SkdcgnError` as one line on stderr (`prog: error: ...`) and exit code 2, so a bad
    option of a benchmark script reads like one of the CLI."""
    try:
        code = main()
    except SkdcgnError as e:
        print(f"{prog}: error: {first_line(e, 500)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    console_main()

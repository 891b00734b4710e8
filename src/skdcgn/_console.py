"""The `skdcgn` console script and `python -m skdcgn`: Ctrl-C answered from the first instruction.

Importing this module installs a handler for SIGINT, SIGTERM and SIGHUP before anything else of
skdcgn (or torch) is imported: a signal that arrives while the command's modules load ends the
process with one line and exit code 128 + signal, since nothing has been written yet. `cli.main`
then replaces it with the handler that lets a running stage stop cleanly. Library users never
import this module, so their handlers stay theirs.
"""
import os
import signal


def _stop_before_start(signum: int, frame: object) -> None:
    name = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    os.write(2, f"skdcgn: {name} before the command started\n".encode())
    os._exit(128 + signum)  # nothing to clean up yet; no traceback, no atexit


for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), _stop_before_start)


def main() -> None:
    """Run the command line (`sys.argv`) and exit with its code (see `cli.main`)."""
    from .cli import console_main

    console_main()

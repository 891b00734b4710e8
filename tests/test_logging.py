"""Output goes through `logging`: library modules log to `skdcgn.*` loggers; the command line
prints INFO on stdout and warnings as `skdcgn: …` on stderr while a command runs, and only then."""
from __future__ import annotations

import logging

from skdcgn.cli import _console_logging


def test_the_console_shows_skdcgn_records_only_while_a_command_runs(capsys):
    lg = logging.getLogger("skdcgn.some.module")
    root = logging.getLogger("skdcgn")
    before = (list(root.handlers), root.level)
    with _console_logging(quiet=False):
        lg.info("epoch 1: loss 0.5")
        lg.warning("cache rebuilt")
        logging.getLogger("elsewhere").warning("not ours")
    out, err = capsys.readouterr()
    assert out == "epoch 1: loss 0.5\n"
    assert err == "skdcgn: cache rebuilt\n"
    with _console_logging(quiet=True):  # --quiet / --no-progress: warnings only
        lg.info("epoch 2")
        lg.warning("still shown")
    out, err = capsys.readouterr()
    assert out == "" and err == "skdcgn: still shown\n"
    assert (list(root.handlers), root.level) == before  # a library user's logging is left as it was


def test_no_library_module_prints():
    """Library code logs; only the command line (cli.py, commands/) prints its results."""
    import ast
    from pathlib import Path

    import skdcgn

    root = Path(skdcgn.__file__).parent
    printing = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel == "cli.py" or rel.startswith("commands/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{rel}:{node.lineno}")
    assert printing == []

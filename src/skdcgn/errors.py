"""The one exception type that the CLI turns into a one-line message (no traceback), and the
warning for legal but suspicious input."""
from __future__ import annotations

import sys
from typing import Callable


class SkdcgnError(Exception):
    """A failure the user can fix: bad input, a missing or wrong file, an unknown name."""


class SkdcgnWarning(UserWarning):
    """Input that is legal but probably a mistake (e.g. images that look like [0, 1] instead of [-1, 1])."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters, or its type's name
    when the message is empty: how a library's multi-line error becomes part of one line."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def script_exit(main: Callable[[], object], prog: str) -> None:
    """Run a script's `main()` and exit like the CLI: its return value (None → 0) as the exit code,
    a `SkdcgnError` as one line on stderr (`prog: error: ...`) and exit code 2, so a bad option
    of a benchmark script reads like one of `skdcgn`."""
    try:
        code = main()
    except SkdcgnError as e:
        print(f"{prog}: error: {first_line(e, 500)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)

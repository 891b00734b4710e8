"""The one exception type that the CLI turns into a one-line message (no traceback), and the
warning for legal but suspicious input."""


class SkdcgnError(Exception):
    """A failure the user can fix: bad input, a missing or wrong file, an unknown name."""


class SkdcgnWarning(UserWarning):
    """Input that is legal but probably a mistake (e.g. images that look like [0, 1] instead of [-1, 1])."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters, or its type's name
    when the message is empty: how a library's multi-line error becomes part of one line."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__

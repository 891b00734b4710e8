"""The one exception type that the CLI turns into a one-line message (no traceback), and the
warning for legal but suspicious input."""


class SkdcgnError(Exception):
    """A failure the user can fix: bad input, a missing or wrong file, an unknown name."""


class SkdcgnWarning(UserWarning):
    """Input that is legal but probably a mistake (e.g. images that look like [0, 1] instead of [-1, 1])."""

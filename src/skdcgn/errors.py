"""The one exception type that the CLI turns into a one-line message (no traceback)."""


class SkdcgnError(Exception):
    """A failure the user can fix: bad input, a missing or wrong file, an unknown name."""

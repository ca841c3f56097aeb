"""Typed errors: the CLI turns these into one line and exit 1 (no traceback)."""


class FwselError(Exception):
    """A user-facing error with a one-line message."""


class ConfigError(FwselError):
    """A config value that is not allowed (raised before training starts)."""


class DataError(FwselError):
    """Bad data: names the file and line."""

"""Errors shown to the user as one line."""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

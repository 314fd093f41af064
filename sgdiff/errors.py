"""Errors a user can cause. The CLI shows them as one line (exit code 2)."""


class UserError(Exception):
    """Bad input: a flag, a file, a checkpoint. The message says what to do."""

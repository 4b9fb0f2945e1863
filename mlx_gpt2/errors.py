"""Errors a user can fix. The CLI prints these as one line, without a traceback."""


class UserError(ValueError):
    """Bad input from the user: a missing file, a bad option, a broken checkpoint.

    The message is one line that says what was wrong and what to do about it.
    """


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not match its config."""

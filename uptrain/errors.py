"""The one exception type users see: a message that says what is wrong and what to do."""


class UptrainError(Exception):
    """A bad input or a failed step, reported as one line by the CLI (exit status 1)."""

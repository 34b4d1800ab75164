"""The one error type for bad user input: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user (a file, a config value, a flag). The message names the problem."""

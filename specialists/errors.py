"""The one error type for bad user input: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user (a file, a config value, a flag). The message names the problem."""


class SettingsError(UserError):
    """A rule of a settings model broken, raised by the model's validators (pydantic wraps it in its
    ValidationError). `keys` are the settings at fault, dotted and relative to the model, the one to change
    first; experiments.config turns them into the TOML lines to name."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys

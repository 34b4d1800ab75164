"""The one error type for bad user input: the CLI prints its message on one line and exits non-zero; and the
"did you mean" of a mistyped name."""

import difflib


class UserError(ValueError):
    """Bad input from the user (a file, a config value, a flag). The message names the problem."""


class SettingsError(UserError):
    """A rule of a settings model broken, raised by the model's validators (pydantic wraps it in its
    ValidationError). `keys` are the settings at fault, dotted and relative to the model, the one to change
    first; experiments.config turns them into the TOML lines to name."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def closest(word: str, allowed) -> str | None:
    """The one of `allowed` a mistyped `word` most likely meant (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(word, [str(a) for a in allowed], n=1)
    return close[0] if close else None


def did_you_mean(word: str, allowed) -> str:
    """" (did you mean 'x'?)" for the closest of `allowed` to a mistyped `word`, else ""."""
    suggestion = closest(word, allowed)
    return f" (did you mean {suggestion!r}?)" if suggestion else ""

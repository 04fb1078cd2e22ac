"""Errors a user can fix, and the one-line wording the CLI gives them.

Code that detects bad input raises a `UserError` subclass (ConfigError, DataError,
ModelError, CheckpointError, FileFormatError) whose message names the problem and the
fix. `user_message` is the one place that decides what counts as bad input: those,
OSError (a missing or unwritable path) and the errors libraries raise on a corrupt
user file (SafetensorError, JSONDecodeError, UnicodeDecodeError). Anything else is an
internal error, shown with its traceback.
"""

from __future__ import annotations

import json


class UserError(ValueError):
    """Bad input (arguments, model, data, output); the message says why and what to do."""


class FileFormatError(UserError):
    """A file the user gave (or one inside a model directory) cannot be read: truncated,
    corrupt, empty, not JSON or not UTF-8. The message names the file."""


def _library_user_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (json.JSONDecodeError, UnicodeDecodeError, SafetensorError)


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for an internal error."""
    if isinstance(exc, (UserError, OSError)):
        text = str(exc).strip()
    elif isinstance(exc, _library_user_errors()):
        # Reached only where no reader below wrapped it with the file's name.
        text = f"a model or data file is corrupt or truncated ({type(exc).__name__}: {str(exc).strip()})"
    else:
        return None
    return text.splitlines()[0] if text else type(exc).__name__

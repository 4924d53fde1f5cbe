"""The errors a user can fix: bad input files, configs, checkpoints, command-line values.

Every error the library raises for bad *input* derives from `LxmertPlError`; its message names the file, line, key
or value at fault. The entry points (`lxmert_pl.runs.errors.user_errors`) print such an error as one line and exit 2.
Anything else (a `KeyError`, an `IndexError`, an `AssertionError` ...) is a bug and keeps its traceback.

The classes also derive from the built-in type a caller would expect (`ValueError`, `LookupError`, `OSError`), so
`except ValueError` around a library call keeps working.
"""

from __future__ import annotations


class LxmertPlError(Exception):
    """Base class: a problem with what the user gave us, explained in the message."""


class UserInputError(LxmertPlError, ValueError):
    """A value, file content or combination of settings that cannot be used as given."""


class ConfigError(UserInputError):
    """A configuration the user asked for that does not exist or is not valid."""


class CheckpointError(UserInputError):
    """A weights file that cannot be used as asked (unreadable, missing or misshapen tensors); names file and key."""


class InterruptedRunError(LxmertPlError):
    """The run was interrupted (Ctrl-C / SIGTERM); the message says what was written and how to continue."""

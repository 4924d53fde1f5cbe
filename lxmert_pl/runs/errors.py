"""Turn the errors a user can fix into one clear line on stderr and exit status 2, instead of a traceback.

User errors are the project's own (`lxmert_pl.errors.LxmertPlError`: bad input files, configs, checkpoints) and the
operating system's file errors (not found, permission denied, a directory where a file was expected ...), whose
message names the path. Everything else is a bug and keeps its traceback. `LXMERT_PL_DEBUG=1` keeps the traceback of
user errors too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator

from lxmert_pl.errors import InterruptedRunError, LxmertPlError, UserInputError

# The OSError subclasses whose message (with its filename) tells the user what to fix.
FILE_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
USER_ERRORS: tuple[type[BaseException], ...] = (LxmertPlError, *FILE_ERRORS)
# Plain OSErrors that are about the machine's files, not the code: disk full, file too large, read-only, quota.
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    return isinstance(err, OSError) and err.errno in FILE_SYSTEM_ERRNOS


def describe_error(err: BaseException) -> str:
    """One line for a user error: the message, with the file an OSError names."""
    if isinstance(err, OSError) and not isinstance(err, LxmertPlError) and err.filename is not None:
        return f"{err.strerror or err}: {err.filename}"
    if isinstance(err, KeyError) and type(err).__str__ is KeyError.__str__ and err.args:
        return str(err.args[0])  # KeyError's own str() adds quotes
    return str(err)


@contextlib.contextmanager
def user_errors(program: str) -> Iterator[None]:
    """Print `program: error: message` and exit 2 on a user error; other exceptions propagate with a traceback."""
    try:
        yield
    except InterruptedRunError as err:
        print(f"{program}: interrupted: {err}", file=sys.stderr)
        sys.exit(130)  # the shell's status for a SIGINT
    except Exception as err:
        if not is_user_error(err) or os.environ.get("LXMERT_PL_DEBUG"):
            raise
        print(f"{program}: error: {describe_error(err)}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def lightning_settings() -> Iterator[None]:
    """Lightning's complaints about the Trainer's arguments (which all come from the config: `--devices`,
    `--accelerator gpu` without a GPU, ...) as user errors."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except MisconfigurationException as err:
        raise UserInputError(f"invalid trainer setting: {err}") from None

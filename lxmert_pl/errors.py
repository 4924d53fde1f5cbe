"""Turn the errors a user can fix (bad paths, formats, configs) into one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Errors whose message says what is wrong and where; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, LookupError)


@contextlib.contextmanager
def user_errors(program: str) -> Iterator[None]:
    """Print `program: error: message` and exit 2 on a user error; LXMERT_PL_DEBUG=1 keeps the traceback."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("LXMERT_PL_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(2)

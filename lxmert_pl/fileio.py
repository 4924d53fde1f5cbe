"""Atomic file writes: a file is either its old content or its complete new content, never a torn mix.

Data goes to a temporary file in the target's folder (same file system, so the final rename is atomic), is flushed
and fsync-ed, and the temporary file is renamed over the target. On any error (or an interrupt) the temporary file
is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _naming(err: OSError, path: Path, temp_name: str) -> OSError:
    """The same error, naming `path` (a failed write, e.g. a full disk or a file-size limit, names no file, or the
    temporary one)."""
    if err.filename not in (None, temp_name) or err.errno is None:
        return err
    named = type(err)(err.errno, f"{err.strerror or err} (writing; the file is left as it was)", str(path))
    named.__cause__ = err
    return named


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name (e.g. `safetensors.save_file`); when the
    block ends without an error the file is fsync-ed and renamed over `path`, else removed (`path` unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            yield Path(temp_name)
            os.chmod(temp_name, 0o644)
            with open(temp_name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except OSError as err:
            raise _naming(err, path, temp_name) from None
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A handle on a temporary file beside `path` that replaces `path` when the block ends without an error.

    `mode` is "w" (text, `encoding`) or "wb". The new file gets mode 0o644 (mkstemp's default is 0o600). The
    parent folder is created when missing. A failed write (disk full, file-size limit) is an OSError naming `path`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except OSError as err:
            raise _naming(err, path, temp_name) from None
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write `data` (text or bytes) to `path` atomically (see the module docstring)."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w", encoding) as handle:
        handle.write(data)

"""One writer per feature file: an exclusive, non-blocking lock on `<file>.lock`.

The lock is an OS advisory lock (`fcntl.flock`, so Linux and macOS; not Windows), held on an open descriptor of the
lock file: the OS releases it when the holder exits, however it ends (a crash, SIGKILL), so a dead run never leaves
the file locked. The lock file itself stays on disk; it is empty and harmless. Locks are reentrant within a process
(extract.py holds the lock of its output for the whole run, and the writers it opens take it again).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from lxmert_pl.features.errors import FeatureFileLockedError

LOCK_SUFFIX = ".lock"

_guard = threading.Lock()
_held: dict[str, list[int]] = {}  # resolved lock path -> [descriptor, hold count], in this process


def lock_path(path: str | Path) -> Path:
    """The lock file of a feature file: `<file>.lock` beside it."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


class WriteLock:
    """Exclusive right to write `path`, taken without waiting; `FeatureFileLockedError` if another process holds it.

    Use as a context manager, or call `release()`. Releasing twice is harmless.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_file = lock_path(self.path)
        self._key = str(self.lock_file.resolve())
        self._released = False
        with _guard:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] += 1
                return
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FeatureFileLockedError(
                    f"{self.path} is being written by another process (it holds {self.lock_file}); wait for that run "
                    "to end, or write to another file"
                ) from None
            _held[self._key] = [fd, 1]

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _guard:
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                os.close(entry[0])  # closing the descriptor releases the flock

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

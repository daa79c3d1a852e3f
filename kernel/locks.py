"""Locks between the processes of one machine (gunicorn workers, local jobs and their slots), released if the
holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def try_lock(path: Path):
    """The open file, locked without waiting, or None if a living process holds it (the kernel frees the lock when
    the holder ends: close the file, or exit)."""
    handle = open(path, "a")  # noqa: SIM115 - held for the job's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        handle.close()
        return None


def release(handle) -> None:
    """Unlock a lock from `try_lock` now, then close it. A forked child that still has the file open (a pool that
    replaced its worker) shares the lock until it exits: closing only our copy would not free it, unlocking does."""
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive `flock` on `path` (created if missing) for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class KeptLock:
    """A lock one process of the machine takes when it is free and keeps until it exits (or dies).

    `held()` tries once, without waiting. Where no lock can be taken (a read-only state folder), every
    process counts as holding it: each then does the work itself, as it would with no lock at all.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._pid = 0

    def held(self) -> bool:
        """Whether this process holds the lock, taking it now if it is free."""
        if self._handle is not None and self._pid == os.getpid():
            return True
        self._handle = None  # a lock taken before a fork belongs to the parent
        try:
            handle = self._open()
        except OSError:
            return True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._handle, self._pid = handle, os.getpid()
        return True

    def _open(self):
        """The lock file, opened for reading only: a file held open for writing would stop the folder
        from being remounted read-only."""
        try:
            return open(self.path, "rb")  # noqa: SIM115 - kept open while held
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path, "ab").close()
            return open(self.path, "rb")  # noqa: SIM115 - kept open while held

    def release(self) -> None:
        """Let the lock go (closing the file releases it), if this process holds it."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

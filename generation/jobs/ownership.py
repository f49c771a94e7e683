"""One process owns a database: an exclusive OS lock on a file beside it.

``flock`` is held for as long as the file stays open and released by the kernel when the
process ends, however it ends, so a crash never leaves a stale lock (as a PID file would).
The lock file is separate from the database because SQLite takes its own (``fcntl``) locks on
the database file, which ``flock`` must not meet (on NFS the two are the same kind of lock).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class InUse(Exception):
    """Another process holds the lock."""


class Ownership:
    """An exclusive, non-blocking lock on ``<database>.lock``; :meth:`release` it once done.

    Locks belong to an open file description, so a second :meth:`take` of the same database
    fails in the same process too.
    """

    def __init__(self, descriptor: int) -> None:
        self._descriptor: int | None = descriptor

    @classmethod
    def take(cls, database: Path) -> Ownership:
        """Lock ``database`` for this process (a blocking system call: run it in a thread).

        Raises:
            InUse: another process, or another store of this one, holds it.
        """
        descriptor = os.open(lock_path(database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            os.close(descriptor)
            raise InUse(str(database)) from error
        except BaseException:
            os.close(descriptor)
            raise
        return cls(descriptor)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the last descriptor drops the lock
            self._descriptor = None


def lock_path(database: Path) -> Path:
    return database.with_name(f"{database.name}.lock")

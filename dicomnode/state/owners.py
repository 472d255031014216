"""Lease owners' liveness locks: how recovery tells a dead worker from a live one without racing the kernel.

A worker names itself ``host:pid:index`` (its lease owner) and, before it claims any job, takes an exclusive
``flock`` on ``<storage>/workers/<owner>.lock``, held for the life of the process. The kernel drops the lock
when it closes the process's descriptors, however the process ends (``kill -9`` included) and before it is
reaped: while a killed process is still unmapping its memory or waits as a zombie, a pid check still finds it
"alive", but its lock is already free or about to be. So a free lock means the owner is gone, whatever its pid
says; a held lock means the owner still runs (on this host: locks are host-local, like pids).

Only :func:`sweep` deletes lock files, and only while holding the lock; :meth:`OwnerLock.acquire` checks that
the file it locked is still the one at the path, so a new process reusing a pid never holds an orphaned file.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from dicomnode.errors import StoreError

SUFFIX = ".lock"


def lock_dir(db_path: Path) -> Path:
    """Where the owners' lock files live: ``workers/`` next to the state store."""
    return db_path.parent / "workers"


def lock_path(db_path: Path, owner: str) -> Path:
    return lock_dir(db_path) / f"{quote(owner, safe='')}{SUFFIX}"


@dataclass
class OwnerLock:
    """An owner's lock, held (the descriptor open) until :meth:`release` or the end of the process."""

    owner: str
    path: Path
    fd: int | None

    @classmethod
    def acquire(cls, db_path: Path, owner: str) -> OwnerLock:
        """Take ``owner``'s lock. StoreError if a live process holds it (the owner name is in use)."""
        path = lock_path(db_path, owner)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"lease owner {owner} is in use by a live process ({path} is locked)") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                return cls(owner, path, fd)
            os.close(fd)  # swept away between open and lock: take the new file

    def release(self) -> None:
        """Drop the lock (the file stays; the next sweep removes it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sweep(db_path: Path) -> list[str]:
    """Owners whose lock file exists and is free now (their process has ended): their files are removed and
    their names returned, so the caller requeues their jobs. Held locks (live owners) are left alone."""
    folder = lock_dir(db_path)
    if not folder.is_dir():
        return []
    gone = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # swept by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner runs
            try:
                if not os.path.samestat(os.fstat(fd), os.stat(path)):
                    continue  # replaced meanwhile: not the file we locked
                path.unlink()
            except FileNotFoundError:
                continue
            gone.append(unquote(path.name[: -len(SUFFIX)]))
        finally:
            os.close(fd)
    return gone


def has_lock_file(db_path: Path, owner: str) -> bool:
    """Whether ``owner`` left a lock file (workers of releases before these locks did not)."""
    return lock_path(db_path, owner).exists()

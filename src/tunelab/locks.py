"""Advisory OS locks (flock) on a run directory or a cache entry. The kernel releases a lock
when its process dies in any way, kill -9 included, so a lock is never left behind; the
holder's pid is written into the lock file for the message a second process prints."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import Busy


class Lock:
    """An exclusive (or shared) lock on `path`, created if missing. Deleting a lock file could
    let two processes each lock a different file of the same name, so only one that holds it
    exclusively may delete it (a pruned cache entry's), and `acquire` locks the file the path
    names once it holds one: a file deleted while it waited is let go and the new one taken."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self, wait: bool = False, shared: bool = False) -> Lock:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Busy(
                    f"{self.what} is in use by another tunelab process (pid {holder}); wait for "
                    "it to end or stop it, then run the command again"
                ) from None
            if _names(fd, self.path):
                break
            os.close(fd)  # deleted while this process waited for it: lock the path's new file
        if not shared:  # a shared lock has many holders: the pid is an exclusive holder's
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _names(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open at `fd`."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


@contextmanager
def waiting(path: Path, what: str) -> Iterator[None]:
    """Hold the lock on `path`, waiting for another holder to finish first."""
    lock = Lock(path, what).acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


RUN_LOCK = ".tunelab.lock"


def run_dir(path: Path) -> Lock:
    """The lock of a run directory: one process trains in it at a time."""
    return Lock(Path(path) / RUN_LOCK, f"run directory {path}")

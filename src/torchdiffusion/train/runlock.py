"""One writer per run folder: an exclusive advisory lock held while `train` writes into RUN/.

The lock is fcntl.flock(LOCK_EX | LOCK_NB) on RUN/train.lock, which holds the holder's pid (for the message
only). The kernel releases a flock when its process ends however it ends (SIGKILL included), so a lock file
left by a dead process is simply taken over; the lock is never judged stale by its pid. The file is removed
while the lock is still held, and a taker checks that the file it locked is still the one at the path (the
usual flock-and-verify-inode pattern), so a removal can never let two processes both believe they hold it.
A run folder that holds nothing else when the lock is released, and that the lock created, is removed too
(a run that failed before writing anything leaves no folder behind).

On platforms without fcntl (Windows) the lock is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from torchdiffusion.errors import TorchDiffusionError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_FILE", "RunLocked", "RunLock", "run_lock"]

LOCK_FILE = "train.lock"


class RunLocked(TorchDiffusionError):
    """Another live process holds the run folder's lock (exit code 1)."""

    exit_code = 1


class RunLock:
    """The held lock of one run folder; release() (idempotent) gives it up."""

    def __init__(self, run_dir: Path, fd: Optional[int], created: bool):
        self.run_dir, self.fd, self.created = run_dir, fd, created

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> "RunLock":
        """Take RUN/train.lock (creating RUN if needed) or raise RunLocked naming the holder's pid."""
        run_dir = Path(run_dir)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return cls(run_dir, None, created)
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise RunLocked(f"{run_dir} is in use by another train process (pid {holder or 'unknown'}, lock "
                                f"file {path}); wait for it to finish, or train into another --run folder") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed (and maybe re-created) by its last holder meanwhile: try again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(run_dir, fd, created)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                (self.run_dir / LOCK_FILE).unlink()  # while still held (see the module docstring)
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
        if self.created:
            self.created = False
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty: a run that wrote nothing leaves no folder


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Optional[RunLock]]:
    """Hold the run folder's lock for the body (enabled=False: no lock, e.g. on the non-main ranks of a job)."""
    lock = RunLock.acquire(run_dir) if enabled else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

"""An exclusive OS-level lock on a run folder, held by the main training process for the whole run.

The lock is ``fcntl.flock`` on ``<output_dir>/.<run_name>.lock``, a file beside the run folder (not inside
it: ``--overwrite`` moves the run folder aside while the lock must stay held). The kernel releases a flock
when its process ends, however it ends (``kill -9`` included), so a lock can never be left stale; the file
holds the owner's PID only to name it in the error of a second writer. The holder deletes the file when it
releases the lock; a process that locked a file which was deleted meanwhile notices (its inode is no longer
the path's) and tries again, so two processes can never both believe they hold the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
from pathlib import Path

from moe_emergence.errors import ConfigError


def lock_path(run_dir: Path) -> Path:
    """``.<name>.lock`` beside the run folder, after resolving symlinks (of ``output_dir`` or the run folder
    itself): two names of one folder share one lock."""
    real = run_dir.resolve()
    return real.with_name(f".{real.name}.lock")


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # being written or removed right now
        return "another process"


class RunLock:
    """``RunLock(run_dir)`` takes the lock or raises ``ConfigError``
    (``run folder X is in use by process PID``); ``release()`` (idempotent) gives it back."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self.created_dirs: list[Path] = []  # parents this lock created (removed again if left empty)
        self._make_parent()
        self.fd: int | None = None
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"cannot lock run folder {str(run_dir)!r} ({self.path}): {e}") from e
                self._remove_created_dirs()
                raise ConfigError(
                    f"run folder {str(run_dir)!r} is in use by {_owner(self.path)} "
                    f"(lock {self.path}); wait for that run to end or choose another log.run_name"
                ) from None
            if self._still_ours(fd):
                self.fd = fd
                break
            os.close(fd)  # the previous holder deleted the file after we opened it: try again
        else:
            raise ConfigError(f"cannot lock run folder {str(run_dir)!r}: {self.path} keeps being replaced")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())

    def _make_parent(self) -> None:
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise ConfigError(
                f"output_dir {str(parent)!r} is a file, not a folder; choose another output_dir"
            )
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir {str(parent)!r}: cannot create it ({e.strerror})") from e
        self.created_dirs = missing

    def _open(self) -> int:
        try:  # never through a symlink, never a FIFO or device someone put there
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            self._remove_created_dirs()
            why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise ConfigError(
                f"cannot use the lock file {self.path} ({why}); remove it if no run uses it"
            ) from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"the lock file {self.path} is not a regular file; remove it if no run uses it")
        return fd

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _remove_created_dirs(self) -> None:
        for d in self.created_dirs:  # innermost first
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.created_dirs = []

    def release(self, remove_created_dirs: bool = False) -> None:
        """Delete the lock file and unlock (in that order: see the module docstring)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
        if remove_created_dirs:
            self._remove_created_dirs()

    @property
    def held(self) -> bool:
        return self.fd is not None

"""SIGINT/SIGTERM during training: finish the current optimizer step, save a checkpoint, exit cleanly.

``StopSignals`` installs handlers that only set a flag (the trainer reads it once per step, together
with its non-finite check, and all-reduces it so every process stops at the same step). A second
signal of the same kind gets the previous handler back, so pressing Ctrl-C twice aborts at once.
``scripts/train.py`` then exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), the
shell's convention for "ended by this signal"; the checkpoint is in place and ``--resume auto`` continues.

Launcher death: under ``accelerate launch`` or ``torchrun`` the training processes are children of the
launcher, and a launcher killed with ``kill -9`` cannot tell them to stop. With ``watch_parent`` (when a
launcher started this process: ``LAUNCHER_ENV``), a daemon thread checks every ``PARENT_POLL_S`` seconds
whether the parent process changed (the child was re-parented because its launcher died) and then stops the
run as SIGTERM would (``StopSignals.request_stop``, no signal sent): the run finishes its step, saves a
checkpoint and exits 143, releasing the run folder's lock. A process started directly (``python
scripts/train.py``, ``nohup``) is not watched: its parent is a shell, which may end while the run goes on by
design. A stop requested so leaves the user's signals as they were: their first SIGTERM after it is still a
first (it says the run is already stopping), their second aborts.

Output whose reader is gone: a launcher may have been reading this process's stderr through a pipe
(``accelerate launch`` 1.16 tees it), and a pipe (``| tee``), socket or terminal may lose its reader in any
run. A write to it raises ``BrokenPipeError`` (a terminal: EIO), which would end the run without a checkpoint
wherever it happens (the progress bar, a print, a message). While ``StopSignals`` is active, ``sys.stdout``
and ``sys.stderr`` are wrapped (``_OutputGuard``): on such an error the file descriptor is moved onto stdout
(for stderr, while stdout's reader is there) or onto ``/dev/null`` (``_reroute``), the write is retried, and
the run stops as by SIGTERM (``request_stop``: checkpoint, exit 143). That happens at the first write that
reaches the pipe: stdout into a pipe is block-buffered, so its loss may show only at a later flush, or at the
run's last lines (then the run has ended anyway). Not covered: writes through a stream's ``buffer``, streams
without a file descriptor, and the set-up before ``StopSignals`` is entered (the trainer enters it to train).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TextIO, TypeVar

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set by `accelerate launch` (every launcher path) and by torchrun in the processes they start.
LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
PARENT_POLL_S = 0.5
# a write's errors when its reader is gone: a pipe or socket (BrokenPipeError), a terminal hung up (EIO)
_READER_GONE = (errno.EPIPE, errno.ESHUTDOWN, errno.ECONNRESET, errno.EIO)
T = TypeVar("T")


def launched_by_launcher() -> bool:
    return any(k in os.environ for k in LAUNCHER_ENV)


def _broken(fd: int) -> bool:
    """Is ``fd`` closed, or is its reader gone: ``poll`` reports an error (a pipe) or a hang-up (a socket, a
    terminal) on it?"""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poller.poll(0))


def _reroute(fd: int, devnull: bool = False) -> None:
    """Output ``fd`` (1 or 2) whose reader is gone goes to stdout (fd 2, while stdout's reader is there and
    ``devnull`` is False) or to /dev/null (module docstring)."""
    if fd == 2 and not devnull and not _broken(1):
        os.dup2(1, 2)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


class _OutputGuard:
    """``stream`` (``sys.stdout`` or ``sys.stderr``, writing to file descriptor ``fd``) whose ``write``,
    ``writelines`` and ``flush`` survive a reader gone: on ``BrokenPipeError`` (or a hung-up terminal's EIO)
    the descriptor is rerouted (``_reroute``), ``on_broken()`` told (it stops the run), and the call retried
    (onto /dev/null if the new target's reader is gone too). Other attributes are the stream's, unguarded: a
    write through ``buffer`` is not covered, and the guard is no ``io.TextIOBase``."""

    def __init__(self, stream: TextIO, fd: int, on_broken: Callable[[], None]) -> None:
        self._stream, self._fd, self._on_broken = stream, fd, on_broken

    def write(self, text: str) -> int:
        return self._guarded(self._stream.write, text)

    def writelines(self, lines: Iterable[str]) -> None:
        self._guarded(self._stream.writelines, list(lines))  # a list: the retry writes the same lines

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call: Callable[..., T], *args) -> T:
        try:
            return call(*args)
        except OSError as e:
            if e.errno not in _READER_GONE:
                raise
            _reroute(self._fd)
        self._on_broken()
        try:
            return call(*args)
        except OSError as e:  # stderr went onto a stdout whose reader left since
            if e.errno not in _READER_GONE:
                raise
            _reroute(self._fd, devnull=True)
            return call(*args)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _fd_of(stream: TextIO) -> int | None:
    """The file descriptor ``stream`` writes to; None for a stream without one (a notebook's, a test's
    capture), which is then left unguarded: it has no pipe to lose."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def _watch_parent(parent: int, stop: threading.Event, request_stop: Callable[[str], None]) -> None:
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent:  # the message goes through the guard, onto stdout if stderr's reader left
            request_stop(f"the launcher (process {parent}) is gone")
            return


class StopSignals:
    """Context manager; ``received`` is the first signal number caught, or SIGTERM once ``request_stop`` was
    called (None until then)."""

    def __init__(self, parent_pid: int | None = None) -> None:
        """``parent_pid``: the launcher's PID as seen when the process started (watched when a launcher
        started it; None: not watched)."""
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._parent = parent_pid if launched_by_launcher() else None
        self._stop_watch = threading.Event()
        self._guards: dict[str, tuple[TextIO, _OutputGuard]] = {}
        self._active = False

    def request_stop(self, reason: str) -> None:
        """Stop as by SIGTERM (a checkpoint at the end of this step, then exit 143) without sending one, so
        that a SIGTERM from the user or a scheduler after this still counts as their first; ``reason`` is
        said first. For the parent-watch thread and the output guards; nothing once the run is over or a
        stop is already under way. Sets the flag before saying anything: a write failing here reaches this
        method again and returns."""
        if self.received is not None or not self._active:
            return
        self.received = signal.SIGTERM
        _say(f"{reason}: stopping")
        _say(_stopping_message(signal.SIGTERM, first=True))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signum
        _say(_stopping_message(signum, first))
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._active = True
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name)
                fd = _fd_of(stream)
                if fd in (1, 2):
                    guard = _OutputGuard(
                        stream, fd, functools.partial(self.request_stop, f"{name} has no reader")
                    )
                    self._guards[name] = (stream, guard)
                    setattr(sys, name, guard)
            if self._parent is not None:  # after the guards, through which it reports
                args = (self._parent, self._stop_watch, self.request_stop)
                threading.Thread(target=_watch_parent, args=args, name="parent-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        self._stop_watch.set()
        for name, (stream, guard) in self._guards.items():
            if getattr(sys, name) is guard:  # a stream installed during the run stays
                setattr(sys, name, stream)
        self._guards.clear()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def _stopping_message(signum: int, first: bool) -> str:
    name = signal.Signals(signum).name
    what = "saving a checkpoint at the end of this step, then stopping" if first else "already stopping"
    return f"{name}: {what} (send {name} again to abort without saving)"


def _say(text: str) -> None:
    """``text`` on stderr; where even /dev/null cannot take it (OSError), nowhere."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)

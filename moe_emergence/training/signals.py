"""SIGINT/SIGTERM during training: finish the current optimizer step, save a checkpoint, exit cleanly.

``StopSignals`` installs handlers that only set a flag (the trainer reads it once per step, together
with its non-finite check, and all-reduces it so every process stops at the same step). A second
signal of the same kind gets the previous handler back, so pressing Ctrl-C twice aborts at once.
``scripts/train.py`` then exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), the
shell's convention for "ended by this signal"; the checkpoint is in place and ``--resume auto`` continues.

Launcher death: under ``accelerate launch`` or ``torchrun`` the training processes are children of the
launcher, and a launcher killed with ``kill -9`` cannot tell them to stop. With ``watch_parent`` (when a
launcher started this process: ``LAUNCHER_ENV``), a daemon thread checks every ``PARENT_POLL_S`` seconds
whether the parent process changed (the child was re-parented because its launcher died) and then sends
this process SIGTERM: the run finishes its step, saves a checkpoint and exits 143, releasing the run
folder's lock. A process started directly (``python scripts/train.py``, ``nohup``) is not watched: its parent is
a shell, which may end while the run goes on by design.

Output whose reader is gone: a launcher may have been reading this process's stderr through a pipe
(``accelerate launch`` 1.16 tees it), and a pipe (``| tee``) may lose its reader in any run. A write to such a
pipe raises ``BrokenPipeError``, which would end the run without a checkpoint wherever it happens (the
progress bar, a print, the thread's message). While ``StopSignals`` is active, ``sys.stdout`` and
``sys.stderr`` are wrapped (``_OutputGuard``): on a broken pipe the file descriptor is moved onto stdout (for
stderr, when stdout is still read) or onto ``/dev/null`` (``_reroute``), the write is retried, and the run is
stopped as by SIGTERM, once (checkpoint, exit 143). The parent-watch thread reroutes a broken stderr too
before its message.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set by `accelerate launch` (every launcher path) and by torchrun in the processes they start.
LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
PARENT_POLL_S = 0.5


def launched_by_launcher() -> bool:
    return any(k in os.environ for k in LAUNCHER_ENV)


def _broken(fd: int) -> bool:
    """Is ``fd`` closed, or a pipe whose reader is gone (``poll`` reports an error on its write end)?"""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))


def _reroute(fd: int) -> None:
    """Output ``fd`` (1 or 2) whose reader is gone goes to stdout (fd 2, while stdout is still read) or to
    /dev/null (module docstring)."""
    if fd == 2 and not _broken(1):
        os.dup2(1, 2)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class _OutputGuard:
    """``stream`` (``sys.stdout`` or ``sys.stderr``, writing to file descriptor ``fd``) whose ``write`` and
    ``flush`` survive a reader gone: on ``BrokenPipeError`` the descriptor is rerouted (``_reroute``), the call
    retried, and ``on_broken()`` told (it stops the run). Everything else is the stream's."""

    def __init__(self, stream, fd: int, on_broken: Callable[[], None]) -> None:
        self._stream, self._fd, self._on_broken = stream, fd, on_broken

    def write(self, text: str) -> int:
        return self._retry(self._stream.write, text)

    def flush(self) -> None:
        self._retry(self._stream.flush)

    def _retry(self, call: Callable, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            _reroute(self._fd)
            self._on_broken()
            return call(*args)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _fd_of(stream) -> int | None:
    """The file descriptor ``stream`` writes to, if it has one (not a notebook's or a test's capture)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def _watch_parent(parent: int, stop: threading.Event, terminate: Callable[[], None]) -> None:
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent:
            try:
                with contextlib.suppress(OSError):  # the message may have nowhere to go: stop all the same
                    if _broken(2):
                        _reroute(2)
                    print(f"the launcher (process {parent}) is gone: stopping", file=sys.stderr, flush=True)
            finally:
                terminate()
            return


class StopSignals:
    """Context manager; ``received`` is the first signal number caught (None until one arrives)."""

    def __init__(self, parent_pid: int | None = None) -> None:
        """``parent_pid``: the launcher's PID as seen when the process started (watched when a launcher
        started it; None: not watched)."""
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._parent = parent_pid if launched_by_launcher() else None
        self._stop_watch = threading.Event()
        self._terminating = threading.Lock()
        self._terminated = False
        self._streams: dict[str, object] = {}

    def _terminate_once(self, reason: str | None = None) -> None:
        """SIGTERM to this process, after ``reason`` on stderr, unless a stop signal already arrived or was
        sent (a second one would abort without a checkpoint): for the parent-watch thread and the output
        guards."""
        with self._terminating:
            if self._terminated or self.received is not None:
                return
            self._terminated = True
        if reason:
            with contextlib.suppress(OSError):  # stderr rerouted already; /dev/null at worst
                os.write(2, f"{reason}: stopping\n".encode())
        os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            print(
                f"{name}: saving a checkpoint at the end of this step, then stopping "
                f"(send {name} again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            if self._parent is not None:
                args = (self._parent, self._stop_watch, self._terminate_once)
                threading.Thread(target=_watch_parent, args=args, name="parent-watch", daemon=True).start()
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name)
                fd = _fd_of(stream)
                if fd in (1, 2):
                    self._streams[name] = stream
                    gone = functools.partial(self._terminate_once, f"{name} has no reader any more")
                    setattr(sys, name, _OutputGuard(stream, fd, gone))
        return self

    def __exit__(self, *exc) -> None:
        self._stop_watch.set()
        for name, stream in self._streams.items():
            setattr(sys, name, stream)
        self._streams.clear()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

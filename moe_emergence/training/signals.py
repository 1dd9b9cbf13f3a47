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
folder's lock. A launcher may have been reading this process's stderr through a pipe (``accelerate launch``
1.16 tees it): with the launcher gone that pipe has no reader and a write to it raises ``BrokenPipeError`` (the
thread's message, the signal handler's), so a stderr whose reader is gone is first moved onto stdout, which the
launcher passed down, or onto ``/dev/null`` when stdout is broken too (``_reroute_stderr``). Not covered: a
progress bar writing to that stderr in the up to ``PARENT_POLL_S`` seconds before the thread notices. A process
started directly (``python scripts/train.py``, ``nohup``) is not watched: its parent is a shell, which may end
while the run goes on by design.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
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


def _reroute_stderr() -> None:
    """Once the launcher is gone: a stderr whose reader went with it (a pipe without a reader) is replaced by
    stdout, or by /dev/null where stdout is broken too (module docstring); a stderr still read stays."""
    if not _broken(2):
        return
    if _broken(1):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    else:
        os.dup2(1, 2)


def _watch_parent(parent: int, stop: threading.Event) -> None:
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent:
            try:
                with contextlib.suppress(OSError):  # the message may have nowhere to go: stop all the same
                    _reroute_stderr()
                    print(f"the launcher (process {parent}) is gone: stopping", file=sys.stderr, flush=True)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
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
                args = (self._parent, self._stop_watch)
                threading.Thread(target=_watch_parent, args=args, name="parent-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_watch.set()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

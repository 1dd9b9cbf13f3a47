"""SIGINT/SIGTERM during training: finish the current optimizer step, save a checkpoint, exit cleanly.

``StopSignals`` installs handlers that only set a flag (the trainer reads it once per step, together
with its non-finite check, and all-reduces it so every process stops at the same step). A second
signal of the same kind gets the previous handler back, so pressing Ctrl-C twice aborts at once.
``scripts/train.py`` then exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), the
shell's convention for "ended by this signal"; the checkpoint is in place and ``--resume auto`` continues.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager; ``received`` is the first signal number caught (None until one arrives)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

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
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

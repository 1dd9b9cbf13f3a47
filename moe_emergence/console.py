"""The command lines print their own progress and results: library chatter a user need not act on is off.

``quiet_libraries()`` is called first thing by every script (``scripts/*.py``, ``training.cli``);
``ArgumentParser`` gives their one-line mistakes; ``check_output_file`` checks a results file before any work;
``stops_as_interrupt`` and ``stopped_by`` let a script that cleans up after itself do so when it is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from moe_emergence.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line ``error:`` (exit 2, through ``errors.run_cli``) instead of the
    usage block plus ``prog: error:``, and no abbreviated options (``--comp`` is not ``--compile``: an option
    added later could make an abbreviation in someone's script mean another)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (usage: {' '.join(self.format_usage().split()[1:])})")


class _DropTiedWeightNotice(logging.Filter):
    """accelerate warns ``Removed shared tensor {'lm_head.weight'}`` at every save: GPT-2's output layer is
    tied to its embedding, so the tensor is expected to be stored once. Nothing a user has to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def quiet_libraries() -> None:
    """The command line prints its own progress bar and summary: no per-file progress bars of transformers
    (``Loading weights``, ``Writing model shards``) and no notice about the tied output layer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(_DropTiedWeightNotice())


def check_output_file(path: str | Path, label: str, kind: str, replaced: bool = False) -> None:
    """Before any work: the results file ``path`` (named ``label`` in messages, e.g. ``--json``; ``kind`` says
    what it is, e.g. ``"a JSON file"``) is new or a regular file, lies in an existing folder and can be written,
    tried for real (an existing file opened for appending, nothing written; a new one by a temporary file beside
    it, removed): ``os.access`` says yes to root on a read-only file system. ``replaced``: the caller writes a
    temporary file beside it and renames it into place, so the folder must take one (named like the caller's:
    ``.NAME.PID.<8 characters>.tmp``, so a name too long fails here), whether or not the file exists. Raises
    ``ConfigError`` (one ``error:`` line)."""
    if not str(path):  # Path("") is the current folder
        raise ConfigError(f"{label} '': an empty name; give {kind} in an existing folder")
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError) as e:  # a link that loops
        raise ConfigError(f"{label} {path}: cannot be resolved ({e})") from None
    try:  # is_dir and exists raise for a name the file system refuses (a part over 255 bytes)
        if p.is_dir() or not p.parent.is_dir():
            raise ConfigError(f"{label} {path}: {kind} in an existing folder")
        if p.exists() and not p.is_file():  # a FIFO would block the check; a device (/dev/null) be replaced
            raise ConfigError(f"{label} {path}: {kind}, not a device, pipe or socket")
    except OSError as e:
        raise ConfigError(f"{label} {path}: not a usable file name ({e.strerror or e})") from None
    try:
        if p.exists():
            with open(p, "a"):
                pass
        if replaced or not p.exists():
            # a named file (TemporaryFile may make an unnamed one, O_TMPFILE, whose name length is never tried)
            with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp"):
                pass
    except OSError as e:
        raise ConfigError(f"{label} {path}: not writable ({e.strerror or e})") from None


_STOPS = (signal.SIGINT, signal.SIGTERM)


class Stops:
    """Ctrl-C and SIGTERM as ``KeyboardInterrupt(signum)`` in the main thread (see ``stops_as_interrupt``), so
    that ``finally`` clauses run (a script removing what it wrote), except inside ``held()`` blocks: a stop that
    comes during one is raised at its end. Python runs a signal's handler between two bytecodes, possibly
    long after the signal came; the handler looks at ``held`` when it runs, so no clean-up or rename inside a
    held block is cut in two. One stop is raised at most: a later Ctrl-C or SIGTERM does nothing (the first
    is already unwinding the script, through its clean-up).

    Python swallows an exception raised inside a finaliser (``__del__``, a weakref callback, a garbage
    collector callback: it prints ``Exception ignored in ...`` and goes on), and the handler may run in one;
    without more, a SIGTERM would be lost and the script end with status 0. ``unraisable`` (the
    ``sys.unraisablehook`` while the block runs) sees such a stop and sends the same signal again
    ``RESEND_S`` later from a timer thread (sent from inside the hook, the handler would run in the hook
    itself and be swallowed again), so it is raised outside the finaliser; one still pending when the block
    ends is raised there."""

    RESEND_S = 0.01

    def __init__(self) -> None:
        self._held = 0
        self._pending: int | None = None
        self._raised = False
        self._lock = threading.Lock()
        self._resend: int | None = None  # a swallowed stop's signal, until it is sent again
        self._closed = False

    def handle(self, signum: int, frame) -> None:
        if self._raised:
            return
        if self._held:
            self._pending = self._pending or signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self._raised = True
        raise KeyboardInterrupt(signum)

    def unraisable(self, unraisable, previous) -> None:
        """``sys.unraisablehook``: our stop, swallowed in a finaliser, is sent again; anything else goes to
        ``previous``, the hook found. While it runs, a stop is noted, not raised (raised in a hook, Python would
        swallow it too, this hook never seeing it): one noted outside any ``held`` block is sent again too."""
        if threading.current_thread() is not threading.main_thread():
            previous(unraisable)  # a finaliser on another thread: no handler runs there, none of our stops
            return
        outer = self._held
        self._held += 1
        try:
            exc = unraisable.exc_value
            if self._raised and isinstance(exc, KeyboardInterrupt) and exc.args and exc.args[0] in _STOPS:
                self._raised = False
                self._pending = self._pending or exc.args[0]
            else:
                previous(unraisable)
            if not outer and self._pending is not None and not self._raised:
                self._send_later()
        finally:
            self._held -= 1

    def _send_later(self) -> None:
        """The pending stop's signal, sent again ``RESEND_S`` from now by a timer thread (sent from here, the
        handler would run at once, in the hook)."""
        with self._lock:
            self._resend, self._pending = self._pending, None
        timer = threading.Timer(self.RESEND_S, self._send_again)
        timer.daemon = True
        timer.start()

    def _send_again(self) -> None:
        with self._lock:  # not after close: the handler put back then would get it
            if self._resend is not None and not self._closed:
                os.kill(os.getpid(), self._resend)
                self._resend = None

    def close(self) -> None:
        """The block ends (its caller has raised ``_held`` first, so that no stop is raised here): a swallowed
        stop not yet sent again becomes pending; ``stops_as_interrupt`` raises it once its handlers are back."""
        with self._lock:
            self._closed = True
            if self._resend is not None:
                self._pending = self._pending or self._resend

    @contextlib.contextmanager
    def held(self):
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._pending is not None and not self._raised:
                self._raise(self._pending)


@contextlib.contextmanager
def stops_as_interrupt():
    """Inside the block Ctrl-C and SIGTERM raise ``KeyboardInterrupt(signum)`` (``Stops``, yielded); the
    previous handlers (and ``sys.unraisablehook``) are put back after. A stop that comes while they are put
    back is raised after, when the block ended without an exception. Main thread only (``ValueError``
    elsewhere, before anything is installed)."""
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("stops_as_interrupt: signal handlers can only be set in the main thread")
    stops = Stops()
    hook = sys.unraisablehook
    previous = {}
    try:
        sys.unraisablehook = functools.partial(stops.unraisable, previous=hook)
        for s in _STOPS:
            previous[s] = signal.getsignal(s)  # first: a stop raised once ours is in must find it recorded
            signal.signal(s, stops.handle)
        yield stops
    finally:
        stops._held += 1  # first, no call before it: from here a stop is noted, not raised
        stops.close()
        for s, handler in previous.items():
            signal.signal(s, handler)  # runs a signal already received first: noted by stops.handle
        sys.unraisablehook = hook
    if stops._pending is not None and not stops._raised:
        stops._raise(stops._pending)


def stopped_by(script: str, interrupt: KeyboardInterrupt, what: str) -> int:
    """Say on stderr that ``script`` was stopped by Ctrl-C or SIGTERM (``interrupt`` from
    ``stops_as_interrupt``) and ``what`` is left; the exit status 128 + the signal's number (130, 143), as
    scripts/train.py."""
    signum = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else signal.SIGINT
    print(f"{script}: stopped by {signal.Signals(signum).name}; {what}", file=sys.stderr)
    return 128 + signum

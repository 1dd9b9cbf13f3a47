"""Crash-safe checkpoints: ``accelerator.save_state`` folders ``checkpoints/step_{N:07d}``.

Writing one (``save_checkpoint``):
  1. ``accelerator.save_state`` into ``step_N.tmp`` (a leftover ``*.tmp`` of a killed save is removed first):
     model (safetensors, or DCP shards under FSDP), optimizer, RNG states,
  2. ``meta.json`` (step, phase, the model's dimensions and MoE settings, the resolved config) and
     ``trainer_state.json`` (``TrainState`` and the data sampler's position: JSON, never a pickle),
  3. every file fsync'ed, then ``manifest.json`` (each file's size and sha256) written LAST,
  4. ``step_N.tmp`` renamed to ``step_N`` (atomic), the folder fsync'ed,
  5. checkpoints beyond the last ``keep`` renamed to ``*.trash`` and then deleted.
A crash at any point leaves either no ``step_N`` or a whole one; a ``step_N`` damaged later (a file
truncated or edited, a disk error) fails ``verify_checkpoint``, and ``latest_good_checkpoint`` falls back
to the previous intact one with a warning.

Nothing in a checkpoint is ever unpickled in a way that can run code: the trainer's own state is JSON;
accelerate loads optimizer and RNG files with ``torch.load(weights_only=True)``; and before any of that,
``verify_checkpoint`` scans every pickle-format file (``unsafe_pickles``): torch zip files are loaded with
``weights_only=True`` (memory-mapped, nothing executed), plain pickles (the DCP ``.metadata`` of FSDP
checkpoints, which torch itself reads with ``pickle.load``) with an unpickler that admits only DCP's
metadata classes. A file that fails is reported like a damaged one: ``--resume PATH`` refuses with one
line, ``--resume auto`` falls back to the previous intact checkpoint. A write that fails (disk full, a
read-only folder) removes its ``step_N.tmp`` and raises ``ConfigError`` naming the path; the previous
checkpoints are untouched.

Test hook: the environment variable ``MOE_EMERGENCE_TEST_SAVE_DELAY`` (seconds) sleeps between step 2
and step 3, so the kill test can SIGKILL a process in the middle of a save. Nothing else reads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from moe_emergence.errors import ConfigError
from moe_emergence.training.checkpoint_check import (  # noqa: F401  (re-exported: the checkpoint API)
    LEGACY_STATE,
    MANIFEST,
    META,
    PICKLE_SUFFIXES,
    TRAINER_STATE,
    UNPICKLE_ERRORS,
    folder_files,
    manifest_files,
    read_mapping,
    read_meta,
    read_trainer_state,
    sha256_file,
    unsafe_pickles,
    verify_checkpoint,
)

STEP_DIR = re.compile(r"^step_(\d+)$")
SAVE_DELAY_ENV = "MOE_EMERGENCE_TEST_SAVE_DELAY"


class TrainState:
    """Counters that are not in the model or optimizer: optimizer steps taken, tokens seen, the
    collapse guard's per-layer streaks and the bad-step guard's counts and loss history."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.collapse_streak: dict[str, int] = {}
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in total
        self.consecutive_skips = 0
        self.first_bad: str | None = None  # where the current run of skipped steps started
        self.loss_history: list[
            float
        ] = []  # LM losses of the last guard.spike_window good steps (this phase)
        self.last_applied = False  # did the last step apply an update (not yet verified by a later loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "collapse_streak": dict(self.collapse_streak),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "first_bad": self.first_bad,
            "loss_history": list(self.loss_history),
            "last_applied": self.last_applied,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.collapse_streak = dict(state["collapse_streak"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.first_bad = state.get("first_bad")
        self.loss_history = [float(v) for v in state.get("loss_history", [])]
        self.last_applied = bool(state.get("last_applied", False))


# ----------------------------------------------------------------------------- finding and verifying


def list_checkpoints(root: str | Path) -> list[Path]:
    """``step_N`` folders under ``root`` (renamed into place, so complete when written), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(root: str | Path) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint under ``root`` that passes ``verify_checkpoint``, the damaged newer ones),
    warning about every damaged one it skips. (None, []) when there is no checkpoint at all;
    ``ConfigError`` when there are checkpoints but none is intact."""
    damaged: list[Path] = []
    reasons: list[str] = []
    for path in reversed(list_checkpoints(root)):
        problems = verify_checkpoint(path)
        if not problems:
            if damaged:
                warnings.warn(
                    f"--resume auto: checkpoint(s) {'; '.join(reasons)} damaged or partial; "
                    f"resuming from the previous good one, {path.name}",
                    stacklevel=2,
                )
            return path, damaged
        damaged.append(path)
        reasons.append(f"{path.name} ({', '.join(problems[:3])})")
    if damaged:
        raise ConfigError(
            f"--resume auto: no intact checkpoint in {root}: {'; '.join(reasons)}. "
            "Pass --overwrite to start the run again from scratch"
        )
    return None, []


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``step_N.damaged`` (kept for inspection, never resumed from)."""
    target = path.with_name(path.name + ".damaged")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    return target


@contextmanager
def accelerate_view(path: str | Path) -> Iterator[Path]:
    """The checkpoint folder as accelerate may load it: ``path`` itself, or, for a checkpoint written before
    ``trainer_state.json``, a temporary folder of symlinks to everything but its ``custom_checkpoint_*.pkl``
    (accelerate would unpickle those with ``weights_only=False``; ``read_trainer_state`` reads them safely)."""
    path = Path(path)
    if not any((path / n).exists() for n in LEGACY_STATE):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="moe-ckpt-") as tmp:
        for entry in path.iterdir():
            if entry.name not in LEGACY_STATE:
                (Path(tmp) / entry.name).symlink_to(entry.resolve())
        yield Path(tmp)


# ----------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> dict[str, Any]:
    """fsync every file of ``folder``, then write ``manifest.json`` (sizes and sha256) and fsync it."""
    files = {}
    for f in folder_files(folder):
        _fsync(f)
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"files": files}
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    tmp.rename(folder / MANIFEST)
    return manifest


def discard(path: Path) -> None:
    """Delete a folder without ever leaving a half-deleted one under its old name."""
    if not path.exists():
        return
    trash = path.with_name(path.name + ".trash")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash)


def _clean_leftovers(root: Path) -> None:
    for p in root.iterdir():
        if p.is_dir() and p.name.endswith((".tmp", ".trash")):
            shutil.rmtree(p)


def save_checkpoint(
    accelerator: Accelerator,
    root: str | Path,
    step: int,
    meta: dict[str, Any],
    keep: int,
    trainer_state: dict[str, dict[str, Any]],
) -> Path:
    """Save the accelerator state (model, optimizer, RNG) and ``trainer_state`` (JSON) as ``root/step_N``
    (module docstring for the crash-safe sequence); ``ConfigError`` naming the path when writing fails."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            _clean_leftovers(root)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
            if delay > 0:
                time.sleep(delay)
            write_manifest(tmp)
    except (OSError, RuntimeError) as e:  # disk full, read-only, quota: torch reports some as RuntimeError
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # our own partial save; earlier checkpoints stay
        first = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"cannot write checkpoint {tmp}: {first}; the earlier checkpoints are intact "
            "(free space or fix the folder, then --resume auto)"
        ) from e
    if accelerator.is_main_process:
        discard(final)
        tmp.rename(final)
        _fsync(root)
        for old in list_checkpoints(root)[:-keep]:
            discard(old)
    accelerator.wait_for_everyone()
    return final

"""Crash-safe checkpoints: ``accelerator.save_state`` folders ``checkpoints/step_{N:07d}``.

Writing one (``save_checkpoint``):
  1. ``accelerator.save_state`` into ``step_N.tmp`` (a leftover ``*.tmp`` of a killed save is removed first),
  2. ``meta.json`` (step, phase, the model's dimensions and MoE settings, the resolved config),
  3. every file fsync'ed, then ``manifest.json`` (each file's size and sha256) written LAST,
  4. ``step_N.tmp`` renamed to ``step_N`` (atomic), the folder fsync'ed,
  5. checkpoints beyond the last ``keep`` renamed to ``*.trash`` and then deleted.
A crash at any point leaves either no ``step_N`` or a whole one; a ``step_N`` damaged later (a file
truncated or edited, a disk error) fails ``verify_checkpoint``, and ``latest_good_checkpoint`` falls back
to the previous intact one with a warning.

Test hook: the environment variable ``MOE_EMERGENCE_TEST_SAVE_DELAY`` (seconds) sleeps between step 2
and step 3, so the kill test can SIGKILL a process in the middle of a save. Nothing else reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from moe_emergence.errors import ConfigError

STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"
MANIFEST = "manifest.json"
SAVE_DELAY_ENV = "MOE_EMERGENCE_TEST_SAVE_DELAY"


class TrainState:
    """Counters that are not in the model or optimizer: optimizer steps taken, tokens seen, the
    collapse guard's per-layer streaks and the non-finite guard's counts."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.collapse_streak: dict[str, int] = {}
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in total
        self.consecutive_skips = 0
        self.first_bad: str | None = None  # where the current run of skipped steps started

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "collapse_streak": dict(self.collapse_streak),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "first_bad": self.first_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.collapse_streak = dict(state["collapse_streak"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.first_bad = state.get("first_bad")


# ----------------------------------------------------------------------------- finding and verifying


def list_checkpoints(root: str | Path) -> list[Path]:
    """``step_N`` folders under ``root`` (renamed into place, so complete when written), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems of checkpoint folder ``path`` against its manifest (empty list = intact)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return [f"no {MANIFEST} (a partial or pre-manifest checkpoint)"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"unreadable {MANIFEST}: {e}"]
    problems = []
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, the manifest says {want['size']}")
        elif _sha256(f) != want["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    extra = {str(p.relative_to(path)) for p in _files(path)} - set(files)
    problems += [f"{rel} is not in the manifest" for rel in sorted(extra)]
    return problems


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


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / META).is_file():
        raise ConfigError(f"{str(path)!r} is not a checkpoint folder (no {META})")
    return json.loads((path / META).read_text())


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
    for f in _files(folder):
        _fsync(f)
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
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
    accelerator: Accelerator, root: str | Path, step: int, meta: dict[str, Any], keep: int
) -> Path:
    """Save the accelerator state (model, optimizer, RNG, registered objects) as ``root/step_N``
    (module docstring for the crash-safe sequence)."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
        write_manifest(tmp)
        discard(final)
        tmp.rename(final)
        _fsync(root)
        for old in list_checkpoints(root)[:-keep]:
            discard(old)
    accelerator.wait_for_everyone()
    return final

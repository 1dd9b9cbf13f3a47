"""Checkpoints: ``accelerator.save_state`` folders ``checkpoints/step_{N:07d}`` with a ``meta.json``.

A checkpoint is written into ``step_N.tmp`` and renamed into place once complete, so a folder named
``step_N`` always holds a whole checkpoint; ``meta.json`` (step, phase) is written last, before the rename.
Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


class TrainState:
    """Counters that are not in the model or optimizer: optimizer steps taken, tokens seen, the
    collapse guard's per-layer streaks."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.collapse_streak: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "collapse_streak": dict(self.collapse_streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.collapse_streak = dict(state["collapse_streak"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (with ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / META).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"{str(path)!r} is not a checkpoint folder (no {META})")
    return json.loads((path / META).read_text())


def save_checkpoint(
    accelerator: Accelerator, root: str | Path, step: int, meta: dict[str, Any], keep: int
) -> Path:
    """Save the accelerator state (model, optimizer, RNG, registered objects) as ``root/step_N``."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final

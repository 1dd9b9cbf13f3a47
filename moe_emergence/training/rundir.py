"""The run folder ``<output_dir>/<run_name>/``: config.yaml, metrics.jsonl, checkpoints/, final/, tokenizer/.

A folder that already holds a run is never silently reused: pass ``--resume`` to continue it or
``--overwrite`` to replace it. On resume, the saved config must match the new one except for the keys in
``RESUMABLE_CHANGES`` (how long to train, logging, eval and checkpoint cadence).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training.config import RunConfig
from moe_emergence.training.loader import ConfigError

RESUMABLE_CHANGES = ("train.stop_after", "log.", "eval.", "checkpoint.")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``auto`` -> the latest complete checkpoint of ``run_dir`` (None if it has none); else a folder."""
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    ckpt.read_meta(path)  # raises if it is not a checkpoint
    return path


def prepare_run_dir(acc: Accelerator, cfg: RunConfig, resume: str | None, overwrite: bool) -> Path | None:
    """Check and create the run folder, write config.yaml; returns the checkpoint to resume from."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    start_from = None
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if resume is not None:
        start_from = resolve_resume(resume, run_dir)
        if start_from is None:
            acc.print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
        elif saved.is_file():
            diff = config_differences(yaml.safe_load(saved.read_text()), cfg.to_dict())
            bad = [k for k in diff if not k.startswith(RESUMABLE_CHANGES)]
            if bad:
                raise ConfigError(
                    f"cannot resume {run_dir}: the config differs from the saved config.yaml in {bad} "
                    f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
                )
    elif saved.exists() and not overwrite:
        raise ConfigError(
            f"run folder {str(run_dir)!r} already holds a run: pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another log.run_name"
        )
    if acc.is_main_process:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(cfg.to_yaml())
    acc.wait_for_everyone()
    return start_from

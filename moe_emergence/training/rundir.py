"""The run folder ``<output_dir>/<run_name>/``: config.yaml, metrics.jsonl, checkpoints/, final/, tokenizer/.

A folder that already holds a run is never silently reused: pass ``--resume`` to continue it or
``--overwrite`` to replace it. On resume, the saved config must match the new one except for the keys in
``RESUMABLE_CHANGES`` (how long to train, compilation, logging, eval and checkpoint cadence), and the checkpoint's own
model dimensions and MoE settings must match the config.

Nothing already written is lost when setup fails (``RunFolder.open`` / ``commit`` / ``abort``): a folder
this run created is removed again, a folder replaced with ``--overwrite`` is only moved aside
(``<run>.replaced``) until setup succeeded and is moved back otherwise, and ``config.yaml`` (what marks a
folder as holding a run) is written only once the model, data and checkpoint all loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from moe_emergence.errors import ConfigError
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training.config import RunConfig

# train.compile*: compiling in place leaves the checkpoint format unchanged
RESUMABLE_CHANGES = ("train.stop_after", "train.compile", "log.", "eval.", "checkpoint.")
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")
# May change on resume when the global batch (batch_size x grad_accum x processes) stays the same, e.g.
# a 2-process checkpoint resumed on 1 process with twice the per-process batch.
WORLD_SIZE_KEYS = ("train.batch_size", "train.grad_accum")


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


def _model_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config keys that fix the model's parameter shapes: base, tiny sizes (tiny only), MoE."""
    model = flatten({"model": cfg.get("model") or {}})
    tiny = model.get("model.base") == "tiny"
    return {
        k: v
        for k, v in model.items()
        if k == "model.base" or k.startswith("model.moe") or (tiny and k.startswith("model.tiny_n_"))
    }


def check_checkpoint_fits(path: Path, meta: dict[str, Any], cfg: RunConfig) -> None:
    """``ConfigError`` when checkpoint ``path`` was saved with other model dimensions or MoE settings."""
    if "config" not in meta:
        return
    old, new = _model_keys(meta["config"]), _model_keys(cfg.to_dict())
    diff = config_differences(old, new)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in diff[:6])
        raise ConfigError(
            f"cannot resume from {path}: it was saved with another model shape or MoE settings "
            f"(checkpoint -> config: {shown}); use the config the checkpoint was trained with"
        )


def check_global_batch(meta: dict[str, Any], cfg: RunConfig, num_processes: int) -> None:
    """Refuse a resume that would change the rows per optimizer step (the data order depends on it)."""
    if "num_processes" not in meta:
        return
    old = meta["batch_size"] * meta["grad_accum"] * meta["num_processes"]
    new = cfg.train.batch_size * cfg.train.grad_accum * num_processes
    if old != new:
        per_process = old // (cfg.train.grad_accum * num_processes)
        hint = (
            f"; e.g. train.batch_size={per_process}"
            if per_process * cfg.train.grad_accum * num_processes == old
            else ""
        )
        raise ConfigError(
            f"cannot resume: the checkpoint took {old} blocks per optimizer step (train.batch_size="
            f"{meta['batch_size']} x train.grad_accum={meta['grad_accum']} x {meta['num_processes']} "
            f"processes), this run would take {new} ({cfg.train.batch_size} x {cfg.train.grad_accum} x "
            f"{num_processes}); keep the global batch the same{hint}"
        )


def check_model_dims(path: Path, meta: dict[str, Any], dims: dict[str, Any]) -> None:
    """``ConfigError`` when the built model's dimensions differ from those saved in ``meta``."""
    saved = meta.get("dims")
    if saved is None:
        return
    diff = [k for k in sorted(set(saved) | set(dims)) if saved.get(k) != dims.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {dims.get(k)!r}" for k in diff)
        raise ConfigError(
            f"cannot resume from {path}: the model differs from the checkpoint's (checkpoint -> now: "
            f"{shown}); the base checkpoint or tokenizer changed since it was saved"
        )


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path | None, list[Path]]:
    """``auto`` -> (the newest intact checkpoint of ``run_dir`` or None, damaged newer ones); a path ->
    (that checkpoint, []) after verifying its manifest."""
    if resume == "auto":
        return ckpt.find_resume_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume!r}: no such checkpoint folder (or pass --resume auto)")
    ckpt.read_meta(path)  # raises if it is not a checkpoint
    problems = ckpt.verify_checkpoint(path)
    if problems:
        raise ConfigError(f"--resume {resume!r}: the checkpoint is damaged or partial: {'; '.join(problems)}")
    return path, []


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in RUN_MARKERS)


class RunFolder:
    """Checks (constructor), then ``open`` before setup, ``commit`` after it or ``abort`` on failure."""

    def __init__(self, acc: Accelerator, cfg: RunConfig, resume: str | None, overwrite: bool) -> None:
        self.acc, self.cfg, self.resume, self.overwrite = acc, cfg, resume, overwrite
        self.run_dir = run_dir = cfg.run_dir
        self.replaced = run_dir.with_name(run_dir.name + ".replaced")
        self.resume_from: Path | None = None
        self.resume_meta: dict[str, Any] | None = None
        self.damaged: list[Path] = []
        saved = run_dir / "config.yaml"
        if resume is not None and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if resume is not None:
            self.resume_from, self.damaged = resolve_resume(resume, run_dir)
            if self.resume_from is None:
                acc.print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
            else:
                self.resume_meta = ckpt.read_meta(self.resume_from)
                check_checkpoint_fits(self.resume_from, self.resume_meta, cfg)
                check_global_batch(self.resume_meta, cfg, acc.num_processes)
            if saved.is_file():
                diff = config_differences(yaml.safe_load(saved.read_text()), cfg.to_dict())
                bad = [k for k in diff if not k.startswith(RESUMABLE_CHANGES) and k not in WORLD_SIZE_KEYS]
                if bad:
                    raise ConfigError(
                        f"cannot resume {run_dir}: the config differs from the saved config.yaml in {bad} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
                    )
        elif holds_run(run_dir) and not overwrite:
            raise ConfigError(
                f"run folder {str(run_dir)!r} already holds a run: pass --resume auto to continue it, "
                "--overwrite to replace it, or choose another log.run_name"
            )
        if self.replaced.exists():
            raise ConfigError(
                f"{self.replaced} exists: a run replaced with --overwrite whose setup was killed; "
                f"move it back to {run_dir.name} or delete it"
            )
        self.created = not run_dir.exists()

    def open(self) -> None:
        """Create the folder (moving a replaced run aside first)."""
        self.acc.wait_for_everyone()  # every process checked the folder before the main process writes
        if self.acc.is_main_process:
            if self.overwrite and self.run_dir.exists():
                self.run_dir.rename(self.replaced)
                self.created = True
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()

    def commit(self) -> None:
        """Setup succeeded: write config.yaml, drop a replaced run, set damaged checkpoints aside."""
        if self.acc.is_main_process:
            for path in self.damaged:
                self.acc.print(f"set aside damaged checkpoint {ckpt.set_aside(path)}")
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            if self.replaced.exists():
                shutil.rmtree(self.replaced)
        self.acc.wait_for_everyone()

    def abort(self) -> None:
        """Setup failed: remove what this run created, put a replaced run back."""
        if not self.acc.is_main_process:
            return
        if self.created and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        if self.replaced.exists() and not self.run_dir.exists():
            self.replaced.rename(self.run_dir)

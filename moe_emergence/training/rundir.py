"""The run folder ``<output_dir>/<run_name>/``: config.yaml, metrics.jsonl, checkpoints/, final/, tokenizer/,
and a finished run's summary.md and plots/ (``summary``).

Nothing a user wrote is ever deleted or overwritten:
- ``log.run_name`` is one plain path component (checked by ``LogConfig``), so a run folder is always a child
  of ``output_dir``.
- The main process holds an exclusive lock on the run folder from the first check to the end of the run
  (``runlock``): a second launch on the same folder, ``--resume`` included, gets one ``error:`` line.
- A run writes the marker ``.moe_emergence_run`` when it creates its folder. ``--overwrite`` replaces only
  a folder that holds that marker and nothing but the files a run writes (``runfiles``); otherwise it
  refuses, naming the other files. A new run goes into a missing or empty folder only.
- A folder that holds a run is never silently reused: ``--resume`` continues it, ``--overwrite`` replaces
  it; running the same finished config again only says where its results are (``RunFinished``).
On resume, the saved config must match the new one except for the keys in ``RESUMABLE_CHANGES`` (how long
to train, compilation, logging, eval and checkpoint cadence), and the checkpoint's own model dimensions and
MoE settings must match the config.

Nothing already written is lost when setup fails (``RunFolder.open`` / ``commit`` / ``abort``): a folder
this run created is removed again, an empty folder it was given is left empty again, a folder replaced with
``--overwrite`` is only moved aside (``<run>.replaced``) until setup succeeded and is moved back otherwise, and
``config.yaml`` is written only once the model, data and checkpoint all loaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from moe_emergence.data.config import saved_data_block, without_inapplicable
from moe_emergence.errors import ConfigError
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training.config import RunConfig
from moe_emergence.training.runfiles import (
    MARKER,
    RUN_ENTRIES,
    check_entry_types,
    check_overwritable,
    holds_run,
    shown,
)
from moe_emergence.training.runlock import RunLock
from moe_emergence.yamlio import strict_load

# train.compile*, train.cuda_graphs: how the same maths runs (the checkpoint format is unchanged);
# optim.lr / router_lr / grad_clip and guard.*: the remedies the bad-step guard names when it stops a run
RESUMABLE_CHANGES = (
    "train.stop_after",
    "train.compile",
    "train.cuda_graphs",
    "log.",
    "eval.",
    "checkpoint.",
    "guard.",
    "optim.lr",
    "optim.router_lr",
    "optim.grad_clip",
)
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


def check_new_run(run_dir: Path, cfg: RunConfig) -> None:
    """A new run (no ``--resume``/``--overwrite``) goes into a missing or empty folder only. A finished run
    with the same config raises ``RunFinished`` (nothing to do), any other run ``ConfigError``."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r} is a file; choose another log.run_name or output_dir")
    if holds_run(run_dir):
        saved = run_dir / "config.yaml"
        if (run_dir / "final").is_dir() and saved.is_file():
            diff = config_differences(read_saved_config(saved), cfg.to_dict())
            if all(k.startswith("log.") for k in diff):  # the same run (logging aside)
                raise RunFinished(run_dir)
        raise ConfigError(
            f"run folder {str(run_dir)!r} already holds a run: pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another log.run_name"
        )
    names = sorted(p.name for p in run_dir.iterdir())
    if names:
        raise ConfigError(
            f"{str(run_dir)!r} exists and holds {shown(names)}, not a run; a new run needs a missing or empty "
            "folder: choose another log.run_name or output_dir"
        )


def read_saved_config(path: Path) -> dict[str, Any]:
    """A run's saved ``config.yaml`` as a mapping (the strict YAML reader); ``ConfigError`` naming the file.
    Data-source fields that do not apply to a source's type are dropped (folders saved before they were
    left out of config.yaml hold them with their defaults), and data keys added since the folder was saved
    take the value then in effect (``saved_data_block``: a run saved before the val split had none)."""
    saved = ckpt.read_mapping(path, "run config", strict_load)
    if isinstance(saved.get("data"), dict):
        saved["data"] = saved_data_block(without_inapplicable(saved["data"]))
    return saved


class RunFinished(ConfigError):
    """The run folder already holds this finished run (``final/``): nothing to do. The command line reports it
    and exits 0; for the library it is a ``ConfigError``."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            f"run folder {str(run_dir)!r} already holds this run, finished: the model is in "
            f"{run_dir / 'final'}, the metrics in {run_dir / 'metrics.jsonl'}. Nothing to do "
            "(--overwrite trains it again; another log.run_name starts a new run)"
        )
        self.run_dir = run_dir


def _on_main(acc: Accelerator, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process; a ``ConfigError`` there is raised on every process."""
    err = None
    if acc.is_main_process:
        try:
            result = fn()
        except ConfigError as e:
            err, result = str(e), None
    else:
        result = None
    if acc.num_processes > 1:
        box = [err]
        broadcast_object_list(box)
        err = box[0]
    if err is not None:
        raise ConfigError(err)
    return result


class RunFolder:
    """Lock and checks (constructor), then ``open`` before setup, ``commit`` after it or ``abort`` on
    failure, ``release`` at the end of the run (the lock is held from the constructor until then)."""

    def __init__(self, acc: Accelerator, cfg: RunConfig, resume: str | None, overwrite: bool) -> None:
        self.acc, self.cfg, self.resume, self.overwrite = acc, cfg, resume, overwrite
        self.run_dir = cfg.run_dir
        self.replaced = self.run_dir.with_name(self.run_dir.name + ".replaced")
        self.resume_from: Path | None = None
        self.resume_meta: dict[str, Any] | None = None
        self.damaged: list[Path] = []
        self.created = self.was_empty = self.wrote_marker = False
        if resume is not None and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        self.lock: RunLock | None = _on_main(acc, lambda: RunLock(self.run_dir))
        try:
            self._check()
        except BaseException:
            self.release(remove_created_dirs=True)
            raise

    def _check(self) -> None:
        run_dir, cfg, acc = self.run_dir, self.cfg, self.acc
        check_entry_types(run_dir)
        if self.resume is not None:
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"run folder {str(run_dir)!r} is a file; --resume needs a run folder")
            self.resume_from, self.damaged = resolve_resume(self.resume, run_dir)
            if self.resume_from is None:
                acc.print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
            else:
                self.resume_meta = ckpt.read_meta(self.resume_from)
                check_checkpoint_fits(self.resume_from, self.resume_meta, cfg)
                check_global_batch(self.resume_meta, cfg, acc.num_processes)
            saved = run_dir / "config.yaml"
            if saved.is_file():
                old = read_saved_config(saved)
                diff = config_differences(old, cfg.to_dict())
                bad = [k for k in diff if not k.startswith(RESUMABLE_CHANGES) and k not in WORLD_SIZE_KEYS]
                if bad:
                    hint = ""
                    if "data.val_fraction" in bad and not flatten(old).get("data.val_fraction"):
                        hint = "; a run from before the val split resumes with data.val_fraction=0 eval.split=eval"
                    raise ConfigError(
                        f"cannot resume {run_dir}: the config differs from the saved config.yaml in {bad} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume){hint}"
                    )
            meta = self.resume_meta
            if (run_dir / "final").is_dir() and meta is not None and meta["step"] >= cfg.train.steps:
                raise RunFinished(run_dir)  # nothing left to train: the run stays as it is
        elif self.overwrite:
            check_overwritable(run_dir)
        else:
            check_new_run(run_dir, cfg)
        if self.replaced.exists():
            raise ConfigError(
                f"{self.replaced} exists: a run replaced with --overwrite whose setup was killed; "
                f"move it back to {run_dir.name} or delete it"
            )

    def open(self) -> None:
        """Create the folder and its marker (moving a replaced run aside first)."""
        self.acc.wait_for_everyone()  # every process checked the folder before the main process writes
        _on_main(self.acc, self._open_main)

    def _open_main(self) -> None:
        run_dir = self.run_dir
        try:
            if self.overwrite and run_dir.exists() and any(run_dir.iterdir()):
                run_dir.rename(self.replaced)
            self.created = not run_dir.exists()
            self.was_empty = not self.created and not any(run_dir.iterdir())  # a new run's folder, made empty
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / MARKER).is_file():
                write_marker(run_dir)
                self.wrote_marker = True
        except OSError as e:
            raise ConfigError(f"run folder {str(run_dir)!r}: cannot write it ({e.strerror})") from e

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
        """Setup failed, or a scratch run ended (``scripts/profile_step.py``): remove what this run created
        (never anything else), put a replaced run back, release the lock."""
        try:
            if self.acc.is_main_process:
                self._remove_written()
        finally:
            self.release(remove_created_dirs=True)

    def _remove_written(self) -> None:
        """The main process's part of ``abort``: what this run wrote goes, a replaced run comes back."""
        run_dir = self.run_dir
        if self.created and run_dir.exists():
            shutil.rmtree(run_dir)
        elif self.was_empty and run_dir.is_dir():  # it was there, empty: take out what a run writes
            for entry in [e for e in run_dir.iterdir() if e.name in RUN_ENTRIES]:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif self.wrote_marker:
            (run_dir / MARKER).unlink(missing_ok=True)
        if self.replaced.exists() and not run_dir.exists():
            self.replaced.rename(run_dir)

    def release(self, remove_created_dirs: bool = False) -> None:
        if self.lock is not None:
            self.lock.release(remove_created_dirs)
            self.lock = None


def write_marker(run_dir: Path) -> None:
    """The file that says "a training run created this folder" (``--overwrite`` replaces only such folders)."""
    from moe_emergence import __version__

    info = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "moe_emergence": __version__}
    (run_dir / MARKER).write_text(json.dumps(info) + "\n")

"""What a run folder may hold: the marker, the entries a run writes, and the checks behind ``--overwrite``.

``--overwrite`` replaces only a folder that a run created (``MARKER``) and that holds nothing but what a run
writes (``foreign_entries`` lists anything else, also inside ``checkpoints/``, ``final/``, ``tokenizer/``,
``plots/`` and at the top of ``wandb/``). ``check_entry_types`` refuses run files that are not regular files
(a FIFO ``config.yaml`` would block a read forever) and run folders that are not folders.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from moe_emergence import model_card
from moe_emergence.errors import ConfigError

MARKER = ".moe_emergence_run"


RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")


# Everything a run writes into its folder (--overwrite replaces a folder holding only these).
RUN_ENTRIES = frozenset(
    {
        MARKER,
        *RUN_MARKERS,
        "final.tmp",
        "final.trash",
        "tokenizer",
        "wandb",
        "wandb_id.txt",
        "summary.md",
        "plots",
    }
)


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in (MARKER, *RUN_MARKERS))


# What save_pretrained writes into final/ and tokenizer/ (model, generation and tokenizer files).
HF_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
    }
)


SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


CHECKPOINT_ENTRY = re.compile(r"^step_\d+(\.tmp|\.trash|\.damaged)?$")


# What accelerate's save_state and save_checkpoint write into a checkpoint folder (files, then DCP folders).
CHECKPOINT_FILE = re.compile(
    r"^(model.*\.safetensors|pytorch_model.*\.bin|optimizer.*\.bin|random_states_\d+\.pkl|scaler\.pt"
    r"|scheduler.*\.bin|custom_checkpoint_\d+\.pkl|meta\.json|trainer_state\.json|manifest\.json(\.part)?)$"
)


CHECKPOINT_SUBDIR = re.compile(r"^(pytorch_model_fsdp_\d+|optimizer_\d+)$")


DCP_FILE = re.compile(r"^(__\d+_\d+\.distcp|\.metadata)$")


# The PNGs a finished run writes into plots/ (summary.write_plots).
PLOT_FILE = re.compile(r"^(loss_by_domain|expert_share_layer\d+|domain_expert_layer\d+)\.png$")


WANDB_ENTRY = re.compile(r"^(latest-run|debug\.log|debug-internal\.log|(offline-)?run-\d{8}_\d{6}-\w+)$")


def foreign_entries(run_dir: Path) -> list[str]:
    """Paths in ``run_dir`` (relative, sorted) that a run never writes: unknown names at the top, in
    ``checkpoints/`` (checkpoint folders holding only what a save writes), ``final/`` and ``tokenizer/`` (what
    ``save_pretrained`` writes, as files), ``plots/`` (the summary's PNGs, as files) and at the top of
    ``wandb/``; symbolic links anywhere but wandb's."""
    out = []
    for p in run_dir.iterdir():
        if p.name not in RUN_ENTRIES or (p.is_symlink() and p.name != "wandb"):
            out.append(p.name)
        elif p.name in ("final", "final.tmp", "final.trash", "tokenizer") and p.is_dir():
            out += [f"{p.name}/{q.name}" for q in p.iterdir() if not _hf_file(q)]
        elif p.name == "plots" and p.is_dir():
            out += [f"plots/{q.name}" for q in p.iterdir() if not _plain_file(q, PLOT_FILE.match(q.name))]
        elif p.name == "checkpoints" and p.is_dir():
            out += _foreign_in_checkpoints(p)
        elif p.name == "wandb" and p.is_dir():
            out += [f"wandb/{q.name}" for q in p.iterdir() if not WANDB_ENTRY.match(q.name)]
    return sorted(out)


def _hf_file(p: Path) -> bool:
    """A file ``save_pretrained`` writes; ``README.md`` only as the package's model card, unedited."""
    if p.name == model_card.CARD_NAME:
        return _plain_file(p, True) and model_card.is_unedited_card(
            p.read_text(encoding="utf-8", errors="replace")
        )
    return _plain_file(p, p.name in HF_FILES or SHARD.match(p.name))


def _plain_file(p: Path, name_ok) -> bool:
    """A regular file (not a link) whose name a run writes (``name_ok``)."""
    return bool(name_ok) and p.is_file() and not p.is_symlink()


def _foreign_in_checkpoints(root: Path) -> list[str]:
    out = []
    for step in root.iterdir():
        rel = f"checkpoints/{step.name}"
        if step.is_symlink() or not step.is_dir() or not CHECKPOINT_ENTRY.match(step.name):
            out.append(rel)
            continue
        for q in step.iterdir():
            if q.is_symlink():
                out.append(f"{rel}/{q.name}")
            elif q.is_dir():
                bad = not CHECKPOINT_SUBDIR.match(q.name)
                out += (
                    [f"{rel}/{q.name}"]
                    if bad
                    else [
                        f"{rel}/{q.name}/{r.name}"
                        for r in q.iterdir()
                        if not (DCP_FILE.match(r.name) and r.is_file() and not r.is_symlink())
                    ]
                )
            elif not CHECKPOINT_FILE.match(q.name):
                out.append(f"{rel}/{q.name}")
    return out


def shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def check_overwritable(run_dir: Path) -> None:
    """``--overwrite`` replaces only a folder this project created (``MARKER``) holding only run files."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_symlink() or not run_dir.is_dir():
        what = "a symbolic link" if run_dir.is_symlink() else "a file"
        raise ConfigError(
            f"{str(run_dir)!r} is {what}, not a run folder; --overwrite replaces only run folders"
        )
    names = sorted(p.name for p in run_dir.iterdir())
    if not names:
        return
    if not (run_dir / MARKER).is_file():
        raise ConfigError(
            f"--overwrite refused: {str(run_dir)!r} was not created by a training run (no {MARKER} marker) "
            f"and holds {shown(names)}; move those files away or choose another log.run_name"
        )
    foreign = foreign_entries(run_dir)
    if foreign:
        raise ConfigError(
            f"--overwrite refused: run folder {str(run_dir)!r} also holds files a run does not write: "
            f"{shown(foreign)}; move them out first (only these are replaced: {', '.join(sorted(RUN_ENTRIES))})"
        )


RUN_FILES = ("config.yaml", "metrics.jsonl", "wandb_id.txt", "summary.md", MARKER)


RUN_DIRS = ("checkpoints", "final", "tokenizer", "plots")


def check_entry_types(run_dir: Path) -> None:
    """``ConfigError`` when a run file is not a regular file or a run folder not a folder (a FIFO
    ``config.yaml`` would block a read forever; a symlink would send writes elsewhere)."""
    if not run_dir.is_dir() or run_dir.is_symlink():
        return
    for name in RUN_FILES:
        p = run_dir / name
        if (p.exists() or p.is_symlink()) and (p.is_symlink() or not stat.S_ISREG(p.stat().st_mode)):
            raise ConfigError(
                f"{p} is not a regular file (a symlink, folder, pipe or device); a run writes it"
            )
    for name in RUN_DIRS:
        p = run_dir / name
        if (p.exists() or p.is_symlink()) and (p.is_symlink() or not p.is_dir()):
            raise ConfigError(f"{p} is not a folder (a symlink or a file); a run writes it")

"""Reading and verifying a checkpoint folder without executing anything (``checkpoint.py`` writes them).

``verify_checkpoint`` checks a folder against its manifest (paths inside the folder, regular files only, sizes,
sha256), the parts a resume needs, safetensors headers, and scans every pickle-format file without running
it (``unsafe_pickles``: torch zip files through ``weights_only=True``, memory-mapped; plain pickles, the DCP
``.metadata`` of FSDP checkpoints, through an unpickler that admits only DCP's metadata classes).
``read_meta`` and ``read_trainer_state`` read the JSON files and check every value's type and range.
Every problem is a ``ConfigError`` (or a line of ``verify_checkpoint``'s list) naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import yaml

from moe_emergence.errors import ConfigError

META = "meta.json"


TRAINER_STATE = "trainer_state.json"


LEGACY_STATE = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl")  # TrainState, sampler (before JSON)


MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every entry under ``folder`` that is not a real directory (files, symlinks to anything, special files),
    but the manifest; symlinked directories are listed, never entered."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        out += [Path(root) / d for d in dirs if os.path.islink(os.path.join(root, d))]
        out += [Path(root) / f for f in files]
    return sorted(p for p in out if p != folder / MANIFEST)


def symlinks(folder: Path) -> list[str]:
    """Relative paths of the symbolic links anywhere in ``folder`` (the manifest included)."""
    links = [p for p in [*folder_files(folder), folder / MANIFEST] if p.is_symlink()]
    return sorted(str(p.relative_to(folder)) for p in links)


def manifest_files(folder: Path) -> list[str]:
    """The relative paths ``folder``'s manifest lists ([] when it is unreadable)."""
    try:
        return [str(rel) for rel in json.loads((folder / MANIFEST).read_text())["files"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return []


def _entry_problem(folder: Path, rel: str) -> str | None:
    """Why manifest entry ``rel`` cannot be a file of checkpoint ``folder``, or None: it must be a relative
    path inside the folder naming a regular file (no ``..``, no symlink, no device or pipe)."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
        return f"{rel!r} in the manifest is not a path inside the checkpoint"
    f = folder / rel
    if f.is_symlink():
        return f"{rel} is a symbolic link"
    if not f.exists():
        return f"{rel} is missing"
    if not stat.S_ISREG(f.stat().st_mode):
        return f"{rel} is not a regular file"
    return None


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems of checkpoint folder ``path`` (empty list = intact): files against the manifest (paths inside
    the folder, regular files only, sizes, sha256), the parts a resume needs, safetensors headers, and every
    pickle-format file scanned without executing anything (``unsafe_pickles``)."""
    path = Path(path)
    links = symlinks(path)
    if links:
        return [f"{rel} is a symbolic link (a checkpoint holds only its own files)" for rel in links[:8]]
    if not (path / MANIFEST).is_file():
        return [f"no {MANIFEST} (a partial or pre-manifest checkpoint)"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        sizes = {str(rel): int(want["size"]) for rel, want in files.items()}
        hashes = {str(rel): str(want["sha256"]) for rel, want in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"unreadable {MANIFEST}: {str(e)[:160]}"]
    problems = []
    for rel in sizes:
        f = path / rel
        why = _entry_problem(path, rel)
        if why is not None:
            problems.append(why)
        elif f.stat().st_size != sizes[rel]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, the manifest says {sizes[rel]}")
        elif sha256_file(f) != hashes[rel]:
            problems.append(f"{rel} does not match its sha256")
    extra = {str(p.relative_to(path)) for p in folder_files(path)} - set(sizes)
    problems += [f"{rel} is not in the manifest" for rel in sorted(extra)]
    if problems:
        return problems[:8] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
    return missing_parts(path) + unreadable_safetensors(path) + unsafe_pickles(path)


def unreadable_safetensors(folder: Path) -> list[str]:
    """``*.safetensors`` files of ``folder`` whose header cannot be read (garbage, truncated, foreign)."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for f in folder_files(folder):
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt") as st:
                list(st.keys())
        except (SafetensorError, OSError, ValueError) as e:
            problems.append(f"{f.relative_to(folder)} is not a readable safetensors file ({str(e)[:120]})")
    return problems


def missing_parts(path: Path) -> list[str]:
    """What a resume needs and ``path`` lacks: meta, trainer state, model weights, optimizer, RNG states."""
    try:
        meta = read_meta(path)
    except ConfigError as e:
        return [str(e)]
    names = {p.name for p in path.iterdir()}
    missing = []
    if TRAINER_STATE not in names and not set(LEGACY_STATE) <= names:
        missing.append(f"{TRAINER_STATE} is missing")
    if not any(n.startswith(("model", "pytorch_model")) for n in names):
        missing.append("the model weights (model.safetensors or pytorch_model_fsdp_0/) are missing")
    if not any(n.startswith("optimizer") and n != "optimizer.bin.part" for n in names):
        missing.append("the optimizer state (optimizer.bin or optimizer_0/) is missing")
    rng = [f"random_states_{i}.pkl" for i in range(meta.get("num_processes", 1))]
    gone = [n for n in rng if n not in names]
    if gone:
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        missing.append(f"{', '.join(gone[:3])}{more} {'is' if len(gone) == 1 else 'are'} missing")
    return missing


# Pickle-format files accelerate or torch may read from a checkpoint (safetensors, JSON and DCP shard files
# are never unpickled).
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


# What unpickling a foreign or damaged file raises (torch wraps its weights-only refusal in UnpicklingError).
UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    ImportError,
    OSError,
)


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Admits only the classes of a ``torch.distributed.checkpoint`` ``.metadata`` file."""

    def find_class(self, module: str, name: str):
        import torch

        ok = (
            module in _DCP_MODULES
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module in ("torch._utils", "torch.serialization") and name == "_get_layout")
            or (
                module == "pathlib"
                and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
            )
            or (module == "collections" and name == "OrderedDict")
        )
        if not ok:
            raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")
        return super().find_class(module, name)


def _safe_load(f: Path) -> None:
    """Unpickle ``f`` the safe way (torch zip: ``weights_only``, memory-mapped; plain pickle: DCP classes
    only); raises what the unpickler raises."""
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy RNG state types, as accelerate loads them

    if zipfile.is_zipfile(f):
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    else:
        with f.open("rb") as fh:
            _DcpMetadataUnpickler(fh).load()


def unsafe_pickles(folder: Path) -> list[str]:
    """Every pickle-format file of ``folder`` that holds more than tensors and plain data (a payload, a
    foreign object) or is not a readable pickle, each named with why (nothing is executed)."""
    problems = []
    for f in folder_files(folder):
        if not (f.suffix in PICKLE_SUFFIXES or f.name == ".metadata"):
            continue
        try:
            _safe_load(f)
        except UNPICKLE_ERRORS as e:  # whatever the unpickler raised, the file is refused
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            keys = ("Unsupported global", "WeightsUnpickler error", "GLOBAL")
            why = next((ln for k in keys for ln in lines if k in ln), lines[0] if lines else type(e).__name__)
            problems.append(
                f"{f.relative_to(folder)} is not a plain tensor/state pickle ({why[:160]}); refused unread, "
                "nothing in it was executed"
            )
    return problems


def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of checkpoint ``path``; ``ConfigError`` naming the file when it is missing or malformed."""
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise ConfigError(f"{str(path)!r} is not a checkpoint folder (no {META})")
    meta = read_mapping(f, "checkpoint metadata")
    if meta.get("phase") not in ("dense", "moe"):
        raise ConfigError(f"{f}: 'phase' must be 'dense' or 'moe', got {meta.get('phase')!r}")
    _check_ints(f, meta, {"step": 0, "upcycle_at_step": 0, "train_rows": 0}, required=("step",))
    _check_ints(f, meta, {"num_processes": 1, "batch_size": 1, "grad_accum": 1}, maximum=MAX_COUNT)
    return meta


MAX_COUNT = 1 << 16  # a sanity bound for process and batch counts read from a checkpoint


MAX_INT = 1 << 62  # and for every other integer (steps, tokens, positions)


def _check_ints(
    f: Path,
    data: dict[str, Any],
    minimum: dict[str, int],
    required: tuple[str, ...] = (),
    maximum: int | None = None,
    where: str = "",
) -> None:
    """``ConfigError`` naming ``f`` and the key unless each key of ``minimum`` that is present (or
    ``required``) holds an integer >= its minimum (and <= ``maximum``)."""
    for key, low in minimum.items():
        if key not in data and key not in required:
            continue
        v = data.get(key)
        high = MAX_INT if maximum is None else maximum
        ok = isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
        if not ok:
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
            raise ConfigError(f"{f}: {where}{key}={shown} is invalid: an integer in [{low}, {high}]")


def read_mapping(f: Path, what: str, loads=json.loads) -> dict[str, Any]:
    """The mapping in file ``f`` (JSON, or what ``loads`` parses); ``ConfigError`` naming ``f`` when it is
    unreadable or not a mapping."""
    try:
        data = loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{f}: unreadable {what} ({' '.join(str(e).split())[:200]})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: unreadable {what} (expected a mapping, got {type(data).__name__})")
    return data


def read_trainer_state(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{"train_state": ..., "sampler": ...}`` of checkpoint ``path``: ``trainer_state.json``, or, in
    checkpoints written before it, accelerate's two ``custom_checkpoint_*.pkl`` read with
    ``weights_only=True``. ``ConfigError`` naming the file when missing or malformed."""
    path = Path(path)
    f = path / TRAINER_STATE
    if f.is_file():
        state = read_mapping(f, "trainer state")
    elif all((path / n).is_file() for n in LEGACY_STATE):
        import torch

        try:
            parts = [torch.load(path / n, map_location="cpu", weights_only=True) for n in LEGACY_STATE]
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
            raise ConfigError(f"{path / LEGACY_STATE[0]}: unreadable trainer state ({str(e)[:160]})") from e
        state = {"train_state": parts[0], "sampler": parts[1]}
    else:
        raise ConfigError(f"{str(path)!r}: no {TRAINER_STATE}; the checkpoint is partial")
    if not all(isinstance(state.get(k), dict) for k in ("train_state", "sampler")):
        raise ConfigError(f"{f}: the trainer state needs 'train_state' and 'sampler' objects")
    _check_trainer_state(f, state)
    return state


def _positive_float(v: Any) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and v > 0
    except OverflowError:
        return False


def _check_trainer_state(f: Path, state: dict[str, dict[str, Any]]) -> None:
    """Types and ranges of every value a resume reads (``ConfigError`` naming ``f`` and the key)."""
    ts, sampler = state["train_state"], state["sampler"]
    counts = {"step": 0, "tokens": 0, "skipped_steps": 0, "consecutive_skips": 0}
    _check_ints(f, ts, counts, required=("step", "tokens"), where="train_state.")
    pos = {"epoch": 0, "offset": 0, "num_rows": 1, "seed": 0}
    _check_ints(f, sampler, pos, required=tuple(pos), where="sampler.")
    streak = ts.get("collapse_streak", {})
    ok = isinstance(streak, dict) and all(
        re.fullmatch(r"layer\d+", str(k))
        and isinstance(v, int)
        and not isinstance(v, bool)
        and 0 <= v <= MAX_INT
        for k, v in streak.items()
    )
    if not ok:
        raise ConfigError(f"{f}: train_state.collapse_streak must map 'layer<i>' to integers >= 0")
    hist = ts.get("loss_history", [])
    if not (isinstance(hist, list) and all(_positive_float(v) for v in hist)):
        raise ConfigError(f"{f}: train_state.loss_history must be a list of finite losses > 0")
    if not ts.get("consecutive_skips", 0) <= ts.get("skipped_steps", 0) <= ts["step"]:
        raise ConfigError(f"{f}: train_state needs consecutive_skips <= skipped_steps <= step")
    if sampler["offset"] > sampler["num_rows"]:
        raise ConfigError(
            f"{f}: sampler.offset={sampler['offset']} is beyond its num_rows={sampler['num_rows']}"
        )
    if not isinstance(ts.get("last_applied", False), bool) or not isinstance(
        ts.get("first_bad"), (str, type(None))
    ):
        raise ConfigError(
            f"{f}: train_state.last_applied must be true or false and first_bad a string or null"
        )

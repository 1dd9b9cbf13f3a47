"""The prepared-corpus cache (``data.cache_dir``): list its entries and prune the ones not used lately.

An entry is a folder named by its corpus fingerprint holding exactly what ``build_corpus`` writes:
``train/``, ``val/``, ``eval/``, ``tokenizer/`` and a ``stats.json`` whose ``fingerprint`` is the folder's
name (entries written before the val split, without ``val/``, are entries too: they can be pruned).
Anything else in the cache folder (a file or folder someone else put there) is never touched. "Last used"
is the modification time of ``stats.json``, which ``build_corpus`` refreshes on every cache hit.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

ENTRY_PARTS = {"train", "val", "eval", "tokenizer", "stats.json"}
OLD_ENTRY_PARTS = ENTRY_PARTS - {"val"}  # format v1 (no val split): never a cache hit, but prunable


@dataclass
class CacheEntry:
    path: Path
    size_bytes: int
    last_used: float  # seconds since the epoch
    domains: list[str]
    seq_len: int | None


def _is_entry(path: Path) -> bool:
    if (
        not path.is_dir()
        or path.is_symlink()
        or {p.name for p in path.iterdir()} not in (ENTRY_PARTS, OLD_ENTRY_PARTS)
    ):
        return False
    try:
        return json.loads((path / "stats.json").read_text()).get("fingerprint") == path.name
    except (OSError, ValueError):
        return False


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_entries(cache_dir: str | Path) -> list[CacheEntry]:
    """The cache's entries, least recently used first (an absent folder has none)."""
    root = Path(cache_dir).expanduser()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if _is_entry(p)):
        stats = json.loads((path / "stats.json").read_text())
        used = (path / "stats.json").stat().st_mtime
        out.append(CacheEntry(path, _size(path), used, list(stats.get("domains", [])), stats.get("seq_len")))
    return sorted(out, key=lambda e: e.last_used)


def prune(
    cache_dir: str | Path,
    older_than_days: float | None = None,
    keep: int | None = None,
    dry_run: bool = False,
) -> list[CacheEntry]:
    """Remove the entries last used more than ``older_than_days`` ago and/or all but the ``keep`` most
    recently used (both given: an entry goes when either says so). Returns what was (or, with ``dry_run``,
    would be) removed. Raises ``ValueError`` when neither limit is given or one is negative."""
    if older_than_days is None and keep is None:
        raise ValueError("prune: give older_than_days and/or keep")
    if (older_than_days is not None and older_than_days < 0) or (keep is not None and keep < 0):
        raise ValueError("prune: older_than_days and keep must be >= 0")
    entries = cache_entries(cache_dir)  # least recently used first
    doomed = set()
    if older_than_days is not None:
        cutoff = time.time() - 86400.0 * older_than_days
        doomed |= {e.path for e in entries if e.last_used < cutoff}
    if keep is not None:
        doomed |= {e.path for e in entries[: max(len(entries) - keep, 0)]}
    doomed = [e for e in entries if e.path in doomed]
    if not dry_run:
        for e in doomed:
            shutil.rmtree(e.path)
    return doomed


def mark_used(entry: Path) -> None:
    """Refresh an entry's last-used time (a cache hit). A read-only cache (shared, or on a read-only
    mount) stays usable: its entries then keep the time they were written."""
    try:
        (entry / "stats.json").touch()
    except PermissionError:
        return

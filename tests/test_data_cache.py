"""The prepared-corpus cache can be listed and pruned; only cache entries are ever removed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from _scripts import load_script

from moe_emergence.data.cache import cache_entries, mark_used, prune


def _entry(cache: Path, fp: str, days_ago: float, parts=("train", "val", "eval", "tokenizer")) -> Path:
    path = cache / fp
    for part in parts:
        (path / part).mkdir(parents=True)
        (path / part / "data.bin").write_bytes(b"x" * 1000)
    (path / "stats.json").write_text(json.dumps({"fingerprint": fp, "domains": ["code"], "seq_len": 8}))
    t = time.time() - 86400 * days_ago
    os.utime(path / "stats.json", (t, t))
    return path


def _cache(tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    cache = tmp_path / "cache"
    v1 = ("train", "eval", "tokenizer")  # an entry written before the val split: still an entry (prunable)
    entries = [_entry(cache, "aa11", 30, v1), _entry(cache, "bb22", 5), _entry(cache, "cc33", 0.1)]
    foreign = [cache / "notes.txt", cache / "mine", cache / "dd44"]
    foreign[0].write_text("keep")
    (foreign[1] / "train").mkdir(parents=True)  # looks partly like an entry, is not one
    _entry(cache, "dd44", 40)
    (foreign[2] / "extra.txt").write_text("someone else's file inside")  # not exactly an entry: untouched
    return cache, entries, foreign


def test_list_and_prune_remove_only_cache_entries(tmp_path):
    cache, entries, foreign = _cache(tmp_path)
    assert [e.path for e in cache_entries(cache)] == entries  # least recently used first
    assert [e.path for e in prune(cache, older_than_days=10, dry_run=True)] == entries[:1]
    assert all(p.exists() for p in entries)
    assert [e.path for e in prune(cache, older_than_days=10)] == entries[:1]
    assert [e.path for e in prune(cache, keep=1)] == entries[1:2]
    assert [e.path for e in cache_entries(cache)] == entries[2:]
    assert all(p.exists() for p in foreign)
    with pytest.raises(ValueError, match="older_than_days and/or keep"):
        prune(cache)
    with pytest.raises(ValueError, match=">= 0"):
        prune(cache, keep=-1)
    assert cache_entries(tmp_path / "absent") == []


def test_a_cache_hit_marks_the_entry_used(tmp_path):
    cache, entries, _ = _cache(tmp_path)
    mark_used(entries[0])
    assert cache_entries(cache)[-1].path == entries[0]


def test_cli(tmp_path, capsys):
    cli = load_script("data_cache")
    cache, entries, _ = _cache(tmp_path)
    assert cli.main(["list", "--cache-dir", str(cache)]) == 0
    assert "3 entries" in capsys.readouterr().out
    assert cli.main(["prune", "--cache-dir", str(cache)]) == 2
    assert capsys.readouterr().err.startswith(
        "error: data_cache.py prune needs --older-than DAYS and/or --keep N"
    )
    assert cli.main(["prune", "--keep", "2", "--cache-dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and not entries[0].exists()

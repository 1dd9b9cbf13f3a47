"""Small offline corpora for the data tests (ASCII only, so decoded block slices compare exactly)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from moe_emergence.data import DataConfig, SourceConfig

WORDS = ["the", "river", "ran", "past", "a", "quiet", "town", "where", "old", "friends", "met", "boats"]
CODE_PATHS = ["json/*.py", "collections/abc.py", "textwrap.py", "colorsys.py", "bisect.py", "heapq.py"]


def write_prose_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` records whose text starts with a unique marker ``Record NNNN.``."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80)))
            f.write(json.dumps({"title": f"t{i}", "body": f"Record {i:04d}. {body}."}) + "\n")
    return path


def small_config(tmp_path: Path, **overrides) -> DataConfig:
    prose = write_prose_jsonl(tmp_path / "prose.jsonl", 80)
    domains = {
        "code": SourceConfig(type="stdlib", paths=CODE_PATHS, min_chars=100, max_chars=30_000),
        "math": SourceConfig(type="mathgen", num_problems=150),
        "prose": SourceConfig(type="files", paths=[prose.name], text_field="body"),
    }
    kwargs = dict(
        domains=domains,
        seq_len=32,
        seed=0,
        eval_fraction=0.2,
        vocab_size=400,
        cache_dir=str(tmp_path / "cache"),
        root_dir=str(tmp_path),
    )
    kwargs.update(overrides)
    return DataConfig(**kwargs)

"""Documented commands work as written: every command line a user copies from README.md, docs/ (but the
measurement records) and configs/ calls the project's environment (``.venv/bin/...``), since a bare
``python`` is the system's and lacks the packages."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = {"benchmarks.md", "results.md"}  # commands quoted as they were run on the GPU machine
COMMAND = re.compile(
    r"(?:^|`|#   )(?:ACCELERATE_USE_CPU=1 )?(python3?|accelerate|torchrun|jupyter|pytest|wandb(?= login| sync)) "
)


def _documents() -> list[Path]:
    docs = [p for p in (ROOT / "docs").glob("*.md") if p.name not in RECORDS]
    return [ROOT / "README.md", ROOT / "notebooks" / "README.md", *docs, *(ROOT / "configs").rglob("*.yaml")]


def test_documented_commands_call_the_project_environment():
    bare = []
    for path in _documents():
        in_block = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            prose_mention = re.search(
                r"`accelerate launch`|of `accelerate launch|Under `accelerate launch", line
            )
            record = re.search(r"\d{4}-\d{2}-\d{2}|UTC", line)  # a dated measurement quotes what was run
            prose_mention = prose_mention or record
            if (
                (in_block or "`" in line or line.startswith("#"))
                and COMMAND.search(line)
                and not prose_mention
            ):
                bare.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bare, "commands without .venv/bin/:\n" + "\n".join(bare)


def test_readme_main_commands_are_the_documented_ones():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python scripts/train.py\n" in readme
    assert "bash scripts/setup.sh && bash scripts/test.sh\n" in readme

"""The first hour of a new user, exactly as documented, on a fresh clone: README's main-job command and
notebooks/README.md's notebook command, run as written from the clone's root, and what they leave.

The clone gets a stand-in ``.venv`` whose programs run this environment's interpreter on the clone's code
(creating a real virtualenv would download every package again; CI's ``.ci/run`` does that on its own clean
clone before it runs this suite with README's test command)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _documented(path: Path, prefix: str) -> str:
    """The one command line in ``path`` that starts with ``prefix`` (inside a code block)."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith(prefix)]
    assert len(lines) == 1, f"{path}: expected one command starting {prefix!r}, got {lines}"
    return lines[0]


def _stand_in_venv(clone: Path) -> dict[str, str]:
    """``clone/.venv`` with bin/python, bin/jupyter and bin/activate running this interpreter on the clone's
    code, and setup.sh's stamp for the clone's pyproject.toml (its dependencies are installed here)."""
    bin_dir = clone / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    real_bin = Path(sys.executable).parent
    for name, target in (("python", sys.executable), ("jupyter", str(real_bin / "jupyter"))):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nPYTHONPATH="{clone}" exec "{target}" "$@"\n')
        script.chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (clone / ".venv" / f".installed-{digest}").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MOE_"))}
    env["PYTHONPATH"] = str(clone)
    return env


@pytest.mark.timeout(900)
def test_readme_main_job_and_notebook_command_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for path in ROOT.glob("*"):  # uncommitted work of this checkout counts too (the suite tests the tree)
        if path.name in (".git", ".venv", "runs", "reports") or path.name.startswith("."):
            continue
        dest = clone / path.name
        if path.is_dir():
            shutil.copytree(path, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, dest)
    env = _stand_in_venv(clone)
    main_job = _documented(ROOT / "README.md", "bash scripts/setup.sh && .venv/bin/python")
    proc = subprocess.run(main_job, shell=True, cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = clone / "runs" / "quickstart"
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "config.json").is_file()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 300 and any("val/lm_loss" in r for r in records)
    assert "run folder: runs/quickstart (step 300)" in proc.stdout
    assert "final val loss (step 300): " in proc.stdout and (run / "summary.md").is_file()  # closing summary
    assert "scripts/analyze.py runs/quickstart --out reports/quickstart\n" in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    # the same command again: nothing to do, says where the results are
    again = subprocess.run(main_job, shell=True, cwd=clone, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "finished" in again.stdout

    notebook = _documented(ROOT / "notebooks" / "README.md", "MOE_RUN_DIR=")
    out = re.search(r"--output (\S+)", notebook).group(1)
    notebook = notebook.replace(out, str(tmp_path / "spec.ipynb"))  # the documented command, output moved
    proc = subprocess.run(notebook, shell=True, cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = json.loads((tmp_path / "spec.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o["output_type"] == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"]

"""notebooks/specialization.ipynb executes end to end on a tiny run, by the command notebooks/README.md gives
(`jupyter nbconvert --execute` from the repository root, the run as a path relative to it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _analysis_fixtures import tiny_runs

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_executes(tmp_path_factory, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:  # ipykernel (a dev dependency) provides "python3" for the running interpreter
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no 'python3' Jupyter kernel: install the dev extras (pip install -e '.[dev]')")
    runs = tiny_runs(tmp_path_factory)
    env = {
        **os.environ,
        "MOE_RUN_DIR": os.path.relpath(runs["moe"], ROOT),  # relative, as runs/quickstart in the README
        "MOE_REPORT_DIR": str(tmp_path / "report"),
        "MOE_MAX_BLOCKS": "6",
        "MOE_BOOTSTRAP": "30",
        "MOE_ABLATION": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    jupyter = Path(sys.executable).parent / "jupyter"  # the venv's, as `.venv/bin/jupyter` in the README
    out = tmp_path / "spec.ipynb"
    cmd = [str(jupyter), "nbconvert", "--to", "notebook", "--execute", "notebooks/specialization.ipynb"]
    proc = subprocess.run(
        [*cmd, "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8  # loss, training, collapse, 2 heatmaps, NMI, 2 token types, examples
    text = "".join(o.get("text", "") for o in outputs)
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| moe | 0 |" in markdown and "token-id router NMI" in markdown  # the baselines table
    assert "moe: gpt2_moe" in text and "report written to" in text
    streams = [o for o in outputs if o.output_type == "stream"]
    assert not [o for o in streams if o.name == "stderr"], (
        "warnings or progress bars in the executed notebook"
    )
    assert "Warning" not in text and "it/s" not in text
    assert (tmp_path / "report" / "report.md").is_file()

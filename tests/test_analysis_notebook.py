"""notebooks/specialization.ipynb executes end to end on a tiny run (nbclient, kernel "python3")."""

import os
from pathlib import Path

import pytest
from _analysis_fixtures import tiny_runs

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_executes(tmp_path_factory, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:  # ipykernel (a dev dependency) provides "python3" for the running interpreter
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no 'python3' Jupyter kernel: install the dev extras (pip install -e '.[dev]')")
    runs = tiny_runs(tmp_path_factory)
    monkeypatch.setenv("MOE_RUN_DIR", str(runs["moe"]))
    monkeypatch.setenv("MOE_REPORT_DIR", str(tmp_path / "report"))
    monkeypatch.setenv("MOE_MAX_BLOCKS", "6")
    monkeypatch.setenv("MOE_BOOTSTRAP", "30")
    monkeypatch.setenv("MOE_ABLATION", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    nb = nbformat.read(ROOT / "notebooks" / "specialization.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8  # loss, training, collapse, 2 heatmaps, NMI, 2 token types, examples
    text = "".join(o.get("text", "") for o in outputs)
    assert "moe: gpt2_moe" in text and "report written to" in text
    assert (tmp_path / "report" / "report.md").is_file()

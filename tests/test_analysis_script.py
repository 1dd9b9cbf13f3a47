"""scripts/analyze.py on tiny run folders: every file written, sane numbers, clear errors on bad input."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _analysis_fixtures import tiny_runs

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("analyze", ROOT / "scripts" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("report") / "rep"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, str(ROOT / "scripts" / "analyze.py"), str(runs["moe"]), str(runs["dense"])]
    cmd += ["--out", str(out), "--max-blocks", "12", "--bootstrap", "100", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_script_writes_every_file(report):
    out, proc = report
    assert "routing moe" in proc.stderr  # the progress bar
    md = (out / "report.md").read_text()
    images = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    expected = {"loss_by_domain.png", "nmi_per_layer.png", "moe/training_router.png", "moe/collapse.png"}
    for L in (0, 1):
        expected |= {
            f"moe/domain_expert_layer{L}.png",
            f"moe/token_types_layer{L}.png",
            f"moe/ablation_layer{L}.png",
        }
    expected |= {f"moe/example_{d}.png" for d in ("code", "math", "prose")}
    assert expected <= set(images)
    for img in images:
        data = (out / img).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, img
    assert not (out / "dense").exists()  # the dense control has no metrics.jsonl router keys nor routing
    assert "Dense model: loss metrics only" in md
    assert "NMI =" in md and "Largest loss increase" in md and "largest expert share" in md


def test_metrics_json_numbers(report):
    out, _ = report
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_set"]["blocks"] == 12 and m["bootstrap"]["n_boot"] == 100
    moe, dense = m["runs"]["moe"], m["runs"]["dense"]
    assert (
        dense["is_moe"] is False
        and "layers" not in dense
        and set(dense["loss"]) == {"code", "math", "prose", "all"}
    )
    for run in (moe, dense):
        for c in run["loss"].values():
            assert c["ci_low"] <= c["value"] <= c["ci_high"] and 0 < c["value"] < 10
    assert set(moe["layers"]) == {"0", "1"}
    for lm in moe["layers"].values():
        nmi = lm["domain_nmi"]
        assert 0 <= nmi["ci_low"] <= nmi["value"] <= nmi["ci_high"] <= 1
        assert sum(lm["expert_usage"]) == pytest.approx(1.0)
        for row in lm["domain_specialization"]:
            assert sum(row) == pytest.approx(2.0)  # top-2: rows sum to k
        assert lm["uniform_baseline"] == 0.5
        assert 0.5 <= lm["vocab_specialization"]["value"] <= 1
        assert len(lm["coactivation"]) == 4 and len(lm["token_type_fractions"]) == 7
    assert set(moe["cross_layer_nmi"]) == {"0-1"}
    assert set(moe["saturation"]) == {"4", "6", "8"}  # the MoE-phase checkpoints
    assert moe["saturation"]["8"]["1"] == {"same_set": 1.0, "overlap": 1.0}  # the final step
    sat = moe["saturation"]["4"]["0"]
    assert 0 <= sat["same_set"] <= sat["overlap"] <= 1
    assert moe["parent_known"] and len(moe["weights"]["0"]["distance_from_parent"]) == 4
    assert moe["weights"]["0"]["mean_pairwise_cosine_distance"] > 0  # noise-upcycled experts differ
    abl = moe["ablation"]["layers"]["1"]
    assert len(abl) == 4 and set(abl[0]["delta"]) == {"code", "math", "prose"}


def test_errors_are_clear_without_traceback(tmp_path, tiny_runs_paths, capsys):
    main = _script().main
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "not a run folder: no config.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(tiny_runs_paths["dense"], bad)
    (bad / "config.yaml").write_text("model: {}\n")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "no data: block" in capsys.readouterr().err
    cfg = yaml.safe_load((tiny_runs_paths["dense"] / "config.yaml").read_text())
    cfg["data"]["seq_lenn"] = 16
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "seq_lenn" in capsys.readouterr().err
    # an out folder with unrelated files is refused, and the files stay
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main([str(tiny_runs_paths["dense"]), "--out", str(other), "--max-blocks", "3"]) == 2
    assert "not empty" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()
    # runs whose eval blocks differ cannot be compared
    diff = tmp_path / "diff"
    shutil.copytree(tiny_runs_paths["dense"], diff)
    cfg = yaml.safe_load((diff / "config.yaml").read_text())
    cfg["data"]["seq_len"] = 16
    (diff / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert (
        main([str(tiny_runs_paths["dense"]), str(diff), "--out", str(tmp_path / "o2"), "--max-blocks", "3"])
        == 2
    )
    assert "different eval blocks" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # nothing is created for refused input
    # top_k == num_experts: no expert can be removed; refused before any work, unless --no-ablation
    full = tmp_path / "full"
    shutil.copytree(tiny_runs_paths["moe"], full)
    cfg_json = json.loads((full / "final" / "config.json").read_text())
    cfg_json["moe"]["top_k"] = cfg_json["moe"]["num_experts"]
    (full / "final" / "config.json").write_text(json.dumps(cfg_json))
    assert main([str(full), "--out", str(tmp_path / "o3"), "--max-blocks", "3"]) == 2
    assert "--no-ablation" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_missing_folder_subprocess_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "analyze.py"),
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


@pytest.fixture
def tiny_runs_paths(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


def test_losses_match_the_trainers_eval(tiny_runs_paths):
    # on all eval blocks, the analysis' per-domain loss equals the trainer's final eval/loss_{domain}
    from moe_emergence.analysis import collect_routing, load_eval_set, load_model, load_run, load_tokenizer
    from moe_emergence.analysis.summarize import loss_by_domain

    run = load_run(tiny_runs_paths["moe"])
    ev = load_eval_set(run, max_blocks=None)
    r = collect_routing(load_model(run.final_dir), ev, load_tokenizer(run), batch_size=32, progress=False)
    loss = loss_by_domain(r, n_boot=0, seed=0)
    last = [rec for rec in run.metrics if "eval/loss_code" in rec][-1]
    assert last["step"] == 8
    for d in r.domains:
        assert loss[d]["value"] == pytest.approx(last[f"eval/loss_{d}"], rel=1e-5)
    assert loss["all"]["value"] == pytest.approx(last["eval/lm_loss"], rel=1e-5)

"""scripts/analyze.py on tiny run folders: every file written, sane numbers, clear errors on bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _analysis_fixtures import tiny_runs
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("analyze")


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
    cmd += [
        "--out",
        str(out),
        "--max-blocks",
        "12",
        "--bootstrap",
        "100",
        "--permutations",
        "50",
        "--seed",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_script_writes_every_file(report):
    out, proc = report
    assert "routing moe" in proc.stderr  # the progress bar
    for stage in ("routing", "routing at step 0", "routing statistics", "saturation", "expert ablation"):
        assert f"analyze: moe: {stage}" in proc.stderr  # one timing line per stage
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
    assert "Baselines: shuffled domains" in md and "I(domain; expert | token id)" in md
    assert "All 2 choices per token: NMI" in md and "the step-0 router gave" in md
    table = [line for line in md.splitlines() if line.startswith(("| moe | 0 |", "| moe | 1 |"))]
    assert len(table) == 2 and all(line.count("|") == 13 for line in table)  # one row per layer, 12 cells


def test_metrics_json_numbers(report):
    out, _ = report
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_set"]["blocks"] == 12 and m["bootstrap"]["n_boot"] == 100
    assert m["experts_backend"] == "eager"  # the reference, whatever backend the run trained with
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
    assert m["permutation"]["n_perm"] == 50 and m["permutation"]["seed"] == 1
    assert moe["step0_known"] is True  # the dense-phase checkpoint at the upcycle step is the parent
    for lm in moe["layers"].values():
        nmi = lm["domain_nmi"]
        assert 0 <= nmi["ci_low"] <= nmi["value"] <= nmi["ci_high"] <= 1
        assert "domain_mi" not in lm and lm["domain_mi_nats"]["value"] >= 0
        for key in ("domain_nmi_sqrt", "domain_nmi_arith", "domain_nmi_topk", "token_identity_nmi"):
            assert 0 <= lm[key]["ci_low"] <= lm[key]["value"] <= lm[key]["ci_high"] <= 1, key
        null = lm["null_permutation"]
        assert null["n_perm"] == 50 and null["domain_nmi"]["observed"] == nmi["value"]
        assert 1 / 51 <= null["domain_nmi"]["p_value"] <= 1
        # mean <= p95 is not guaranteed (and equal shuffles differ by rounding): both are NMIs
        assert 0 <= null["domain_nmi"]["mean"] <= 1 and 0 <= null["domain_nmi"]["p95"] <= 1
        cmi = lm["domain_cmi_given_token"]
        assert 0 <= cmi["value"] <= cmi["h_domain_given_token"] and 0 < cmi["token_frac"] <= 1
        s0 = lm["step0"]
        for suffix in ("", "_topk"):
            change = s0[f"change_domain_nmi{suffix}"]["value"]
            assert change == pytest.approx(
                lm[f"domain_nmi{suffix}"]["value"] - s0[f"domain_nmi{suffix}"]["value"]
            )
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-1"], "--seed -1: an integer >= 0"),
        (["--bootstrap", "-5"], "--bootstrap -5: an integer >= 0"),
        (["--permutations", "-1"], "--permutations -1: an integer >= 0"),
        (["--batch-size", "0"], "--batch-size 0: an integer >= 1"),
        (["--device", "nonsense"], "--device 'nonsense': cpu, cuda or cuda:N"),
        (["--backend", "fast"], "--backend 'fast': one of auto, eager, grouped_mm, triton"),
        (["--backend", "triton"], "--backend 'triton' cannot run on cpu ("),
    ],
)
def test_bad_flags_are_one_error_line_naming_the_flag(tmp_path, tiny_runs_paths, capsys, flags, message):
    out = tmp_path / "o"
    assert _script().main([str(tiny_runs_paths["dense"]), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and not out.exists()


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
    # and names them as the trainer did: one fingerprint of the blocks (training.evalset.blocks_fingerprint)
    assert ev.fingerprint == last["eval/blocks_fingerprint"]
    for d in r.domains:
        assert loss[d]["value"] == pytest.approx(last[f"eval/loss_{d}"], rel=1e-5)
    assert loss["all"]["value"] == pytest.approx(last["eval/lm_loss"], rel=1e-5)


def test_step0_model_reproduces_the_trainers_step0_routing(tiny_runs_paths, tmp_path):
    # a run upcycled at step 0 from a local dense folder evaluates its step-0 model on every eval block;
    # re-upcycling the parent with the final model's MoEConfig must give exactly that routing
    from _analysis_fixtures import TINY

    from moe_emergence.analysis import collect_routing, load_eval_set, load_model, load_run, load_tokenizer
    from moe_emergence.analysis.metrics import expert_usage, joint_counts, normalized_mutual_information
    from moe_emergence.analysis.report import find_parent, step0_model
    from moe_emergence.training.config import config_from_dict
    from moe_emergence.training.trainer import train

    cache = tiny_runs_paths["moe"].parent / "cache"
    overrides = [f"output_dir={tmp_path}", f"data.cache_dir={cache}", "log.run_name=s0", "train.steps=2"]
    overrides += [
        f"model.base={tiny_runs_paths['dense'] / 'final'}",
        "model.upcycle_at_step=0",
        "checkpoint.every=0",
        "eval.split=eval",  # the step-0 eval on the eval split, the split the analysis reads
        "eval.final_split=null",
    ]
    overrides += ["optim.lr=3e-2", "optim.router_lr=3e-1"]  # let the router move in 2 steps
    train(config_from_dict(TINY, overrides))
    run = load_run(tmp_path / "s0")
    model = load_model(run.final_dir)
    parent = find_parent(run, "cpu")
    assert parent is not None
    ev = load_eval_set(run, max_blocks=None)
    r0 = collect_routing(step0_model(model, parent), ev, load_tokenizer(run), batch_size=32, progress=False)
    rec = next(r for r in run.metrics if r["step"] == 0 and "eval_router/layer0/domain_nmi" in r)
    M, E = len(r0.domains), r0.num_experts
    for L in r0.layers:
        nmi = normalized_mutual_information(joint_counts(r0.domain, r0.topk[L][:, 0], M, E))
        assert nmi == pytest.approx(rec[f"eval_router/layer{L}/domain_nmi"], rel=1e-6, abs=1e-9)
        usage = expert_usage(r0.topk[L], E)
        assert usage == pytest.approx(
            [rec[f"eval_router/layer{L}/expert{e}_frac"] for e in range(E)], abs=1e-9
        )
    final_w = model.moe_layers()[0].router.weight.detach()
    assert not torch.equal(final_w, step0_model(model, parent).moe_layers()[0].router.weight.detach())


def test_a_bug_keeps_its_traceback(tmp_path, tiny_runs_paths, monkeypatch):
    """Only user mistakes (``ConfigError``) become one error line; any other ``ValueError`` is a bug and
    propagates (it used to be reported as a user error, exit 2)."""
    import moe_emergence.analysis as analysis

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(analysis, "analyze_runs", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        _script().main([str(tiny_runs_paths["dense"]), "--out", str(tmp_path / "o")])


def test_load_model_runs_the_experts_through_the_backend_asked(tiny_runs_paths):
    from moe_emergence.analysis import load_model, load_run
    from moe_emergence.analysis.runs import list_checkpoints, load_checkpoint_model

    run = load_run(tiny_runs_paths["moe"])
    saved = load_model(run.final_dir).config.moe.backend
    other = "grouped_mm" if saved != "grouped_mm" else "triton"
    step, folder, _ = list_checkpoints(run)[-1]
    for model in (
        load_model(run.final_dir, backend=other),
        load_checkpoint_model(run, folder, backend=other),
    ):
        assert model.config.moe.backend == other
        assert {layer.experts.backend for layer in model.moe_layers().values()} == {other}
    assert load_model(run.final_dir).config.moe.backend == saved  # None keeps the saved config's


def test_a_failure_while_writing_leaves_the_earlier_report_as_it_was(tmp_path, tiny_runs_paths, monkeypatch):
    from moe_emergence.analysis import report

    out = tmp_path / "rep"
    kw = dict(max_blocks=6, n_boot=0, n_perm=0, ablation=False, saturation=False, progress=False)
    _, analyses = report.analyze_runs([tiny_runs_paths["moe"]], out, **kw)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "report.md" in before and all(Path(f).is_file() for f in analyses[0].figures.values())
    assert all(Path(f).parent.is_relative_to(out) for f in analyses[0].figures.values())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_report", broken)  # after the figures and metrics.json are written
    with pytest.raises(RuntimeError, match="disk full"):
        report.analyze_runs([tiny_runs_paths["moe"]], out, seed=3, **kw)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no staging folder left
    with pytest.raises(RuntimeError, match="disk full"):
        report.analyze_runs([tiny_runs_paths["moe"]], tmp_path / "new", **kw)
    assert not (tmp_path / "new").exists()


def test_an_out_folder_under_a_file_is_refused_before_any_work(tmp_path, tiny_runs_paths, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    assert _script().main([str(tiny_runs_paths["dense"]), "--out", str(afile / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, so no folder can be made under it" in err
    assert afile.read_text() == "mine\n"

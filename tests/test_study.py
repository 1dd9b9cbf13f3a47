"""The study's arms (configs/study/), scripts/study.sh's seed lists and plan (dry run: no training), and
scripts/study_report.py's tables on made-up run records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_script

from moe_emergence.config_loader import read_yaml
from moe_emergence.training.rundir import config_differences

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "study"


@pytest.mark.parametrize(
    ("arm", "changed"),
    [
        ("no-lb", {"model.moe.lb_coef"}),
        ("no-noise", {"model.moe.noise_std"}),
        ("no-balance", {"model.moe.lb_coef", "model.moe.noise_std"}),
    ],
)
def test_balance_arms_differ_from_the_main_run_only_in_their_factor(arm, changed):
    main, cfg = read_yaml(STUDY / "moe-top1.yaml"), read_yaml(STUDY / f"{arm}.yaml")
    assert set(config_differences(main, cfg)) == changed | {"log.run_name"}
    assert cfg["log"]["run_name"] == f"study-{arm}"
    for key in changed:
        assert cfg["model"]["moe"][key.rsplit(".", 1)[1]] == 0.0
    assert main["model"]["moe"]["lb_coef"] > 0 and main["model"]["moe"]["noise_std"] > 0


def _study_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python with yaml, as in .venv
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "study.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path, "STUDY_DRY_RUN": "1", **env},
        timeout=120,
    )


def test_study_sh_runs_every_seed_of_a_seed_list():
    proc = _study_sh("runs", "0-5", "moe-top1", "dense")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 12
    for s in range(6):
        assert any(
            f"moe-top1.yaml train.seed={s} model.moe.seed={s} log.run_name=study-moe-top1-s{s}" in x
            for x in lines
        )
        assert any(f"dense.yaml train.seed={s} log.run_name=study-dense-s{s}" in x for x in lines)
    assert not any("dense.yaml" in x and "model.moe.seed" in x for x in lines)  # no MoE in the dense control
    proc = _study_sh("runs", "1,4", "no-lb")
    assert [x.split("log.run_name=")[1].split()[0] for x in proc.stdout.splitlines()] == [
        "study-no-lb-s1",
        "study-no-lb-s4",
    ]


def test_study_sh_plan_has_the_documented_seed_counts():
    proc = _study_sh("plan")
    assert proc.returncode == 0, proc.stderr
    specs = [x.split(":") for x in proc.stdout.split()]
    counts = {c: sum(1 for _, cc in specs if cc == c) for _, c in specs}
    assert counts == {
        "moe-top1": 6,
        "dense": 6,
        "no-balance": 3,
        "no-lb": 3,
        "no-noise": 3,
        "moe-top2": 3,
        "drop-init": 3,
    }
    assert sorted(int(s) for s, c in specs if c == "dense") == list(range(6))
    smaller = _study_sh("plan", STUDY_SEEDS_MAIN="5", STUDY_SEEDS_OTHER="2").stdout.split()
    assert smaller.count("4:moe-top1") == 1 and "5:moe-top1" not in smaller and "2:no-lb" not in smaller


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("runs", "3-1", "dense"), "seed range '3-1' is empty"),
        (("runs", "x", "dense"), "SEEDS is one seed"),
        (("runs", "0", "dense", "nope"), "no study arm 'nope'"),
        (("runs", "0", "parent"), "no study arm 'parent'"),  # a config, not an arm
        (("runs", "0", "../study/dense"), "no study arm '../study/dense'"),
        (("runs",), "runs needs SEEDS"),
        (("name", "x", "dense"), "seed 'x' is not a whole number from 0 to 999999999"),
        (("name", "1234567890", "dense"), "seed '1234567890' is not a whole number"),
        (("runs", "0-100000", "dense"), "seed range '0-100000' has more than 1000 seeds"),
        (("runs", "12345678901", "dense"), "of seeds 0 to 999999999 (no leading zeros)"),
        (("runs", "00", "dense"), "(no leading zeros)"),
        (("name", "", "dense"), "name needs SEED and CONFIG"),
        (("fly",), "unknown step 'fly'"),
    ],
)
def test_study_sh_bad_input_is_one_error_line(args, message):
    proc = _study_sh(*args)
    assert proc.returncode == 2 and proc.stdout == ""  # nothing started, not even the valid configs
    assert (
        proc.stderr.count("\n") == 1
        and proc.stderr.startswith("study.sh: error: ")
        and message in proc.stderr
    )


# ----------------------------------------------------------------------------- study_report.py


def _report_module():
    return load_script("study_report")


def _layer(nmi: float, change: float | None) -> dict:
    ci = {"ci_low": nmi - 0.01, "ci_high": nmi + 0.01, "n_boot": 10}
    out = {
        "domain_nmi": {"value": nmi, **ci},
        "domain_nmi_topk": {"value": nmi / 2, **ci},
        "null_permutation": {"domain_nmi": {"mean": 0.001, "p95": 0.002, "p_value": 0.001}},
        "token_identity_nmi": {"value": 0.01, **ci},
        "domain_cmi_given_token": {"excess_over_null": nmi / 4},
        "step0": None,
        "token_type_nmi": {"value": nmi / 3, **ci},
        "token_type_fractions": [[1.0, 0.0], [0.5, 0.5]],
        "domain_expert_fractions": [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
        "max_frac": 0.5,
    }
    if change is not None:
        out["step0"] = {
            "change_domain_nmi": {"value": change},
            "change_domain_nmi_topk": {"value": change / 2},
        }
    return out


def _fake_study(
    tmp_path: Path, losses: dict[str, list[float]], nmi: dict[str, list[float]]
) -> tuple[Path, Path]:
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for config, values in losses.items():
        for seed, loss in enumerate(values):
            name = f"study-{config}-s{seed}"
            (runs / name).mkdir(parents=True)
            rec = {  # the trainer's final eval of its own blocks: 1 nat above the analysis' (tables use that)
                "step": 1000,
                "eval/lm_loss": loss + 1,
                **{f"eval/loss_{d}": loss + 1 for d in ("code", "math", "prose")},
                "eval/blocks_fingerprint": "00000000000000aa",
            }
            (runs / name / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
            layers = {} if config == "dense" else {"3": _layer(nmi[config][seed], nmi[config][seed] - 0.05)}
            loss_ci = {"value": loss, "ci_low": loss - 0.1, "ci_high": loss + 0.1, "n_boot": 10}
            analysis = {"layers": layers, "loss": {d: loss_ci for d in ("code", "math", "prose", "all")},
                        "token_types": ["name", "other"]}  # fmt: skip
            eval_set = {"fingerprint": "00000000000000bb", "blocks": 12, "max_blocks": None}
            (reports / name).mkdir(parents=True)
            (reports / name / "metrics.json").write_text(
                json.dumps({"eval_set": eval_set, "runs": {name: analysis}})
            )
    return runs, reports


def test_study_report_tables_carry_sign_flip_p_values_and_baselines(tmp_path):
    sr = _report_module()
    assert {"no-lb", "no-noise"} <= set(sr.ORDER)
    losses = {
        "dense": [3.80, 3.81, 3.79, 3.80, 3.82, 3.78],
        "moe-top1": [3.78, 3.80, 3.77, 3.79, 3.80, 3.76],  # lower than dense in every seed
        "no-lb": [3.81, 3.80, 3.79],
    }
    nmi = {"moe-top1": [0.20, 0.25, 0.22, 0.30, 0.21, 0.24], "no-lb": [0.01, 0.02, 0.01]}
    runs = sr.load(*_fake_study(tmp_path, losses, nmi))
    groups = sr.by_config(runs)
    assert list(groups) == ["dense", "moe-top1", "no-lb"] and len(groups["moe-top1"]) == 6
    paired = sr.paired_table(runs, groups).splitlines()
    main = next(x for x in paired if x.startswith("| moe-top1 | 6 |"))
    assert main.count("p=0.031") == 5  # all 6 paired differences negative: 2 / 2^6 in every column
    # the loss tables read analyze.py's test loss (all blocks), not the trainer's 1-nat-higher final eval
    dense = next(x for x in sr.loss_table(runs, groups).splitlines() if x.startswith("| dense | 6 |"))
    assert "| 3.800 [" in dense and "4.8" not in dense
    no_lb = next(x for x in paired if x.startswith("| no-lb | 3 |"))
    assert "p=" in no_lb
    table = sr.baseline_seed_table(runs, groups).splitlines()
    assert table[0].count("|") == len(sr.BASELINE_COLUMNS) + 4
    main = next(x for x in table if x.startswith("| moe-top1 | 6 | 3 |"))
    cells = [c.strip() for c in main.strip("|").split("|")]
    assert cells[3].startswith("0.237 [")  # mean NMI of the six seeds
    assert cells[5].endswith("p=0.031")  # change from step 0: +0.187 in every seed
    assert "n/a" not in main and "dense" not in "\n".join(table)
    norm = sr.normalisation_table(runs, groups).splitlines()
    assert norm[2].startswith("| moe-top1 | 6 | 3 |") and norm[2].count("n/a") == 3  # the fakes: NMI only
    assert "| 0.237 |" in norm[2]


def test_study_report_tolerates_reports_without_the_new_keys(tmp_path):
    sr = _report_module()
    runs = sr.load(*_fake_study(tmp_path, {"moe-top1": [3.7, 3.8]}, {"moe-top1": [0.2, 0.3]}))
    for r in runs.values():
        lm = r["analysis"]["layers"]["3"]
        for key in (
            "domain_nmi_topk",
            "null_permutation",
            "token_identity_nmi",
            "domain_cmi_given_token",
            "step0",
        ):
            del lm[key]
    row = sr.baseline_seed_table(runs, sr.by_config(runs)).splitlines()[2]
    assert row.startswith("| moe-top1 | 2 | 3 | 0.250 [") and row.count("n/a") == len(sr.BASELINE_COLUMNS) - 1


def test_study_report_refuses_a_half_analysed_study_in_one_line(tmp_path, capsys):
    sr = _report_module()
    losses = {"dense": [3.8, 3.8], "moe-top1": [3.7, 3.7], "no-balance": [3.8, 3.8]}
    nmi = {"moe-top1": [0.2, 0.3], "no-balance": [0.0, 0.0]}
    runs, reports = _fake_study(tmp_path, losses, nmi)
    out = tmp_path / "docs"
    (reports / "study-moe-top1-s1" / "metrics.json").unlink()  # one analysis did not finish
    argv = ["--runs", str(runs), "--reports", str(reports), "--out", str(out)]
    assert sr.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --reports") and "study-moe-top1-s1" in err
    assert not out.exists()
    for name in ("study-no-balance-s0", "study-no-balance-s1"):
        shutil.rmtree(runs / name)
    s0 = json.loads((reports / "study-moe-top1-s0" / "metrics.json").read_text())
    s0["runs"] = {"study-moe-top1-s1": s0["runs"]["study-moe-top1-s0"]}
    (reports / "study-moe-top1-s1" / "metrics.json").write_text(json.dumps(s0))
    assert sr.main(argv) == 2
    assert "no runs of no-balance" in capsys.readouterr().err and not out.exists()
    s0["eval_set"]["fingerprint"] = "00000000000000cc"  # an analysis of other blocks: losses not comparable
    (reports / "study-moe-top1-s1" / "metrics.json").write_text(json.dumps(s0))
    assert sr.main(argv) == 2
    err = capsys.readouterr().err
    assert "read different eval blocks" in err and "00000000000000cc" in err and not out.exists()
    assert sr.main(["--runs", str(tmp_path / "nope"), "--reports", str(reports)]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("var", ["STUDY_SEEDS_MAIN", "STUDY_SEEDS_OTHER"])
@pytest.mark.parametrize("value", ["x", "0", "-2", "1000", "99999999999999999999"])
def test_study_sh_plan_refuses_a_seed_count_out_of_range(var, value):
    proc = _study_sh("plan", **{var: value})
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr
        == f"study.sh: error: {var} '{value}' is not a whole number from 1 to 999 (seeds per arm)\n"
    )


def test_study_report_names_a_broken_input_file_in_one_line(tmp_path, capsys):
    sr = _report_module()
    losses = {"dense": [3.8], "moe-top1": [3.7], "no-balance": [3.8]}
    runs, reports = _fake_study(tmp_path, losses, {"moe-top1": [0.2], "no-balance": [0.0]})
    out = tmp_path / "docs"
    argv = ["--runs", str(runs), "--reports", str(reports), "--out", str(out)]
    walls = tmp_path / "driver.log"
    walls.write_text("study-dense-s0: rc 0, 12 s wall\n")
    (out / "study" / "trajectories").mkdir(parents=True)  # an earlier report, which a refusal leaves alone
    (out / "study" / "tables.md").write_text("earlier tables\n")
    (out / "study" / "trajectories" / "study-moe-top1-s0.json").write_text("[]")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def refused(extra: list[str], message: str) -> None:
        assert sr.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten

    refused(["--walls", str(tmp_path / "nope.log")], "--walls")
    jsonl = runs / "study-moe-top1-s0" / "metrics.jsonl"
    good = jsonl.read_text()
    jsonl.write_text(good + '{"step": 1001, "train/lo')
    refused([], "study-moe-top1-s0/metrics.jsonl, line 2: not a JSON record")
    jsonl.write_text('{"step": 500, "train/loss": 3.9}\n')
    refused([], "study-moe-top1-s0 has no final eval record")
    jsonl.write_text(good)
    report = reports / "study-moe-top1-s0" / "metrics.json"
    good_report = report.read_text()
    full = json.loads(good_report)
    report.write_text(json.dumps({**full, "runs": {"study-moe-top1-s9": {"layers": {}}}}))
    refused([], "holds no analysis of run 'study-moe-top1-s0'")
    report.write_text(json.dumps({"runs": full["runs"]}))
    refused([], "metrics.json: no eval_set with fingerprint and blocks")
    section = full["runs"]["study-moe-top1-s0"]
    section["loss"]["math"]["value"] = "x"
    report.write_text(json.dumps(full))
    refused([], "'study-moe-top1-s0' has no finite loss of 'math'")
    section["loss"]["math"]["value"] = 3.7
    section["layers"] = {"3": {"domain_nmi": {}}}
    report.write_text(json.dumps(full))
    refused([], "layer 3 of 'study-moe-top1-s0' has no token_type_nmi")
    report.write_text("[1, 2]")
    refused([], "not an analyze.py metrics.json (no 'runs' object)")
    report.write_text("{")
    refused([], "metrics.json: not JSON")
    report.unlink()
    jsonl.write_text(good.replace('"eval/lm_loss": 4.7', '"eval/lm_loss": "a"'))
    refused([], "eval/lm_loss is 'a', not a finite number")
    assert sr.main(["--runs", str(runs), "--reports", str(reports), "--out", str(walls)]) == 2
    assert "--out" in capsys.readouterr().err
    report.write_text(good_report)
    full = json.loads(good_report)
    jsonl.write_text(good.replace('"eval/lm_loss": 4.7', '"eval/lm_loss": NaN'))
    refused([], "eval/lm_loss is nan, not a finite number")
    jsonl.write_bytes(b"\xff\xfe\x00")
    refused([], "metrics.jsonl: cannot be read as a UTF-8 text file")
    jsonl.write_text(good)
    twin = runs / "study-moe-top1-s00"  # seed 0 again (a leading zero): would replace s0 in every table
    shutil.copytree(runs / "study-moe-top1-s0", twin)
    refused([], "its seed has a leading zero")
    shutil.rmtree(twin)
    (runs / "study-dense-s3").mkdir()  # a run folder without records: not silently left out
    refused([], "study-dense-s3' has no metrics.jsonl")
    (runs / "study-dense-s3").rmdir()
    (runs / "study-micro-s0").mkdir()  # micro runs only with DDP: no table has it
    refused([], "arm 'micro', not one of")
    (runs / "study-micro-s0").rmdir()
    (out / "figures").write_text("a file where the figures go")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused([], "is a file; the report writes a folder there")
    (out / "figures").unlink()
    (out / "study" / "metrics" / "study-moe-top1-s0.json").mkdir(parents=True)  # a folder where a file goes
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused([], "study-moe-top1-s0.json' is in the way of")
    (out / "study" / "metrics" / "study-moe-top1-s0.json").rmdir()
    (runs / "study-moe-top1-s7").mkdir()  # seed 7 has no dense partner: the paired table would drop it
    shutil.copy(runs / "study-moe-top1-s0" / "metrics.jsonl", runs / "study-moe-top1-s7")
    shutil.copytree(reports / "study-moe-top1-s0", reports / "study-moe-top1-s7")
    r7 = reports / "study-moe-top1-s7" / "metrics.json"
    r7.write_text(r7.read_text().replace("study-moe-top1-s0", "study-moe-top1-s7"))
    refused([], "seed 7 of moe-top1 has no dense run of the same seed")
    layer = full["runs"]["study-moe-top1-s0"]["layers"]["3"]
    layer["token_identity_nmi"] = {"value": float("nan")}  # NaN in a baseline: refused, not a nan cell
    report.write_text(json.dumps(full))
    refused([], "token-id router NMI is nan, not a finite number")
    report.write_text(good_report)
    full = json.loads(good_report)
    shutil.rmtree(runs / "study-moe-top1-s7")
    shutil.rmtree(reports / "study-moe-top1-s7")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    nmi_layer = full["runs"]["study-moe-top1-s0"]["layers"]["3"]
    nmi_layer["domain_nmi"] = {**nmi_layer["domain_nmi"], "ci_low": None, "ci_high": None}  # NaN CI: null
    report.write_text(json.dumps(full))
    assert sr.main(argv) == 0  # a layer without a CI is drawn without error bars
    assert not list(out.glob(".study_report.*"))  # the staging folder is gone

"""wandb without the network: metric definitions on a tiny offline run, the dashboard's panels against the
keys that run really logged, the saved view built offline, and scripts/wandb_dashboard.py's errors."""

from __future__ import annotations

import itertools
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _analysis_fixtures import TINY

from moe_emergence.errors import run_cli
from moe_emergence.telemetry import names as keys
from moe_emergence.telemetry import read_metrics
from moe_emergence.telemetry.dashboard import as_data, dashboard_sections, panel_keys, workspace
from moe_emergence.training.tracking import metric_definitions

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "wandb_dashboard.py"
LAYERS, EXPERTS, DOMAINS = (0, 1), 4, ("code", "math", "prose")
HEATMAPS = {
    keys.layer_key(r, i, keys.DOMAIN_EXPERT) for r in (keys.VAL_ROUTER, keys.EVAL_ROUTER) for i in LAYERS
}

# The tiny run in a child process (wandb is kept out of pytest's process), with every define_metric call
# of the real wandb Run recorded.
CHILD = """
import json, sys
import wandb.sdk.wandb_run as wandb_run
calls, define = [], wandb_run.Run.define_metric
def spy(self, name, *args, **kw):
    calls.append([name, kw.get("summary")])
    return define(self, name, *args, **kw)
wandb_run.Run.define_metric = spy
from moe_emergence.training.config import config_from_dict
from moe_emergence.training.trainer import train
train(config_from_dict(json.loads(sys.argv[1]), sys.argv[3:]))
open(sys.argv[2], "w").write(json.dumps(calls))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", **extra}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A tiny MoE run (upcycled at step 2, 2 MoE layers x 4 experts) logging to wandb offline."""
    root = tmp_path_factory.mktemp("wandb_offline")
    calls = root / "calls.json"
    overrides = [f"output_dir={root}", "log.run_name=tiny", f"data.cache_dir={root / 'cache'}"]
    overrides += ["log.wandb=offline", "train.steps=4", "eval.every=2", "eval.max_blocks=16"]
    overrides += ["checkpoint.every=4", "model.moe.top_k=1"]
    cmd = [sys.executable, "-c", CHILD, json.dumps(TINY), str(calls), *overrides]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "tiny"
    logged = {k for r in read_metrics(run_dir / "metrics.jsonl") for k in r} - {"step"}
    return SimpleNamespace(run_dir=run_dir, calls=json.loads(calls.read_text()), logged=logged)


def _summary_of(key: str, definitions: list[tuple[str, str]]) -> str:
    """The summary wandb gives ``key``: its exact definition, else the one glob that matches it."""
    exact = {n: s for n, s in definitions if not n.endswith("*")}
    if key in exact:
        return exact[key]
    matching = [s for n, s in definitions if n.endswith("*") and key.startswith(n[:-1])]
    assert len(matching) == 1, (key, matching)  # globs that overlap give wandb an unpredictable summary
    return matching[0]


def test_define_metric_covers_every_logged_key(offline_run):
    definitions = metric_definitions()
    assert [tuple(c) for c in offline_run.calls] == definitions  # called once each, on the real run
    globs = [n[:-1] for n, _ in definitions if n.endswith("*")]
    assert not [(a, b) for a, b in itertools.permutations(globs, 2) if a.startswith(b)]
    summaries = {k: _summary_of(k, definitions) for k in offline_run.logged | HEATMAPS}
    assert summaries["train/loss"] == summaries["eval/loss_math"] == summaries["eval/lm_loss"] == "min,last"
    assert summaries["val/loss_math"] == summaries["val/ppl_code"] == summaries["val/lm_loss"] == "min,last"
    assert summaries["val/blocks_fingerprint"] == summaries["eval/blocks_fingerprint"] == "last"
    assert summaries["router/layer1/expert3_frac"] == summaries["eval_router/layer0/domain_nmi"] == "last"
    assert summaries["train/lr"] == "last" and summaries["perf/tokens_per_sec"] == "mean,last"
    assert (offline_run.run_dir / "wandb").is_dir()


def test_dashboard_panels_show_only_logged_keys(offline_run):
    files = next((offline_run.run_dir / "wandb").glob("offline-run-*")) / "files" / "media" / "images"
    for key in HEATMAPS:  # images are not in metrics.jsonl: they are files of the offline run
        assert list(files.glob(f"{key}_*.png")), key
    sections = dashboard_sections(offline_run.logged)
    assert panel_keys(sections) - offline_run.logged == HEATMAPS
    panels = {p.title: p for s in sections for p in s.panels}
    for i in LAYERS:
        share = panels[f"layer {i}: share of routing assignments"]
        assert share.kind == "stacked" and share.keys == tuple(
            keys.layer_key(keys.ROUTER, i, keys.expert_frac(e)) for e in range(EXPERTS)
        )
        for split in ("val", "eval"):  # the periodic eval (val) and eval.final_split (eval, the test split)
            assert panels[f"layer {i}: P(expert | domain), {split}"].kind == "media"
    for split, (prefix, router) in keys.SPLIT_PREFIXES.items():
        nmi = panels[f"domain NMI, {split}"].keys
        assert nmi == tuple(keys.layer_key(router, i, "domain_nmi") for i in LAYERS)
        assert panels[f"{split} LM loss by domain"].keys == tuple(
            keys.domain_loss(d, prefix) for d in DOMAINS
        )
    assert panels["LM loss: train, val and eval (nats/token)"].keys == (
        keys.TRAIN_LM_LOSS,
        keys.VAL_LM_LOSS,
        keys.EVAL_LM_LOSS,
    )
    assert [s.name for s in sections][:2] == ["Loss", "Expert share per layer (train)"]


def test_dense_and_variant_runs_get_their_own_panels():
    dense = {keys.TRAIN_LOSS, keys.TRAIN_LM_LOSS, keys.TRAIN_LR, keys.EVAL_LM_LOSS, keys.domain_loss("code")}
    assert [s.name for s in dashboard_sections(dense)] == ["Loss", "Optimisation"]
    layer = {keys.layer_key(keys.ROUTER, 3, n) for n in ("dropped_frac", keys.expert_frac(0), "entropy")}
    layer.add(keys.layer_key(keys.ROUTER, 3, keys.selection_bias(0)))
    titles = {p.title: p.keys for s in dashboard_sections(dense | layer) for p in s.panels}
    assert titles["dropped assignments (capacity)"] == (keys.layer_key(keys.ROUTER, 3, "dropped_frac"),)
    assert titles["layer 3: selection bias"] == (keys.layer_key(keys.ROUTER, 3, keys.selection_bias(0)),)
    assert "tokens no expert took (expert choice)" not in titles  # not logged: no panel


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb_workspaces uses pydantic V1 validators
def test_workspace_is_built_offline(offline_run):
    pytest.importorskip("wandb_workspaces")
    sections = dashboard_sections(offline_run.logged)
    view = workspace(sections, "someone", "moe-emergence", "MoE routing")
    assert [s.name for s in view.sections] == [s.name for s in sections]
    assert view.settings.group_by_prefix == "last" and view.auto_generate_panels is False
    # what save() would send, built without the network
    spec = view._to_model().spec.model_dump(by_alias=True, exclude_none=True)
    wire = [p for s in spec["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    stacked = [p["config"] for p in wire if p["config"].get("plotType") == "stacked-area"]
    assert len(stacked) == len(LAYERS) and all(c["limit"] == 1 and c["yAxisMax"] == 1.0 for c in stacked)
    media = {k for p in wire if p["viewType"] == "Media Browser" for k in p["config"]["mediaKeys"]}
    assert media == HEATMAPS
    lines = {k for p in wire if p["viewType"] == "Run History Line Plot" for k in p["config"]["metrics"]}
    assert lines == panel_keys(sections) - HEATMAPS <= offline_run.logged


def test_script_prints_the_panels_without_wandb(offline_run):
    code = (
        "import runpy, sys, json\n"
        f"main = runpy.run_path({str(SCRIPT)!r}, run_name='x')['main']\n"
        f"assert main([{str(offline_run.run_dir)!r}, '--print']) == 0\n"
        "assert not [m for m in ('wandb', 'wandb_workspaces') if m in sys.modules]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(as_data(dashboard_sections(offline_run.logged))))


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_script_errors_are_one_line(offline_run, tmp_path):
    run = [sys.executable, str(SCRIPT)]
    err = _one_error_line(subprocess.run([*run, str(tmp_path)], env=_env(), capture_output=True, text=True))
    assert "has no metrics.jsonl" in err
    # no API key (and no network here): one line, whether or not wandb-workspaces is installed
    env = _env(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), WANDB_CONFIG_DIR=str(tmp_path))
    proc = subprocess.run(
        [*run, str(offline_run.run_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert "API key" in _one_error_line(proc) or "wandb-workspaces" in proc.stderr


def test_script_without_the_network_is_one_line(offline_run, monkeypatch, capsys):
    import types

    import wandb

    def refused(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setattr(wandb, "Api", refused)
    monkeypatch.setitem(
        sys.modules, "wandb_workspaces", sys.modules.get("wandb_workspaces", types.ModuleType("x"))
    )
    main = runpy.run_path(str(SCRIPT), run_name="x")["main"]
    assert run_cli(main, [str(offline_run.run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot save the dashboard") and "unreachable" in err[0]

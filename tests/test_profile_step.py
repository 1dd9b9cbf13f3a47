"""scripts/profile_step.py on the CPU: ``--no-profiler`` walls and ``--bare`` (the trainer beside the benchmark's
loop on the same model, issue 20 item 5), and its refusals. The profiled (CUDA) mode is not run here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _scripts import SCRIPTS, load_script
from test_reliability import assert_one_error_line, cfg_file


@pytest.fixture(scope="module")
def profile_step():
    return load_script("profile_step")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny_data_cache"  # shared with test_reliability


def test_bare_loop_beside_the_trainer(profile_step, tmp_path, cache, capsys):
    cfg = cfg_file(tmp_path, cache, model__upcycle_at_step=0, train__grad_accum=2)
    out = tmp_path / "p.jsonl"
    argv = [str(out), "--config", str(cfg), "--no-profiler", "--bare", "--warmup", "1", "--steps", "2"]
    assert profile_step.main([*argv, "--repeat", "3", "log.run_name=p"]) == 0
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["moe"] and len(rec["wall_ms_windows"]) == len(rec["bare_wall_ms_windows"]) == 3
    tokens = 4 * 32  # train.batch_size x data.seq_len; the trainer's step has grad_accum=2 micro-batches
    assert rec["tokens_per_s"] == pytest.approx(2 * tokens / rec["wall_ms"] * 1000.0)
    assert rec["bare_tokens_per_s"] == pytest.approx(tokens / rec["bare_wall_ms"] * 1000.0)
    # each round's windows side by side (trainer tokens/s over bare tokens/s), their median the ratio
    rounds = [2 * b / w for w, b in zip(rec["wall_ms_windows"], rec["bare_wall_ms_windows"], strict=True)]
    assert rec["vs_bare_rounds"] == pytest.approx(rounds) and rec["vs_bare"] > 0
    assert rec["vs_bare"] == pytest.approx(sorted(rounds)[1])
    for bad, pattern in (
        ([], r"--bare compares plain walls: add --no-profiler, leave out --time-snapshot"),
        (["--no-profiler", "--time-snapshot"], r"--bare compares plain walls: .* leave out --time-snapshot"),
        (["--no-profiler", "train.mixed_precision=fp16"], r"--bare: train.mixed_precision=fp16"),
        (["--no-profiler", "--steps", "0"], r"--steps 0: an integer >= 1"),
        (["--no-profiler", "--warmup", "-1"], r"--warmup -1: an integer >= 0"),
    ):
        capsys.readouterr()
        rc = profile_step.main([str(out), "--config", str(cfg), "--bare", *bad, "log.run_name=q"])
        assert rc == 2
        assert_one_error_line(capsys.readouterr().err, pattern)
    assert len(out.read_text().splitlines()) == 1  # the refusals appended nothing


def test_host_phases_without_the_profiler(profile_step, tmp_path, cache, capsys):
    """``--host-phases`` records each phase's host time per step (perf_counter, no profiler): every phase
    the step runs is there, and the disjoint ones (forward, backward, optimizer step) fit inside the wall;
    the wrappers (and --time-snapshot's) are gone after the run; it is refused with the profiler, beside
    --bare or with --time-snapshot, before anything is written."""
    cfg = cfg_file(tmp_path, cache, model__upcycle_at_step=0)
    out = tmp_path / "p.jsonl"
    base = [str(out), "--config", str(cfg), "--warmup", "1", "--steps", "2"]
    assert (
        profile_step.main([*base, "--no-profiler", "--host-phases", "--repeat", "2", "log.run_name=p"]) == 0
    )
    rec = json.loads(out.read_text())
    phases = (
        "rows",
        "collate",
        "to_device",
        "walk",
        "guard_vector",
        "forward",
        "loss",
        "backward",
        "clip_grad_norm",
        "nonfinite",
        "snapshot",
        "optimizer",
        "zero_grad",
    )
    assert all(rec[f"host_{p}_ms"] > 0 for p in phases), rec
    disjoint = rec["host_forward_ms"] + rec["host_backward_ms"] + rec["host_optimizer_ms"]
    assert disjoint < max(rec["wall_ms_windows"]), rec
    from moe_emergence.data import rows
    from moe_emergence.training import rollback, steps
    from moe_emergence.training import trainer as trainer_module

    take = rollback.Snapshot.take
    argv = [*base, "--no-profiler", "--time-snapshot", "log.run_name=s"]
    assert profile_step.main(argv) == 0 and rollback.Snapshot.take is take  # its wrapper is gone again
    assert trainer_module.clip_grad_norm_ is steps.clip_grad_norm_  # so are the phases' (a later run here)
    assert trainer_module.any_nonfinite is rollback.any_nonfinite
    assert trainer_module.rows_of is rows.rows_of and trainer_module.step_flags is steps.step_flags
    out.write_text(out.read_text().splitlines()[0] + "\n")
    for bad in (
        ["--host-phases"],
        ["--no-profiler", "--host-phases", "--bare"],
        ["--no-profiler", "--host-phases", "--time-snapshot"],
    ):
        capsys.readouterr()
        assert profile_step.main([*base, *bad, "log.run_name=q"]) == 2
        assert_one_error_line(capsys.readouterr().err, r"--host-phases times the trainer's phases")
    assert len(out.read_text().splitlines()) == 1


def test_profiler_needs_a_gpu(profile_step, tmp_path, capsys):
    if sys.modules["torch"].cuda.is_available():
        pytest.skip("a GPU is here")
    assert profile_step.main([str(tmp_path / "p.jsonl"), "--steps", "1"]) == 2
    assert_one_error_line(capsys.readouterr().err, r"no GPU here \(--no-profiler times walls on the CPU\)")


def test_run_folder_is_scratch_and_a_run_there_is_kept(profile_step, tmp_path, cache, capsys):
    """The profile's run folder is removed at the end; a folder holding a run is refused (exit 2) and kept;
    the upcycle happens during the warm-up when due; a bad OUT is refused before any run."""
    from moe_emergence.training.trainer import train

    cfg = cfg_file(tmp_path, cache)  # TINY: model.upcycle_at_step=2
    out, runs = tmp_path / "p.jsonl", tmp_path / "runs"
    base = [str(out), "--config", str(cfg), "--no-profiler", "--steps", "1"]
    assert profile_step.main([*base, "--warmup", "2", "log.run_name=p"]) == 0
    assert (
        json.loads(out.read_text())["moe"] and not (runs / "p").exists()
    )  # upcycled at step 2, then removed
    assert profile_step.main([*base, "--warmup", "1", "--steps", "2", "log.run_name=p"]) == 0
    assert "the dense phase (model.upcycle_at_step=2 > --warmup 1)" in capsys.readouterr().out
    assert not json.loads(out.read_text().splitlines()[-1])["moe"]

    from moe_emergence.training.config import load_config

    kept = runs / "kept"
    train(load_config(str(cfg), ["log.run_name=kept", "train.steps=3"]))
    before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
    assert profile_step.main([*base, "--warmup", "2", "log.run_name=kept"]) == 2
    assert_one_error_line(capsys.readouterr().err, r"run folder .*kept")
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == before
    assert profile_step.main([str(tmp_path / "no" / "p.jsonl"), *base[1:], "log.run_name=q"]) == 2
    assert_one_error_line(capsys.readouterr().err, r"OUT .*a JSON lines file in an existing folder")
    assert not (runs / "q").exists() and len(out.read_text().splitlines()) == 2


def test_nothing_written_on_a_refusal_and_the_config_default_runs(profile_step, tmp_path, cache, capsys):
    """A run folder that is not free, OUT inside the run folder or in a missing folder, a bad flag: one error
    line, exit 2, no OUT file and the folder as it was; a config whose upcycle step lies past the profiled
    steps keeps its train.steps (the dense phase is profiled)."""
    cfg = cfg_file(tmp_path, cache)  # TINY: model.upcycle_at_step=2, train.steps=6
    runs = tmp_path / "runs"
    (runs / "used").mkdir(parents=True)
    (runs / "used" / "notes.txt").write_text("mine")
    (runs / "empty").mkdir()
    out = tmp_path / "p.jsonl"
    base = ["--config", str(cfg), "--no-profiler", "--warmup", "1", "--steps", "1"]
    for argv, pattern in (
        (
            [str(out), *base, "log.run_name=used"],
            r"run folder .*used.* is not empty: the profile is a scratch run",
        ),
        ([str(runs / "empty" / "p.jsonl"), *base, "log.run_name=empty"], r"OUT .* lies in the run folder"),
        ([str(out), *base, "--steps", "x"], r"argument --steps: invalid int value: 'x'"),
        ([str(out), *base, "--resume", "auto"], r"unrecognized arguments: --resume"),
    ):
        capsys.readouterr()
        assert profile_step.main(argv) == 2, argv
        assert_one_error_line(capsys.readouterr().err, pattern)  # argparse's too (no usage block)
    assert not out.exists() and not list((runs / "empty").iterdir())
    assert [p.name for p in (runs / "used").iterdir()] == ["notes.txt"]
    assert profile_step.main([str(out), *base, "log.run_name=empty"]) == 0  # warm-up 1 + 1 step < the upcycle
    assert "the dense phase" in capsys.readouterr().out and not list((runs / "empty").iterdir())


def test_sigterm_removes_the_scratch_run(tmp_path, cache):
    """A profile killed with SIGTERM during its warm-up removes the run folder it created (and its lock)."""
    import signal
    import subprocess
    import time

    cfg = cfg_file(tmp_path, cache, model__upcycle_at_step=0)
    run_dir = tmp_path / "runs" / "killed"
    argv = [str(tmp_path / "p.jsonl"), "--config", str(cfg), "--no-profiler", "--warmup", "100000"]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "profile_step.py"), *argv, "log.run_name=killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "config.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run_dir / "config.yaml").exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
    time.sleep(1.0)  # into the warm-up steps
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM  # 143, as scripts/train.py
    err = [line for line in proc.stderr.read().splitlines() if "Traceback" in line or "stopped by" in line]
    assert err == ["profile_step: stopped by SIGTERM; nothing it wrote is left"], (
        err
    )  # one line, no traceback
    assert not run_dir.exists() and not (tmp_path / "runs" / ".killed.lock").exists()

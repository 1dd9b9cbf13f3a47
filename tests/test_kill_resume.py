"""Kill test: a tiny run SIGKILLed at seeded random points (also in the middle of a checkpoint save)
and SIGTERMed, each time restarted with ``--resume auto``, ends with the metrics and weights of an
uninterrupted run (same seed) to 1e-6."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_training_run import TINY

from moe_emergence.telemetry import read_metrics
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training.config import config_from_dict
from moe_emergence.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "train.steps=16",
    "model.dropout=0.1",  # dropout and router noise draw random numbers: RNG state must resume exactly
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "eval.every=4",
    "eval.max_blocks=8",
]
SAVE_DELAY = 0.4  # seconds each checkpoint save pauses before its manifest (test hook)


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            steps.append(json.loads(line)["step"])
    return max(steps, default=-1)


def saving(run: Path, after: int = -1) -> bool:
    """A checkpoint save of a step > ``after`` is under way (``step_N.tmp``; older ones are leftovers)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return False
    names = [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
    return any(int(n.removeprefix("step_").removesuffix(".tmp")) > after for n in names)


def launch(cfg_file: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), ckpt.SAVE_DELAY_ENV: str(SAVE_DELAY)}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg_file), "--resume", "auto"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, cond, timeout: float = 120.0) -> bool:
    """Poll ``cond()`` every 5 ms; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training process made no progress")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path_factory, tmp_path):
    cache = tmp_path_factory.getbasetemp() / "tiny_data_cache"
    base = [f"output_dir={tmp_path}", f"data.cache_dir={cache}", *OVERRIDES]
    reference = train(config_from_dict(TINY, [*base, "log.run_name=reference"]))
    cfg = config_from_dict(TINY, [*base, "log.run_name=killed"])
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(cfg.to_yaml())
    run, log = cfg.run_dir, tmp_path / "killed.log"

    rng = random.Random(8)
    plan = [  # (what to wait for, signal); a random 0-150 ms on top of each wait
        (("step", rng.randint(1, 3)), signal.SIGKILL),
        (("save", None), signal.SIGKILL),  # inside a checkpoint save: leaves step_N.tmp behind
        (("step", rng.randint(6, 8)), signal.SIGKILL),
        (("save", None), signal.SIGKILL),
        (("step", rng.randint(9, 11)), signal.SIGTERM),  # clean stop: checkpoint, exit 143
    ]
    seen_tmp = False
    for (event, arg), sig in plan:
        start = last_step(run)  # records past the resume point are stale until the new process drops them
        proc = launch(cfg_file, log)
        if event == "step":
            reached = wait_for(proc, lambda a=arg, s=start: last_step(run) >= max(a, s + 1))
        else:
            reached = wait_for(proc, lambda s=start: saving(run, after=s))
        assert reached, f"ended before {event} {arg}: {log.read_text()[-3000:]}"
        time.sleep(rng.uniform(0.0, 0.15))
        seen_tmp |= saving(run, after=start)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 128 + signal.SIGTERM, log.read_text()[-3000:]
            assert "SIGTERM: saving a checkpoint" in log.read_text()
            stopped_at = last_step(run)
            assert ckpt.list_checkpoints(run / "checkpoints")[-1].name == f"step_{stopped_at:07d}"
        assert all(ckpt.verify_checkpoint(p) == [] for p in ckpt.list_checkpoints(run / "checkpoints"))
    assert seen_tmp  # at least one kill landed inside a checkpoint save
    proc = launch(cfg_file, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    resumed = [ln for ln in log.read_text().splitlines() if ln.startswith("resumed from")]
    assert len(resumed) >= 3, resumed  # the first two launches may end before a checkpoint is whole

    a = read_metrics(reference.run_dir / "metrics.jsonl")
    b = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # same records, none duplicated or lost
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.items():
            if key.startswith("perf/"):
                continue
            assert rb[key] == pytest.approx(va, abs=1e-6), (ra["step"], key)
    from safetensors.torch import load_file

    sa, sb = (
        load_file(reference.run_dir / "final" / "model.safetensors"),
        load_file(run / "final" / "model.safetensors"),
    )
    assert sa.keys() == sb.keys()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 1e-6
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    assert not [p for p in (run / "checkpoints").iterdir() if not ckpt.STEP_DIR.match(p.name)]
    assert torch.isfinite(torch.tensor(b[-1]["val/lm_loss"]))

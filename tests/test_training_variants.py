"""The trainer drives the routing variants: coefficient schedules, entropy loss, aux-free bias, telemetry."""

from __future__ import annotations

import torch
from test_training_run import TINY, final_state, make_cfg, train_records

from moe_emergence.telemetry import read_metrics
from moe_emergence.training.trainer import train

VARIANTS = (
    "model.moe.capacity_factor=1.0",
    "model.moe.entropy_coef=0.05",
    "model.moe.bias_update_rate=0.01",
    "model.moe.lb_schedule={kind: linear_warmup, warmup_steps: 4}",
    "model.moe.noise_std=0",
)


def test_variants_are_driven_and_logged(tmp_path):
    res = train(make_cfg(tmp_path, "variants", *VARIANTS))
    records = read_metrics(res.run_dir / "metrics.jsonl")
    train_recs = train_records(records)
    U = TINY["model"]["upcycle_at_step"]
    lb0 = TINY["model"]["moe"].get("lb_coef", 0.01)
    for step, r in train_recs.items():
        if step <= U:
            continue
        moe_step = step - 1 - U  # the record of step s describes optimizer step s - 1
        assert abs(r["train/lb_coef"] - lb0 * min(moe_step, 4) / 4) < 1e-9, (step, r["train/lb_coef"])
        assert r["train/entropy_loss"] > 0
        expected = r["train/lm_loss"] + r["train/lb_coef"] * r["train/lb_loss"]
        expected += r["train/z_coef"] * r["train/z_loss"] + 0.05 * r["train/entropy_loss"]
        assert abs(r["train/loss"] - expected) < 1e-6
    routed = [r for r in records if "router/layer0/dropped_frac" in r]
    assert routed and all(0.0 <= r["router/layer0/dropped_frac"] <= 1.0 for r in routed)
    bias = [r["router/layer1/selection_bias_e0"] for r in records if "router/layer1/selection_bias_e0" in r]
    assert bias and any(b != 0.0 for b in bias)
    state = final_state(res.run_dir)
    sel = state["transformer.h.0.mlp.router.selection_bias"]
    assert sel.abs().sum() > 0  # updated every optimizer step, saved with the model
    # sign updates of +-rate per step: every entry is a multiple of the rate
    steps_moe = TINY["train"]["steps"] - U
    assert torch.all(sel.abs() <= 0.01 * steps_moe + 1e-6)


def test_selection_bias_survives_resume(tmp_path):
    full = train(make_cfg(tmp_path, "full", *VARIANTS))
    train(make_cfg(tmp_path, "part", *VARIANTS, "train.stop_after=4"))
    resumed = train(make_cfg(tmp_path, "part", *VARIANTS), resume="auto")
    a, b = final_state(full.run_dir), final_state(resumed.run_dir)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    ra = train_records(read_metrics(full.run_dir / "metrics.jsonl"))
    rb = train_records(read_metrics(resumed.run_dir / "metrics.jsonl"))
    for step in range(5, TINY["train"]["steps"] + 1):
        assert abs(ra[step]["train/loss"] - rb[step]["train/loss"]) <= 1e-6

"""Tiny run folders for the analysis tests, made by the real trainer (``moe_emergence.training.train``):
a top-2 MoE run upcycled at step 2 with checkpoints every 2 steps (so a dense-phase checkpoint, the
parent, and MoE-phase checkpoints for router saturation exist), and a dense control on the same data."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY = {
    "data": {
        "seq_len": 32,
        "vocab_size": 300,
        "tokenizer_train_chars": 60_000,
        "eval_fraction": 0.25,
        "domains": {
            "code": {"type": "stdlib", "paths": ["json/*.py", "textwrap.py", "bisect.py"], "min_chars": 100},
            "math": {"type": "mathgen", "num_problems": 80},
            "prose": {"type": "pydoc", "max_docs": 40, "min_chars": 200, "target_chars": 600},
        },
    },
    "model": {
        "tiny_n_layer": 2,
        "tiny_n_embd": 32,
        "tiny_n_head": 2,
        "tiny_n_positions": 64,
        "upcycle_at_step": 2,
        "moe": {"num_experts": 4, "top_k": 2, "layers": [0, 1], "noise_std": 0.5, "noise_anneal_steps": 10},
    },
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 8, "batch_size": 4},
    "log": {"every": 1, "router_every": 1, "wandb": "disabled", "progress": False},
    # the periodic eval reads the val split; the final one every block of the eval (test) split: the
    # analysis' losses are cross-checked against it
    "eval": {"every": 4, "final_split": "eval"},
    "checkpoint": {"every": 2, "keep": 10},
}


def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """``{"moe": top-2 MoE run, "dense": dense control}``, trained once per test session (shared by the
    analysis test modules through a folder under the session's base temp dir)."""
    from moe_emergence.training.config import config_from_dict
    from moe_emergence.training.trainer import train

    root = tmp_path_factory.getbasetemp() / "analysis-runs"
    runs = {"moe": root / "moe", "dense": root / "dense"}
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        base = [f"output_dir={root}", f"data.cache_dir={root / 'cache'}"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: threads only add contention on a busy 2-core machine
        try:
            train(config_from_dict(TINY, [*base, "log.run_name=moe"]))
            train(config_from_dict(TINY, [*base, "log.run_name=dense", "model.moe=null"]))
        finally:
            torch.set_num_threads(threads)
        (root / "done").write_text("ok")
    return runs

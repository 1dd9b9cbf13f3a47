"""``train.compile``: the trainer compiles the model in place; losses equal an uncompiled run, a compiled run
resumes from its checkpoint (compiled or not), and checkpoints and ``final/`` carry the plain parameter names."""

from __future__ import annotations

import shutil

import pytest
import test_training_run
import torch
from test_training_run import final_state, make_cfg, train_records
from torch._dynamo.utils import counters

from moe_emergence import GPT2MoEForCausalLM
from moe_emergence.telemetry import read_metrics
from moe_emergence.training.config import TrainConfig
from moe_emergence.training.trainer import train


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """``make_cfg`` reads its module's corpus cache folder, which that module's own fixture sets."""
    test_training_run.CACHE = tmp_path_factory.mktemp("data_cache")


def test_compiled_run_matches_uncompiled_and_resumes(tmp_path):
    # dense step 1, upcycle, MoE steps 2-3 on the CPU fast backend (a graph without breaks);
    # aot_eager: inductor's C++ compilation takes over a minute on 2 CPU cores (same losses within ~1e-5);
    # cuda_graphs=none: on a GPU the uncompiled run would graph its experts (logging perf/cuda_graph_captures),
    # which a compiled run never does
    ov = ("train.steps=3", "model.upcycle_at_step=1", "model.moe.backend=grouped_mm", "checkpoint.every=1",
          "train.cuda_graphs=none")  # fmt: skip
    compiled = ("train.compile=true", "train.compile_backend=aot_eager")
    torch._dynamo.reset()
    graphs = counters["stats"]
    n0 = graphs["unique_graphs"]
    plain = train(make_cfg(tmp_path, "plain", *ov))
    assert graphs["unique_graphs"] == n0  # compile is off by default
    breaks0 = sum(counters["graph_break"].values())
    part = train(make_cfg(tmp_path, "comp", *ov, *compiled, "train.stop_after=2"))
    assert graphs["unique_graphs"] >= n0 + 2  # dense and MoE forward (training) at least
    assert sum(counters["graph_break"].values()) == breaks0, dict(counters["graph_break"])  # dense and MoE
    assert part.stopped == "stop_after" and part.step == 2
    ckpt = tmp_path / "comp" / "checkpoints" / "step_0000002" / "model.safetensors"
    from safetensors.torch import load_file

    assert not [k for k in load_file(ckpt) if "_orig_mod" in k]  # loadable by uncompiled runs and analysis
    shutil.copytree(tmp_path / "comp", tmp_path / "toggled")
    resumed = train(make_cfg(tmp_path, "comp", *ov, *compiled), resume="auto")
    toggled = train(make_cfg(tmp_path, "toggled", *ov), resume="auto")  # the same checkpoint, uncompiled
    assert resumed.step == 3 and resumed.stopped is None
    a = train_records(read_metrics(plain.run_dir / "metrics.jsonl"))
    b = train_records(read_metrics(resumed.run_dir / "metrics.jsonl"))
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert "train/lb_loss" in a[3] and "train/lb_loss" not in a[1]  # dense step 1, MoE steps 2-3
    for step in (1, 2, 3):
        assert a[step].keys() == b[step].keys()
        for key in ("train/loss", "train/lm_loss", "train/lb_loss", "train/z_loss", "train/grad_norm"):
            if key not in a[step]:
                continue
            assert abs(a[step][key] - b[step][key]) <= 1e-4, (step, key, a[step][key], b[step][key])
    c = train_records(read_metrics(toggled.run_dir / "metrics.jsonl"))
    assert abs(c[3]["train/loss"] - a[3]["train/loss"]) <= 1e-4
    sa = final_state(plain.run_dir)
    for run in (resumed, toggled):
        sb = final_state(run.run_dir)
        assert sa.keys() == sb.keys() and not [k for k in sb if "_orig_mod" in k]
        assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 1e-4
    model = GPT2MoEForCausalLM.from_pretrained(resumed.run_dir / "final")
    assert set(model.moe_layers()) == {0, 1}
    torch._dynamo.reset()


def test_compile_options_are_validated():
    assert TrainConfig().compile is False and TrainConfig().compile_backend == "inductor"
    with pytest.raises(ValueError, match="train.compile_backend='tvm' is invalid"):
        TrainConfig(compile=True, compile_backend="tvm")
    with pytest.raises(ValueError, match="train.compile='yes' is invalid"):
        TrainConfig(compile="yes")
    assert TrainConfig().compile_mode == "default"
    TrainConfig(compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="train.compile_mode='fast' is invalid.*reduce-overhead"):
        TrainConfig(compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="train.compile_mode='reduce-overhead' is invalid.*aot_eager"):
        TrainConfig(compile=True, compile_backend="aot_eager", compile_mode="reduce-overhead")

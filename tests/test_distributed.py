"""Data parallelism on the CPU: 2 gloo processes (torchrun) against 1 process with the same global batch.

`accelerate launch --cpu --num_processes 2` starts one process on our 2-core machines; torchrun with
ACCELERATE_USE_CPU=1 starts two and Accelerator() picks up gloo (docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_training_run import TINY
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moe_emergence.errors import ConfigError
from moe_emergence.telemetry import read_metrics
from moe_emergence.training.config import config_from_dict
from moe_emergence.training.sampler import BlockSampler
from moe_emergence.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# Router noise and dropout draw per-process random numbers, so they are off for the equivalence;
# global balance scope makes the load-balance loss independent of how the batch is split.
COMMON = [
    "model.moe.noise_std=0",
    "train.balance_scope=global",
    "train.steps=10",
    "optim.lr=1e-3",
    "log.router_every=5",
    "log.run_name=tiny",
]


def _losses(run_dir: Path) -> dict[int, list[float]]:
    out = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "train/loss" in r:
            out[r["step"]] = [
                r["train/lm_loss"],
                r.get("train/lb_loss", 0.0),
                r.get("train/z_loss", 0.0),
                r["train/grad_norm"],  # before clipping: the norm over all processes' gradients
            ]
    return out


def _evals(run_dir: Path) -> dict[int, dict]:
    """The val eval records by step (every val block: 161 of them, an odd number of batches of 4)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "val/lm_loss" in r}


def _assert_same_evals(ref: dict[int, dict], got: dict[int, dict]) -> None:
    """Same steps, same blocks (fingerprint), same token-weighted losses: at step 0 (the same weights) to
    float rounding, later within the training equivalence's tolerance."""
    assert sorted(got) == sorted(ref) == [0, 3, 6, 9, 10]
    for step, r in ref.items():
        assert got[step]["val/blocks_fingerprint"] == r["val/blocks_fingerprint"]
        losses = [k for k in r if k.startswith(("val/loss_", "val/lm_loss"))]
        assert len(losses) == 4
        for k in losses:
            assert got[step][k] == pytest.approx(r[k], rel=1e-5 if step == 0 else 1e-4), (step, k)


def _torchrun(tmp_path: Path, cache: Path, *overrides: str, resume: bool = False) -> None:
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "scripts" / "train.py"), "--config", str(cfg_file), f"output_dir={tmp_path}"]
    cmd += [f"data.cache_dir={cache}", *COMMON, *overrides] + (["--resume", "auto"] if resume else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _assert_close(a: dict[int, list[float]], b: dict[int, list[float]], steps, rel=1e-4) -> None:
    for s in steps:
        for x, y in zip(a[s], b[s], strict=True):
            assert abs(x - y) <= rel * abs(x), (s, a[s], b[s])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1 process, batch 8: the reference run."""
    tmp = tmp_path_factory.mktemp("single")
    cache = tmp / "cache"
    res = train(
        config_from_dict(
            TINY, [f"output_dir={tmp}", f"data.cache_dir={cache}", *COMMON, "train.batch_size=8"]
        )
    )
    return tmp, cache, _losses(res.run_dir)


def test_two_processes_match_one_process_with_twice_the_batch(single, tmp_path):
    _, cache, ref = single
    _torchrun(tmp_path, cache, "train.batch_size=4")
    run = tmp_path / "tiny"
    got = _losses(run)
    assert sorted(got) == list(range(1, 11)) == sorted(ref)  # only the main process writes metrics
    assert any(v[1] > 0 for v in got.values())  # MoE steps (aux losses) are part of the comparison
    _assert_close(ref, got, range(1, 11))
    assert (run / "final" / "model.safetensors").is_file()
    _assert_same_evals(_evals(single[0] / "tiny"), _evals(run))  # each val block once over 2 processes


@pytest.mark.parametrize("wrap", ["block", "root"])
def test_fsdp2_sharded_steps_match_one_process(single, tmp_path, wrap):
    """The trainer's step on FSDP2-sharded parameters (DTensors) on 2 gloo processes: gradient norm, guard
    flags and rollback snapshot, telemetry (expert divergence gathers DTensors), optimizer groups and the
    mid-run upcycle of a sharded dense model, against the 1-process run (tests/fsdp_cpu_worker.py)."""
    _, cache, ref = single
    cfg_file, out = tmp_path / "tiny.yaml", tmp_path / "fsdp.json"
    cfg_file.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["FSDP_WRAP"] = wrap  # one unit per block, or the whole model as one unit (the shipped fsdp.yaml)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "fsdp_cpu_worker.py"), str(cfg_file), str(out), f"output_dir={tmp_path}"]
    cmd += [f"data.cache_dir={cache}", *COMMON, "train.batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["step"] == 10 and summary["stopped"] is None and summary["sharded"] > 0
    got = _losses(tmp_path / "tiny")
    assert sorted(got) == list(range(1, 11))
    _assert_close(ref, got, range(1, 11))
    _assert_same_evals(_evals(single[0] / "tiny"), _evals(tmp_path / "tiny"))  # forwards matched under FSDP
    router = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "router/layer0/max_frac" in r]
    assert router and all(math.isfinite(r["router/layer1/expert_divergence"]) for r in router)


def test_resume_two_process_checkpoint_on_one_process(single, tmp_path):
    _, cache, ref = single
    _torchrun(tmp_path, cache, "train.batch_size=4", "train.stop_after=5")
    base = [f"output_dir={tmp_path}", f"data.cache_dir={cache}", *COMMON]
    with pytest.raises(ConfigError, match=r"keep the global batch the same; e.g. train.batch_size=8"):
        train(config_from_dict(TINY, [*base, "train.batch_size=4"]), resume="auto")
    res = train(config_from_dict(TINY, [*base, "train.batch_size=8"]), resume="auto")
    assert res.step == 10
    _assert_close(ref, _losses(res.run_dir), range(6, 11))


def test_resume_one_process_checkpoint_on_two_processes(single, tmp_path):
    _, cache, ref = single
    base = [f"output_dir={tmp_path}", f"data.cache_dir={cache}", *COMMON]
    train(config_from_dict(TINY, [*base, "train.batch_size=8", "train.stop_after=5"]))
    _torchrun(tmp_path, cache, "train.batch_size=4", resume=True)
    _assert_close(ref, _losses(tmp_path / "tiny"), range(6, 11))


def test_sampler_shards_disjoint_rows_that_cover_the_global_batch():
    one = BlockSampler(100, batch_size=6, grad_accum=2, num_processes=1)
    two = [BlockSampler(100, batch_size=3, grad_accum=2, num_processes=2, process_index=r) for r in (0, 1)]
    for _ in range(20):  # several epochs
        ref = one.next_step()
        parts = [s.next_step() for s in two]
        for m in range(2):
            a, b = parts[0][m], parts[1][m]
            assert not set(a) & set(b)
            assert sorted(a + b) == sorted(ref[m])


class _CountDTensorOps(TorchDispatchMode):
    """Counts operators dispatched with a DTensor argument."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(isinstance(a, DTensor) for a in tree_flatten((args, kwargs or {}))[0]):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _clip_worker(rank: int, store_path: str, out_path: str) -> None:
    """One of 2 gloo processes: FSDP2-style DTensor parameters (Shard(0), uneven and empty shards)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from moe_emergence.training.optim import ShardLocalAdamW
    from moe_emergence.training.steps import clip_grad_norm_

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (1, 4), (3, 2, 2)]
    grads = [torch.randn(s, generator=gen) * 3 for s in shapes]
    params = []
    for g in grads:
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, [Shard(0)]))
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        params.append(p)

    def reduce_sum(x):
        dist.all_reduce(x)
        return x

    dispatched = _CountDTensorOps()
    with dispatched:
        norm = clip_grad_norm_(params, 1.5, reduce_sum)
    clipped = [p.grad.full_tensor() for p in params]
    opt = ShardLocalAdamW(params, lr=0.1, weight_decay=0.1, fused=True)
    opt.step()  # the first step creates the (DTensor) state
    with dispatched:
        for _ in range(2):  # the clipped gradients again each step
            opt.step()
    result = {
        "norm": norm,
        "clipped": clipped,
        "params": [p.full_tensor() for p in params],
        "exp_avg_sq": [opt.state[p]["exp_avg_sq"].full_tensor() for p in params],
        "state_is_dtensor": all(isinstance(opt.state[p]["exp_avg"], DTensor) for p in params),
        "dtensor_ops": dispatched.n,  # the maths ran on the local shards
    }
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()  # neither process closes its gloo connections while the other still uses them (a rare SIGABRT)
    dist.destroy_process_group()
    # The DTensors still hold the mesh and through it the gloo group, whose worker threads then die in the
    # interpreter's finalisation: a rare SIGABRT ("terminate called without an active exception") after the
    # result is written. Skip the finalisation; nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _restore_after_eval_worker(rank: int, store_path: str, out_path: str) -> None:
    """One of 2 gloo processes: a GPT-2 sharded as one FSDP2 unit (configs/accelerate/fsdp.yaml), a snapshot,
    a NaN in this process's shard, an eval forward (the root keeps its parameters gathered), then the
    guard's check before a save."""
    import torch.distributed as dist
    from conftest import tiny_gpt2_config
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import GPT2LMHeadModel

    from moe_emergence.training.optim import ShardLocalAdamW
    from moe_emergence.training.rollback import VerifiedState
    from moe_emergence.training.steps import evaluate

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config()).train()
    fully_shard(model)
    opt = ShardLocalAdamW(model.parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, 97, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()

    def reduce_sum(x):
        dist.all_reduce(x)
        return x

    verified = VerifiedState(model, opt, 1, reduce_sum)
    verified.before_update()  # the snapshot of the sharded state
    wpe = model.transformer.wpe.weight
    kept = wpe._local_tensor.clone()
    with torch.no_grad():
        wpe._local_tensor.fill_(float("nan"))
    verified.after_update()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the trainer's eval before a checkpoint
    model.train()
    messages = []
    ok = verified.good_for_saving(torch.device("cpu"), messages.append, 5)
    local = model.transformer.wpe.weight._local_tensor  # resharded: the live shard
    result = {"ok": ok, "restored": torch.equal(local, kept), "messages": messages}
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), "domain_ids": ids * 0}
    evaluate(model, model, [(batch, True)], ["a"], False, reduce_sum)
    # the trainer's eval leaves the shards in place (an upcycle after it reads the sharded model)
    result["sharded_after_eval"] = all(isinstance(p, DTensor) for p in model.parameters())
    torch.save(result, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as _clip_worker: no finalisation of the gloo threads the DTensors still hold


def test_rollback_before_a_save_after_an_eval_restores_the_fsdp2_shards(tmp_path):
    """After a forward without backward FSDP2's root unit holds its parameters gathered; the guard's check
    before a save reshards first, so a non-finite shard is rolled back in the shards themselves (before,
    one process wrote into the gathered copies and reported success, two processes raised). The trainer's
    eval reshards when it ends (before, an upcycle right after an eval found no DTensor, took the live
    model for a plain one and failed to load its sharded state)."""
    import torch.multiprocessing as mp

    out = tmp_path / "restore"
    mp.spawn(_restore_after_eval_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["ok"] and got["restored"] and got["sharded_after_eval"], got
        assert "rolled back to the last verified-good state" in got["messages"][0]


def test_gradient_norm_and_adamw_on_sharded_tensors_equal_torch_on_the_whole(tmp_path):
    """``steps.clip_grad_norm_`` on DTensor gradients sharded over 2 processes (odd sizes, a parameter with
    one row: one process holds an empty shard) gives torch.nn.utils.clip_grad_norm_'s norm and clipped
    gradients on the whole tensors, and ``ShardLocalAdamW`` on the shards takes torch's fused AdamW steps
    (its state staying DTensors); plain gradients on one process give the same; inf clips nothing."""
    import torch.multiprocessing as mp

    from moe_emergence.training.steps import clip_grad_norm_

    out = tmp_path / "clip.pt"
    mp.spawn(_clip_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    gen = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in [(7, 3), (5,), (1, 4), (3, 2, 2)]]
    for p in ref:
        p.grad = torch.randn(p.shape, generator=gen) * 3
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for p, r in zip(plain, ref, strict=True):
        p.grad = r.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.5)
    assert expected > 1.5  # the clip engages
    torch.testing.assert_close(got["norm"], expected)
    for g, r in zip(got["clipped"], ref, strict=True):
        torch.testing.assert_close(g, r.grad)
    whole = [torch.nn.Parameter(torch.zeros(p.shape)) for p in ref]
    opt = torch.optim.AdamW(whole, lr=0.1, weight_decay=0.1, fused=True)
    for _ in range(3):
        for w, r in zip(whole, ref, strict=True):
            w.grad = r.grad.clone()
        opt.step()
    assert got["state_is_dtensor"] and got["dtensor_ops"] == 0
    for g, w in zip(got["params"], whole, strict=True):
        assert w.abs().sum() > 0  # the steps moved the weights
        torch.testing.assert_close(g, w.detach())
    for g, w in zip(got["exp_avg_sq"], whole, strict=True):
        torch.testing.assert_close(g, opt.state[w]["exp_avg_sq"])
    norm = clip_grad_norm_(plain, 1.5, reduce_sum=lambda x: pytest.fail("plain gradients are not reduced"))
    torch.testing.assert_close(norm, expected)
    for p, r in zip(plain, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad)
    before = [p.grad.clone() for p in plain]
    torch.testing.assert_close(
        clip_grad_norm_(plain, float("inf"), lambda x: x),
        torch.linalg.vector_norm(torch.cat([b.flatten() for b in before])),
    )
    assert all(torch.equal(p.grad, b) for p, b in zip(plain, before, strict=True))
    plain[1].grad[0] = float("nan")
    assert torch.isnan(clip_grad_norm_(plain, 1.0, lambda x: x))

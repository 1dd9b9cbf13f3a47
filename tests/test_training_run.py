"""Training runs on CPU: resume equality, gradient accumulation, dense control, telemetry, run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moe_emergence.errors import ConfigError
from moe_emergence.telemetry import read_metrics
from moe_emergence.training.config import config_from_dict
from moe_emergence.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CACHE: Path | None = None
TINY = {
    "data": {
        "seq_len": 32,
        "vocab_size": 300,
        "tokenizer_train_chars": 60_000,
        "eval_fraction": 0.2,
        "domains": {
            "code": {"type": "stdlib", "paths": ["json/*.py", "textwrap.py", "bisect.py"], "min_chars": 100},
            "math": {"type": "mathgen", "num_problems": 60},
            "prose": {"type": "pydoc", "max_docs": 30, "min_chars": 200},
        },
    },
    "model": {
        "tiny_n_layer": 2,
        "tiny_n_embd": 32,
        "tiny_n_head": 2,
        "tiny_n_positions": 64,
        "upcycle_at_step": 2,
        "moe": {"num_experts": 4, "top_k": 1, "layers": [0, 1], "noise_std": 0.5, "noise_anneal_steps": 10},
    },
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 6, "batch_size": 4},
    "log": {"every": 1, "router_every": 1, "wandb": "disabled", "progress": False},
    "eval": {"every": 3},
    "checkpoint": {"every": 3, "keep": 1},
}


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """One corpus cache for the module: each tiny corpus is prepared once."""
    global CACHE
    CACHE = tmp_path_factory.mktemp("data_cache")
    return CACHE


def make_cfg(tmp_path: Path, name: str, *overrides: str):
    base = [f"output_dir={tmp_path}", f"log.run_name={name}", f"data.cache_dir={CACHE}"]
    return config_from_dict(TINY, [*base, *overrides])


def train_records(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "train/loss" in r}


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def test_resume_reproduces_uninterrupted_run(tmp_path):
    # dropout and router noise both draw random numbers, so RNG state must be restored exactly
    extra = ("model.dropout=0.1",)
    full = train(make_cfg(tmp_path, "full", *extra))
    part = train(make_cfg(tmp_path, "part", *extra, "train.stop_after=4"))
    assert part.stopped == "stop_after" and part.step == 4
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert ckpts == ["step_0000004"]  # keep=1: only the latest
    resumed = train(make_cfg(tmp_path, "part", *extra), resume="auto")
    assert resumed.step == 6 and resumed.stopped is None
    a = train_records(read_metrics(full.run_dir / "metrics.jsonl"))
    b = train_records(read_metrics(resumed.run_dir / "metrics.jsonl"))
    assert sorted(a) == sorted(b) == list(range(1, 7))  # no duplicated records after the resume
    for step in range(5, 7):
        for key in ("train/loss", "train/lm_loss", "train/lb_loss", "train/z_loss", "train/grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key)
    assert a[6]["train/tokens"] == b[6]["train/tokens"]
    sa, sb = final_state(full.run_dir), final_state(resumed.run_dir)
    assert sa.keys() == sb.keys()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 1e-6


def test_resume_from_dense_phase_checkpoint(tmp_path):
    # the checkpoint at step 1 is dense; the resumed run upcycles at step 2 like the uninterrupted one
    ov = ("checkpoint.every=1", "train.steps=4", "model.moe.noise_std=0.0")
    full = train(make_cfg(tmp_path, "full", *ov))
    train(make_cfg(tmp_path, "part", *ov, "train.stop_after=1"))
    resumed = train(make_cfg(tmp_path, "part", *ov), resume="auto")
    a = train_records(read_metrics(full.run_dir / "metrics.jsonl"))
    b = train_records(read_metrics(resumed.run_dir / "metrics.jsonl"))
    assert [abs(a[s]["train/loss"] - b[s]["train/loss"]) <= 1e-6 for s in (2, 3, 4)] == [True] * 3


def test_gradient_accumulation_matches_big_batch(tmp_path):
    # k = E makes the balance fractions batch-independent, so 2 x B and 1 x 2B see the same loss,
    # aux losses included; noise is off so both draw no random numbers
    ov = (
        "model.upcycle_at_step=0",
        "model.moe.num_experts=2",
        "model.moe.top_k=2",
        "model.moe.noise_std=0.0",
        "model.moe.lb_coef=0.1",
        "model.moe.z_coef=0.01",
        "train.steps=3",
    )
    big = train(make_cfg(tmp_path, "big", *ov, "train.batch_size=4", "train.grad_accum=1"))
    acc = train(make_cfg(tmp_path, "acc", *ov, "train.batch_size=2", "train.grad_accum=2"))
    a = train_records(read_metrics(big.run_dir / "metrics.jsonl"))
    b = train_records(read_metrics(acc.run_dir / "metrics.jsonl"))
    for step in (1, 2, 3):
        for key in ("train/loss", "train/lm_loss", "train/lb_loss", "train/z_loss", "train/grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-6), (step, key)
    sa, sb = final_state(big.run_dir), final_state(acc.run_dir)
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 1e-5


def test_moe_run_telemetry_and_final_model(tmp_path):
    res = train(make_cfg(tmp_path, "moe", "train.balance_scope=global"))
    records = read_metrics(res.run_dir / "metrics.jsonl")
    steps = train_records(records)
    for key in ("train/loss", "train/lm_loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec"):
        assert all(key in r for r in steps.values()), key
    assert "train/lb_loss" not in steps[2] and "train/lb_loss" in steps[3]  # dense until the upcycle
    moe = steps[4]
    for key in ("train/lb_loss", "train/z_loss", "train/router_lr", "router/noise_std"):
        assert key in moe
    for layer in (0, 1):
        p = f"router/layer{layer}"
        fr = [moe[f"{p}/expert{i}_frac"] for i in range(4)]
        assert sum(fr) == pytest.approx(1.0) and moe[f"{p}/max_frac"] == max(fr)
        assert 0.0 <= moe[f"{p}/domain_nmi"] <= 1.0 and moe[f"{p}/domain_mi"] >= 0.0
        assert (
            0.0
            <= moe[f"{p}/entropy"]
            <= moe[f"{p}/marginal_entropy"] + 1e-9
            <= torch.log(torch.tensor(4.0)) + 1e-6
        )
        assert moe[f"{p}/dead_experts"] in (0.0, 1.0, 2.0, 3.0) and moe[f"{p}/cv"] >= 0
        assert 0.0 < moe[f"{p}/expert_divergence"] < 2.0
    evals = [r for r in records if "val/lm_loss" in r]  # the periodic eval reads the val split
    assert [r["step"] for r in evals] == [0, 3, 6] and not [r for r in records if "eval/lm_loss" in r]
    domains = ("code", "math", "prose")
    assert all(f"val/loss_{d}" in evals[-1] and f"val/ppl_{d}" in evals[-1] for d in domains)
    assert "val_router/layer1/domain_nmi" in evals[-1] and "val_router/layer1/domain_nmi" not in evals[0]
    assert len({r["val/blocks_fingerprint"] for r in evals}) == 1  # the same blocks at every eval
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["train"]["balance_scope"] == "global"

    from transformers import AutoModelForCausalLM

    import moe_emergence  # noqa: F401  (registers gpt2_moe)

    model = AutoModelForCausalLM.from_pretrained(res.run_dir / "final")
    assert type(model).__name__ == "GPT2MoEForCausalLM" and model.config.moe.num_experts == 4
    out = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def test_dense_control_has_no_router_keys(tmp_path):
    res = train(make_cfg(tmp_path, "dense", "model.moe=null", "train.steps=3"))
    records = read_metrics(res.run_dir / "metrics.jsonl")
    keys = {k for r in records for k in r}
    assert "train/lm_loss" in keys and "val/lm_loss" in keys
    assert not [k for k in keys if "router" in k or k in ("train/lb_loss", "train/z_loss")]
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(res.run_dir / "final")).__name__ == "GPT2LMHeadModel"


def test_collapse_guard_stops(tmp_path):
    res = train(
        make_cfg(
            tmp_path, "collapse", "collapse.max_frac=0.01", "collapse.patience=2", "collapse.action=stop"
        )
    )
    assert res.stopped == "collapse" and res.step == 4  # MoE from step 3; second consecutive check
    assert (res.run_dir / "checkpoints" / "step_0000004").is_dir()
    # final/ is written, so the run leaves its summary, saying why it ended early
    assert "Stopped by the collapse guard at step 4 of 6" in (res.run_dir / "summary.md").read_text()


def test_occupied_run_folder_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "occupied", "model.moe=null", "train.steps=1")
    train(cfg)
    before = (cfg.run_dir / "metrics.jsonl").read_text()
    summary = (cfg.run_dir / "summary.md").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already holds this run, finished"):
        train(cfg)
    assert (cfg.run_dir / "metrics.jsonl").read_text() == before
    assert (cfg.run_dir / "summary.md").stat().st_mtime_ns == summary  # not written again
    with pytest.raises(ConfigError, match=r"differs from the saved config.yaml in \['optim.weight_decay'\]"):
        train(
            make_cfg(tmp_path, "occupied", "model.moe=null", "train.steps=1", "optim.weight_decay=0.5"),
            resume="auto",
        )


def test_accelerate_launch_end_to_end(tmp_path):
    """The real command line through `accelerate launch` on CPU, with wandb offline."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    script = ROOT / "scripts" / "train.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    cmd += ["--config", str(cfg_file), f"output_dir={tmp_path}", f"data.cache_dir={CACHE}", "log.wandb=auto"]
    cmd += ["train.steps=4", "eval.final_split=eval"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("Removed shared tensor", "Writing model shards", "Loading weights"):  # no library chatter
        assert noise not in proc.stdout + proc.stderr, noise
    run = tmp_path / "tiny"
    names = {"config.yaml", "metrics.jsonl", "checkpoints", "final", "summary.md", "plots"}
    assert names <= {p.name for p in run.iterdir()}
    assert (run / "wandb").is_dir()  # offline wandb run written into the run folder
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 4
    # the closing summary: final val and (eval.final_split) eval loss per domain, the summary, next commands
    records = read_metrics(run / "metrics.jsonl")
    assert f"summary: {run / 'summary.md'}\n" in proc.stdout
    for split in ("val", "eval"):
        (ev,) = [r for r in records if f"{split}/lm_loss" in r and r["step"] == 4]  # the test split: once
        losses = ", ".join(f"{d} {ev[f'{split}/loss_{d}']:.4f}" for d in ("code", "math", "prose"))
        line = f"final {split} loss (step 4): {losses}; all tokens {ev[f'{split}/lm_loss']:.4f}\n"
        assert line in proc.stdout
    assert [r["step"] for r in records if "eval/lm_loss" in r] == [4]
    assert f"scripts/analyze.py {run} --out reports/tiny\n" in proc.stdout
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert (
        f"wandb sync {offline}\n" in proc.stdout
        and f"wandb sync {offline}\n" in (run / "summary.md").read_text()
    )
    summary = (run / "summary.md").stat().st_mtime_ns
    # the same command again: the run is finished, so it says where the results are and exits 0 (accelerate's
    # launcher prints a traceback for any non-zero exit, so "nothing to do" must not be an error)
    before = (run / "metrics.jsonl").read_text()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "already holds this run, finished: the model is in" in again.stdout
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "summary.md").stat().st_mtime_ns == summary and "final val loss" not in again.stdout
    # a user mistake: one error line and exit status 2, no traceback (plain python; accelerate's launcher
    # adds its own traceback when a child fails)
    bad_cmd = [sys.executable, str(script), "--config", str(cfg_file), "train.stpes=3"]
    bad = subprocess.run(bad_cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'steps'" in bad.stderr and "Traceback" not in bad.stderr


def _script(name: str):
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name="not_main")["main"]


def test_upcycle_and_generate_scripts(tmp_path, capsys):
    res = train(make_cfg(tmp_path, "gen", "model.moe=null", "train.steps=1"))
    out = tmp_path / "moe"
    assert _script("upcycle")([str(res.run_dir / "final"), str(out), "num_experts=3", "layers=[1]"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GPT2MoEForCausalLM" and model.config.moe_layers == [1]
    assert _script("upcycle")([str(res.run_dir / "final"), str(tmp_path / "x"), "num_expert=3"]) == 2
    assert "did you mean 'num_experts'" in capsys.readouterr().err
    gen = ["--prompt", "def f(x):", "--max-new-tokens", "5", "--show-experts"]
    assert _script("generate")([str(out), *gen]) == 0
    assert "L1" in capsys.readouterr().out
    assert _script("generate")([str(res.run_dir / "final"), *gen]) == 2  # dense: no experts to show
    capsys.readouterr()
    # several prompts: one left-padded batch; each line is what that prompt generates alone (greedy)
    greedy = ["--max-new-tokens", "6", "--temperature", "0"]
    prompts = ["def f(x):", "x", "The quick brown fox"]
    assert _script("generate")([str(out), *sum((["--prompt", p] for p in prompts), []), *greedy]) == 0
    batch = capsys.readouterr().out
    alone = []
    for p in prompts:
        assert _script("generate")([str(out), "--prompt", p, *greedy]) == 0
        alone.append(capsys.readouterr().out)
    assert batch == "".join(f"[{b}] {text}" for b, text in enumerate(alone))
    bad = {  # one error: line each, naming the flag or what is missing, and no traceback
        "--num-beams=0": [str(out), "--prompt", "x", "--num-beams", "0"],
        "--temperature=inf": [str(out), "--prompt", "x", "--temperature", "inf"],
        "--temperature=1e-40": [str(out), "--prompt", "x", "--temperature", "1e-40"],
        "--top-k is for sampling": [str(out), "--prompt", "x", "--temperature", "0", "--top-k", "5"],
        "--prompt is too long": [str(out), "--prompt", "x " * 400],
        "a training checkpoint": [str(res.run_dir / "checkpoints" / "step_0000001"), "--prompt", "x"],
        "beam search": [str(out), "--prompt", "x", "--num-beams", "2", "--top-k", "5"],
        "--max-new-tokens=100000 is too many": [str(out), "--prompt", "x", "--max-new-tokens", "100000"],
        "no such folder": [str(tmp_path / "nowhere"), "--prompt", "x"],
        "its model is in final/": [str(res.run_dir), "--prompt", "x"],
    }
    no_tokenizer = tmp_path / "bare"
    model.save_pretrained(no_tokenizer)
    bad["holds no complete tokenizer"] = [str(no_tokenizer), "--prompt", "x"]
    for says, argv in bad.items():
        assert _script("generate")(argv) == 2, says
        err = capsys.readouterr().err
        assert err.startswith("error:") and says in err and err.count("\n") == 1, err
    cfg = out / "config.json"  # a checkpoint whose routing is not causal: one error line, before generating
    cfg.write_text(cfg.read_text().replace('"routing": "token_choice"', '"routing": "expert_choice"'))
    capsys.readouterr()
    assert _script("generate")([str(out), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not causal" in err and "Traceback" not in err


def test_run_saved_with_every_source_field_still_resumes(tmp_path):
    """Run folders written before config.yaml left out the source fields a type does not read hold them all
    (with their defaults): --resume auto must still accept them as the same config."""
    import dataclasses

    from moe_emergence.data.config import SourceConfig

    part = train(make_cfg(tmp_path, "old", "train.stop_after=2", "model.upcycle_at_step=1"))
    saved = yaml.safe_load((part.run_dir / "config.yaml").read_text())
    for name, src in saved["data"]["domains"].items():
        full = dataclasses.asdict(SourceConfig(type=src["type"]))
        saved["data"]["domains"][name] = {**full, **src}
        assert set(saved["data"]["domains"][name]) > set(src)
    (part.run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    resumed = train(make_cfg(tmp_path, "old", "model.upcycle_at_step=1"), resume="auto")
    assert resumed.stopped is None and resumed.step == 6


def test_resume_auto_of_a_finished_run_changes_nothing(tmp_path):
    """`--resume auto` on a run that already reached train.steps (final/ written) is the same command as the
    plain re-run: nothing to do (RunFinished, exit 0 on the command line), no eval, no new records."""
    from moe_emergence.training.rundir import RunFinished

    cfg = make_cfg(tmp_path, "done")
    res = train(cfg)
    metrics = (res.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunFinished, match="already holds this run, finished"):
        train(cfg, resume="auto")
    assert (res.run_dir / "metrics.jsonl").read_text() == metrics


def test_trainer_hands_the_model_a_mask_only_for_padded_batches(tmp_path, monkeypatch):
    """An all-ones attention mask is read on the CPU and not passed (transformers would check it on the
    device, a host sync per forward); a batch with padding passes its mask. Both kinds occur in a run: packed
    training blocks are full, the last eval block of a domain is padded."""
    from transformers import GPT2LMHeadModel

    from moe_emergence import GPT2MoEForCausalLM

    seen = []
    for cls in (GPT2LMHeadModel, GPT2MoEForCausalLM):
        forward = cls.forward

        def record(self, *args, _forward=forward, **kwargs):
            mask = kwargs.get("attention_mask")
            seen.append(None if mask is None else bool((mask == 0).any()))
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", record)
    train(make_cfg(tmp_path, "masks", "train.steps=4", "checkpoint.every=0"))
    assert None in seen and True in seen, seen  # unpadded batches without a mask, padded ones with theirs
    assert False not in seen  # never an all-ones mask


def test_long_lived_frozen_collects_then_freezes_and_always_unfreezes():
    import gc
    import weakref

    from moe_emergence.training.loop import long_lived_frozen

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    before = cycle()  # garbage made before the loop: collected, not frozen with the live objects
    with long_lived_frozen() as refreeze:
        assert before() is None and gc.get_freeze_count() > 0
        during = cycle()
        refreeze()  # after an upcycle: the old model's cycles go
        assert during() is None and gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), long_lived_frozen():
        raise RuntimeError("a failed step")
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is kept, also by a nested use
    try:
        frozen = gc.get_freeze_count()  # (frozen objects freed by their reference count leave it)
        with long_lived_frozen() as refreeze:
            during = cycle()
            refreeze()
            assert during() is None and 0.9 * frozen < gc.get_freeze_count() <= frozen
        assert 0.9 * frozen < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


def test_training_steps_run_with_the_setup_frozen(tmp_path, monkeypatch):
    """The steps run with the objects made before them frozen (no full garbage-collection pass over the
    model, data and libraries mid-run), and an upcycle freezes again; nothing stays frozen after the run."""
    import gc

    from moe_emergence.training.trainer import Trainer

    frozen, freezes = [], []
    step, freeze = Trainer.train_step, gc.freeze
    monkeypatch.setattr(
        Trainer, "train_step", lambda self, *a: frozen.append(gc.get_freeze_count()) or step(self, *a)
    )
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1) or freeze())
    train(make_cfg(tmp_path, "frozen", "train.steps=4", "checkpoint.every=0"))
    assert len(frozen) == 4 and min(frozen) > 10_000, frozen
    assert len(freezes) == 2  # before the first step, and at the upcycle (step 2)
    assert gc.get_freeze_count() == 0

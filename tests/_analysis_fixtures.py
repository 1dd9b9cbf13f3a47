"""Tiny run folders for the analysis tests, built by hand in the trainer's format (config.yaml with a data:
block, metrics.jsonl, checkpoints/step_N with meta.json and model.safetensors, final/ with model + tokenizer).

The model is a tiny GPT-2 trained for a few steps on the corpus (so routing is not all ties), then upcycled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_model
from transformers import GPT2Config, GPT2LMHeadModel

from moe_emergence import MoEConfig, upcycle
from moe_emergence.data import DataConfig, SourceConfig, build_corpus, collate_blocks

CODE_PATHS = ["textwrap.py", "colorsys.py", "bisect.py", "heapq.py"]


def tiny_data_config(cache_dir: Path) -> DataConfig:
    return DataConfig(
        domains={
            "code": SourceConfig(type="stdlib", paths=CODE_PATHS, min_chars=100, max_chars=30_000),
            "math": SourceConfig(type="mathgen", num_problems=120),
            "prose": SourceConfig(type="pydoc", max_docs=60, min_chars=200, target_chars=800),
        },
        seq_len=32,
        seed=0,
        eval_fraction=0.25,
        vocab_size=400,
        tokenizer_train_chars=200_000,
        cache_dir=str(cache_dir),
    )


def _train(model, corpus, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rows = corpus.train.select(range(min(len(corpus.train), steps * 8)))
    for s in range(steps):
        batch = collate_blocks(rows[s * 8 % len(rows) : s * 8 % len(rows) + 8])
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _records(layers: list[int], E: int, steps: int, collapse: bool) -> list[dict]:
    out = []
    for step in range(0, steps + 1, 5):
        rec = {"step": step, "train/loss": 5.0 - step / 10}
        for L in layers:
            top = min(0.25 + (0.7 if collapse else 0.1) * step / steps, 0.99)
            fr = [top] + [(1 - top) / (E - 1)] * (E - 1)
            for e, f in enumerate(fr):
                rec[f"router/layer{L}/expert{e}_frac"] = f
            rec[f"router/layer{L}/max_frac"] = top
            rec[f"router/layer{L}/entropy"] = 1.3 - step / steps
        out.append(rec)
    return out


def make_run(
    root: Path, name: str, moe: bool = True, top_k: int = 2, seed: int = 0, collapse: bool = False
) -> Path:
    """A finished tiny run folder ``root/name`` (dense control when ``moe`` is False)."""
    run = root / name
    run.mkdir(parents=True)
    data = tiny_data_config(root / "data-cache")
    corpus = build_corpus(data, tokenizer=None, max_positions=32, tokenizer_dir=run / "tokenizer")
    tok = corpus.tokenizer
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    _train(model, corpus, 6, seed)
    moe_cfg = MoEConfig(
        num_experts=4,
        top_k=top_k,
        layers=[0, 1],
        init="noise",
        init_noise_std=0.5,
        router_init_std=0.3,
        seed=seed,
    )
    if moe:
        ckpt = run / "checkpoints" / "step_0000006"
        ckpt.mkdir(parents=True)
        save_model(model, str(ckpt / "model.safetensors"))
        (ckpt / "meta.json").write_text(json.dumps({"step": 6, "phase": "dense", "upcycle_at_step": 6}))
        model = upcycle(model, moe_cfg)
        _train(model, corpus, 3, seed)
        ckpt = run / "checkpoints" / "step_0000009"
        ckpt.mkdir(parents=True)
        save_model(model, str(ckpt / "model.safetensors"))
        (ckpt / "meta.json").write_text(json.dumps({"step": 9, "phase": "moe", "upcycle_at_step": 6}))
        _train(model, corpus, 3, seed + 1)
    model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    config = {
        "data": data.to_dict(),
        "model": {"base": "tiny", "upcycle_at_step": 6, "moe": moe_cfg.to_dict() if moe else None},
        "collapse": {"max_frac": 0.9, "patience": 5, "action": "warn"},
        "log": {"run_name": name},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    records = (
        _records([0, 1], 4, 12, collapse)
        if moe
        else [{"step": s, "train/loss": 5.0 - s / 10} for s in range(0, 13, 5)]
    )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """``{"moe": top-2 MoE run, "dense": dense control}``, built once per test session (shared by the
    analysis test modules through a folder under the session's base temp dir)."""
    root = tmp_path_factory.getbasetemp() / "analysis-runs"
    runs = {"moe": root / "moe", "dense": root / "dense"}
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_run(root, "moe", moe=True, top_k=2)
        make_run(root, "dense", moe=False)
        (root / "done").write_text("ok")
    return runs

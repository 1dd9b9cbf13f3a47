"""Run folders: read config.yaml and metrics.jsonl, load the final model and checkpoints, rebuild the eval blocks.

A run folder (written by ``scripts/train.py``) holds ``config.yaml`` (resolved run config with ``data:`` and
``model:`` blocks), ``metrics.jsonl`` (one JSON record per logged step), ``checkpoints/step_N/``
(``accelerator.save_state`` + ``meta.json``) and ``final/`` (``save_pretrained`` model + tokenizer).
Shapes (legend: docs/architecture.md): B rows (eval blocks), S = ``seq_len`` positions, M domains.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import moe_emergence  # noqa: F401  (registers gpt2_moe with the Auto classes)
from moe_emergence.data import DataConfig, build_corpus
from moe_emergence.data.config import saved_data_block
from moe_emergence.errors import ConfigError, as_user_error
from moe_emergence.modeling import GPT2MoEForCausalLM
from moe_emergence.training.evalset import blocks_fingerprint
from moe_emergence.yamlio import strict_load


@dataclass
class Run:
    """A training run folder, checked on load (``load_run``)."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    @property
    def model_type(self) -> str:
        return json.loads((self.final_dir / "config.json").read_text()).get("model_type", "?")

    @property
    def is_moe(self) -> bool:
        return self.model_type == "gpt2_moe"

    @property
    def data_config(self) -> DataConfig:
        """The run's own data config; keys added after the run was saved take the value then in effect
        (``data.config.saved_data_block``)."""
        return DataConfig.from_dict(saved_data_block(self.config["data"]))

    @property
    def collapse_threshold(self) -> float | None:
        """``collapse.max_frac`` of the run config: the largest expert share (0..1) that counts as collapse;
        None when the config sets none."""
        return (self.config.get("collapse") or {}).get("max_frac")


def _bad(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{str(path)!r} is not a run folder: {why} (a run folder, written by scripts/train.py, has "
        "config.yaml with a data: block, final/ with a saved model, and metrics.jsonl)"
    )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file in order; a truncated last line (a run killed mid-write) is
    skipped, any other unreadable line is an error naming the line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ConfigError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return out


def load_run(path: str | Path) -> Run:
    """Check and load a run folder's config and metrics (the model is loaded by ``load_model``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise _bad(path, "it is not a folder")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise _bad(path, "no config.yaml")
    try:
        config = strict_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        raise _bad(path, f"config.yaml is not valid YAML ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise _bad(path, "config.yaml has no data: block")
    if not (path / "final" / "config.json").is_file():
        raise _bad(path, "no final/config.json (the run has not finished, or final/ was not saved)")
    metrics_file = path / "metrics.jsonl"
    metrics = read_metrics(metrics_file) if metrics_file.is_file() else []
    run = Run(path=path, config=config, metrics=metrics)
    try:
        _ = run.data_config  # validate the data block now, with the data package's messages
    except (ValueError, TypeError) as e:
        raise _bad(path, f"config.yaml's data: block is invalid: {e}") from e
    return run


def load_model(
    folder: str | Path, device: str | torch.device = "cpu", backend: str | None = None
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder)`` in eval mode, float32 (MoE or dense GPT-2), without
    transformers' per-file "Loading weights" bar (restored after); an MoE model's experts run through
    ``backend`` when given (``GPT2MoEForCausalLM.set_experts_backend``), else the saved config's."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if backend is not None and isinstance(model, GPT2MoEForCausalLM):
        model.set_experts_backend(backend)
    return model.to(device).eval()


def load_tokenizer(run: Run):
    """The run's tokenizer (``final/``, else ``tokenizer/``)."""
    from transformers import AutoTokenizer

    for folder in (run.final_dir, run.path / "tokenizer"):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
    raise _bad(run.path, "no tokenizer in final/ or tokenizer/")


def list_checkpoints(run: Run) -> list[tuple[int, Path, dict[str, Any]]]:
    """``(step, folder, meta)`` of the complete checkpoints (with ``meta.json``), oldest first."""
    root = run.path / "checkpoints"
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "meta.json").is_file():
                out.append((int(p.name[5:]), p, json.loads((p / "meta.json").read_text())))
    return sorted(out, key=lambda t: t[0])


def _checkpoint_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    st = sorted(folder.glob("model*.safetensors"))
    if st:
        from safetensors.torch import load_file

        out = {}
        for f in st:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise ConfigError(f"checkpoint {folder} has no model weights (model.safetensors or pytorch_model.bin)")


def load_checkpoint_model(
    run: Run, folder: Path, device: str | torch.device = "cpu", backend: str | None = None
) -> torch.nn.Module:
    """The model of a checkpoint: the final model's architecture with the checkpoint's weights (an MoE
    model's experts through ``backend`` when given, as in ``load_model``).

    A dense-phase checkpoint of an upcycled run gives a ``GPT2LMHeadModel`` with the same sizes.
    """
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    state = _checkpoint_state_dict(folder)
    config = AutoConfig.from_pretrained(str(run.final_dir))
    if any(".experts." in k for k in state):
        model = GPT2MoEForCausalLM(config)
    else:
        d = config.to_dict()
        for key in ("model_type", "moe", "architectures", "transformers_version"):
            d.pop(key, None)
        model = GPT2LMHeadModel(GPT2Config(**d))
    # Tied embeddings: a checkpoint may store either name of the shared tensor.
    for a, b in (("transformer.wte.weight", "lm_head.weight"), ("lm_head.weight", "transformer.wte.weight")):
        if a not in state and b in state:
            state[a] = state[b]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {folder}: weights do not fit the final model's architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if backend is not None and isinstance(model, GPT2MoEForCausalLM):
        model.set_experts_backend(backend)
    return model.to(device).eval()


@dataclass
class EvalSet:
    """Eval blocks, numpy ``[B, S]``: input_ids, attention_mask, domain_ids (-1 on padding);
    ``rows`` are the blocks' indices in the corpus eval split; ``fingerprint`` names them as the trainer's eval
    records do (``training.evalset.blocks_fingerprint``), so an analysis on every block of a split can be matched
    with the trainer's ``eval/blocks_fingerprint`` of a run that evaluated every block."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    domain_ids: np.ndarray
    domains: list[str]
    rows: np.ndarray
    eos_token_id: int

    @property
    def fingerprint(self) -> str:
        return blocks_fingerprint(self.rows.tolist(), self.input_ids, self.attention_mask)


def block_domains(domain_ids_BS: np.ndarray) -> np.ndarray:
    """``[B]`` the most frequent domain id of each block's real tokens (-1 for an empty block)."""
    out = np.full(domain_ids_BS.shape[0], -1)
    for b, row in enumerate(domain_ids_BS):
        row = row[row >= 0]
        if len(row):
            out[b] = np.bincount(row).argmax()
    return out


def select_blocks(domain_ids_BS: np.ndarray, num_domains: int, max_blocks: int | None) -> np.ndarray:
    """Indices of at most ``max_blocks`` blocks: the FIRST ceil(max_blocks / M) blocks of each domain, in
    corpus order (so documents stay whole where they fit). None = every block."""
    all_rows = np.arange(domain_ids_BS.shape[0])
    if max_blocks is None:
        return all_rows
    if max_blocks < 1:
        raise ConfigError(f"max_blocks={max_blocks} must be >= 1 (or None for all eval blocks)")
    per = math.ceil(max_blocks / num_domains)
    dom = block_domains(domain_ids_BS)
    keep = np.concatenate([all_rows[dom == d][:per] for d in range(num_domains)])
    return np.sort(keep)


def load_eval_set(run: Run, tokenizer=None, max_blocks: int | None = None) -> EvalSet:
    """The run's eval blocks, rebuilt with the run's data config and tokenizer (cached by the data package)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(run)
    with as_user_error(f"run {run.name!r}: its data"):  # missing or changed files: the data package's message
        corpus = build_corpus(run.data_config, tokenizer=tokenizer)
    ev = corpus.eval.with_format("numpy")
    ids, mask, dom = (
        np.asarray(ev[c], dtype=np.int64) for c in ("input_ids", "attention_mask", "domain_ids")
    )
    rows = select_blocks(dom, len(corpus.domains), max_blocks)
    return EvalSet(
        input_ids=ids[rows],
        attention_mask=mask[rows],
        domain_ids=np.where(mask[rows] > 0, dom[rows], -1),
        domains=list(corpus.domains),
        rows=rows,
        eos_token_id=int(corpus.tokenizer.eos_token_id),
    )

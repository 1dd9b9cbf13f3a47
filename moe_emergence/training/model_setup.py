"""Model, tokenizer and corpus of a run, and the dense -> MoE switch.

``model.base: tiny`` builds a small ``GPT2LMHeadModel`` from the ``tiny_*`` sizes; its tokenizer is the
byte-level BPE the data pipeline trains (saved in ``<run>/tokenizer``). A hub id or a folder is loaded
with ``from_pretrained`` (only GPT-2 checkpoints) and ``AutoTokenizer``; the data pipeline tokenizes with it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from moe_emergence.modeling import GPT2MoEForCausalLM
from moe_emergence.training.config import ModelConfig, RunConfig
from moe_emergence.upcycle import load_dense_gpt2, upcycle


def build_tiny_gpt2(
    cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_id: int | None
) -> GPT2LMHeadModel:
    """A randomly initialised small GPT-2 (``tiny_*`` sizes); the caller seeds the RNG."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.tiny_n_positions,
        n_embd=cfg.tiny_n_embd,
        n_layer=cfg.tiny_n_layer,
        n_head=cfg.tiny_n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def load_tokenizer(cfg: ModelConfig):
    """The base checkpoint's tokenizer, or None for ``tiny`` (the data pipeline trains one)."""
    if cfg.base == "tiny":
        return None
    return AutoTokenizer.from_pretrained(cfg.base)


def max_positions(cfg: ModelConfig) -> int:
    """Context length of the model the run will train (checked against ``data.seq_len``)."""
    if cfg.base == "tiny":
        return cfg.tiny_n_positions
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.base).n_positions


def build_model(cfg: RunConfig, tokenizer) -> GPT2LMHeadModel:
    """The dense model at step 0 (MoE when ``upcycle_at_step == 0`` and ``moe`` is set)."""
    m = cfg.model
    if m.base == "tiny":
        model = build_tiny_gpt2(m, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    else:
        model = load_dense_gpt2(m.base)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"model.base={m.base!r}: its tokenizer has {len(tokenizer)} tokens but the model only "
                f"{model.config.vocab_size} embeddings; the tokenizer does not match the checkpoint"
            )
    if m.moe is not None and m.upcycle_at_step == 0:
        model = upcycle(model, m.moe)
    return model


def to_moe(dense: GPT2LMHeadModel, cfg: RunConfig) -> GPT2MoEForCausalLM:
    """Upcycle the current dense weights (``init`` from ``model.moe``), in train mode."""
    if cfg.model.moe is None:
        raise ValueError("model.moe is null: a dense run is never upcycled")
    model = upcycle(dense, cfg.model.moe)
    model.train()
    return model


def is_moe(model) -> bool:
    return isinstance(model, GPT2MoEForCausalLM)


def save_final(model, tokenizer, path: str | Path, state_dict=None) -> None:
    """``save_pretrained`` model + tokenizer: loadable with ``AutoModelForCausalLM.from_pretrained``
    (after ``import moe_emergence`` for MoE models)."""
    path = Path(path)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)

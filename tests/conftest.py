"""Shared fixtures: tiny GPT-2 models built locally (the hub is never touched in tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2_config(**overrides) -> GPT2Config:
    kw = dict(
        vocab_size=97,
        n_positions=32,
        n_embd=24,
        n_layer=3,
        n_head=4,
        n_inner=40,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


@pytest.fixture
def dense_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    # Non-zero biases make function preservation a stronger check.
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_(std=0.1)
            block.mlp.c_proj.bias.normal_(std=0.1)
    return model


@pytest.fixture
def dense_checkpoint(dense_model, tmp_path):
    path = tmp_path / "dense"
    dense_model.save_pretrained(path)
    return path


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))

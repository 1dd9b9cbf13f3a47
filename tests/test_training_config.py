"""Typed run config: YAML + overrides, errors naming the dotted key, inheritance, controls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from moe_emergence.config_loader import ConfigError, read_yaml
from moe_emergence.training.config import RunConfig, config_from_dict, load_config
from moe_emergence.training.rundir import config_differences

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = {"data": {"seq_len": 32, "domains": {"math": {"type": "mathgen"}, "prose": {"type": "pydoc"}}}}


def test_overrides_are_yaml_scalars_and_nested():
    cfg = config_from_dict(
        BASE, ["train.steps=7", "optim.lr=1e-3", "model.moe.layers=[0, 1]", "log.run_name=x"]
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.model.moe.layers == [0, 1]
    assert config_from_dict(BASE, ["model.moe=null"]).model.moe is None


def test_unknown_key_names_full_key_and_suggests():
    with pytest.raises(ConfigError, match=r"'train\.stpes'.*did you mean 'steps'"):
        config_from_dict(BASE, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"'model\.moe\.num_expert'.*did you mean 'num_experts'"):
        config_from_dict(BASE, ["model.moe.num_expert=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        config_from_dict({**BASE, "optimizer": {"lr": 1.0}})


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.steps=abc", r"train\.steps: expected int, got str"),
        ("train.steps=1.5", r"train\.steps: expected int"),
        ("log.progress=3", r"log\.progress: expected bool"),
        ("optim.betas=0.9", r"optim\.betas: expected a list"),
        (
            "train.balance_scope=globl",
            r"train\.balance_scope: 'globl' is not allowed; choose one of 'micro', 'global'",
        ),
        ("log.wandb=maybe", r"log\.wandb"),
    ],
)
def test_wrong_types_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(BASE, [override])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=-1", r"optim\.lr=-1\.0 is invalid"),
        ("train.grad_accum=0", r"train\.grad_accum=0 is invalid"),
        ("collapse.max_frac=1.5", r"collapse\.max_frac"),
        ("model.moe.top_k=9", r"model\.moe\.top_k=9 is invalid"),
        ("model.tiny_n_embd=65", r"tiny_n_embd=65 is invalid: a multiple of tiny_n_head"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(BASE, [override])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no-balance", {"model.moe.lb_coef", "model.moe.noise_std"}),
        ("top2", {"model.moe.top_k"}),
    ],
)
def test_controls_differ_only_in_named_keys(name, expected):
    treatment = read_yaml(CONFIGS / "gpt2-small.yaml")
    control = read_yaml(CONFIGS / f"{name}.yaml")
    assert set(config_differences(treatment, control)) == expected


def test_dense_control_differs_only_in_moe():
    treatment = read_yaml(CONFIGS / "gpt2-small.yaml")
    dense = read_yaml(CONFIGS / "dense.yaml")
    diff = config_differences(treatment, dense)
    assert diff and all(k.startswith("model.moe") for k in diff)
    assert dense["model"]["moe"] is None
    assert {k: v for k, v in dense.items() if k != "model"} == {
        k: v for k, v in treatment.items() if k != "model"
    }


def test_local_study_only_changes_data():
    diff = config_differences(read_yaml(CONFIGS / "gpt2-small.yaml"), read_yaml(CONFIGS / "local-study.yaml"))
    assert diff and all(k.startswith("data.") for k in diff)


def test_resolved_config_round_trips():
    cfg = config_from_dict(BASE, ["train.steps=3", "log.run_name=r", "model.moe.layers=[1]"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again, RunConfig)


def test_run_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "myrun.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_config(path).log.run_name == "myrun"
    assert load_config(path, ["log.run_name=other"]).log.run_name == "other"


@pytest.mark.parametrize("name", ["quickstart", "gpt2-small", "dense", "no-balance", "top2", "local-study"])
def test_shipped_configs_build(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.log.run_name == name and set(cfg.data.domains) == {"code", "math", "prose"}
    assert (cfg.model.moe is None) == (name == "dense")


@pytest.mark.parametrize("dropout, expected", [(None, 0.1), (0.0, 0.0), (0.25, 0.25)])
def test_dropout_overrides_a_loaded_checkpoint_or_keeps_it(tmp_path, dropout, expected):
    from transformers import GPT2Config, GPT2LMHeadModel

    from moe_emergence.lm_head import AlignedLMHead
    from moe_emergence.training.model_setup import build_model

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    ).save_pretrained(tmp_path / "base")
    cfg = config_from_dict(
        BASE,
        [
            f"model.base={tmp_path / 'base'}",
            "model.moe=null",
            "model.dropout=" + ("null" if dropout is None else str(dropout)),
        ],
    )
    model = build_model(cfg, tokenizer=[0] * 64)
    assert isinstance(model.lm_head, AlignedLMHead) and model.lm_head.weight is model.transformer.wte.weight
    ps = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {expected}
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == expected

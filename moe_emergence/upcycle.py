"""upcycle: turn a dense GPT-2 into a ``GPT2MoEForCausalLM`` whose experts start from its MLPs.

Shapes (legend: docs/architecture.md): D model width, F expert intermediate width, E experts.
GPT-2's Conv1D stores weights ``[in, out]``: ``c_fc.weight [D, F]``, ``c_proj.weight [F, D]``, which is
exactly one slice of the expert bank's ``w1_EDF`` / ``w2_EFD``; every copy asserts its shape.

Expert inits (per expert e, seeded by ``MoEConfig.seed``):
    copy:  W_e = W.
    noise: W_e = W + N(0, (init_noise_std * std(W))^2), for every weight and bias.
    drop:  Drop-Upcycling (Nakamura et al., ICLR 2025): pick round(drop_ratio * F) intermediate neurons
           at random; their columns of c_fc (weight and bias) and rows of c_proj are redrawn from
           N(mean(W), std(W)^2) of the original matrix; c_proj's bias is kept.
The router gate is drawn from N(0, router_init_std^2).
Variants: a shared expert (``shared_expert``) is an exact copy of the dense MLP, whatever ``init``;
its learned gate starts at ``w_g = 0``, ``b_g = logit(shared_expert_weight)``; a selection bias
(``bias_update_rate > 0``) starts at 0.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from transformers import AutoConfig, GPT2LMHeadModel

from moe_emergence.config import MoEConfig
from moe_emergence.dense_checkpoint import check_loading_info, check_weight_files, hub_access
from moe_emergence.errors import ConfigError
from moe_emergence.modeling import GPT2MoEConfig, GPT2MoEForCausalLM


def load_dense_gpt2(source: str | os.PathLike | GPT2LMHeadModel, **kwargs) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` from a model, a local checkpoint folder or a hub id; anything else is refused.

    A checkpoint whose weights file is missing, truncated, incomplete (transformers would initialise the
    missing weights randomly and only warn) or of other shapes than its config is a ``ConfigError`` naming
    the file (``dense_checkpoint``); ``kwargs`` go to ``from_pretrained`` (e.g. dropout overrides)."""
    if isinstance(source, GPT2MoEForCausalLM):
        raise ValueError("upcycle: the source is already a GPT2MoEForCausalLM; pass a dense GPT-2")
    if isinstance(source, GPT2LMHeadModel):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"upcycle: source must be a GPT2LMHeadModel, a folder or a hub id, got {type(source)}"
        )
    _check_local_source(source)
    hub = hub_access(source)  # an unreachable hub: the local cache, or one quick error
    config = AutoConfig.from_pretrained(source, **hub)
    if config.model_type != "gpt2":
        raise ValueError(
            f"upcycle: {os.fspath(source)!r} is a {config.model_type!r} checkpoint; "
            "only GPT-2 checkpoints (model_type 'gpt2') can be upcycled"
        )
    check_weight_files(source, config)
    from safetensors import SafetensorError

    try:
        model, info = GPT2LMHeadModel.from_pretrained(
            source, output_loading_info=True, ignore_mismatched_sizes=True, **hub, **kwargs
        )
    except SafetensorError as e:
        raise ConfigError(f"{os.fspath(source)}: unreadable or truncated weights file ({e})") from e
    check_loading_info(source, info)
    return model


def _check_local_source(source: str | os.PathLike) -> None:
    """``ConfigError`` for a path that is not there (absolute, relative with ``./``/``~``, or deeper than a hub
    id's ``org/name``) and for a folder without ``config.json``; hub ids pass."""
    text, path = os.fspath(source), Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{text}: a folder without config.json (not a save_pretrained model folder)")
        return
    looks_like_path = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    if looks_like_path or path.exists():
        raise ConfigError(f"{text}: no such folder (a save_pretrained folder or a hub id such as 'gpt2')")


def _randn(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """float32 normal draws from the CPU generator ``gen``, moved to ``like``'s device: the same seed gives the
    same experts whether the dense model sits on the CPU or a GPU."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(like.device)


def _perturb(w: torch.Tensor, rel_std: float, gen: torch.Generator) -> torch.Tensor:
    noise = _randn(w.shape, gen, w) * (rel_std * w.float().std())
    return w + noise.to(w.dtype)


def _drop_neurons(
    w1_DF: torch.Tensor, b1_F: torch.Tensor, w2_FD: torch.Tensor, ratio: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    F = w1_DF.shape[1]
    idx = torch.randperm(F, generator=gen)[: round(ratio * F)]

    def redraw(like: torch.Tensor, shape: tuple[int, ...], stats_of: torch.Tensor) -> torch.Tensor:
        s = stats_of.float()
        return (_randn(shape, gen, like) * s.std() + s.mean()).to(like.dtype)

    w1_DF, b1_F, w2_FD = w1_DF.clone(), b1_F.clone(), w2_FD.clone()
    w1_DF[:, idx] = redraw(w1_DF, (w1_DF.shape[0], len(idx)), w1_DF)
    b1_F[idx] = redraw(b1_F, (len(idx),), b1_F)
    w2_FD[idx, :] = redraw(w2_FD, (len(idx), w2_FD.shape[1]), w2_FD)
    return w1_DF, b1_F, w2_FD


def upcycle(
    source: str | os.PathLike | GPT2LMHeadModel, config: MoEConfig | None = None
) -> GPT2MoEForCausalLM:
    """Build a ``GPT2MoEForCausalLM`` from a dense GPT-2 (model, folder or hub id).

    Every non-MLP weight is copied; each selected block's MLP becomes ``num_experts`` experts
    initialised by ``config.init`` (module docstring). With ``init="copy"`` the result computes exactly
    the dense function in eval mode (top-1 straight-through, or top-k with normalised weights).
    Raises ``ConfigError`` for an unreadable source, ``ValueError`` for a config that does not fit it.
    """
    config = config or MoEConfig()
    dense = load_dense_gpt2(source)
    cfg_dict = dense.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "moe", "output_router_logits"):
        cfg_dict.pop(key, None)
    moe_config = GPT2MoEConfig(**cfg_dict, moe=dataclasses.replace(config))  # the model's own copy
    model = GPT2MoEForCausalLM(moe_config).to(device=dense.device, dtype=dense.dtype)

    src = dense.state_dict()
    dst = model.state_dict()
    new = {}
    for key, value in dst.items():
        if key in src:
            assert src[key].shape == value.shape, (
                f"{key}: dense {tuple(src[key].shape)} vs MoE {tuple(value.shape)}"
            )
            new[key] = src[key]
    gen = torch.Generator().manual_seed(config.seed)
    for i in moe_config.moe_layers:
        new.update(_moe_block_weights(f"transformer.h.{i}.mlp.", src, dst, config, gen))
    missing = sorted(set(dst) - set(new))
    assert not missing, f"upcycle left weights unset: {missing}"
    model.load_state_dict(new, strict=True)
    model.generation_config = dense.generation_config
    model.train(dense.training)
    return model


def _moe_block_weights(
    p: str, src: dict, dst: dict, config: MoEConfig, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """The MoE layer's weights under prefix ``p`` from the dense MLP's (GPT-2 Conv1D: ``[in, out]``):
    the expert bank, the router (N(0, router_init_std^2) from ``gen``), its step, and the variants'."""
    w1_DF, b1_F = src[p + "c_fc.weight"], src[p + "c_fc.bias"]
    w2_FD, b2_D = src[p + "c_proj.weight"], src[p + "c_proj.bias"]
    D, F = w1_DF.shape
    E = config.num_experts
    assert w2_FD.shape == (F, D) and b1_F.shape == (F,) and b2_D.shape == (D,), f"{p}: odd MLP shapes"
    assert dst[p + "experts.w1_EDF"].shape == (E, D, F), f"{p}: expert bank shape mismatch"
    experts = []
    for _ in range(E):
        w1, b1, w2, b2 = w1_DF, b1_F, w2_FD, b2_D
        if config.init == "noise":
            w1, b1, w2, b2 = (_perturb(t, config.init_noise_std, gen) for t in (w1, b1, w2, b2))
        elif config.init == "drop":
            w1, b1, w2 = _drop_neurons(w1, b1, w2, config.drop_ratio, gen)
        experts.append((w1, b1, w2, b2))
    new = {
        p + "experts." + name: torch.stack([e[j] for e in experts])
        for j, name in enumerate(("w1_EDF", "b1_EF", "w2_EFD", "b2_ED"))
    }
    new[p + "router.weight"] = (
        torch.randn(dst[p + "router.weight"].shape, generator=gen) * config.router_init_std
    )
    new[p + "router.step"] = torch.zeros((), dtype=torch.long)
    if config.bias_update_rate > 0:
        new[p + "router.selection_bias"] = torch.zeros(E, dtype=torch.float32)
    if config.shared_expert:
        for key in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
            assert dst[p + "shared_expert." + key].shape == src[p + key].shape, f"{p}: shared {key}"
            new[p + "shared_expert." + key] = src[p + key]
        if config.shared_expert_gate == "learned":
            new[p + "shared_gate.weight"] = dst[p + "shared_gate.weight"]  # init'd by the model: w_g = 0
            new[p + "shared_gate.bias"] = dst[p + "shared_gate.bias"]  # b_g = logit(weight)
    return new

"""AdamW parameter groups and the learning-rate schedule.

Groups: ``decay`` (matrices), ``no_decay`` (biases, LayerNorm weights, any 1-d parameter) and
``router`` (router gates: own learning rate ``optim.router_lr``, never decayed). Expert weights are
3-d stacked matrices and decay like the dense MLP they came from; expert biases ``b1_EF``/``b2_ED`` are
2-d but are biases, so they are matched by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_emergence.training.config import OptimConfig
from moe_emergence.training.rollback import local_data

EXPERT_BIASES = ("b1_EF", "b2_ED")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three AdamW groups (see module docstring); each carries ``base_lr`` for the schedule."""
    router, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".router." in name:
            router.append(p)
        elif p.ndim < 2 or name.endswith(EXPERT_BIASES):
            no_decay.append(p)
        else:
            decay.append(p)
    router_lr = cfg.router_lr if cfg.router_lr is not None else cfg.lr
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
        {"name": "router", "params": router, "weight_decay": 0.0, "base_lr": router_lr},
    ]
    return [g for g in groups if g["params"]]


class ShardLocalAdamW(torch.optim.AdamW):
    """torch's AdamW (Loshchilov & Hutter 2019, Algorithm 2) whose update runs on each parameter's local
    shard: for FSDP2's DTensor parameters, gradients and moments, the fused kernel gets their
    ``_local_tensor`` (this process's shard, which aliases them) instead of going through DTensor's
    dispatch, whose sharding propagation over the parameter lists took 7.3 ms of host time a step against
    1.7 ms for the same update on one GPU (2 x H200, docs/scaling.md). The update is elementwise, so the
    result is the same; the state stays DTensors (checkpoints unchanged). Plain tensors pass through as is.

    Overrides ``Adam._init_group`` (torch >= 2.7, where AdamW is Adam with decoupled weight decay): the
    lists it fills are mapped to local shards before torch's ``adam`` runs them."""

    def load_state_dict(self, state_dict: dict) -> None:
        """Load ``state_dict`` keeping this optimizer's implementation: a state saved by another AdamW (an
        older checkpoint's default ``foreach`` one, its step counts on the CPU) would otherwise set its
        groups' ``fused``/``foreach`` flags and run unfused from then on; torch moves the step counts to the
        parameters' devices for the fused kernel."""
        keep = {k: self.defaults[k] for k in ("fused", "foreach", "capturable")}
        groups = [{**g, **keep} for g in state_dict["param_groups"]]
        super().load_state_dict({**state_dict, "param_groups": groups})

    def _init_group(self, group, *lists):
        got = [[] for _ in lists]
        has_complex = super()._init_group(group, *got)
        for out, tensors in zip(lists, got, strict=True):
            out.extend(map(local_data, tensors))
        return has_complex


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (``ShardLocalAdamW``); learning rates are set every step by ``set_lr``.

    The fused implementation (``fused=True``: one multi-tensor kernel per device and dtype, on CPU and CUDA)
    rather than torch's default ``foreach`` one, which launches a dozen ``_foreach_*`` ops per step: 5.9 ms
    of host time a step against 1.7 ms on the GPT-2-small shape (H200, docs/scaling.md). A parameter on a
    device without a fused kernel is refused by torch (RuntimeError), not run another way."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = g["base_lr"]
    return ShardLocalAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine decay: ``(step + 1) / warmup`` for the first ``warmup`` steps, then
    ``min + (1 - min) * (1 + cos(pi * progress)) / 2`` with progress going 0 -> 1 over the rest.
    ``step`` counts optimizer steps from 0 (the step about to be taken)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> dict[str, float]:
    """Set every group's lr to ``base_lr * multiplier``; returns ``{group name: lr}``."""
    out = {}
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
        out[g["name"]] = g["lr"]
    return out


def reset_base_lrs(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set each group's ``base_lr`` from ``cfg`` (after loading a checkpoint, whose optimizer state carries
    the old ones): ``optim.lr`` and ``optim.router_lr`` may change on resume."""
    router_lr = cfg.router_lr if cfg.router_lr is not None else cfg.lr
    for g in optimizer.param_groups:
        g["base_lr"] = router_lr if g["name"] == "router" else cfg.lr

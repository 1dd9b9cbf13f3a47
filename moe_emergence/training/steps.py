"""One optimizer step's loss terms, and evaluation.

Shapes: B blocks, L sequence length, T = B * L tokens, E experts, V vocabulary.

Loss of one optimizer step over G micro-batches and P processes (what the gradient is taken of):
    lm = sum over all predicted tokens of the step of CE / number of those tokens (token-weighted, so
         G x B, 1 x G*B and P processes x B give the same value),
    z  = the same token weighting of the per-token router z-loss, mean over MoE layers,
    lb = mean over micro-batches (and processes) of the Switch loss E * sum_i f_i P_i, mean over layers;
         ``balance_scope: global`` all-reduces the counts behind f_i across processes first,
    ent = the same token weighting of the per-token router entropy, mean over MoE layers,
    loss = lm + lb_coef * lb + z_coef * z + entropy_coef * ent (coefficients in force this step).
``accelerator.backward`` divides by G and DDP averages over P, so micro-batch terms are scaled by G * P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_emergence.losses import aux_losses_per_layer
from moe_emergence.telemetry import DomainLossStats, LayerRoutingStats


def shifted_token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[predicted tokens (labels[:, 1:] != -100), real input tokens (attention_mask)] as float64 ``[2]``."""
    return torch.stack([(batch["labels"][:, 1:] != -100).sum(), batch["attention_mask"].sum()]).double()


def lm_share(lm_mean: torch.Tensor, n_predicted: torch.Tensor, n_step: torch.Tensor) -> torch.Tensor:
    """A micro-batch's token-weighted share of the step's LM loss, ``lm_mean * n_predicted / n_step``.
    A micro-batch with no predicted token (all padding) contributes 0, not the NaN of an empty mean
    (no host sync; the masked branch's gradient is 0)."""
    return torch.where(n_predicted > 0, lm_mean.float(), 0.0) * (n_predicted / n_step)


def nonfinite_flags(router_outputs: dict, lb_L: torch.Tensor, z_L: torch.Tensor) -> torch.Tensor:
    """``[L, 2]`` bool on device, per MoE layer: router logits non-finite, aux loss non-finite (no sync)."""
    logits_L = torch.stack([~torch.isfinite(r.router_logits).all() for r in router_outputs.values()])
    return torch.stack([logits_L, ~(torch.isfinite(lb_L) & torch.isfinite(z_L))], dim=-1)


def moe_terms(moe_model, layers: list[int], mask_T: torch.Tensor, token_share: torch.Tensor, global_fn):
    """One micro-batch's MoE loss terms after its forward: the router outputs of ``layers``, ``lb`` (mean
    over layers of the Switch loss of this micro-batch, counts all-reduced by ``global_fn`` if given), ``z``
    (mean over layers, weighted by ``token_share`` = its real tokens / the step's) and the ``[L, 2]``
    non-finite flags."""
    outs = moe_model.router_outputs()
    outs = {i: outs[i] for i in layers}
    lb_L, z_L = aux_losses_per_layer(outs, mask_T, moe_model.config.moe["num_experts"], global_fn)
    return outs, lb_L.mean(), z_L.mean() * token_share, nonfinite_flags(outs, lb_L, z_L)


def step_flags(
    totals: torch.Tensor,
    grad_norm: torch.Tensor,
    signalled: bool,
    params_bad: torch.Tensor,
    bad_L2: torch.Tensor,
) -> torch.Tensor:
    """The step's guard vector (summed over processes, then ``StepCheck.decode``): non-finite loss totals,
    non-finite gradient norm, a stop signal, non-finite parameters, the per-layer flags, then this process's
    share of the LM loss (summed: the step's LM loss). DTensor inputs (FSDP2) are made plain tensors first."""
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    device = totals.device
    return torch.cat(
        [
            (~torch.isfinite(totals).all()).reshape(1).float(),
            (~torch.isfinite(grad_norm.to(device))).reshape(1).float(),
            torch.tensor([float(signalled)], device=device),
            params_bad.to(device).reshape(1).float(),
            bad_L2.reshape(-1).float(),
            totals[:1].float(),
        ]
    )


def train_record(moe_model, lm: float, lb: float, z: float, ent: float, lrs: dict[str, float]) -> dict:
    """The loss and learning-rate part of a ``train/`` record; ``moe_model`` None for a dense model.
    ``train/loss`` uses the coefficients in force this step."""
    record = {"train/lm_loss": lm, "train/lr": lrs["decay"] if "decay" in lrs else lrs["no_decay"]}
    if moe_model is None:
        return {"train/loss": lm, **record}
    coefs = moe_model.loss_coefs
    ent_coef = moe_model.config.moe["entropy_coef"]
    noise = next(iter(moe_model.moe_layers().values())).router.noise_std_now()
    return {
        "train/loss": lm + coefs["lb"] * lb + coefs["z"] * z + ent_coef * ent,
        **record,
        "train/lb_loss": lb,
        "train/z_loss": z,
        "train/entropy_loss": ent,
        "train/lb_coef": coefs["lb"],
        "train/z_coef": coefs["z"],
        "train/router_lr": lrs["router"],
        "router/noise_std": float(noise),
    }


def token_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE ``[B * (L - 1)]`` in float32 (0 where the label is -100)."""
    V = logits_BLV.shape[-1]
    return F.cross_entropy(
        logits_BLV[:, :-1].reshape(-1, V).float(),
        labels_BL[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="none",
    )


@torch.no_grad()
def evaluate(model, unwrapped, batches, domains: list[str], moe: bool, reduce_fn) -> tuple[dict, dict]:
    """Eval metrics over ``batches`` (this process's share): ``eval/lm_loss``, ``eval/loss_{domain}``,
    ``eval/ppl_{domain}`` and, for MoE models, ``eval_router/...``. Returns (metrics, joint counts)."""
    was_training = model.training
    model.eval()
    device = next(unwrapped.parameters()).device
    losses = DomainLossStats(len(domains), device)
    routing = None
    if moe:
        E = unwrapped.config.moe["num_experts"]
        routing = LayerRoutingStats(unwrapped.config.moe_layers, E, len(domains), device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.compiler.cudagraph_mark_step_begin()  # compile_mode=reduce-overhead: outputs are used before the next
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce_T = token_cross_entropy(out.logits, batch["labels"])
        losses.add(ce_T, batch["domain_ids"][:, 1:], batch["labels"][:, 1:] != -100)
        if routing is not None:
            routing.add(unwrapped.router_outputs(), batch["attention_mask"].reshape(-1), batch["domain_ids"])
    losses.buf.copy_(reduce_fn(losses.buf))
    metrics = losses.metrics(domains, "eval")
    joint = {}
    if routing is not None:
        routing.all_reduce(reduce_fn)
        metrics.update(routing.metrics("eval_router"))
        joint = routing.joint_counts()
    model.train(was_training)
    return metrics, joint

"""Causal expert ablation: remove expert e of MoE layer L at inference and measure the eval loss per domain.

The expert is removed through the real router: the model's forward takes ``expert_masks={L: keep_E}`` and
layer L's ``Router`` routes with ``keep_E[e] = False`` (``Router`` docstring: the expert is never selected,
the weights use the survivors' renormalised probabilities, capacity and selection bias act as in the
model's own forward, and with expert choice the expert takes no token). With nothing removed this is the
model's own eval output, for every routing variant (tested).

Shapes (legend: docs/architecture.md): B rows (eval blocks), S positions, E experts, M domains.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from moe_emergence.analysis.collect import eval_nll
from moe_emergence.analysis.runs import EvalSet
from moe_emergence.errors import ConfigError


def keep_all_but(num_experts: int, expert: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[E]`` expert mask with ``expert`` removed (None removes nothing). Raises ``ValueError`` for an
    expert outside ``0 .. E-1``."""
    if expert is not None and not 0 <= expert < num_experts:
        raise ValueError(f"expert={expert} out of range for a router with {num_experts} experts")
    keep_E = torch.ones(num_experts, dtype=torch.bool, device=device)
    if expert is not None:
        keep_E[expert] = False
    return keep_E


def check_ablation(run) -> None:
    """Raises ``ValueError`` for an MoE run whose experts cannot be removed one at a time: with
    ``top_k == num_experts`` a token would be left fewer than top_k experts (run without the ablation)."""
    if not run.is_moe:
        return
    moe = json.loads((run.final_dir / "config.json").read_text())["moe"]
    if moe["top_k"] >= moe["num_experts"]:
        raise ConfigError(
            f"run {run.name!r}: top_k={moe['top_k']} equals num_experts={moe['num_experts']}, so removing one "
            "expert leaves fewer than top_k; the causal ablation cannot run (pass --no-ablation)"
        )


def domain_loss_sums(
    nll_BS: np.ndarray, domain_ids_BS: np.ndarray, num_domains: int
) -> tuple[np.ndarray, np.ndarray]:
    """(``[M]`` sum of the per-token loss, ``[M]`` token count) over tokens with a defined loss."""
    ok = ~np.isnan(nll_BS) & (domain_ids_BS >= 0)
    d = domain_ids_BS[ok]
    return np.bincount(d, weights=nll_BS[ok], minlength=num_domains), np.bincount(
        d, minlength=num_domains
    ).astype(float)


def expert_ablation(
    model,
    eval_set: EvalSet,
    batch_size: int = 8,
    progress: bool = True,
    base_nll_BS: np.ndarray | None = None,
) -> dict:
    """Per-domain eval loss with each expert of each MoE layer removed, one at a time.

    Returns ``{"base": {domain: loss}, "layers": {L: {"loss": [E][domain], "delta": [E][domain],
    "nll": {e: [B, S] per-token loss}}}}``; delta = ablated loss - base loss (token-weighted means).
    A large positive delta for domain m means the model relies on expert e for m.
    """
    M = len(eval_set.domains)
    if base_nll_BS is None:
        base_nll_BS = eval_nll(model, eval_set, batch_size, "ablation base", progress)
    s, n = domain_loss_sums(base_nll_BS, eval_set.domain_ids, M)
    base = s / np.maximum(n, 1)
    out = {"base": dict(zip(eval_set.domains, base.tolist(), strict=True)), "layers": {}}
    device = next(model.parameters()).device
    for layer, wrapper in model.moe_layers().items():
        losses, deltas, nlls = [], [], {}
        for e in range(wrapper.router.num_experts):
            masks = {layer: keep_all_but(wrapper.router.num_experts, e, device)}
            nll = eval_nll(model, eval_set, batch_size, f"ablate L{layer} e{e}", progress, masks)
            s_e, _ = domain_loss_sums(nll, eval_set.domain_ids, M)
            loss = s_e / np.maximum(n, 1)
            losses.append(loss.tolist())
            deltas.append((loss - base).tolist())
            nlls[e] = nll
        out["layers"][layer] = {"loss": losses, "delta": deltas, "nll": nlls}
    return out

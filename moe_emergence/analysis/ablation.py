"""Causal expert ablation: remove expert e of MoE layer L at inference and measure the eval loss per domain.

The expert is removed by a forward hook on that layer's ``Router`` (no change to model code): the hook takes
the router's own clean logits, sets expert e's logit to -inf and recomputes the eval-mode selection and
combine weights exactly as ``Router.forward`` does, so every token that chose e is re-routed to its next
choice and the other tokens are unchanged. Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from moe_emergence.analysis.collect import eval_nll
from moe_emergence.analysis.runs import EvalSet
from moe_emergence.routing import Router, RouterOutput, entropy_from_probs


def reroute(router: Router, logits_TE: torch.Tensor) -> RouterOutput:
    """Eval-mode routing from given logits (no noise): top-k of the softmax, combined with the router's
    own weight rule (``Router.combine_weights``)."""
    probs_TE = logits_TE.softmax(dim=-1)
    topk_probs_TK, topk_indices_TK = probs_TE.topk(router.top_k, dim=-1)
    weights_TK = router.combine_weights(topk_probs_TK)
    return RouterOutput(
        topk_weights=weights_TK,
        topk_indices=topk_indices_TK,
        router_probs=probs_TE,
        router_probs_clean=probs_TE,
        router_logits=logits_TE,
        entropy=entropy_from_probs(probs_TE),
    )


@contextmanager
def masked_expert(router: Router, expert: int | None):
    """Within the block, ``router`` never selects ``expert`` (its logit is -inf); None masks nothing
    (the hook then reproduces the router's eval output, which the tests check). Eval mode only."""
    if expert is not None and not 0 <= expert < router.num_experts:
        raise ValueError(f"expert={expert} out of range for a router with {router.num_experts} experts")

    def hook(module: Router, args, output: RouterOutput) -> RouterOutput:
        if module.training:
            raise RuntimeError("masked_expert is an eval-mode intervention; call model.eval() first")
        logits_TE = output.router_logits
        if expert is not None:
            logits_TE = logits_TE.clone()
            logits_TE[:, expert] = float("-inf")
        return reroute(module, logits_TE)

    handle = router.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def domain_loss_sums(
    nll_BL: np.ndarray, domain_ids_BL: np.ndarray, num_domains: int
) -> tuple[np.ndarray, np.ndarray]:
    """(``[D]`` sum of the per-token loss, ``[D]`` token count) over tokens with a defined loss."""
    ok = ~np.isnan(nll_BL) & (domain_ids_BL >= 0)
    d = domain_ids_BL[ok]
    return np.bincount(d, weights=nll_BL[ok], minlength=num_domains), np.bincount(
        d, minlength=num_domains
    ).astype(float)


def expert_ablation(
    model,
    eval_set: EvalSet,
    batch_size: int = 8,
    progress: bool = True,
    base_nll_BL: np.ndarray | None = None,
) -> dict:
    """Per-domain eval loss with each expert of each MoE layer removed, one at a time.

    Returns ``{"base": {domain: loss}, "layers": {L: {"loss": [E][domain], "delta": [E][domain],
    "nll": {e: [B, L] per-token loss}}}}``; delta = ablated loss - base loss (token-weighted means).
    A large positive delta for domain D means the model relies on expert e for D.
    """
    D = len(eval_set.domains)
    if base_nll_BL is None:
        base_nll_BL = eval_nll(model, eval_set, batch_size, "ablation base", progress)
    s, n = domain_loss_sums(base_nll_BL, eval_set.domain_ids, D)
    base = s / np.maximum(n, 1)
    out = {"base": dict(zip(eval_set.domains, base.tolist(), strict=True)), "layers": {}}
    for layer, wrapper in model.moe_layers().items():
        losses, deltas, nlls = [], [], {}
        for e in range(wrapper.router.num_experts):
            with masked_expert(wrapper.router, e):
                nll = eval_nll(model, eval_set, batch_size, f"ablate L{layer} e{e}", progress)
            s_e, _ = domain_loss_sums(nll, eval_set.domain_ids, D)
            loss = s_e / np.maximum(n, 1)
            losses.append(loss.tolist())
            deltas.append((loss - base).tolist())
            nlls[e] = nll
        out["layers"][layer] = {"loss": losses, "delta": deltas, "nll": nlls}
    return out

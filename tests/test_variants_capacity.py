"""Capacity factor with drop / next_best overflow: hand cases, priority, padding, weights, model telemetry."""

import math

import pytest
import torch

from moe_emergence import MoEConfig, Router, upcycle
from moe_emergence.capacity import assign_with_capacity, compact_accepted, expert_capacity, preference_order
from moe_emergence.losses import masked_mean, routed_tokens_per_expert


def logit_router(E, k=1, **kw) -> Router:
    """A router whose logits equal its input (D = E, gate = identity)."""
    r = Router(E, E, top_k=k, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r.eval()


def logits_for(prefs: list[list[int]], E: int) -> torch.Tensor:
    """Logits whose ranking per token is exactly ``prefs`` (first = highest)."""
    x = torch.zeros(len(prefs), E)
    for t, order in enumerate(prefs):
        for rank, e in enumerate(order):
            x[t, e] = float(E - rank)
    return x


def test_capacity_formula():
    assert expert_capacity(4, 1, 2, 1.0) == 2
    assert expert_capacity(10, 2, 4, 1.25) == math.ceil(10 * 2 / 4 * 1.25) == 7
    assert expert_capacity(3, 1, 8, 1.0) == 1
    assert expert_capacity(5, 8, 8, 2.0) == 5  # never more than T
    assert expert_capacity(0, 1, 4, 1.0) == 0


def test_drop_rank_priority_before_token_order():
    # E=3, k=2, T=3, C=2. Rank 0: e1<-t0, e2<-t1, e0<-t2. Rank 1: e0<-t0 (pos 1), e0<-t1 (pos 2: dropped),
    # e1<-t2 (pos 1). Token-order-only priority would drop t2's e0 instead.
    idx = torch.tensor([[1, 0], [2, 0], [0, 1]])
    acc = assign_with_capacity(idx, torch.ones(3, 2, dtype=torch.bool), 2, 2, 3)
    assert acc.tolist() == [[True, True], [True, False], [True, True]]


def test_router_drop_zeroes_weight_and_reports_dropped():
    # k=1, E=2, T=4, C=2: tokens 0,1,2 want expert 0 -> token 2 dropped.
    r = logit_router(2, capacity_factor=1.0, overflow="drop")
    out = r(logits_for([[0, 1], [0, 1], [0, 1], [1, 0]], 2))
    assert out.topk_indices[:, 0].tolist() == [0, 0, 0, 1]
    assert out.dropped[:, 0].tolist() == [False, False, True, False]
    assert out.topk_weights[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert masked_mean(out.dropped.float().mean(-1)).item() == 0.25


def test_padding_takes_no_capacity_and_is_never_dropped():
    r = logit_router(2, capacity_factor=1.0, overflow="drop")
    x = logits_for([[0, 1], [0, 1], [0, 1], [1, 0]], 2)
    out = r(x, torch.tensor([1, 0, 1, 1]))  # token 1 is padding: token 2 now fits
    assert out.dropped[:, 0].tolist() == [False, False, False, False]
    assert out.topk_weights[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_next_best_sends_overflow_to_next_expert_with_room():
    # E=3, k=1, T=3, C=1; all want e0. t1 prefers e2 next, t2 prefers e1 next.
    r = logit_router(3, capacity_factor=1.0, overflow="next_best")
    out = r(logits_for([[0, 1, 2], [0, 2, 1], [0, 1, 2]], 3))
    assert out.topk_indices[:, 0].tolist() == [0, 2, 1]
    assert not out.dropped.any()
    assert torch.equal(out.topk_weights, torch.ones(3, 1))


def test_next_best_top2_weights_from_final_choice_and_no_duplicates():
    E = 3
    r = logit_router(E, k=2, capacity_factor=1.0, overflow="next_best", straight_through=False)
    x = torch.tensor([[3.0, 2.0, 0.0], [2.5, 0.0, 1.0], [3.0, 1.5, 0.0]])
    # C = 2. rank 0: e0 <- t0, t1, t2 (t2 overflows). rank 1: t0 -> e1, t1 -> e2, t2 -> e1 (pos 1).
    # rank 2: t2 -> e2 (pos 1). Final: t0 {0,1}, t1 {0,2}, t2 {1,2}.
    out = r(x)
    assert out.topk_indices.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert not out.dropped.any()
    p = x.softmax(-1)
    sel = p.gather(1, out.topk_indices)
    assert torch.allclose(out.topk_weights, sel / sel.sum(-1, keepdim=True))
    counts = torch.bincount(out.topk_indices.reshape(-1), minlength=E)
    assert (counts <= 2).all()


def test_next_best_drops_when_only_held_experts_have_room():
    # E=3, k=2, T=3, C=2, prefs t0 [1,0,2], t1 [2,0,1], t2 [0,1,2]: t1's second slot overflows e0 and
    # e1 is full, e2 is already held by t1 -> dropped (weight 0), and never a duplicate.
    r = logit_router(3, k=2, capacity_factor=1.0, overflow="next_best", straight_through=False)
    out = r(logits_for([[1, 0, 2], [2, 0, 1], [0, 1, 2]], 3))
    assert out.dropped.tolist() == [[False, False], [False, True], [False, False]]
    assert out.topk_indices[1, 0].item() == 2 and out.topk_weights[1, 1].item() == 0.0
    assert out.topk_weights[1, 0].item() == pytest.approx(1.0)  # renormalised over the filled slot
    assert all(len(set(row)) == 2 for row in out.topk_indices.tolist())


def test_preference_order_and_compaction():
    sel = torch.tensor([[0.1, 0.5, 0.3, 0.2]])
    pref = preference_order(torch.tensor([[3, 1]]), sel)  # selected slots first, then by score
    assert pref.tolist() == [[3, 1, 2, 0]]
    idx, filled = compact_accepted(pref, torch.tensor([[False, True, True, False]]), 2)
    assert idx.tolist() == [[1, 2]] and filled.tolist() == [[True, True]]


def test_drop_straight_through_gradient_only_for_kept_tokens():
    r = logit_router(2, capacity_factor=1.0, overflow="drop").train()
    x = logits_for([[0, 1], [0, 1], [0, 1], [1, 0]], 2).requires_grad_(True)
    out = r(x)
    out.topk_weights.sum().backward()
    assert x.grad[2].abs().sum() == 0 and x.grad[0].abs().sum() > 0


@pytest.mark.parametrize("overflow", ["drop", "next_best"])
def test_model_with_capacity_runs_and_reports_dropped(dense_model, input_ids, overflow):
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, overflow=overflow, router_init_std=2.0)
    moe = upcycle(dense_model, cfg).train()
    mask = torch.ones_like(input_ids)
    mask[0, 7:] = 0
    out = moe(input_ids, attention_mask=mask, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for _i, r in out.router_outputs.items():
        assert r.dropped.shape == r.topk_indices.shape
        assert not r.dropped[mask.reshape(-1) == 0].any()
        C = expert_capacity(input_ids.numel(), 2, 4, 1.0)
        load = routed_tokens_per_expert(r, 4, mask.reshape(-1))
        assert (load <= C).all() and load.sum() == (2 * mask.sum() - r.dropped.sum())
    assert moe.transformer.h[0].mlp.router.weight.grad.abs().sum() > 0


def test_drop_k1_dropped_token_gets_zero_moe_output(dense_model):
    cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0, layers=[0], router_init_std=3.0)
    layer = upcycle(dense_model, cfg).eval().transformer.h[0].mlp
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    y, r = layer(x)
    dropped = r.dropped[:, 0]
    assert dropped.any(), "the case must overflow"
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
    assert (y[~dropped].abs().sum(-1) > 0).all()

import math

import pytest
import torch

from moe_emergence.losses import expert_fractions, load_balance_loss, mean_router_probs, z_loss


def test_uniform_routing_gives_one():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    indices = torch.arange(T).remainder(E)[:, None]  # each expert gets T/E tokens
    assert torch.allclose(load_balance_loss(probs, indices, E), torch.tensor(1.0))


def test_uniform_routing_top2_gives_one():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    indices = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)
    assert torch.allclose(load_balance_loss(probs, indices, E), torch.tensor(1.0))
    assert torch.allclose(expert_fractions(indices, E), torch.full((E,), 0.25))


def test_collapse_gives_num_experts():
    E, T = 8, 5
    probs = torch.zeros(T, E)
    probs[:, 3] = 1.0
    indices = torch.full((T, 1), 3)
    assert torch.allclose(load_balance_loss(probs, indices, E), torch.tensor(float(E)))


def test_hand_computed_case():
    # f = [2/3, 1/3], P = [0.7, 0.3] -> 2 * (2/3*0.7 + 1/3*0.3) = 2 * 17/30
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    indices = torch.tensor([[0], [0], [1]])
    assert torch.allclose(load_balance_loss(probs, indices, 2), torch.tensor(2 * 17 / 30))


def test_zero_logits_z_loss_is_log_e_squared():
    for E in (2, 8, 64):
        assert torch.allclose(z_loss(torch.zeros(7, E)), torch.tensor(math.log(E) ** 2))


def test_z_loss_closed_form():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.allclose(z_loss(logits), expected)


def test_masked_tokens_change_nothing():
    g = torch.Generator().manual_seed(0)
    E = 4
    logits = torch.randn(6, E, generator=g)
    probs = logits.softmax(-1)
    indices = probs.topk(2, dim=-1).indices
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    keep = mask.bool()
    # garbage in the padded positions must not matter
    probs_pad, logits_pad, idx_pad = probs.clone(), logits.clone(), indices.clone()
    probs_pad[~keep] = torch.tensor([1.0, 0, 0, 0])
    logits_pad[~keep] = 1e30
    idx_pad[~keep] = 0
    assert torch.allclose(
        load_balance_loss(probs_pad, idx_pad, E, mask), load_balance_loss(probs[keep], indices[keep], E)
    )
    assert torch.allclose(z_loss(logits_pad, mask), z_loss(logits[keep]))
    assert torch.allclose(mean_router_probs(probs_pad, mask), probs[keep].mean(0))


def test_all_masked_is_zero_not_nan():
    probs = torch.full((3, 2), 0.5)
    mask = torch.zeros(3)
    assert load_balance_loss(probs, torch.zeros(3, 1, dtype=torch.long), 2, mask).item() == 0.0
    assert z_loss(torch.zeros(3, 2), mask).item() == 0.0


def test_load_balance_gradient_flows_only_through_probs():
    logits = torch.randn(10, 4, requires_grad=True)
    probs = logits.softmax(-1)
    loss = load_balance_loss(probs, probs.argmax(-1, keepdim=True), 4)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_padding_never_counts_in_the_load_balance_loss_even_if_non_finite():
    probs_TE = torch.tensor([[0.7, 0.3], [float("nan"), float("inf")]])
    idx_TK = torch.tensor([[0], [1]])
    lb = load_balance_loss(probs_TE, idx_TK, 2, torch.tensor([1, 0]))
    assert torch.isfinite(lb) and lb.item() == pytest.approx(2 * 0.7)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_layers_in_one_call_equal_one_call_per_layer(k):
    """Every formula on ``[L, T, ...]`` (what ``moe_objective`` does for all layers at once) gives, per
    layer, exactly its one-layer value: odd T, padding holding NaN/inf, an assignment mask, counts from
    another batch (global balance), gradients included."""
    from moe_emergence.losses import fractions_of, masked_mean, tokens_per_expert

    g = torch.Generator().manual_seed(k)
    L, T, E = 3, 13, 5
    logits = torch.randn(L, T, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    topk = probs.topk(k, dim=-1).indices
    mask = torch.ones(T, dtype=torch.bool)
    mask[[2, 7, 12]] = False
    with torch.no_grad():
        logits[:, 7] = float("nan")  # padding: must not count
        logits[1, 12, 0] = float("inf")
    keep = torch.rand(L, T, k, generator=g) > 0.3
    counts_LE = torch.rand(L, E, generator=g) * 10
    ent = -(probs * probs.clamp_min(1e-9).log()).sum(-1)
    batched = [
        load_balance_loss(probs, topk, E, mask),
        load_balance_loss(probs, topk, E, mask, fractions_E=fractions_of(counts_LE)),
        z_loss(logits, mask),
        masked_mean(ent, mask),
        tokens_per_expert(topk, E, mask, keep),
        fractions_of(counts_LE),
    ]
    per_layer = [
        torch.stack([load_balance_loss(probs[i], topk[i], E, mask) for i in range(L)]),
        torch.stack(
            [load_balance_loss(probs[i], topk[i], E, mask, fractions_of(counts_LE[i])) for i in range(L)]
        ),
        torch.stack([z_loss(logits[i], mask) for i in range(L)]),
        torch.stack([masked_mean(ent[i], mask) for i in range(L)]),
        torch.stack([tokens_per_expert(topk[i], E, mask, keep[i]) for i in range(L)]),
        torch.stack([fractions_of(counts_LE[i]) for i in range(L)]),
    ]
    for b, p in zip(batched, per_layer, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, p, rtol=1e-6, atol=0)
    assert batched[4].sum(-1).tolist() == [float(keep[i][mask].sum()) for i in range(L)]
    grad_b = torch.autograd.grad((batched[0] + batched[2] + batched[3]).sum(), logits, retain_graph=True)[0]
    grad_p = torch.autograd.grad((per_layer[0] + per_layer[2] + per_layer[3]).sum(), logits)[0]
    assert torch.isfinite(grad_b[:, mask]).all()  # NaN only in the padding rows' own softmax
    torch.testing.assert_close(grad_b, grad_p, equal_nan=True)
    with pytest.raises(ValueError, match=r"expected \(3, 13, " + str(k)):
        tokens_per_expert(topk, E, mask, keep[0])


def test_fractions_of_the_wrong_shape_are_refused():
    probs = torch.full((3, 6, 4), 0.25)
    topk = torch.zeros(3, 6, 1, dtype=torch.long)
    assert load_balance_loss(probs, topk, 4, fractions_E=torch.full((4,), 0.25)).shape == (3,)
    with pytest.raises(ValueError, match=r"fractions_E has shape \(2, 4\), expected \(3, 4\)"):
        load_balance_loss(probs, topk, 4, fractions_E=torch.full((2, 4), 0.25))

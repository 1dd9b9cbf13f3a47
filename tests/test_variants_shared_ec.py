"""Shared expert (fixed and learned gate) and expert-choice routing."""

import math

import pytest
import torch

from moe_emergence import GPT2MoEForCausalLM, MoEConfig, Router, upcycle
from moe_emergence.losses import masked_mean, routed_tokens_per_expert
from moe_emergence.selection import expert_choice


@pytest.mark.parametrize("gate, weight", [("fixed", 0.0), ("fixed", 0.3), ("fixed", 1.0), ("learned", 0.3)])
@pytest.mark.parametrize(
    "routing", [dict(top_k=1, straight_through=True), dict(top_k=2, straight_through=False)]
)
def test_shared_expert_copy_init_preserves_dense_function(dense_model, input_ids, gate, weight, routing):
    cfg = MoEConfig(
        num_experts=4,
        router_init_std=1.0,
        shared_expert=True,
        shared_expert_gate=gate,
        shared_expert_weight=weight,
        **routing,
    )
    moe = upcycle(dense_model, cfg).eval()
    with torch.no_grad():
        assert (moe(input_ids).logits - dense_model(input_ids).logits).abs().max().item() <= 1e-5
    mlp = moe.transformer.h[1].mlp
    assert torch.equal(mlp.shared_expert.c_fc.weight, dense_model.transformer.h[1].mlp.c_fc.weight)


def test_shared_expert_mix_formula_and_learned_gate_gradient(dense_model):
    cfg = MoEConfig(
        num_experts=2,
        layers=[0],
        init="noise",
        init_noise_std=0.5,
        shared_expert=True,
        shared_expert_weight=0.3,
    )
    moe = upcycle(dense_model, cfg).eval()
    layer = moe.transformer.h[0].mlp
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    y, r = layer(x)
    routed = layer.experts(x, r.topk_indices, r.topk_weights)
    assert torch.allclose(y, 0.7 * routed + 0.3 * layer.shared_expert(x), atol=1e-6)

    learned = upcycle(dense_model, MoEConfig(**{**cfg.to_dict(), "shared_expert_gate": "learned"})).train()
    layer = learned.transformer.h[0].mlp
    assert layer.shared_gate.weight.abs().sum() == 0
    assert torch.sigmoid(layer.shared_gate.bias).item() == pytest.approx(0.3)
    layer(x)[0].sum().backward()
    assert (
        layer.shared_gate.weight.grad.abs().sum() > 0 and layer.shared_expert.c_fc.weight.grad.abs().sum() > 0
    )
    with torch.no_grad():
        layer.shared_gate.weight.normal_()
    layer.eval()
    g = torch.sigmoid(x @ layer.shared_gate.weight + layer.shared_gate.bias)
    r = layer.router(x)
    expected = (1 - g) * layer.experts(x, r.topk_indices, r.topk_weights) + g * layer.shared_expert(x)
    assert torch.allclose(layer(x)[0], expected, atol=1e-6)


def test_shared_expert_save_load(dense_model, input_ids, tmp_path):
    cfg = MoEConfig(num_experts=2, shared_expert=True, shared_expert_gate="learned", shared_expert_weight=0.2)
    moe = upcycle(dense_model, cfg).eval()
    moe.save_pretrained(tmp_path / "m")
    loaded = GPT2MoEForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(input_ids).logits, moe(input_ids).logits)
    fresh = GPT2MoEForCausalLM(moe.config)  # random init still starts the gate at logit(weight)
    mlp = fresh.transformer.h[0].mlp
    assert torch.sigmoid(mlp.shared_gate.bias).item() == pytest.approx(0.2)
    assert mlp.shared_gate.weight.abs().sum() == 0
    std = moe.config.initializer_range
    assert mlp.shared_expert.c_fc.weight.std().item() == pytest.approx(std, rel=0.2)
    assert mlp.shared_expert.c_proj.weight.std().item() == pytest.approx(std / (2 * 3) ** 0.5, rel=0.2)


def test_expert_choice_hand_case():
    # T=4, E=2, k=1, C = ceil(4 * 1 / 2) = 2. Expert 0 takes tokens 0, 1; expert 1 takes 1, 3; token 2 none.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.55, 0.05], [0.2, 0.8]])
    tokens, weights, taken, unrouted = expert_choice(probs, 2)
    assert tokens.tolist() == [[0, 1], [3, 1]]
    assert torch.equal(weights, torch.tensor([[0.9, 0.6], [0.8, 0.4]]))
    assert taken.all()
    assert unrouted.tolist() == [False, False, True, False]
    # padding is never preferred to a real token and gets weight 0
    tokens, weights, taken, unrouted = expert_choice(probs, 2, torch.tensor([1, 0, 1, 1]))
    assert tokens.tolist() == [[0, 2], [3, 0]]
    assert unrouted.tolist() == [False, True, False, False]
    # a real-token capacity of 1: the second slots are not taken (weight 0, not counted)
    tokens, weights, taken, unrouted = expert_choice(probs, 2, torch.tensor([1, 0, 1, 1]), None, 1)
    assert tokens.tolist() == [[0, 2], [3, 0]]
    assert taken.tolist() == [[True, False], [True, False]]
    assert torch.equal(weights, torch.tensor([[0.9, 0.0], [0.8, 0.0]]))
    assert unrouted.tolist() == [False, True, True, False]


def test_expert_choice_layer_output_and_gradient(dense_model):
    cfg = MoEConfig(
        num_experts=4, top_k=1, routing="expert_choice", layers=[0], init="noise", init_noise_std=0.5
    )
    layer = upcycle(dense_model, cfg).train().transformer.h[0].mlp
    x = torch.randn(10, 24, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the router noise: a draw where some token goes unrouted
    y, r = layer(x)
    C = math.ceil(10 * 1 / 4)
    assert r.ec_tokens.shape == (4, C) and r.ec_weights.shape == (4, C)
    expected = torch.zeros(10, 24)
    for e in range(4):
        for c in range(C):
            t = r.ec_tokens[e, c]
            one = layer.experts(x[t : t + 1], torch.tensor([[e]]), torch.ones(1, 1))
            expected[t] += r.router_probs[t, e] * one[0]
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.equal(y[r.unrouted], torch.zeros_like(y[r.unrouted]))
    assert 0 < masked_mean(r.unrouted.float()).item() < 1
    y.pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_expert_choice_model_trains_and_generate_refuses(dense_model, input_ids):
    cfg = MoEConfig(num_experts=4, top_k=2, routing="expert_choice", capacity_factor=1.5)
    moe = upcycle(dense_model, cfg).train()
    out = moe(input_ids, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    r = out.router_outputs[0]
    assert r.ec_tokens.shape == (4, math.ceil(33 * 2 / 4 * 1.5))
    assert r.topk_indices.shape == (33, 2)  # the token's own preference
    load = routed_tokens_per_expert(r, 4)
    assert torch.equal(load, torch.full((4,), float(r.ec_tokens.shape[1])))
    with pytest.raises(ValueError, match="not causal"):
        moe.generate(input_ids[:, :3], max_new_tokens=2)


def test_expert_choice_refuses_token_choice_only_options():
    for name, value in [("bias_update_rate", 0.1), ("random_routing_prob", 0.1), ("expert_dropout", 0.1)]:
        with pytest.raises(ValueError, match=f"MoEConfig.{name}=.*expert_choice"):
            MoEConfig(routing="expert_choice", **{name: value})


# ----------------------------------------------------------------------------- padding (issue 18.3)


def layout_mask(T: int, layout: str) -> torch.Tensor:
    """A mask with T real tokens and T padding tokens: ``first``, ``last``, or ``interleaved`` (a [4, S]
    batch whose rows hold their real tokens and padding at different places, flattened)."""
    if layout == "first":
        return torch.cat([torch.zeros(T), torch.ones(T)])
    if layout == "last":
        return torch.cat([torch.ones(T), torch.zeros(T)])
    r = T // 4
    rows = [[1] * r + [0] * r, [0] * r + [1] * r, [1, 0] * r, [0] * (r // 2) + [1] * r + [0] * (r - r // 2)]
    return torch.tensor([v for row in rows for v in row], dtype=torch.float)


def with_padding(
    x_TD: torch.Tensor, layout: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x with as many random padding rows as real ones, mask, index of each real token)."""
    mask = layout_mask(x_TD.shape[0], layout)
    x = 3.0 * torch.randn(len(mask), x_TD.shape[1], generator=torch.Generator().manual_seed(seed))
    real = mask.nonzero().squeeze(1)
    x[real] = x_TD
    return x, mask, real


def taken_by_expert(r, real: torch.Tensor | None) -> list[list[tuple[int, float]]]:
    """Per expert, the (real token index, weight) of the slots it took, in slot order."""
    pos = None if real is None else {int(t): i for i, t in enumerate(real)}
    out = []
    for e in range(r.ec_tokens.shape[0]):
        taken = r.ec_taken[e]
        toks = r.ec_tokens[e][taken].tolist()
        out.append(
            [
                (t if pos is None else pos[t], w)
                for t, w in zip(toks, r.ec_weights[e][taken].tolist(), strict=True)
            ]
        )
    return out


@pytest.mark.parametrize("layout", ["first", "last", "interleaved"])
@pytest.mark.parametrize("k, cf", [(1, 1.0), (2, 1.0), (2, 1.25)])
def test_expert_choice_padding_does_not_change_the_real_assignment(layout, k, cf):
    E = 4
    router = Router(E, E, top_k=k, routing="expert_choice", capacity_factor=cf).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    x = torch.randn(8, E, generator=torch.Generator().manual_seed(3))
    x[5] = x[1]  # ties between real tokens: broken by token order, whatever the padding
    x[6] = x[1]
    alone = router(x)
    xp, mask, real = with_padding(x, layout)
    both = router(xp, mask)
    C_real = math.ceil(8 * k / E * cf)
    assert alone.ec_tokens.shape == (E, C_real) and both.ec_tokens.shape == (E, math.ceil(16 * k / E * cf))
    assert taken_by_expert(both, real) == taken_by_expert(alone, None)
    assert torch.equal(both.unrouted[real], alone.unrouted)
    assert both.unrouted[mask == 0].all()
    load = routed_tokens_per_expert(both, E, mask)
    assert torch.equal(load, routed_tokens_per_expert(alone, E)) and load.tolist() == [float(C_real)] * E
    # not vacuous: the static slots hold real tokens the experts do not take (the old C would have)
    assert (~both.ec_taken & (mask[both.ec_tokens] == 1)).any()
    assert (both.ec_weights[~both.ec_taken] == 0).all()


@pytest.mark.parametrize("layout", ["first", "last", "interleaved"])
def test_expert_choice_ties_go_by_token_order(layout):
    router = Router(4, 4, top_k=1, routing="expert_choice").eval()  # zero gate: every p_te = 1/4
    alone = router(torch.zeros(8, 4))
    xp, mask, real = with_padding(torch.zeros(8, 4), layout)
    both = router(xp, mask)
    assert taken_by_expert(alone, None) == [[(0, 0.25), (1, 0.25)]] * 4
    assert taken_by_expert(both, real) == taken_by_expert(alone, None)


@pytest.mark.parametrize("layout", ["first", "last", "interleaved"])
@pytest.mark.parametrize("k", [1, 2])
def test_expert_choice_layer_output_on_real_tokens_ignores_padding(dense_model, layout, k):
    cfg = MoEConfig(
        num_experts=4, top_k=k, routing="expert_choice", layers=[0], init="noise", router_init_std=1.0
    )
    layer = upcycle(dense_model, cfg).eval().transformer.h[0].mlp
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y_alone, r_alone = layer(x)
        xp, mask, real = with_padding(x, layout, seed=5)
        y_both, r_both = layer(xp, mask)
    # not vacuous: the static slots hold real tokens the experts do not take (the old C would have)
    assert (~r_both.ec_taken & (mask[r_both.ec_tokens] == 1)).any()
    assert taken_by_expert(r_both, real) == taken_by_expert(r_alone, None)
    torch.testing.assert_close(y_both[real], y_alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(y_both[real][r_alone.unrouted], torch.zeros_like(y_alone[r_alone.unrouted]))

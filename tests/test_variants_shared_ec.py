"""Shared expert (fixed and learned gate) and expert-choice routing."""

import math

import pytest
import torch

from moe_emergence import GPT2MoEForCausalLM, MoEConfig, upcycle
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

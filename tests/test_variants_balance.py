"""Aux-loss-free selection bias, entropy regularisation, random routing and expert dropout."""

import pytest
import torch

from moe_emergence import GPT2MoEForCausalLM, MoEConfig, Router, upcycle
from moe_emergence.losses import masked_mean, routed_tokens_per_expert
from moe_emergence.selection import expert_dropout_keep, random_reroute
from moe_emergence.telemetry import variant_metrics


def logit_router(E, k=1, **kw) -> Router:
    r = Router(E, E, top_k=k, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r.eval()


def test_selection_bias_selects_but_does_not_weight():
    r = logit_router(3, k=2, straight_through=False, normalize_topk=False, bias_update_rate=0.1)
    x = torch.tensor([[2.0, 1.0, 0.0]])
    r.selection_bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    out = r(x)
    p = x.softmax(-1)
    assert out.topk_indices.tolist() == [[2, 0]]  # ranked by logits + bias = [2, 1, 5]
    assert torch.equal(out.topk_weights, p[:, [2, 0]])  # unbiased probabilities
    assert torch.equal(out.router_probs, p)


def test_selection_bias_update_formula():
    r = logit_router(3, bias_update_rate=0.1)
    r.update_selection_bias(torch.tensor([4.0, 1.0, 1.0]))  # mean 2 -> sign = [-1, +1, +1]
    assert torch.allclose(r.selection_bias, torch.tensor([-0.1, 0.1, 0.1]))
    r.update_selection_bias(torch.tensor([2.0, 2.0, 2.0]))  # balanced: unchanged
    assert torch.allclose(r.selection_bias, torch.tensor([-0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        r.update_selection_bias(torch.ones(4))
    with pytest.raises(ValueError, match="bias_update_rate=0"):
        logit_router(3).update_selection_bias(torch.ones(3))
    assert "selection_bias" not in logit_router(3).state_dict()


def test_selection_bias_survives_state_dict_and_save_pretrained(dense_model, input_ids, tmp_path):
    cfg = MoEConfig(num_experts=4, top_k=2, bias_update_rate=0.05, router_init_std=0.5)
    moe = upcycle(dense_model, cfg).train()
    out = moe(input_ids)
    loads = {i: routed_tokens_per_expert(r, 4) for i, r in out.router_outputs.items()}
    assert all(load.sum() == 2 * input_ids.numel() for load in loads.values())
    moe.update_selection_bias(loads)
    moe.update_selection_bias({i: torch.tensor([9.0, 0.0, 0.0, 3.0]) for i in loads})
    bias = moe.transformer.h[1].mlp.router.selection_bias.clone()
    expected = 0.05 * torch.sign(loads[1].mean() - loads[1]) + 0.05 * torch.tensor([-1.0, 1.0, 1.0, 0.0])
    assert bias.abs().sum() > 0 and torch.allclose(bias, expected)
    moe.save_pretrained(tmp_path / "m")
    loaded = GPT2MoEForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.transformer.h[1].mlp.router.selection_bias, bias)
    other = upcycle(dense_model, cfg)
    other.load_state_dict(moe.state_dict())
    assert torch.equal(other.transformer.h[1].mlp.router.selection_bias, bias)
    moe.eval(), loaded.eval()
    assert torch.equal(loaded(input_ids).logits, moe(input_ids).logits)
    with pytest.raises(ValueError, match="expected exactly the MoE blocks"):
        moe.update_selection_bias({0: torch.ones(4)})
    with pytest.raises(ValueError, match="bias_update_rate is 0"):
        upcycle(dense_model, MoEConfig(num_experts=4)).update_selection_bias(loads)


def test_selection_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    r = Router(8, 4, top_k=1, bias_update_rate=0.05).eval()
    with torch.no_grad():
        r.weight.normal_()
        r.weight[0] += 1.0  # expert 0 favoured
    x = torch.randn(512, 8) + 0.5
    load0 = torch.bincount(r(x).topk_indices[:, 0], minlength=4).float()
    for _ in range(100):
        r.update_selection_bias(torch.bincount(r(x).topk_indices[:, 0], minlength=4).float())
    load1 = torch.bincount(r(x).topk_indices[:, 0], minlength=4).float()
    assert load1.max() - load1.min() < 0.5 * (load0.max() - load0.min())


def test_entropy_loss_value_and_gradient(dense_model, input_ids):
    cfg = dict(num_experts=4, top_k=2, straight_through=False, noise_std=0.0, lb_coef=0.0, z_coef=0.0)
    cfg["router_init_std"] = 0.5
    mask = torch.ones_like(input_ids)
    mask[2, 4:] = 0
    for coef in (0.0, 0.7, -0.7):
        moe = upcycle(dense_model, MoEConfig(**cfg, entropy_coef=coef)).train()
        out = moe(input_ids, attention_mask=mask, labels=input_ids)
        m = mask.reshape(-1)
        expected = torch.stack([masked_mean(r.entropy, m) for r in out.router_outputs.values()]).mean()
        assert torch.equal(out.entropy_loss, expected)
        assert torch.allclose(out.loss, out.lm_loss + coef * expected)
        out.loss.backward()
        g = moe.transformer.h[0].mlp.router.weight.grad.abs().max().item()
        # copies + renormalised top-2: only the entropy term moves the router
        assert (g > 1e-4) if coef else (g < 1e-6)


def test_random_reroute_replaces_top1_and_swaps():
    idx = torch.tensor([[0, 1, 2]] * 2000)
    torch.manual_seed(0)
    out = random_reroute(idx, 1.0, torch.ones(4, dtype=torch.bool))
    top = out[:, 0]
    counts = torch.bincount(top, minlength=4).float()
    assert (counts - 500).abs().max() < 80  # uniform over 4
    for row in out.tolist():
        assert len(set(row)) == 3
        e = row[0]
        if e == 1:
            assert row == [1, 0, 2]  # swapped with the slot that held it
        elif e == 2:
            assert row == [2, 1, 0]
        else:
            assert row[1:] == [1, 2]
    allowed = torch.tensor([False, True, False, True])
    assert set(random_reroute(idx, 1.0, allowed)[:, 0].tolist()) == {1, 3}
    assert torch.equal(random_reroute(idx, 0.0, allowed), idx)


def test_random_routing_in_router_training_only_with_final_weights():
    r = logit_router(4, k=2, straight_through=False, normalize_topk=True, random_routing_prob=0.5)
    x = torch.randn(400, 4)
    plain = r(x)
    assert torch.equal(plain.topk_indices, x.topk(2).indices)  # eval: off
    r.train()
    out = r(x)
    changed = (out.topk_indices[:, 0] != plain.topk_indices[:, 0]).float().mean().item()
    assert 0.25 < changed < 0.5  # p * 3/4 of the tokens get a different top-1
    sel = x.softmax(-1).gather(1, out.topk_indices)
    assert torch.allclose(out.topk_weights, sel / sel.sum(-1, keepdim=True))


def test_expert_dropout_keep_mask():
    torch.manual_seed(0)
    for _ in range(200):
        keep = expert_dropout_keep(8, 3, 0.9, torch.device("cpu"))
        assert keep.sum() >= 3
    torch.manual_seed(1)
    u = torch.rand(6)
    torch.manual_seed(1)
    keep = expert_dropout_keep(6, 2, 0.5, torch.device("cpu"))
    expected = (u >= 0.5).scatter(0, u.topk(2).indices, True)
    assert torch.equal(keep, expected)
    assert expert_dropout_keep(6, 1, 0.0, torch.device("cpu")).all()


def test_expert_dropout_in_router_excludes_and_renormalises():
    E = 6
    r = logit_router(E, k=2, straight_through=False, normalize_topk=False, expert_dropout=0.5, noise_std=0.0)
    r.train()
    x = torch.randn(50, E)
    torch.manual_seed(3)
    keep = expert_dropout_keep(E, 2, 0.5, x.device)
    assert not keep.all(), "seed must drop an expert"
    torch.manual_seed(3)
    out = r(x)
    assert keep[out.topk_indices].all()
    p = x.softmax(-1) * keep
    p = p / p.sum(-1, keepdim=True)
    top = p.topk(2)
    assert torch.equal(out.topk_indices, top.indices)
    assert torch.allclose(out.topk_weights, top.values)
    r.eval()
    assert torch.equal(r(x).topk_indices, x.topk(2).indices)


@pytest.mark.parametrize(
    "variant",
    [
        dict(random_routing_prob=0.3),
        dict(expert_dropout=0.3),
        dict(bias_update_rate=0.01),
        dict(random_routing_prob=0.3, expert_dropout=0.3, capacity_factor=1.0, overflow="next_best"),
    ],
)
def test_perturbed_variants_train_with_gradients(dense_model, input_ids, variant):
    moe = upcycle(dense_model, MoEConfig(num_experts=4, top_k=2, init="noise", **variant)).train()
    out = moe(input_ids, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert moe.transformer.h[2].mlp.router.weight.grad.abs().sum() > 0
    assert moe.transformer.h[2].mlp.experts.w1_EDF.grad.abs().sum() > 0


def test_variant_metrics_for_telemetry(dense_model, input_ids):
    mask = torch.ones_like(input_ids)
    mask[1, 3:] = 0
    m = mask.reshape(-1)
    moe = upcycle(dense_model, MoEConfig(num_experts=4)).eval()
    assert variant_metrics(moe(input_ids, attention_mask=mask).router_outputs, m, {}) == {}
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, router_init_std=2.0, bias_update_rate=0.1)
    moe = upcycle(dense_model, cfg).eval()
    moe.update_selection_bias({i: torch.tensor([3.0, 1.0, 1.0, 1.0]) for i in moe.moe_layers()})
    out = moe(input_ids, attention_mask=mask)
    bias = {i: layer.router.selection_bias for i, layer in moe.moe_layers().items()}
    stats = variant_metrics(out.router_outputs, m, bias)
    r = out.router_outputs[2]
    dropped = (r.dropped.float().mean(-1) * m).sum() / m.sum()
    assert torch.equal(stats["router/layer2/dropped_frac"], dropped)
    assert stats["router/layer2/selection_bias_e0"].item() == pytest.approx(-0.1)
    ec = upcycle(dense_model, MoEConfig(num_experts=4, routing="expert_choice")).eval()
    outs = ec(input_ids, attention_mask=mask).router_outputs
    r = outs[0]
    assert torch.equal(
        variant_metrics(outs, m, {})["router/layer0/unrouted_frac"], (r.unrouted.float() * m).sum() / m.sum()
    )

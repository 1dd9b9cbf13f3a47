"""Variants off = bit-identical to the core router/model; config validation; coefficient schedules."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_emergence import GPT2MoEConfig, MoEConfig, Router, upcycle
from moe_emergence.losses import LossCoefs
from moe_emergence.schedules import coef_at


def core_router_forward(r: Router, x: torch.Tensor):
    """The Router.forward of the core commit (2027941), verbatim maths: the reference for 'off'."""
    x_TD = x.reshape(-1, x.shape[-1])
    logits_TE = F.linear(x_TD.float(), r.weight.float())
    probs_clean_TE = logits_TE.softmax(dim=-1)
    if r.training and r.noise_std > 0:
        probs_TE = (logits_TE + r.noise_std_now() * torch.randn_like(logits_TE)).softmax(dim=-1)
    else:
        probs_TE = probs_clean_TE
    topk_probs_TK, topk_indices_TK = probs_TE.topk(r.top_k, dim=-1)
    if r.top_k == 1 and r.straight_through:
        w = (topk_probs_TK - topk_probs_TK.detach()) + 1.0 if r.training else torch.ones_like(topk_probs_TK)
    elif r.normalize_topk:
        w = topk_probs_TK / topk_probs_TK.sum(dim=-1, keepdim=True)
    else:
        w = topk_probs_TK
    return w, topk_indices_TK, probs_TE, probs_clean_TE, logits_TE


@pytest.mark.parametrize("k, st, norm", [(1, True, True), (2, False, True), (3, False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_router_with_variants_off_is_bit_identical_to_core(k, st, norm, training):
    torch.manual_seed(0)
    r = Router(10, 6, top_k=k, noise_std=0.5, straight_through=st, normalize_topk=norm)
    torch.nn.init.normal_(r.weight, std=0.5)
    r.train(training)
    x = torch.randn(2, 7, 10)
    torch.manual_seed(5)
    ref = core_router_forward(r, x)
    torch.manual_seed(5)
    out = r(x)
    got = (out.topk_weights, out.topk_indices, out.router_probs, out.router_probs_clean, out.router_logits)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert out.dropped is None and out.ec_tokens is None and out.unrouted is None


INACTIVE = dict(
    overflow="next_best",  # no capacity: unused
    shared_expert_gate="learned",  # no shared expert: unused
    shared_expert_weight=0.9,
    entropy_coef=0.0,
    lb_schedule={"kind": "constant"},
    z_schedule=None,
)


def _run(model, input_ids, mask, seed=7, loss_coefs=None):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(input_ids, attention_mask=mask, labels=input_ids, loss_coefs=loss_coefs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("k", [1, 2])
def test_model_with_inactive_variant_settings_is_bit_identical(dense_model, input_ids, k):
    base_cfg = dict(num_experts=4, top_k=k, noise_std=0.5, init="noise", lb_coef=0.1, z_coef=0.01)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    ref = upcycle(dense_model, MoEConfig(**base_cfg)).train()
    ref_out, ref_grads = _run(ref, input_ids, mask)
    variants = [
        INACTIVE,
        dict(capacity_factor=100.0),  # capacity that never overflows
        dict(random_routing_prob=0.0, expert_dropout=0.0, bias_update_rate=0.0),
    ]
    for variant in variants:
        model = upcycle(dense_model, MoEConfig(**base_cfg, **variant)).train()
        assert model.state_dict().keys() == ref.state_dict().keys()
        out, grads = _run(model, input_ids, mask, loss_coefs=model.config.moe.loss_coefs(123))
        for name in ("loss", "logits", "lm_loss", "aux_loss", "z_loss"):
            assert torch.equal(getattr(out, name), getattr(ref_out, name)), (variant, name)
        assert grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[n], ref_grads[n]) for n in grads), variant
    # training-only variants are off in eval
    ref.eval()
    model = upcycle(dense_model, MoEConfig(**base_cfg, random_routing_prob=0.7, expert_dropout=0.5)).eval()
    assert torch.equal(model(input_ids).logits, ref(input_ids).logits)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("routing", "hash", "one of"),
        ("capacity_factor", 0.5, ">= 1.0"),
        ("capacity_factor", float("nan"), ">= 1.0"),
        ("capacity_factor", True, ">= 1.0"),
        ("overflow", "reroute", "one of"),
        ("shared_expert", 1, "true or false"),
        ("shared_expert_gate", "softmax", "one of"),
        ("shared_expert_weight", 1.5, r"\[0, 1\]"),
        ("bias_update_rate", -0.1, ">= 0"),
        ("entropy_coef", float("inf"), "finite"),
        ("random_routing_prob", 1.1, r"\[0, 1\]"),
        ("expert_dropout", 1.0, r"\[0, 1\)"),
        ("lb_schedule", {"kind": "exp"}, "kind"),
        ("z_schedule", "cosine", "kind"),
    ],
)
def test_variant_fields_are_validated(field, value, allowed):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.*{allowed}"):
        MoEConfig(**{field: value})


def test_learned_gate_needs_open_interval_and_negative_entropy_allowed():
    with pytest.raises(ValueError, match=r"shared_expert_weight=1.0.*\(0, 1\)"):
        MoEConfig(shared_expert=True, shared_expert_gate="learned", shared_expert_weight=1.0)
    assert MoEConfig(entropy_coef=-0.5).entropy_coef == -0.5
    with pytest.raises(ValueError, match=r"lb_schedule.warmup_steps=0"):
        MoEConfig(lb_schedule={"kind": "linear_warmup", "warmup_steps": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['warmup'\]"):
        MoEConfig(lb_schedule={"kind": "cosine", "total_steps": 10, "warmup": 3})
    with pytest.raises(ValueError, match=r"needs key 'gamma'"):
        MoEConfig(z_schedule={"kind": "step", "step_size": 10})


def test_config_round_trip_and_old_dicts_get_defaults(dense_model):
    cfg = MoEConfig(
        capacity_factor=1.25,
        overflow="next_best",
        shared_expert=True,
        lb_schedule={"kind": "cosine", "total_steps": 100, "final": 0.001},
    )
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    old = {
        k: v
        for k, v in MoEConfig().to_dict().items()
        if k not in ("capacity_factor", "routing", "lb_schedule")
    }
    assert MoEConfig.from_dict(old) == MoEConfig()
    hf = GPT2MoEConfig(n_layer=2, moe=cfg.to_dict())
    assert hf.moe == cfg and isinstance(hf.moe, MoEConfig)
    assert hf.to_dict()["moe"] == cfg.to_dict()  # saved as a dict: config.json stays JSON


def test_schedule_formulas():
    assert coef_at(0.01, None, 500) == 0.01
    assert coef_at(0.01, {"kind": "constant"}, 500) == 0.01
    warm = {"kind": "linear_warmup", "warmup_steps": 100, "start": 0.002}
    assert coef_at(0.01, warm, 0) == pytest.approx(0.002)
    assert coef_at(0.01, warm, 25) == pytest.approx(0.002 + 0.008 * 0.25)
    assert coef_at(0.01, warm, 100) == coef_at(0.01, warm, 1000) == pytest.approx(0.01)
    step = {"kind": "step", "step_size": 10, "gamma": 0.5}
    assert [coef_at(1.0, step, s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cos = {"kind": "cosine", "total_steps": 100, "final": 0.1}
    assert coef_at(1.0, cos, 0) == pytest.approx(1.0)
    assert coef_at(1.0, cos, 50) == pytest.approx(0.55)
    assert coef_at(1.0, cos, 100) == coef_at(1.0, cos, 200) == pytest.approx(0.1)
    assert coef_at(1.0, {"kind": "cosine", "total_steps": 3}, 1) == pytest.approx(
        (1 + math.cos(math.pi / 3)) / 2
    )
    with pytest.raises(ValueError, match="step=-1"):
        coef_at(1.0, None, -1)


def test_model_loss_uses_scheduled_coefficients(dense_model, input_ids):
    cfg = MoEConfig(
        num_experts=4,
        top_k=2,
        lb_coef=0.5,
        z_coef=0.02,
        lb_schedule={"kind": "linear_warmup", "warmup_steps": 10},
        z_schedule={"kind": "step", "step_size": 5, "gamma": 0.1},
    )
    moe = upcycle(dense_model, cfg).eval()
    coefs = cfg.loss_coefs(4)
    assert (coefs.lb_coef, coefs.z_coef) == (pytest.approx(0.2), pytest.approx(0.02))
    out = moe(input_ids, labels=input_ids, loss_coefs=coefs)
    assert torch.allclose(out.loss, out.lm_loss + 0.2 * out.aux_loss + 0.02 * out.z_loss)
    out = moe(input_ids, labels=input_ids, loss_coefs=cfg.loss_coefs(12))
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.aux_loss + 0.0002 * out.z_loss)
    out = moe(input_ids, labels=input_ids)  # no coefficients given: the config's base values
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.aux_loss + 0.02 * out.z_loss)
    out = moe(input_ids, labels=input_ids, loss_coefs=LossCoefs(lb_coef=0.0, z_coef=0.0002))
    assert torch.allclose(out.loss, out.lm_loss + 0.0002 * out.z_loss)


def test_router_refuses_bad_variant_arguments():
    for kw, msg in [
        (dict(capacity_factor=0.5), "capacity_factor=0.5"),
        (dict(expert_dropout=1.0), r"expert_dropout=1.0 must be in \[0, 1\)"),
        (dict(random_routing_prob=-0.1), "random_routing_prob=-0.1"),
        (dict(bias_update_rate=-1.0), "bias_update_rate=-1.0"),
        (dict(routing="hash"), "routing='hash'"),
        (dict(overflow="spill"), "overflow='spill'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Router(4, 4, **kw)


def test_variant_fields_load_through_the_typed_yaml_loader():
    from moe_emergence.config_loader import ConfigError, build

    data = {
        "capacity_factor": 1.25,
        "overflow": "next_best",
        "shared_expert": True,
        "lb_schedule": {"kind": "linear_warmup", "warmup_steps": 50},
        "z_schedule": None,
    }
    cfg = build(MoEConfig, data)
    assert cfg.capacity_factor == 1.25 and cfg.lb_schedule == {"kind": "linear_warmup", "warmup_steps": 50}
    with pytest.raises(ConfigError, match="warmup_steps"):
        build(MoEConfig, {"lb_schedule": {"kind": "linear_warmup"}})

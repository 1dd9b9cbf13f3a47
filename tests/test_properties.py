"""Property tests of the router and losses over shapes, k, masks, extreme logits and dtypes."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_emergence import Router
from moe_emergence.losses import expert_fractions, load_balance_loss, z_loss

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def routing_case(draw):
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, E))
    T = draw(st.integers(0, 17))
    D = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e15]))
    seed = draw(st.integers(0, 2**16))
    return E, k, T, D, scale, seed


@settings(max_examples=60, deadline=None)
@given(case=routing_case(), dtype=DTYPES, training=st.booleans(), st_flag=st.booleans(), norm=st.booleans())
def test_router_outputs_are_finite_and_documented_shapes(case, dtype, training, st_flag, norm):
    E, k, T, D, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    r = Router(D, E, top_k=k, noise_std=0.5, straight_through=st_flag, normalize_topk=norm).train(training)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g) * scale)
    x = (torch.randn(T, D, generator=g)).to(dtype)
    out = r(x)
    assert out.topk_weights.shape == (T, k) and out.topk_indices.shape == (T, k)
    for name in ("router_probs", "router_probs_clean", "router_logits"):
        t = getattr(out, name)
        assert t.shape == (T, E) and t.dtype == torch.float32
        assert torch.isfinite(t).all(), name
    assert torch.isfinite(out.topk_weights).all() and torch.isfinite(out.entropy).all()
    assert ((out.topk_indices >= 0) & (out.topk_indices < E)).all()
    assert (out.entropy >= -1e-6).all() and (out.entropy <= math.log(E) + 1e-5).all()
    if T:
        assert torch.allclose(out.router_probs.sum(-1), torch.ones(T), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(case=routing_case(), dtype=DTYPES, mask_kind=st.sampled_from(["none", "random", "all_masked"]))
def test_losses_finite_and_bounded(case, dtype, mask_kind):
    E, k, T, _, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * scale).to(dtype)
    probs = logits.float().softmax(-1)
    indices = probs.topk(k, -1).indices
    mask = {
        "none": None,
        "random": torch.randint(0, 2, (T,), generator=g),
        "all_masked": torch.zeros(T),
    }[mask_kind]
    lb = load_balance_loss(probs, indices, E, mask)
    z = z_loss(logits, mask)
    assert lb.shape == () and z.shape == () and lb.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.isfinite(lb) and torch.isfinite(z)
    # E * sum f_i P_i lies in [0, E]; it is 0 only when no token counts
    assert 0.0 <= lb.item() <= E + 1e-4
    assert z.item() >= 0.0
    f = expert_fractions(indices, E, mask)
    counted = T if mask is None else int(mask.sum())
    assert torch.isclose(f.sum(), torch.tensor(1.0 if counted else 0.0), atol=1e-5)


# ----------------------------------------------------------------------------- layer, model, trainer losses


@settings(max_examples=40, deadline=None)
@given(
    E=st.integers(1, 5),
    data=st.data(),
    B=st.integers(0, 3),
    L=st.integers(0, 5),
    dtype=DTYPES,
    training=st.booleans(),
)
def test_moe_layer_any_batch_including_empty(E, data, B, L, dtype, training):
    from moe_emergence import MoEConfig, MoEWrapper

    k = data.draw(st.integers(1, E))
    torch.manual_seed(0)
    layer = MoEWrapper(MoEConfig(num_experts=E, top_k=k, noise_std=0.5), 8, 12).to(dtype).train(training)
    x = torch.randn(B, L, 8).to(dtype).requires_grad_()
    y, r = layer(x)
    assert y.shape == (B, L, 8) and y.dtype == dtype and torch.isfinite(y.float()).all()
    assert r.router_logits.shape == (B * L, E) and r.topk_indices.shape == (B * L, k)
    y.float().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert all(torch.isfinite(g.float()).all() for g in grads)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 3),
    L=st.integers(2, 6),
    k=st.integers(1, 3),
    scale=st.sampled_from([1.0, 1e4]),
    mask_kind=st.sampled_from(["all_padding", "one_token", "random"]),
)
def test_model_and_trainer_losses_finite_on_padding(B, L, k, scale, mask_kind):
    """The full MoE model and the trainer's loss terms on batches with no (or one) real token per row:
    logits, aux and z losses and every gradient stay finite; an all-padding micro-batch adds 0."""
    from conftest import tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    from moe_emergence import MoEConfig, upcycle
    from moe_emergence.losses import LossCoefs
    from moe_emergence.training.steps import MoEStep, StepSums, micro_batch_loss, shifted_token_counts

    torch.manual_seed(0)
    model = upcycle(GPT2LMHeadModel(tiny_gpt2_config()), MoEConfig(num_experts=3, top_k=k, layers=[0, 2]))
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.weight.mul_(scale)  # huge logits: the z-loss must stay finite
    model.train()
    g = torch.Generator().manual_seed(B * 10 + L)
    ids = torch.randint(0, 97, (B, L), generator=g)
    mask = {
        "all_padding": torch.zeros(B, L, dtype=torch.long),
        "one_token": torch.nn.functional.one_hot(torch.zeros(B, dtype=torch.long), L),
        "random": torch.randint(0, 2, (B, L), generator=g),
    }[mask_kind]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    out = model(**batch)
    assert out.logits.shape == (B, L, 97) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)
    c = shifted_token_counts(batch)
    moe = MoEStep([0, 2], 3, LossCoefs(0.01, 0.001), None, False)
    sums = StepSums(2, torch.device("cpu"))
    lm_only = model(**batch, output_router_logits=False)
    loss = micro_batch_loss(lm_only, batch, c.clamp_min(1), 1.0, moe, sums)
    assert torch.isfinite(loss) and torch.isfinite(sums.totals).all()
    assert not sums.bad_L2.any()
    if int(c[0]) == 0:
        assert sums.totals[0].item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@settings(max_examples=60, deadline=None)
@given(
    case=routing_case(),
    overflow=st.sampled_from(["drop", "next_best"]),
    cf=st.sampled_from([1.0, 1.3, 2.0]),
    masked=st.booleans(),
    dropout=st.sampled_from([0.0, 0.5]),
    bias=st.booleans(),
)
def test_capacity_invariants(case, overflow, cf, masked, dropout, bias):
    """Per expert at most C real assignments; no expert twice per token; dropped weights are 0;
    padding never dropped; k=1 next_best without expert dropout drops nothing."""
    E, k, T, D, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    r = Router(
        D,
        E,
        top_k=k,
        capacity_factor=cf,
        overflow=overflow,
        expert_dropout=dropout,
        bias_update_rate=float(bias),
    ).train()
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g) * scale)
        if bias:
            r.selection_bias.copy_(torch.randn(E, generator=g) * scale)
    mask = torch.randint(0, 2, (T,), generator=g) if masked else torch.ones(T, dtype=torch.long)
    torch.manual_seed(seed)
    out = r(torch.randn(T, D, generator=g), mask if masked else None)
    C = math.ceil(T * k / E * cf)
    kept = (~out.dropped) & mask.bool()[:, None]
    load = torch.zeros(E).index_add_(0, out.topk_indices[kept], torch.ones(int(kept.sum())))
    assert (load <= C).all()
    assert all(len(set(row)) == k for row in out.topk_indices.tolist())
    assert torch.equal(out.topk_weights[out.dropped], torch.zeros(int(out.dropped.sum())))
    assert not out.dropped[mask == 0].any()
    assert torch.isfinite(out.topk_weights).all()
    if overflow == "next_best" and k == 1 and dropout == 0.0:
        assert not out.dropped.any()


def test_nonfinite_flags_name_each_layer_and_kind():
    """``nonfinite_flags``: per layer, [router logits non-finite, a router loss non-finite]; NaN, +inf and -inf
    each count, in any layer, and a flag of one layer never marks another."""
    from types import SimpleNamespace

    from moe_emergence.training.steps import nonfinite_flags

    torch.manual_seed(0)
    logits = [torch.randn(6, 4) for _ in range(3)]
    lb, z = torch.ones(3), torch.ones(3)
    flags = lambda: nonfinite_flags([SimpleNamespace(router_logits=t) for t in logits], lb, z)  # noqa: E731
    assert flags().shape == (3, 2) and not flags().any()
    logits[2][5, 3] = -math.inf
    assert flags().tolist() == [[False, False], [False, False], [True, False]]
    logits[0][0, 0] = math.nan
    z[1] = math.inf
    assert flags().tolist() == [[True, False], [False, True], [True, False]]
    z[1], lb[0] = 1.0, math.nan
    assert flags()[:, 1].tolist() == [True, False, False]

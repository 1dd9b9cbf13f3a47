"""Zero-weight assignments are not computed (``moe_emergence.experts`` docstring): the exact repro of issue 18,
the expert-choice dispatch, a capacity-dropping model with an expert whose output is inf for the tokens it
dropped, and the claim that this leaves every router gradient as computing those assignments would.

The backends' outputs and gradients on poisoned experts / inputs against eager are in ``test_kernels.py``
(``test_*zero_weight_assignments_isolated``)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from moe_emergence import MoEConfig, MoEWrapper, upcycle
from moe_emergence import experts as experts_module
from moe_emergence.experts import ExpertBank, eager_experts

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the backends that run here on D = 8 / 32 and F = 16 / 64 / 128 (triton: on a GPU; its CPU interpreter runs in
# test_kernels.py's subprocess)
BACKENDS = ["eager", "grouped_mm"] + (["triton"] if CUDA else [])


def compute_all(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, indices_TK, weights_TK, activation):
    """The semantics before issue 18: every assignment computed, ``y_t = sum_k w_tk * expert_{i_tk}(x_t)`` with
    ``0 * expert(x)`` for a zero weight (every expert on every token; small shapes only)."""
    act = ACT2FN[activation]
    out_TED = torch.stack(
        [act(x_TD @ w1_EDF[e] + b1_EF[e]) @ w2_EFD[e] + b2_ED[e] for e in range(w1_EDF.shape[0])], dim=1
    )
    picked_TKD = out_TED.gather(1, indices_TK[:, :, None].expand(-1, -1, out_TED.shape[-1]))
    return (picked_TKD.float() * weights_TK[:, :, None].float()).sum(1).to(x_TD.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_18_repro_zero_weight_on_inf_bias_gives_zero(backend):
    """The report: expert 1's b2 is inf, token 0 goes to it with weight 0 -> y = 0, not 0 * inf = NaN; and every
    gradient (x, the weight, each parameter) is exactly 0."""
    torch.manual_seed(0)
    bank = ExpertBank(2, 8, 16, backend=backend).to(DEVICE)
    with torch.no_grad():
        bank.b2_ED[1, 0] = float("inf")
    x = torch.randn(1, 8, device=DEVICE, requires_grad=True)
    weights = torch.zeros(1, 1, device=DEVICE, requires_grad=True)
    y = bank(x, torch.tensor([[1]], device=DEVICE), weights)
    assert y[0, 0].item() == 0.0 and torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    for name, grad in [("x", x.grad), ("weights", weights.grad)] + [
        (n, p.grad) for n, p in bank.named_parameters()
    ]:
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), f"{name}: {grad}"


def test_eager_with_zero_weights_matches_computing_everything_on_finite_experts():
    """On finite experts, not computing a zero-weight assignment gives what ``0 * expert(x)`` gave: y and every
    gradient equal, except d(weights) at the zero weights, which is now 0 instead of <dy, expert(x)>."""
    g = torch.Generator().manual_seed(0)
    T, D, F, E, K = 23, 7, 11, 4, 2
    params = [torch.randn(s, generator=g) for s in ((T, D), (E, D, F), (E, F), (E, F, D), (E, D))]
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    weights[torch.rand(T, K, generator=g) < 0.3] = 0.0
    weights[3] = 0.0  # a token with no live assignment
    dy = torch.randn(T, D, generator=g)
    results = []
    for fn in (eager_experts, compute_all):
        leaves = [p.clone().requires_grad_() for p in (*params, weights)]
        y = fn(*leaves[:5], indices, leaves[5], "gelu_new")
        (y * dy).sum().backward()
        results.append([y.detach()] + [p.grad for p in leaves])
    (y_new, *g_new), (y_old, *g_old) = results
    torch.testing.assert_close(y_new, y_old, rtol=1e-5, atol=1e-6)
    for new, old in zip(g_new[:5], g_old[:5], strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    zero = weights == 0
    assert zero.sum() > 3 and (g_old[5][zero] != 0).all()
    assert torch.equal(g_new[5][zero], torch.zeros(int(zero.sum())))
    torch.testing.assert_close(g_new[5][~zero], g_old[5][~zero], rtol=1e-5, atol=1e-6)


def _wrapper(backend: str, **moe) -> MoEWrapper:
    torch.manual_seed(0)  # drawn on the CPU, then moved: the same layer on every device
    layer = MoEWrapper(MoEConfig(num_experts=4, noise_std=0.0, backend=backend, **moe), 32, 64)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(std=0.2)
        layer.router.weight.normal_(std=0.5)
    return layer.to(DEVICE).train()


# every way a router gives a weight exactly 0: capacity (drop; next_best when only held experts have room),
# softmax underflow (k = 2, with and without renormalisation), a selection bias whose picks all underflow (the
# eps-clamped renormalisation), expert choice with a removed expert and with padding tokens
ZERO_WEIGHT_ROUTINGS = {
    "drop_top1": dict(top_k=1, capacity_factor=1.0),
    "drop_top2": dict(top_k=2, capacity_factor=1.0),
    "next_best_top2": dict(top_k=2, capacity_factor=1.0, overflow="next_best"),
    "underflow_top2": dict(top_k=2),
    "underflow_top2_unnormalised": dict(top_k=2, normalize_topk=False),
    "underflow_selection_bias": dict(top_k=2, bias_update_rate=0.1),
    "expert_choice_removed_expert": dict(top_k=1, routing="expert_choice"),
    "expert_choice_padding": dict(
        top_k=2, routing="expert_choice", capacity_factor=2.0
    ),  # C = T: padding picked
}


@pytest.mark.parametrize("routing", list(ZERO_WEIGHT_ROUTINGS))
def test_router_gradients_unchanged_by_not_computing_zero_weights(monkeypatch, routing):
    """The docstring's claim: a weight is exactly 0 only where a mask or capacity zeroed it (upstream gradient 0
    whatever the weight's own) or its softmax probability underflowed (softmax's backward scales by p = 0); so the
    router's gradient, and every other one, is the same as when the zero-weight assignments are computed
    (``compute_all``, finite experts). Each case checks that it has zero weights."""
    kw = ZERO_WEIGHT_ROUTINGS[routing]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 32, generator=g).to(DEVICE)
    r = torch.randn(2, 13, 32, generator=g).to(DEVICE)
    token_mask = expert_mask = None
    if routing == "expert_choice_padding":
        token_mask = torch.ones(26, device=DEVICE).index_fill_(
            0, torch.tensor([4, 11, 20, 25], device=DEVICE), 0
        )
    if routing == "expert_choice_removed_expert":
        expert_mask = torch.tensor([True, True, False, True], device=DEVICE)
    grads = []
    for fn in ("new", "old"):
        if fn == "old":
            monkeypatch.setattr(experts_module, "get_backend", lambda *args: compute_all)
        layer = _wrapper("eager", **kw)
        with torch.no_grad():
            if routing.startswith("underflow"):
                # logit gaps of hundreds: exp underflows to exactly 0 (drawn on the CPU: same on every device)
                w = torch.randn(layer.router.weight.shape, generator=torch.Generator().manual_seed(3))
                layer.router.weight.copy_(20.0 * w)
            if (
                routing == "underflow_selection_bias"
            ):  # pick the two experts of lowest probability for token 0
                low = (x.reshape(-1, 32)[0] @ layer.router.weight.t()).argsort()[:2]
                layer.router.selection_bias[low] = 1e4
        xx = x.clone().requires_grad_()
        y, out = layer(xx, token_mask, expert_mask)
        weights = out.topk_weights if out.ec_weights is None else out.ec_weights
        assert (weights == 0).any(), f"{routing}: no zero weight to test"
        (y * r).sum().backward()
        grads.append({"x": xx.grad} | {n: p.grad for n, p in layer.named_parameters()})
    new, old = grads
    assert new["router.weight"].abs().sum() > 0
    errors = {n: ((new[n] - old[n]).norm() / old[n].norm().clamp_min(1e-30)).item() for n in new}
    assert all(torch.isfinite(g).all() for g in new.values())
    # CUDA's float32 GEMMs round differently for different row counts (the live rows vs all of them):
    # measured up to 2.7e-5 relative on an H200 (2026-11-30) with these logits of std ~100; CPU: <= 1e-6
    # With the selection bias every token picks two experts whose probabilities are (near) 0, and the
    # eps-clamped renormalisation p / max(sum p, 1e-30) runs on subnormal floats with few significant bits:
    # 9e-4 relative on the router weight's gradient on the H200 (same date).
    bound = 1e-6 if DEVICE != "cuda" else 2e-3 if routing == "underflow_selection_bias" else 1e-4
    assert all(e <= bound for e in errors.values()), f"{routing}: relative errors {errors}"


@pytest.mark.parametrize("poison", ["b1", "b2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_choice_removed_expert_with_inf_bias_isolated(backend, poison):
    """Expert choice: a removed expert still picks C tokens, with weight 0; with an inf bias it changes nothing
    (y and every gradient equal to the same layer with that expert finite)."""
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expert_mask = torch.tensor([True, False, True, True], device=DEVICE)
    results = []
    for poisoned in (False, True):
        layer = _wrapper(backend, top_k=1, routing="expert_choice")
        if poisoned:
            with torch.no_grad():
                getattr(layer.experts, f"{poison}_E{'F' if poison == 'b1' else 'D'}")[1] = float("inf")
        xx = x.clone().requires_grad_()
        y, out = layer(xx, None, expert_mask)
        assert (out.ec_weights[1] == 0).all()
        (y * torch.arange(32, device=DEVICE)).sum().backward()
        results.append([y.detach(), xx.grad] + [p.grad for p in layer.parameters()])
    for ref, got in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


SPIKE_TOKEN, SPIKE_DIM, ROUTE_DIM, POISONED = 100, 3, 7, 2


def _poisoned_model(backend: str, activation: str):
    """The tiny upcycled model of the issue, whose last block sends every token to expert ``POISONED`` (its
    ``ln_2`` bias puts ~10 on ``ROUTE_DIM`` for all tokens, the router reads only that dimension). Capacity
    ``C = T / 4`` keeps the first C tokens (in row 0) and drops the others. Expert ``POISONED`` has one hidden unit
    ``100 * (x[SPIKE_DIM] - 4.5)`` whose row of ``w2`` is 1e37: its output is 0 for ordinary tokens
    (``x[SPIKE_DIM]`` well under 4.5 after the LayerNorm: the unit is off), inf for ``SPIKE_TOKEN`` (its embedding
    is a spike on ``SPIKE_DIM``: ~5.6 after the LayerNorm)."""
    dense = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=101,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function=activation,
        )  # fmt: skip
    )
    moe = MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0, noise_std=0.0, backend=backend)
    model = upcycle(dense, moe).to(DEVICE)
    block = model.transformer.h[1]
    bank = block.mlp.experts
    with torch.no_grad():
        model.transformer.wte.weight[SPIKE_TOKEN, SPIKE_DIM] = 100.0
        block.ln_2.bias[ROUTE_DIM] = 10.0
        block.mlp.router.weight.zero_()
        block.mlp.router.weight[POISONED, ROUTE_DIM] = 1.0
        bank.w1_EDF[POISONED, :, 0] = 0.0
        bank.w1_EDF[POISONED, SPIKE_DIM, 0] = 100.0
        bank.b1_EF[POISONED, 0] = -450.0
        bank.w2_EFD[POISONED, 0, :] = 1e37
    return model.train()


# gelu_new (GPT-2's): the logits only. The kept tokens' own backward through the off unit overflows there
# (gelu_new's autograd multiplies z by d(a) ~ dy * 1e37 before the factor 1 - tanh^2 = 0), which is this
# construction's artefact, not a dropped token's; relu's backward selects instead of multiplying, so with it the
# gradients are checked too.
MODEL_CASES = [(b, "gelu_new") for b in BACKENDS] + [(b, "relu") for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize(("backend", "activation"), MODEL_CASES)
def test_model_capacity_dropped_tokens_of_an_inf_expert_stay_finite(backend, activation):
    """Spike tokens in row 1 are routed to the poisoned expert and dropped by capacity; that expert's output for
    them is inf (checked), for the tokens it keeps finite. Every logit (and, relu, every gradient) stays finite;
    before issue 18 the spike tokens' logits were NaN (0 * inf)."""
    torch.manual_seed(0)
    model = _poisoned_model(backend, activation)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[1, [2, 9, 15]] = SPIKE_TOKEN
    ids = ids.to(DEVICE)
    seen = {}
    bank = model.transformer.h[1].mlp.experts
    hook = bank.register_forward_pre_hook(
        lambda _m, args: seen.update(x=args[0].detach(), w=args[2].detach())
    )
    out = model(input_ids=ids, labels=ids)
    hook.remove()

    # the premise: everything goes to the poisoned expert, row 0's first 8 tokens are kept, the rest (the spikes
    # among them) dropped, and the poisoned expert's own output is inf exactly for the spike tokens
    routing = out.router_outputs[1]
    assert (routing.topk_indices == POISONED).all()
    kept = ~routing.dropped[:, 0]
    assert kept[:8].all() and not kept[8:].any() and torch.equal(seen["w"][:, 0] != 0, kept)
    everyone = torch.full_like(routing.topk_indices, POISONED)
    with torch.no_grad():
        raw = eager_experts(
            seen["x"], *bank.parameters(), everyone, torch.ones_like(seen["w"]), bank.activation
        )
    spike = (ids == SPIKE_TOKEN).reshape(-1)
    assert (~torch.isfinite(raw[spike])).any(dim=-1).all() and torch.isfinite(raw[~spike]).all()

    assert torch.isfinite(out.logits).all()
    if activation == "relu":
        out.loss.backward()
        bad = [
            n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        assert not bad, f"non-finite gradients: {bad}"
        assert bank.w2_EFD.grad[POISONED].abs().sum() > 0  # the kept tokens did train it

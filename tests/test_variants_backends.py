"""Every routing variant reaches the experts only through the backend interface
``fn(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, indices_TK, weights_TK, activation) -> y_TD``, so any correct
backend gives the same model. Checked with an independent dense reference backend swapped in."""

import pytest
import torch
from transformers.activations import ACT2FN

from moe_emergence import MoEConfig, upcycle
from moe_emergence import experts as experts_module

VARIANTS = [
    dict(),
    dict(capacity_factor=1.0, overflow="drop"),
    dict(capacity_factor=1.0, overflow="next_best", random_routing_prob=0.5, expert_dropout=0.3),
    dict(shared_expert=True, shared_expert_gate="learned", shared_expert_weight=0.4),
    dict(routing="expert_choice", capacity_factor=1.5),
    dict(bias_update_rate=0.1),
]


def dense_backend(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, indices_TK, weights_TK, activation):
    """Every expert on every token, then pick: a different algorithm from eager (no sort, no split)."""
    act = ACT2FN[activation]
    h_ETF = act(torch.einsum("td,edf->etf", x_TD, w1_EDF) + b1_EF[:, None])
    y_ETD = torch.einsum("etf,efd->etd", h_ETF, w2_EFD) + b2_ED[:, None]
    T = x_TD.shape[0]
    y_TKD = y_ETD[indices_TK, torch.arange(T)[:, None]]
    return (y_TKD.float() * weights_TK[..., None].float()).sum(1).to(x_TD.dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "plain")
def test_variant_is_backend_agnostic(dense_model, input_ids, variant, monkeypatch):
    cfg = MoEConfig(
        num_experts=4, top_k=2, straight_through=False, init="noise", init_noise_std=0.5, **variant
    )
    model = upcycle(dense_model, cfg).train()
    if cfg.bias_update_rate:
        model.update_selection_bias({i: torch.tensor([5.0, 0.0, 1.0, 2.0]) for i in model.moe_layers()})
    results = []
    for backend in (None, dense_backend):
        calls = []

        def recording(fn, calls=calls):
            def wrapped(x_TD, w1, b1, w2, b2, indices_TK, weights_TK, activation):
                assert indices_TK.dtype == torch.long and indices_TK.shape == weights_TK.shape
                assert indices_TK.shape[0] == x_TD.shape[0] and x_TD.dim() == 2
                calls.append(indices_TK.shape)
                return fn(x_TD, w1, b1, w2, b2, indices_TK, weights_TK, activation)

            return wrapped

        base = experts_module.eager_experts if backend is None else backend
        monkeypatch.setattr(experts_module, "get_backend", lambda name, device, *dims, f=base: recording(f))
        model.zero_grad()
        torch.manual_seed(11)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        assert len(calls) == 3  # one backend call per MoE layer, whatever the variant
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.allclose(logits_a, logits_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("router" in n for n in grads_a)
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=lambda v: ",".join(v))
def test_variants_under_gradient_checkpointing_and_bf16_autocast(dense_model, input_ids, variant):
    cfg = MoEConfig(num_experts=4, top_k=2, init="noise", noise_std=0.3, **variant)
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0
    base = upcycle(dense_model, cfg).train()
    grads = []
    for checkpointing in (False, True):
        model = upcycle(dense_model, cfg).train()
        model.load_state_dict(base.state_dict())
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(5)
        model(input_ids, attention_mask=mask, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = base(input_ids, attention_mask=mask, labels=input_ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def _cpu_fast_backends() -> list[str]:
    try:
        from moe_emergence import kernels
    except ImportError:  # the fast backends (moe_emergence.kernels) are not on this branch yet
        return []
    return kernels.available_backends("cpu")


@pytest.mark.parametrize("backend", _cpu_fast_backends() or [pytest.param("none", marks=pytest.mark.skip)])
def test_every_variant_with_every_cpu_backend_matches_eager(dense_model, input_ids, backend):
    mask = torch.ones_like(input_ids)
    mask[2, 5:] = 0
    for variant in VARIANTS:
        kw = dict(num_experts=4, top_k=2, straight_through=False, init="noise", init_noise_std=0.5, **variant)
        ref = upcycle(dense_model, MoEConfig(**kw)).train()
        fast = upcycle(dense_model, MoEConfig(**kw, backend=backend)).train()
        fast.load_state_dict(ref.state_dict())
        outs = []
        for model in (ref, fast):
            torch.manual_seed(3)
            out = model(input_ids, attention_mask=mask, labels=input_ids)
            out.loss.backward()
            outs.append(
                (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
            )
        (la, ga), (lb, gb) = outs
        assert torch.allclose(la, lb, atol=1e-5), (backend, variant)
        assert ga.keys() == gb.keys()
        for n in ga:
            assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), (backend, variant, n)

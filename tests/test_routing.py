import math

import pytest
import torch

from moe_emergence import Router
from moe_emergence.routing import entropy_from_probs


def make_router(E=6, D=10, k=1, **kw) -> Router:
    torch.manual_seed(0)
    r = Router(D, E, top_k=k, **kw)
    torch.nn.init.normal_(r.weight, std=0.5)
    return r


def test_shapes_and_dtypes_for_2d_and_3d_inputs():
    r = make_router(E=5, D=8, k=2)
    for x in (torch.randn(7, 8), torch.randn(2, 3, 8, dtype=torch.bfloat16)):
        out = r(x)
        T = 7 if x.dim() == 2 else 6
        assert out.topk_weights.shape == (T, 2) and out.topk_indices.shape == (T, 2)
        for t in (out.router_probs, out.router_probs_clean, out.router_logits):
            assert t.shape == (T, 5) and t.dtype == torch.float32
        assert out.entropy.shape == (T,)
        assert out.topk_indices.dtype == torch.long


def test_gate_runs_in_float32_under_autocast():
    r = make_router()
    x = torch.randn(5, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.router_logits.dtype == torch.float32
    assert torch.allclose(out.router_logits, x @ r.weight.T, atol=1e-6)


def test_clean_probs_unaffected_by_noise_and_no_noise_in_eval():
    r = make_router(noise_std=1.0)
    x = torch.randn(50, 10)
    clean = torch.softmax(x @ r.weight.T, -1)
    r.train()
    out = r(x)
    assert torch.allclose(out.router_probs_clean, clean, atol=1e-6)
    assert not torch.allclose(out.router_probs, clean, atol=1e-3)
    r.eval()
    out = r(x)
    assert torch.equal(out.router_probs, out.router_probs_clean)


def _empirical_noise_std(r: Router, x: torch.Tensor) -> float:
    out = r(x)
    diff = out.router_probs.log() - out.router_probs_clean.log()  # = noise - per-row constant
    E = diff.shape[1]
    return (diff.var(dim=1, unbiased=True).mean()).sqrt().item() * math.sqrt(E / E)


def test_noise_anneals_linearly_and_ends():
    r = make_router(E=64, noise_std=0.5, noise_anneal_steps=100).train()
    x = torch.randn(400, 10)
    for step, expected in [(0, 0.5), (50, 0.25), (75, 0.125), (100, 0.0), (150, 0.0)]:
        r.set_step(step)
        assert r.noise_std_now().item() == pytest.approx(expected)
        assert _empirical_noise_std(r, x) == pytest.approx(expected, rel=0.05, abs=1e-6)
    r.set_step(100)
    out = r(x)
    assert torch.equal(out.router_probs, out.router_probs_clean)


def test_forward_never_advances_step_and_step_is_state():
    r = make_router(noise_std=0.1, noise_anneal_steps=10).train()
    r.set_step(3)
    for _ in range(4):
        r(torch.randn(4, 10))
    assert int(r.step) == 3
    assert int(r.state_dict()["step"]) == 3
    r2 = make_router(noise_std=0.1, noise_anneal_steps=10)
    r2.load_state_dict(r.state_dict())
    assert int(r2.step) == 3


def test_entropy_formula():
    r = make_router(E=4)
    out = r(torch.randn(9, 10))
    p = out.router_probs_clean
    assert torch.allclose(out.entropy, -(p * p.log()).sum(-1), atol=1e-6)
    assert torch.allclose(entropy_from_probs(torch.full((1, 4), 0.25)), torch.tensor([math.log(4)]))
    assert entropy_from_probs(torch.tensor([[1.0, 0.0]])).item() == 0.0


def test_topk_weights():
    x = torch.randn(20, 10)
    r = make_router(k=3, normalize_topk=True).eval()
    out = r(x)
    top, idx = out.router_probs.topk(3, -1)
    assert torch.equal(out.topk_indices, idx)
    assert torch.allclose(out.topk_weights, top / top.sum(-1, keepdim=True))
    assert torch.allclose(out.topk_weights.sum(-1), torch.ones(20))
    r.normalize_topk = False
    assert torch.allclose(r(x).topk_weights, top)


def test_straight_through_top1_is_exactly_one_forward_with_probability_gradient():
    r = make_router(k=1, straight_through=True).train()
    x = torch.randn(12, 10)
    out = r(x)
    assert torch.equal(out.topk_weights, torch.ones(12, 1))
    (out.topk_weights * torch.arange(12.0)[:, None]).sum().backward()
    assert r.weight.grad.abs().sum() > 0
    # the gradient is exactly that of the selected probability
    r.weight.grad = None
    out2 = r(x)
    sel = out2.router_probs.gather(1, out2.topk_indices)
    (sel * torch.arange(12.0)[:, None]).sum().backward()
    g_prob = r.weight.grad.clone()
    r.weight.grad = None
    out3 = r(x)
    (out3.topk_weights * torch.arange(12.0)[:, None]).sum().backward()
    assert torch.allclose(r.weight.grad, g_prob)
    r.eval()
    assert torch.equal(r(x).topk_weights, torch.ones(12, 1))


def test_top_k_out_of_range_refused():
    with pytest.raises(ValueError, match="top_k=5"):
        Router(4, 4, top_k=5)

"""Whole MoE layers replayed from CUDA graphs (``kernels.cuda_graph.LayerGraph``, ``train.cuda_graphs=layers``)
against the same layer called directly: y, every RouterOutput field, d x and every parameter's gradient bitwise
equal over accumulated micro-batches and optimizer-like updates, with router noise and dropout drawn from the
same generator state; replays draw new noise; buffers (router step, selection bias) read in place; the guards.
The refusals run on the CPU too."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_emergence.config import MoEConfig
from moe_emergence.kernels.cuda_graph import ExpertsGraph, LayerGraph, _Captured, _fill_grad_outputs
from moe_emergence.layer import GRAPHED_ROUTER_FIELDS, MoEWrapper

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
D, F = 72, 136  # widths multiples of 8 (grouped_mm), not powers of two


def _layers(dropout: float = 0.1, **moe) -> tuple[MoEWrapper, MoEWrapper]:
    torch.manual_seed(0)
    cfg = MoEConfig(
        **{"num_experts": 5, "noise_std": 0.5, "noise_anneal_steps": 7, "backend": "triton", **moe}
    )
    direct = MoEWrapper(cfg, D, F, activation="gelu_new", dropout=dropout).cuda().train()
    with torch.no_grad():
        direct.router.weight.normal_(std=0.3)
        direct.experts.b1_EF.normal_(std=0.1)
        direct.experts.b2_ED.normal_(std=0.1)
    graphed = copy.deepcopy(direct)
    graphed.cuda_graph = LayerGraph()
    return direct, graphed


def _step(layer: MoEWrapper, x, coefs, seed: int, autocast: bool, every_field: bool):
    """One forward+backward from the generator state ``seed``: a loss on y, the load-balance and z-loss
    fields and, with ``every_field``, the combine weights and the entropy too (``router_probs_clean`` never:
    an output without a gradient enters the graph as zeros, after one that had one too)."""
    torch.cuda.manual_seed(seed)
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, r = layer(x)
    loss = (y.float() * coefs["y"]).sum() + (r.router_probs * coefs["probs"]).sum()
    loss = loss + r.router_logits.logsumexp(-1).square().mean()
    if every_field:
        loss = loss + (r.topk_weights * coefs["w"]).sum() + r.entropy.mean()
    loss.backward()  # outside autocast, as training runs it
    return [y.detach(), x.grad] + [getattr(r, f) for f in GRAPHED_ROUTER_FIELDS]


def _assert_same(graphed: MoEWrapper, direct: MoEWrapper, x, coefs, seed: int, autocast: bool, every: bool):
    got, want = (
        _step(graphed, x, coefs, seed, autocast, every),
        _step(direct, x, coefs, seed, autocast, every),
    )
    for name, a, b in zip(("y", "dx", *GRAPHED_ROUTER_FIELDS), got, want, strict=True):
        assert torch.equal(a, b), name
    for (name, p), q in zip(graphed.named_parameters(), direct.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@needs_cuda
@pytest.mark.parametrize(
    "moe, autocast",
    [
        (dict(top_k=1), False),  # straight-through top-1, fp32
        (dict(top_k=1), True),
        (dict(top_k=2), True),
        (dict(top_k=3, noise_std=0.0), False),  # no noise: router_probs is router_probs_clean
        (dict(top_k=2, shared_expert=True, shared_expert_gate="learned", backend="grouped_mm"), True),
        (dict(top_k=2, bias_update_rate=0.01), True),
    ],
    ids=["top1-fp32", "top1-bf16", "top2-bf16", "top3-no-noise", "shared-grouped_mm", "selection-bias"],
)
def test_graphed_layer_equals_direct_calls(moe, autocast):
    direct, graphed = _layers(**moe)
    gen = torch.Generator().manual_seed(1)
    T, E, K = 67, 5, moe["top_k"]
    for step in range(3):  # two micro-batches a step; the weights, the router step and the bias move between
        for micro in range(2):
            x = torch.randn(T, D, generator=gen).cuda()
            coefs = {
                "y": torch.randn(T, D, generator=gen).cuda(),
                "probs": torch.randn(T, E, generator=gen).cuda(),
                "w": torch.randn(T, K, generator=gen).cuda(),
            }
            _assert_same(graphed, direct, x, coefs, 10 * step + micro, autocast, every=micro == 0)
        with torch.no_grad():
            for layer in (graphed, direct):
                for p in layer.parameters():
                    p -= 0.1 * p.grad  # in place, as the optimizer does
                    p.grad = None
                layer.router.set_step(step + 1)
                if layer.router.bias_update_rate > 0:
                    layer.router.update_selection_bias(torch.arange(E, dtype=torch.float32) * (step + 1))
    assert graphed.cuda_graph.captures == 1


@needs_cuda
def test_replays_draw_new_noise_and_graphs_only_where_a_backward_follows():
    direct, graphed = _layers(top_k=2)
    x = torch.randn(40, D, device="cuda", requires_grad=True)
    _, first = graphed(x)
    _, second = graphed(x)  # no backward of the first: it never runs (its graphs would be overwritten)
    assert not torch.equal(first.router_probs, second.router_probs)  # new noise at each replay
    assert torch.equal(first.router_probs_clean, second.router_probs_clean)
    assert graphed.cuda_graph.captures == 1
    with torch.no_grad():  # no backward follows: the direct call
        graphed(x)
    graphed.eval()
    graphed(x)
    graphed.train()
    graphed(
        x, expert_mask_E=torch.tensor([True, True, False, True, True], device="cuda")
    )  # ablations: direct
    graphed(x.reshape(4, 10, D))  # [B, S, D]: the same [T, D] signature
    assert graphed.cuda_graph.captures == 1 and len(graphed.cuda_graph) == 1
    graphed(x[:33])  # a new shape: a new signature
    assert graphed.cuda_graph.captures == 2
    with pytest.raises(
        ValueError, match="token mask has shape"
    ):  # the mask is checked as the router checks it
        graphed(x, torch.ones(41, device="cuda"))


@needs_cuda
def test_backward_guards():
    _, graphed = _layers(top_k=1)
    x = torch.randn(24, D, device="cuda", requires_grad=True)
    y1, _ = graphed(x)
    y2, _ = graphed(x * 2)
    y2.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="another forward of this layer ran since"):
        y1.sum().backward()
    with pytest.raises(RuntimeError, match="this forward's backward ran already"):
        y2.sum().backward()
    y3, _ = graphed(x)
    with torch.no_grad():
        graphed.router.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="a parameter changed in place or moved"):
        y3.sum().backward()


def test_layer_graph_refusals_on_any_machine():
    layer = MoEWrapper(MoEConfig(num_experts=4, capacity_factor=1.5), 16, 32)
    layer.cuda_graph = LayerGraph()
    x = torch.randn(6, 16, requires_grad=True)
    with pytest.raises(ValueError, match=r"cannot take this layer: model\.moe\.capacity_factor=1\.5"):
        layer(x)
    layer = MoEWrapper(MoEConfig(num_experts=4), 16, 32)
    layer.cuda_graph, layer.experts.cuda_graph = LayerGraph(), ExpertsGraph()
    with pytest.raises(ValueError, match="its experts have a CUDA graph of their own"):
        layer(x)
    layer.experts.cuda_graph = None
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors; the input is on cpu"):
        layer(x)
    with torch.no_grad():  # no backward follows: the direct call, on any device
        y, _ = layer(x)
    assert y.shape == x.shape and layer.cuda_graph.captures == 0


def test_unused_outputs_zero_their_gradient_slot_once():
    """``_fill_grad_outputs``: a gradient is copied in; None zeroes the slot the first time only; a
    non-differentiable output has no slot."""
    slots = (torch.full((3,), 7.0), None, torch.full((2,), 7.0))
    graphs = _Captured(None, None, (), (), slots, ())
    _fill_grad_outputs(graphs, (None, None, torch.ones(2)))
    assert slots[0].tolist() == [0.0] * 3 and slots[2].tolist() == [1.0] * 2 and graphs.zeroed == {0}
    slots[0].fill_(5.0)  # nothing else writes a slot: a zeroed one is not zeroed again
    _fill_grad_outputs(graphs, (None, None, torch.full((2,), 2.0)))
    assert slots[0].tolist() == [5.0] * 3 and slots[2].tolist() == [2.0] * 2
    _fill_grad_outputs(graphs, (torch.arange(3.0), None, None))
    assert slots[0].tolist() == [0.0, 1.0, 2.0] and slots[2].tolist() == [0.0] * 2 and graphs.zeroed == {2}
    _fill_grad_outputs(graphs, (None, None, None))
    assert slots[0].tolist() == [0.0] * 3 and graphs.zeroed == {0, 2}


def test_a_copy_of_a_graphed_layer_starts_without_captures():
    """deepcopy (through ``__reduce__``, as pickling) keeps the graph object, not its captures (they belong to the
    original's parameter storage; a CUDA graph cannot be copied)."""
    layer = MoEWrapper(MoEConfig(num_experts=4), 16, 32)
    layer.cuda_graph, layer.experts.cuda_graph = LayerGraph(), None
    layer.cuda_graph._captured["signature"] = object()  # stands for captured graphs: not copyable
    layer.cuda_graph.captures = 1
    copied = copy.deepcopy(layer)
    assert type(copied.cuda_graph) is LayerGraph and len(copied.cuda_graph) == 0
    assert copied.cuda_graph.captures == 0 and not copied.cuda_graph.capturing
    assert len(layer.cuda_graph) == 1  # the original keeps its own
    bank = copy.deepcopy(MoEWrapper(MoEConfig(num_experts=4), 16, 32)).experts
    bank.cuda_graph = ExpertsGraph()
    assert type(copy.deepcopy(bank).cuda_graph) is ExpertsGraph

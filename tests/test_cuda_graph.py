"""CUDA-graphed experts (kernels/cuda_graph.py, ``train.cuda_graphs``) against the same backend called directly:
outputs and gradients bitwise equal, gradient accumulation, changing weights, new signatures, the guard against
two forwards before one backward; the trainer with graphs against the trainer without. The resolution of
``train.cuda_graphs`` and the refusals run on the CPU too."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from test_training_run import TINY, data_cache, final_state, make_cfg, train_records  # noqa: F401 (fixture)

from moe_emergence.errors import ConfigError
from moe_emergence.experts import ExpertBank
from moe_emergence.kernels.cuda_graph import ExpertsGraph
from moe_emergence.training.config import config_from_dict
from moe_emergence.training.model_setup import BaseInfo, cuda_graphs_on

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
E, D, F = 5, 72, 136  # odd E; widths multiples of 8 (grouped_mm)


def _banks(backend: str) -> tuple[ExpertBank, ExpertBank]:
    torch.manual_seed(0)
    direct = ExpertBank(E, D, F, activation="gelu_new", backend=backend).cuda()
    with torch.no_grad():
        direct.b1_EF.normal_(std=0.1)
        direct.b2_ED.normal_(std=0.1)
    graphed = copy.deepcopy(direct)
    graphed.cuda_graph = ExpertsGraph()
    return direct, graphed


def _inputs(T: int, K: int, gen: torch.Generator):
    x = torch.randn(T, D, generator=gen).cuda()
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).cuda()
    w = torch.rand(T, K, generator=gen)
    w = w.masked_fill(torch.rand(T, K, generator=gen) < 0.1, 0.0).cuda()  # zero weights: dead rows
    return x, idx, w


def _step(bank: ExpertBank, x, idx, w, dy, autocast: bool):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = bank(x, idx, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _assert_same_step(graphed: ExpertBank, direct: ExpertBank, x, idx, w, dy, autocast: bool = False) -> None:
    """y, dx and d weights of one forward+backward bitwise equal (parameter gradients accumulate)."""
    got, want = _step(graphed, x, idx, w, dy, autocast), _step(direct, x, idx, w, dy, autocast)
    for name, a, b in zip(("y", "dx", "d weights"), got, want, strict=True):
        assert torch.equal(a, b), name


def _assert_same_grads(a: ExpertBank, b: ExpertBank) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@needs_cuda
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize(
    "backend, autocast",
    [("triton", False), ("triton", True), ("grouped_mm", True)],  # grouped_mm syncs outside bf16: not graphed
    ids=["triton-fp32", "triton-bf16-autocast", "grouped_mm-bf16-autocast"],
)
def test_graphed_experts_equal_direct_calls(backend, autocast, K):
    """Three optimizer-like steps of two accumulated micro-batches (T odd), new inputs every call and new
    weights every step: y, dx, d weights and the accumulated parameter gradients are bitwise equal."""
    direct, graphed = _banks(backend)
    gen = torch.Generator().manual_seed(K)
    for _ in range(3):
        for _ in range(2):
            x, idx, w = _inputs(333, K, gen)
            dy = torch.randn(333, D, generator=gen).cuda()
            _assert_same_step(graphed, direct, x, idx, w, dy, autocast)
        _assert_same_grads(direct, graphed)
        with torch.no_grad():
            for p, q in zip(direct.parameters(), graphed.parameters(), strict=True):
                p.add_(0.05 * torch.randn_like(p))
                q.copy_(p)
                p.grad = q.grad = None
    assert len(graphed.cuda_graph) == 1  # one signature, replayed five times


@needs_cuda
def test_graphs_only_where_a_backward_follows_and_per_signature():
    direct, graphed = _banks("triton")
    gen = torch.Generator().manual_seed(0)
    x, idx, w = _inputs(64, 2, gen)
    with torch.no_grad():
        assert torch.equal(graphed(x, idx, w), direct(x, idx, w))
    graphed.eval()
    assert torch.equal(graphed(x, idx, w), direct(x, idx, w))
    assert len(graphed.cuda_graph) == 0  # eval and no_grad call the backend directly
    graphed.train()
    dy = torch.randn(64, D, generator=gen).cuda()
    _assert_same_step(graphed, direct, x, idx, w, dy)
    x2, idx2, w2 = _inputs(48, 2, gen)  # another token count: a second signature
    dy2 = torch.randn(48, D, generator=gen).cuda()
    _assert_same_step(graphed, direct, x2, idx2, w2, dy2)
    assert len(graphed.cuda_graph) == 2
    with torch.no_grad():  # a parameter whose storage moved: captured again, never replayed on the old memory
        graphed.w1_EDF.data = graphed.w1_EDF.data.clone().mul_(2)
        direct.w1_EDF.mul_(2)
    direct.zero_grad(set_to_none=True)
    graphed.zero_grad(set_to_none=True)
    _assert_same_step(graphed, direct, x, idx, w, dy)
    assert len(graphed.cuda_graph) == 3 and graphed.cuda_graph.captures == 3
    _assert_same_grads(direct, graphed)


@needs_cuda
def test_a_second_backward_and_a_parameter_changed_in_place_are_refused():
    _, graphed = _banks("triton")
    x, idx, w = _inputs(64, 2, torch.Generator().manual_seed(0))
    x.requires_grad_()
    with torch.autocast(
        "cuda", dtype=torch.bfloat16
    ):  # the backward's float32 dx may reuse the activations' memory
        y = graphed(x, idx, w)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="this forward's backward ran already"):
        y.sum().backward()
    y = graphed(x, idx, w)
    with torch.no_grad():
        graphed.w2_EFD.mul_(2)
    with pytest.raises(RuntimeError, match="w2_EFD|a parameter changed in place or moved"):
        y.sum().backward()


@needs_cuda
def test_inputs_without_gradients_and_more_signatures_than_kept():
    """x and the routing weights without requires_grad (their gradient slots None), the parameters frozen but
    one; five token counts, so the first signature is dropped while its backward is pending."""
    direct, graphed = _banks("triton")
    for bank in (direct, graphed):
        for p in (bank.w1_EDF, bank.b1_EF, bank.b2_ED):
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    pending = []
    for T in (40, 41, 42, 43, 44):
        x, idx, w = _inputs(T, 2, gen)
        pending.append((graphed(x, idx, w), direct(x, idx, w)))
        if T == 40:
            first = pending.pop()
            continue
        y, want = pending.pop()
        assert torch.equal(y, want)
        dy = torch.randn_like(y)
        y.backward(dy)
        want.backward(dy)
    assert len(graphed.cuda_graph) == 4 and graphed.cuda_graph.captures == 5  # T=40's graphs were dropped
    y, want = first  # its graphs live on through the pending backward
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    assert torch.equal(graphed.w2_EFD.grad, direct.w2_EFD.grad)
    assert graphed.w1_EDF.grad is None and graphed.b1_EF.grad is None


@needs_cuda
def test_two_forwards_before_one_backward_are_refused():
    _, graphed = _banks("triton")
    x, idx, w = _inputs(64, 1, torch.Generator().manual_seed(0))
    x.requires_grad_()
    y1 = graphed(x, idx, w)
    y2 = graphed(x * 2, idx, w)  # overwrites the activations y1's backward would read
    y2.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="another forward of this layer ran since"):
        y1.sum().backward()


def graphed_run_overrides(backend: str) -> tuple[str, ...]:
    """The tiny run as the graphed-trainer tests run it: gradient accumulation, bf16, top-2, dropout."""
    return (
        f"model.moe.backend={backend}",
        "train.grad_accum=2",
        "train.mixed_precision=bf16",
        "model.moe.top_k=2",
        "model.dropout=0.1",
    )


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_trainer_with_cuda_graphs_matches_without(tmp_path, capsys, backend):
    """The tiny run on the GPU (dense steps, upcycle, MoE steps with gradient accumulation, router noise and
    dropout): every logged loss and the final weights equal with train.cuda_graphs=model, layers, experts and
    none."""
    from moe_emergence.telemetry import read_metrics
    from moe_emergence.training.trainer import train

    ov = graphed_run_overrides(backend)
    runs = {}
    for g in ("model", "layers", "experts", "none"):
        runs[g] = train(make_cfg(tmp_path, g, *ov, f"train.cuda_graphs={g}"))
        said = {
            "model": "train.cuda_graphs=model: on: each micro-batch's whole step, forward, objective and backward, runs "
            "from one CUDA graph",
            "layers": "train.cuda_graphs=layers: on: each MoE layer runs whole from CUDA graphs, router and experts",
            "experts": "train.cuda_graphs=experts: on: each MoE layer's experts run from CUDA graphs",
            "none": "train.cuda_graphs=none: off: train.cuda_graphs=none",
        }[g]
        assert said in capsys.readouterr().out
    b = train_records(read_metrics(runs["none"].run_dir / "metrics.jsonl"))
    sb = final_state(runs["none"].run_dir)
    for g, captures in (("model", 1.0), ("layers", 2.0), ("experts", 2.0)):  # one model, or 2 layers
        a = train_records(read_metrics(runs[g].run_dir / "metrics.jsonl"))
        assert a.keys() == b.keys() and len(a) == 6
        assert [a[s].get("perf/cuda_graph_captures") for s in a] == [None, None] + [
            captures
        ] * 4  # dense, MoE
        for step in a:
            assert a[step].keys() - {"perf/cuda_graph_captures"} == b[step].keys()
            for key in a[step]:
                if key.startswith("train/"):  # the maths (perf/ holds the timings)
                    assert a[step][key] == b[step][key], (g, step, key)
        sa = final_state(runs[g].run_dir)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), g


# ------------------------------------------------------------------ resolution and refusals (any machine)


def _cfg(*overrides: str):
    return config_from_dict(TINY, ["model.moe.backend=eager", *overrides])


BASE = BaseInfo(None, 64, 32, 128)


def test_auto_resolves_off_with_the_reason_and_experts_is_refused_with_it(monkeypatch):
    cuda = torch.device("cuda")  # no device is touched: the capability is faked, no backend is loaded
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    grouped = ("model.moe.backend=grouped_mm", "train.mixed_precision=bf16")
    cases = {  # why: (config, device, fsdp, processes)
        "the run is on the cpu": (_cfg(), torch.device("cpu"), False, 1),
        "train.compile=true": (_cfg("train.compile=true"), cuda, False, 1),
        "FSDP moves the unsharded parameters": (_cfg(), cuda, True, 1),
        "model.moe.backend='eager' runs the eager experts": (_cfg(), cuda, False, 1),
        "model.moe is null": (_cfg("model.moe=null"), cuda, False, 1),
        "the grouped_mm experts wait on the device outside bf16": (
            _cfg("model.moe.backend=grouped_mm", "train.mixed_precision=no"),
            cuda,
            False,
            1,
        ),
        "the grouped_mm experts wait on the device on GPUs other than compute capability 9.x and 10.x": (
            _cfg(*grouped),
            cuda,
            False,
            1,
        ),
    }
    for why, (cfg, device, fsdp, processes) in cases.items():
        what, said = cuda_graphs_on(cfg, BASE, device, fsdp, processes)
        assert what is None and said.startswith(why), (why, said)
        if cfg.train.compile:
            continue  # layers or experts with compile is refused by the config itself (test_bad_input)
        for setting in ("model", "layers", "experts"):
            cfg.train.cuda_graphs = setting
            with pytest.raises(ConfigError, match=f"train.cuda_graphs='{setting}' cannot run here: {why}"):
                cuda_graphs_on(cfg, BASE, device, fsdp, processes)
    assert cuda_graphs_on(_cfg("train.cuda_graphs=none", "model.moe.backend=triton"), BASE, cuda, False) == (
        None,
        "train.cuda_graphs=none",
    )
    # several processes: auto declines (DDP not verified), layers and experts are the user's call
    triton = _cfg("model.moe.backend=triton")
    what, said = cuda_graphs_on(triton, BASE, cuda, False, 2)
    assert what is None and said.startswith("2 processes: CUDA-graphed MoE layers are not verified under DDP")
    for setting in ("layers", "experts"):
        triton.train.cuda_graphs = setting
        assert cuda_graphs_on(triton, BASE, cuda, False, 2) == (setting, None)
    # the whole model is refused there: DDP communicates inside its forward and backward
    triton.train.cuda_graphs = "model"
    with pytest.raises(ConfigError, match=r"train.cuda_graphs='model' cannot run here: 2 processes \(DDP"):
        cuda_graphs_on(triton, BASE, cuda, False, 2)


def test_auto_takes_graphs_where_they_run(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100 / H200
    for overrides in (
        ("model.moe.backend=triton",),
        ("model.moe.backend=triton", "train.mixed_precision=fp16"),
        ("model.moe.backend=triton", "train.mixed_precision=no"),
        ("model.moe.backend=grouped_mm", "train.mixed_precision=bf16"),
    ):
        for setting, what in (
            ("auto", "model"),
            ("model", "model"),
            ("layers", "layers"),
            ("experts", "experts"),
        ):
            cfg = _cfg(*overrides, f"train.cuda_graphs={setting}")
            assert cuda_graphs_on(cfg, BASE, cuda, False) == (what, None), (overrides, setting)
    # a routing variant the whole-layer graph does not take: auto graphs the experts and says why; layers refuses
    variants = {
        "model.moe.capacity_factor=1.25": "model.moe.capacity_factor=1.25; whole-layer graphs take "
        "capacity_factor=null only",
        "model.moe.routing=expert_choice": "model.moe.routing=expert_choice; whole-layer graphs take "
        "routing=token_choice only",
        "model.moe.random_routing_prob=0.1": "model.moe.random_routing_prob=0.1",
        "model.moe.expert_dropout=0.1": "model.moe.expert_dropout=0.1",
    }
    for override, why in variants.items():
        what, said = cuda_graphs_on(_cfg("model.moe.backend=triton", override), BASE, cuda, False)
        assert what == "experts" and said.startswith(why), (override, said)
        for setting in ("model", "layers"):
            with pytest.raises(
                ConfigError, match=f"train.cuda_graphs='{setting}' cannot run here: {re.escape(why)}"
            ):
                cuda_graphs_on(
                    _cfg("model.moe.backend=triton", override, f"train.cuda_graphs={setting}"),
                    BASE,
                    cuda,
                    False,
                )
    # the selection bias is read in place: the whole model and the whole layer take it
    biased = _cfg("model.moe.backend=triton", "model.moe.bias_update_rate=0.001")
    assert cuda_graphs_on(biased, BASE, cuda, False) == ("model", None)
    biased.train.cuda_graphs = "layers"
    assert cuda_graphs_on(biased, BASE, cuda, False) == ("layers", None)


def test_experts_graph_refuses_cpu_tensors():
    bank = ExpertBank(2, 8, 16)
    bank.cuda_graph = ExpertsGraph()
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors; x_TD is on cpu"):
        bank(x, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1))

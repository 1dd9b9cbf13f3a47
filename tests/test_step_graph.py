"""One micro-batch's whole training step from one CUDA graph (``training.step_graph.StepGraph``,
``train.cuda_graphs=model``): the trainer's results bit for bit those of the direct step, on a GPU; the
mechanism's rules (gradients in place, warm-ups leave no trace, unreached parameters refused) and its
refusals anywhere."""

from __future__ import annotations

import pytest
import torch
from test_cuda_graph import graphed_run_overrides
from test_training_run import TINY, data_cache, final_state, make_cfg, train_records  # noqa: F401 (fixture)

from moe_emergence.losses import LossCoefs
from moe_emergence.training.step_graph import StepGraph
from moe_emergence.training.steps import MoEStep, StepSums

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, whose mixed precision a later Accelerator may not change: reset
    before the test (its fp16 run) and after (the next test's precision)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@needs_cuda
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(
    ("backend", "precision", "data"),
    [
        ("triton", "bf16", "data.cross_documents=true"),
        ("grouped_mm", "bf16", "data.cross_documents=true"),
        ("triton", "fp16", "data.cross_documents=true"),
        ("triton", "bf16", "data.cross_documents=false"),  # every document's last block padded
    ],
)
def test_trainer_step_graph_equals_direct_with_schedules_and_balancing(
    tmp_path, monkeypatch, backend, precision, data
):
    """The tiny run (gradient accumulation, top-2, dropout, router noise, routing telemetry every step; bf16, or
    fp16 with its GradScaler; micro-batches with and without padding) with the coefficients on schedules that
    change every step, an entropy term, aux-loss-free balancing (tokens per expert summed in the graph, the
    selection bias updated after each step) and a rolled-back step (step 4 judged a spike: the snapshot restored
    in place, the next steps replayed on it): every logged value of train/ and router/ and the final weights
    equal with train.cuda_graphs=model and none; one capture for the run per kind of micro-batch met, padded or
    not (the coefficients are the graph's inputs, not part of its signature)."""
    from moe_emergence.telemetry import read_metrics
    from moe_emergence.training import guard
    from moe_emergence.training import trainer as trainer_module
    from moe_emergence.training.trainer import train

    judge = guard.judge

    def spike_at_step_4(check, state, cfg):
        judge(check, state, cfg)
        if state.step == 4:
            check.spike = "forced by the test"

    monkeypatch.setattr(guard, "judge", spike_at_step_4)
    padding_seen = []  # per micro-batch, in order
    has_padding = trainer_module.has_padding
    monkeypatch.setattr(
        trainer_module, "has_padding", lambda b: padding_seen.append(has_padding(b)) or padding_seen[-1]
    )
    ov = (
        *graphed_run_overrides(backend),
        f"train.mixed_precision={precision}",
        "model.moe.lb_schedule={kind: linear_warmup, warmup_steps: 4}",
        "model.moe.z_schedule={kind: cosine, total_steps: 4}",
        "model.moe.entropy_coef=0.01",
        "model.moe.bias_update_rate=0.01",
        data,
    )
    runs = {g: train(make_cfg(tmp_path, g, *ov, f"train.cuda_graphs={g}")) for g in ("model", "none")}
    moe_batches = padding_seen[
        4:12
    ]  # the graphed run's MoE steps 3-6, 2 micro-batches each (dense: steps 1-2)
    if data.endswith("false"):
        assert any(moe_batches)  # padded micro-batches were replayed from the graph
    graphed = read_metrics(runs["model"].run_dir / "metrics.jsonl")
    direct = read_metrics(runs["none"].run_dir / "metrics.jsonl")
    a, b = train_records(graphed), train_records(direct)
    assert a.keys() == b.keys() and len(a) == 6
    captures = [a[s].get("perf/cuda_graph_captures") for s in a]
    assert captures[:2] == [None, None] and captures[-1] == len(set(moe_batches))
    assert len({a[s]["train/lb_coef"] for s in a if s > 2}) == 4  # a new coefficient every MoE step
    assert [a[s]["train/skipped_steps"] for s in a] == [0, 0, 0, 0, 1, 1]  # step 4 (the 5th) rolled back
    routed = 0
    for ra, rb in zip(graphed, direct, strict=True):
        assert ra["step"] == rb["step"]
        for key in rb:
            if key.startswith(("train/", "router/")):
                assert ra[key] == rb[key], (ra["step"], key)
                routed += key.startswith("router/")
    assert routed > 0
    sa, sb = final_state(runs["model"].run_dir), final_state(runs["none"].run_dir)
    assert any("selection_bias" in k for k in sa)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Net(torch.nn.Module):
    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 1)
        self.unused = torch.nn.Parameter(torch.zeros(3)) if unused else None

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(self.a(x).relu(), 0.25)).sum()


def _step_fn(net: torch.nn.Module, total: torch.Tensor):
    def step(x: torch.Tensor) -> tuple[torch.Tensor]:
        loss = net(x)
        total.add_(loss.detach())
        loss.backward()
        return (loss.detach() * 2,)

    return step


def _params_and_names(net: torch.nn.Module):
    """``StepGraph.replay``'s ``params`` and ``names`` of ``net``."""
    return list(net.parameters()), lambda: [n for n, _ in net.named_parameters()]


@needs_cuda
def test_replay_accumulates_in_place_and_warm_ups_leave_no_trace():
    """Micro-batches graphed (three of one shape, then one of another: a second capture, made with gradients and
    sum already accumulated): the gradients, the in-place sum and the returned outputs equal the direct calls'
    from the same generator state (dropout), in the same .grad tensors throughout, so neither capture's warm-ups
    changed what they found; gradients set to None make a new capture (three kept)."""
    torch.manual_seed(0)
    ref = _Net().cuda()
    net = _Net().cuda()
    net.load_state_dict(ref.state_dict())
    xs = [torch.randn(5, 8, device="cuda") for _ in range(3)] + [torch.randn(3, 8, device="cuda")]
    total_g, total_d = torch.zeros((), device="cuda"), torch.zeros((), device="cuda")
    graph = StepGraph()
    torch.cuda.manual_seed(7)
    out_g, grads = [], None
    for x in xs:
        (y,) = graph.replay("k", _step_fn(net, total_g), (x,), *_params_and_names(net), (total_g,))
        out_g.append(y.clone())
        grads = grads or [p.grad for p in net.parameters()]
        assert all(p.grad is g for p, g in zip(net.parameters(), grads, strict=True))
    torch.cuda.manual_seed(7)
    out_d = [_step_fn(ref, total_d)(x)[0] for x in xs]
    assert graph.captures == 2 and len(graph) == 2
    assert all(torch.equal(g, d) for g, d in zip(out_g, out_d, strict=True))
    assert torch.equal(total_g, total_d)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    net.zero_grad(set_to_none=True)
    graph.replay("k", _step_fn(net, total_g), (xs[0],), *_params_and_names(net), (total_g,))
    assert graph.captures == 3 and len(graph) == StepGraph.max_signatures


@needs_cuda
def test_a_parameter_the_loss_does_not_reach_is_refused_by_name():
    net = _Net(unused=True).cuda()
    total = torch.zeros((), device="cuda")
    x = torch.randn(5, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"does not reach unused .*train\.cuda_graphs=layers"):
        StepGraph().replay("k", _step_fn(net, total), (x,), *_params_and_names(net), (total,))
    assert net.unused.grad is not None and not net.unused.grad.any()  # made before the key, never written
    assert not total.any()  # the warm-ups' sums put back


# ------------------------------------------------------------------ any machine


def test_cpu_tensors_are_refused():
    """Directly and through the trainer's call, whose key (``model_key`` over one ``module_walk``) is built first."""
    from types import SimpleNamespace

    from test_model_graph import _moe_model

    net = _Net()
    with pytest.raises(ValueError, match=r"CUDA graphs need CUDA tensors.*train\.cuda_graphs=none"):
        StepGraph().replay("k", _step_fn(net, torch.zeros(())), (torch.zeros(2, 8),), [], list, ())
    model = _moe_model(1, "cpu", backend="eager")
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, scaler=None, gradient_accumulation_steps=1)
    step = MoEStep([0, 2], 5, LossCoefs(0.01, 0.001), None, False)
    ids = torch.zeros(2, 8, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    n = torch.ones(2, dtype=torch.float64)
    sums = StepSums.of(step, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"CUDA graphs need CUDA tensors"):
        StepGraph()(model, accelerator, batch, n, n, torch.zeros(2), step, sums, 1.0, False)


def test_sums_zero_in_place_and_collect_tokens_per_expert():
    step = MoEStep([1, 3], 4, LossCoefs(0.01, 0.001), None, collect_tokens_per_expert=True)
    sums = StepSums.of(step, torch.device("cpu"))
    assert sorted(sums.tokens_per_expert) == [1, 3] and sums.tokens_per_expert[1].shape == (4,)
    held = [sums.totals, sums.bad_L2, *sums.tokens_per_expert.values()]
    for t in held:
        t.fill_(1)
    sums.variants["x"] = torch.ones(())
    assert sums.zero_() is sums and sums.variants == {}
    now = [sums.totals, sums.bad_L2, *sums.tokens_per_expert.values()]
    assert all(t is u for t, u in zip(held, now, strict=True))
    assert not any(t.any() for t in held)
    assert StepSums.of(None, torch.device("cpu")).bad_L2.shape == (0, 2)


def test_loss_coefs_take_0d_float32_tensors_with_the_floats_values():
    """The objective reads tensor coefficients as it reads the floats they hold (the trainer's step graph takes
    them as inputs); other tensors are refused."""
    from moe_emergence.losses import moe_objective
    from moe_emergence.routing import RouterOutput

    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    probs = logits.softmax(-1)
    topv, topi = probs.topk(2, dim=-1)
    r = RouterOutput(
        topk_weights=topv, topk_indices=topi, router_probs=probs, router_probs_clean=probs,
        router_logits=logits, entropy=-(probs * probs.log()).sum(-1),
    )  # fmt: skip
    lm = torch.tensor(2.5)
    floats = moe_objective(lm, [r], None, 4, LossCoefs(0.01, 0.001))
    tensors = moe_objective(lm, [r], None, 4, LossCoefs(torch.tensor(0.01), torch.tensor(0.001)))
    assert torch.equal(floats.loss, tensors.loss)
    step = MoEStep([0], 4, LossCoefs(0.01, 0.001, 0.5), None, False).with_coefs(torch.tensor([0.01, 0.001]))
    assert isinstance(step.coefs.lb_coef, torch.Tensor) and step.coefs.entropy_coef == 0.5
    for bad in (torch.tensor([0.01]), torch.tensor(0.01, dtype=torch.float64)):
        with pytest.raises(ValueError, match="LossCoefs.lb_coef is a tensor"):
            LossCoefs(bad, 0.001)

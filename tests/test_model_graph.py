"""A whole causal LM's training forward and backward from CUDA graphs (``training.model_graph.ModelGraph``,
``train.cuda_graphs=model``) against the same model called directly: the loss, every ``RouterOutput`` field and
every parameter's gradient bitwise equal over accumulated micro-batches and in-place updates, with dropout and
router noise drawn from the same generator state; a plain dense GPT-2 close to it; one capture per signature; the
refusals (these also on the CPU). The trainer with ``model`` against ``none``: tests/test_cuda_graph.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2_config

from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM
from moe_emergence.layer import GRAPHED_ROUTER_FIELDS
from moe_emergence.training.model_graph import ModelGraph

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
V = 97  # not a multiple of 64: the aligned LM head pads on the GPU


def _moe_model(top_k: int, device: str, backend: str = "triton") -> GPT2MoEForCausalLM:
    moe = dict(
        num_experts=5, top_k=top_k, layers=[0, 2], noise_std=0.5, noise_anneal_steps=9, backend=backend
    )
    cfg = GPT2MoEConfig(
        **tiny_gpt2_config(n_embd=32, n_inner=72, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1).to_dict(),
        moe=moe,
    )
    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(cfg)
    with torch.no_grad():  # the stacked expert weights: from-config construction leaves them to the upcycle
        for layer in model.moe_layers().values():
            for p in layer.experts.parameters():
                p.normal_(std=0.05)
    return model.to(device).train()


def _batch(seed: int, device: str, rows: int = 3, positions: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, positions), generator=gen)
    labels = ids.masked_fill(torch.rand(rows, positions, generator=gen) < 0.2, -100)  # some not predicted
    return ids.to(device), labels.to(device)


def _micro_batch(model, graph: ModelGraph | None, ids, labels, seed: int, layers: list[int]):
    """One forward+backward from the generator state ``seed`` under bf16 autocast, the objective as the trainer
    forms it outside the model: the LM loss, a load-balance-like term on the probabilities and a z-loss-like
    term on the logits (``router_probs_clean`` and the indices unused)."""
    torch.cuda.manual_seed(seed)
    kw = {"output_router_logits": False} if layers else {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if graph is None:
            out = model(input_ids=ids, labels=labels, **kw)
        else:
            out = graph(model, ids, labels, layers, **kw)
    loss = out.loss
    for i in layers:
        r = out.router_outputs[i]
        loss = loss + 0.01 * r.router_probs.mean(0).square().sum()
        loss = loss + 1e-3 * r.router_logits.logsumexp(-1).square().mean()
        loss = loss + 1e-3 * (r.topk_weights.sum() + r.entropy.mean())
    loss.backward()  # outside autocast, as training runs it
    fields = [getattr(out.router_outputs[i], f) for i in layers for f in GRAPHED_ROUTER_FIELDS]
    return [out.loss.detach(), *fields]


def _train(model, graph: ModelGraph | None, layers: list[int], steps: int = 2, graphed=(True, True)):
    """``steps`` optimizer-like steps of ``len(graphed)`` micro-batches each (in-place SGD, the router step
    advanced), micro-batch m from ``graph`` where ``graphed[m]`` (else directly, as the trainer runs a padded
    one): every micro-batch's outputs, then the final gradients and weights."""
    seen = []
    for step in range(steps):
        for m, use_graph in enumerate(graphed):
            ids, labels = _batch(10 * step + m, "cuda")
            seen.append(
                _micro_batch(model, graph if use_graph else None, ids, labels, 100 * step + m, layers)
            )
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None
        if layers:
            model.set_router_step(step + 1)
    return seen, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_training(
    graphed, direct, graph: ModelGraph, layers: list[int], pattern=(True, True)
) -> None:
    got, got_grads, got_weights = _train(graphed, graph, layers, graphed=pattern)
    want, want_grads, want_weights = _train(direct, None, layers, graphed=pattern)
    for k, (a_all, b_all) in enumerate(zip(got, want, strict=True)):
        for name, a, b in zip(("loss", *GRAPHED_ROUTER_FIELDS * len(layers)), a_all, b_all, strict=True):
            assert torch.equal(a, b), (k, name)
    for n in want_grads:
        assert torch.equal(got_grads[n], want_grads[n]), n
        assert torch.equal(got_weights[n], want_weights[n]), n


@needs_cuda
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_model_graphed_equals_direct(top_k):
    direct = _moe_model(top_k, "cuda")
    graphed = copy.deepcopy(direct)
    graph = ModelGraph()
    layers = [0, 2]
    _assert_same_training(graphed, direct, graph, layers)
    assert graph.captures == 1 and len(graph) == 1  # one signature: the micro-batches share their shapes
    # replays draw new dropout and noise: two micro-batches of the same tokens differ
    ids, labels = _batch(0, "cuda")
    a, b = (_micro_batch(graphed, graph, ids, labels, seed, layers)[0] for seed in (1, 2))
    assert not torch.equal(a, b)
    # a module's setting changed in place is a new signature, never a replay of the old one
    graphed.transformer.drop.p = 0.0
    _micro_batch(graphed, graph, ids, labels, 3, layers)
    assert graph.captures == 2


@needs_cuda
def test_graphed_and_direct_micro_batches_accumulate_alike():
    """A step whose micro-batches run partly from the graphs and partly directly (the trainer's padded ones)."""
    direct = _moe_model(2, "cuda")
    _assert_same_training(copy.deepcopy(direct), direct, ModelGraph(), [0, 2], pattern=(True, False, True))


@needs_cuda
def test_an_autocast_inside_the_forward_under_one_around_it_records_its_casts():
    """accelerate's prepared forward autocasts with the weight cache on; called inside the caller's autocast
    region (profile_step's bare loop), the warm-ups' casts would outlive them: the capture must cast again, so
    that each replay casts the weights as they are (after the in-place updates) and reads no freed copy."""
    direct = _moe_model(1, "cuda")
    graphed = copy.deepcopy(direct)
    for model in (direct, graphed):  # the inner region, as accelerate's prepare wraps the forward
        model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)
    _assert_same_training(graphed, direct, ModelGraph(), [0, 2])


@needs_cuda
def test_dense_model_graphed_close_to_direct_and_new_shapes_capture_anew():
    """A plain GPT2LMHeadModel is graphed too, but attends through another path under capture (model_graph's
    docstring): equal to rounding without dropout (measured on the H200: losses within 4e-5, gradients within
    0.4% of the largest)."""
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    direct = GPT2LMHeadModel(tiny_gpt2_config()).cuda().train()
    graphed = copy.deepcopy(direct)
    graph = ModelGraph()
    got, got_grads, _ = _train(graphed, graph, [])
    want, want_grads, _ = _train(direct, None, [])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-3)
    for n, w in want_grads.items():
        assert (got_grads[n] - w).abs().max() <= 1e-2 * w.abs().max(), n
    ids, labels = _batch(5, "cuda", rows=2, positions=9)  # a last, shorter batch: a second signature
    _micro_batch(graphed, graph, ids, labels, 0, [])
    assert graph.captures == 2 and len(graph) == 2
    ids, labels = _batch(6, "cuda", rows=1, positions=5)  # a third: the least recently used is dropped
    _micro_batch(graphed, graph, ids, labels, 0, [])
    assert graph.captures == 3 and len(graph) == ModelGraph.max_signatures == 2


def test_refuses_eval_mode_no_grad_and_cpu_tensors():
    model = _moe_model(1, "cpu")
    model.config.moe.backend = "eager"
    ids, labels = _batch(0, "cpu")
    graph = ModelGraph()
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors; the input is on cpu"):
        graph(model, ids, labels, [0, 2])
    with torch.no_grad(), pytest.raises(RuntimeError, match="a training forward"):
        graph(model, ids, labels, [0, 2])
    model.eval()
    with pytest.raises(RuntimeError, match="a training forward"):
        graph(model, ids, labels, [0, 2])
    assert graph.captures == 0


def test_outputs_are_packed_and_unpacked_in_order_on_the_cpu(monkeypatch):
    """What the graphs would replay, run directly (``Graphs.replay`` calling the captured function itself): the
    loss and every layer's ``RouterOutput`` fields come back in their places, as the model returns them."""
    model = _moe_model(2, "cpu", backend="eager")
    monkeypatch.setattr(ModelGraph, "replay", lambda self, key, fn, inputs, params: fn(*inputs, *params))
    ids, labels = _batch(0, "cpu")
    torch.manual_seed(1)
    got = ModelGraph()(model, ids, labels, [0, 2], output_router_logits=False)
    torch.manual_seed(1)
    want = model(input_ids=ids, labels=labels, output_router_logits=False)
    assert torch.equal(got.loss, want.loss)
    for i in (0, 2):
        for f in GRAPHED_ROUTER_FIELDS:
            assert torch.equal(getattr(got.router_outputs[i], f), getattr(want.router_outputs[i], f)), (i, f)


def test_the_capture_key_sees_every_setting_a_graph_fixes():
    """``model_key`` and ``kernels.cuda_graph.signature``, the key of a model's (and a step's) capture, built from
    one ``rollback.module_walk`` (the same modules, parameters and buffers, in order, as ``modules()``,
    ``parameters()``, ``buffers()``): equal for a model left alone (the router step advanced in place too), and
    different after each change a captured graph would not follow: a training flag, a module setting (dropout's
    p, a router's noise), a buffer or a parameter replaced, a parameter frozen, transposed in place or cast, a
    module swapped for another class with the same settings, a module or gradient hook added, a forward set on an
    instance, an input's shape."""
    from moe_emergence.kernels.cuda_graph import signature
    from moe_emergence.training.model_graph import model_key
    from moe_emergence.training.rollback import module_walk

    model = _moe_model(1, "cpu", backend="eager")
    modules, params, buffers = module_walk(model)
    for walked, listed in (
        (modules, model.modules()),
        (params, model.parameters()),
        (buffers, model.buffers()),
    ):
        listed = list(listed)
        assert len(walked) == len(listed) and all(a is b for a, b in zip(walked, listed, strict=True))
    ids = torch.zeros(2, 8, dtype=torch.long)

    def key(inputs=(ids, ids)):
        walk = module_walk(model)
        return signature(model_key(model, walk), walk[1], inputs)

    before = key()
    router = model.moe_layers()[0].router
    router.set_step(5)  # read in place by the graph: the same key
    assert key() == before and model_key(model) == model_key(model, module_walk(model))
    dropout = model.transformer.drop
    changes = [
        (lambda: model.transformer.h[1].eval(), lambda: model.transformer.h[1].train()),
        (lambda: setattr(dropout, "p", 0.2), lambda: setattr(dropout, "p", 0.1)),
        (lambda: setattr(router, "noise_std", 0.25), lambda: setattr(router, "noise_std", 0.5)),
    ]
    step = router.step
    changes.append((lambda: setattr(router, "step", step.clone()), lambda: setattr(router, "step", step)))
    weight = model.transformer.h[1].attn.c_attn.weight
    replaced = torch.nn.Parameter(weight.detach().clone())
    changes.append(
        (
            lambda: setattr(model.transformer.h[1].attn.c_attn, "weight", replaced),
            lambda: setattr(model.transformer.h[1].attn.c_attn, "weight", weight),
        )
    )
    changes.append((lambda: weight.requires_grad_(False), lambda: weight.requires_grad_(True)))
    block = model.transformer.h[1]
    gelu = block.mlp.act
    changes.append(
        (lambda: setattr(block.mlp, "act", torch.nn.Tanh()), lambda: setattr(block.mlp, "act", gelu))
    )
    handles = []
    changes.append(
        (
            lambda: handles.append(block.register_forward_hook(lambda *a: None)),
            lambda: handles.pop().remove(),
        )
    )
    changes.append(
        (
            lambda: handles.append(weight.register_hook(lambda g: 2 * g)),
            lambda: handles.pop().remove(),
        )
    )
    changes.append(
        (
            lambda: setattr(block.mlp, "forward", lambda x: torch.zeros_like(x)),
            lambda: delattr(block.mlp, "forward"),
        )
    )
    square = block.attn.c_proj.weight  # [D, D]: transposed, the same address, shape and dtype
    data = square.data

    def transpose():
        square.data = data.t()

    changes.append((transpose, lambda: setattr(square, "data", data)))

    def cast_router():
        router.weight.data = router.weight.data.double()

    changes.append((cast_router, None))
    for change, undo in changes:
        change()
        assert key() != before, change
        if undo is not None:
            undo()
            assert key() == before, undo
    assert key((ids[:1], ids[:1])) != key()

"""CUDA graphs of one MoE layer's forward and backward, for training without ``torch.compile``.

Shapes (legend: docs/architecture.md): T tokens, D model width, E experts, K experts per token.

Uncompiled, an MoE layer is bound by the host: the router's ~25 small float32 ops and the triton backend's
kernels each launch behind Python and autograd dispatch (2.8-5.2 ms of host time per layer forward+backward on
the H200, against ~0.6 ms on the device at T = 8192; docs/benchmarks.md). The sync-free path (token-choice
routing and a backend that never waits on the device: ``triton``, ``grouped_mm``) can be captured as one CUDA
graph forward and one backward, and replayed: one launch each, the same kernels, bitwise the same results.

Three owners of such graphs, one mechanism (``Graphs``: ``_capture`` / ``_Replay``, for any
``fn(*inputs, *params) -> outputs``):

- ``LayerGraph`` (``MoEWrapper.cuda_graph``): the whole token-choice layer, router (noise included), experts,
  shared expert and dropout; outputs y and every ``RouterOutput`` field. Random draws (router noise, dropout)
  are graph-safe: each replay advances the default CUDA generator by what the eager layer would draw, so a
  replay computes what the eager layer computes from the same generator state (the warm-up calls draw under
  ``torch.random.fork_rng`` and leave the generator as they found it).
- ``ExpertsGraph`` (``ExpertBank.cuda_graph``): the experts call ``fn(x_TD, w1, b1, w2, b2, indices_TK,
  weights_TK, activation)`` alone, for the routing variants a whole-layer graph does not take.
- ``training.model_graph.ModelGraph``: a whole causal LM's training forward (its loss and the MoE layers'
  ``RouterOutput`` fields) and backward (the benchmarks' graphed loops; a model is code for one device, so
  graphs of a whole model live with the training code).

The trainer sets one of the layers' (``train.cuda_graphs``), or, for ``model``, captures each micro-batch's whole
step, objective and gradient accumulation included, as one graph (``training.step_graph.StepGraph``: its own
rules, on ``signature`` and ``WARMUP_CALLS`` from here). How these behave:

- Replayed only where a backward follows: training mode with autograd on. Eval, ``no_grad`` and generation call
  the layer directly.
- One pair of graphs per call signature: the caller's key (the function, the layer's settings), the shapes,
  dtypes and ``requires_grad`` of the inputs, the parameters' storage (pointer, shape, dtype,
  ``requires_grad``), the autocast state and the float32 matmul precision (TF32 or not). A new signature is
  captured on first use, after two warm-up calls on a side stream (Triton autotuning and lazy initialisation
  stay out of the graph); at most ``MAX_SIGNATURES`` are kept, the least recently used dropped. A parameter
  whose storage moved (``param.data = ...``) makes a new signature, never a replay on freed memory. Buffers
  (``Router.step``, the selection bias) are read in place at each replay: updating them in place is seen; a
  buffer replaced by another tensor is a new signature (``MoEWrapper`` puts their addresses in its key).
- The graphs hold one forward's activations, for one backward: each call's backward must run once, before the
  same signature's next forward, as in training with gradient accumulation (forward, backward, forward,
  backward). A backward whose activations a later forward or an earlier backward overwrote raises
  ``RuntimeError``, never computes gradients of other inputs; so does a parameter changed in place or moved
  (``param.data = ...``) between forward and backward. Activation checkpointing (library use; the trainer has
  no such option) is not verified: a recomputed forward that runs before the layer's backward gets that
  ``RuntimeError``, and a first capture inside a checkpointed region meets the checkpoint's saved-tensor hooks.
- Inputs are copied into the graph's static buffers, and outputs and every gradient copied out of them:
  nothing returned aliases the graph's memory, so outputs may be kept and gradients accumulate into ``.grad``
  as usual (DDP's hooks see ordinary gradients). An output the caller's backward gives no gradient (an unused
  ``RouterOutput`` field) enters the backward graph as zeros. The backward is captured with autocast off, as
  training runs it (a backward called inside an autocast region runs its matmuls in the autocast dtype
  eagerly; the graphed one keeps them in float32).
- Memory: each signature has its own memory pool, kept while it lives and allocated from by its two captures
  alone: the forward's activations and the backward's gradient buffers (E x D x F x 2 float32 gradients and the
  activations of T x K rows: by their shapes ~0.35 GB a layer at the GPT-2-small shape with T = 4096).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
MAX_SIGNATURES = 4  # per layer: e.g. the training shape and a last, shorter batch
WARMUP_CALLS = 2


@dataclass
class _Captured:
    """The graphs of one signature and the static tensors they read and write."""

    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]  # the forward graph's inputs
    # outputs of the captured forward (detached: the saved activations live on in the private pool)
    outputs: tuple[Tensor, ...]
    grad_outputs: tuple[Tensor | None, ...]  # the backward graph's inputs; None = output not differentiable
    grads: tuple[Tensor | None, ...]  # d each input, then d each parameter; None = no gradient
    generation: int = 0  # forwards replayed so far; a backward belongs to the latest
    zeroed: set[int] = field(default_factory=set)  # grad_outputs slots that hold zeros now
    owner: tuple[str, str] = ("MoE layer", "layer")  # what the graphs are of, for errors: its name, its noun


def signature(key: Hashable, params: Sequence[Tensor], inputs: Sequence[Tensor]) -> tuple:
    """What a capture depends on beyond ``key``: the device, the inputs' shapes, dtypes and ``requires_grad``, the
    parameters' storage (``tensor_layout``), ``requires_grad`` and gradient hooks, the autocast state and the
    float32 matmul precision (module docstring)."""
    device_type = inputs[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    return (
        key,
        inputs[0].device,
        tuple((t.shape, t.dtype, t.requires_grad) for t in inputs),
        tensor_layout(params),
        tuple(map(_REQUIRES_GRAD, params)),
        tuple(map(_tensor_hooks, params)),
        torch.get_autocast_dtype(device_type) if autocast else None,
        torch.backends.cuda.matmul.fp32_precision,  # TF32 or not: the float32 kernels' precision is fixed at capture
    )


def tensor_layout(tensors: Sequence[Tensor]) -> tuple:
    """The storage of ``tensors`` as a graph reads it in place: addresses, shapes, strides, dtypes. A ``map`` per
    attribute, not a tuple per tensor: a step graph builds this for every micro-batch (host time)."""
    return (
        tuple(map(Tensor.data_ptr, tensors)),
        tuple(map(Tensor.size, tensors)),
        tuple(map(Tensor.stride, tensors)),
        tuple(map(_DTYPE, tensors)),
    )


_DTYPE, _REQUIRES_GRAD = operator.attrgetter("dtype"), operator.attrgetter("requires_grad")


def _tensor_hooks(t: Tensor) -> tuple:
    """The ids of ``t``'s gradient hooks (``register_hook``, ``register_post_accumulate_grad_hook``): a graph runs
    those its capture ran."""
    return tuple(t._backward_hooks or ()), tuple(t._post_accumulate_grad_hooks or ())


def _static_copy(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


def _differentiable(outputs: Sequence[Tensor]) -> list[Tensor]:
    return [o for o in outputs if o.requires_grad]


def _capture(
    fn: Callable[..., tuple[Tensor, ...]], inputs: Sequence[Tensor], params: Sequence[Tensor]
) -> _Captured:
    """Warm up ``fn(*inputs, *params)`` on a side stream, then capture its forward and its backward
    (``autograd.grad`` of its differentiable outputs with respect to every input and parameter that requires a
    gradient) into two graphs sharing one private memory pool, on the inputs' device: the forward under the
    caller's autocast state with its weight cache off (a cached cast would be captured stale), the backward with
    autocast off. The autocast cache is also cleared before each warm-up and the capture, and after: an
    autocast region inside ``fn`` with the cache on (accelerate's prepared forward) within one around the call
    (the caller's) keeps its casts until the outer region ends, so the capture would reuse a warm-up's cast,
    record no cast kernel and replay that freed copy of the weights."""
    statics = tuple(_static_copy(t) for t in inputs)
    # the parameters' memory under new leaves: no AccumulateGrad node of a parameter (DDP keeps those, made on
    # the default stream) takes part in the capture; in-place updates of the parameters are what the replays read
    aliases = tuple(p.detach().requires_grad_(p.requires_grad) for p in params)
    slots = (*statics, *aliases)  # gradient slots, in the order of _Replay's inputs
    wrt = [t for t in slots if t.requires_grad]
    device = statics[0].device
    autocast = torch.autocast(
        device.type,
        dtype=torch.get_autocast_dtype(device.type),
        enabled=torch.is_autocast_enabled(device.type),
        cache_enabled=False,
    )

    # the backward as training runs it, outside autocast (the engine runs the backward ops under the autocast
    # state of its caller: called inside the forward's autocast region, the router's float32 gradient matmuls
    # would run in bf16)
    no_autocast = torch.autocast(device.type, enabled=False)

    def run() -> tuple[Tensor, ...]:
        torch.clear_autocast_cache()  # no cast made before this run is reused in it (docstring)
        with autocast:
            return tuple(fn(*statics, *aliases))

    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with (
            torch.cuda.stream(side),
            torch.random.fork_rng(devices=[device]),
        ):  # warm-ups leave the RNG as found
            for _ in range(WARMUP_CALLS):
                outs = _differentiable(run())
                with no_autocast:
                    torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        del outs
        torch.clear_autocast_cache()  # the warm-ups' casts, freed before the capture rather than inside it
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # one capture stream for both (they share a pool); thread_local: other threads' CUDA calls (NCCL's
        # watchdog) are no error during the capture
        kw = dict(stream=torch.cuda.Stream(), capture_error_mode="thread_local")
        with torch.cuda.graph(forward, **kw):
            outputs = run()
        grad_outputs = tuple(torch.empty_like(o) if o.requires_grad else None for o in outputs)
        with torch.cuda.graph(backward, pool=forward.pool(), **kw), no_autocast:
            computed = iter(
                torch.autograd.grad(
                    _differentiable(outputs),
                    wrt,
                    [g for g in grad_outputs if g is not None],
                    allow_unused=True,
                )
            )
    grads = tuple(next(computed) if t.requires_grad else None for t in slots)
    torch.clear_autocast_cache()  # the capture's casts live in the graphs' pool: not for the caller's later ops
    # The captured autograd graph is freed here; the memory of its saved activations stays reserved in the pool,
    # which nothing else allocates from, so the replays find them where the capture put them. The backward's own
    # buffers may reuse that memory (it was free once the backward had read it): one backward per forward.
    return _Captured(forward, backward, statics, tuple(o.detach() for o in outputs), grad_outputs, grads)


def _copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    out = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(out, tensors)  # one launch per dtype, not one per tensor
    return out


def _fill_grad_outputs(graphs: _Captured, grad_outputs: Sequence[Tensor | None]) -> None:
    """Copy the outputs' gradients into the backward graph's input slots; zero the slot of an output without one
    (None: the caller did not use it), unless it holds zeros already (one launch or none, instead of a zero
    tensor per unused output)."""
    to, frm, zero = [], [], []
    for i, (g, slot) in enumerate(zip(grad_outputs, graphs.grad_outputs, strict=True)):
        if slot is None:
            continue
        if g is not None:
            to.append(slot)
            frm.append(g)
            graphs.zeroed.discard(i)
        elif i not in graphs.zeroed:
            zero.append(slot)
            graphs.zeroed.add(i)
    if zero:
        torch._foreach_zero_(zero)
    if to:
        torch._foreach_copy_(to, frm)  # one launch per dtype


class _Replay(torch.autograd.Function):
    """Forward: copy the inputs in, replay, copy the outputs out. Backward: copy the outputs' gradients in,
    replay, copy the inputs' and parameters' gradients out."""

    @staticmethod
    def forward(ctx, graphs: _Captured, *tensors: Tensor):  # the inputs, then the parameters
        n = len(graphs.inputs)
        torch._foreach_copy_(graphs.inputs, tensors[:n])
        graphs.forward.replay()
        graphs.generation += 1
        ctx.graphs, ctx.generation, ctx.done = graphs, graphs.generation, False
        # an output without a gradient comes to the backward as None (its slot is zeroed once), not as zeros
        ctx.set_materialize_grads(False)
        ctx.params = [(p, p._version, p.data_ptr()) for p in tensors[n:]]  # checked in the backward
        outputs = _copies(graphs.outputs)
        ctx.mark_non_differentiable(
            *(o for o, g in zip(outputs, graphs.grad_outputs, strict=True) if g is None)
        )
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: Tensor | None):
        graphs: _Captured = ctx.graphs
        changed = [p for p, version, ptr in ctx.params if p._version != version or p.data_ptr() != ptr]
        if changed:
            raise RuntimeError(
                f"CUDA-graphed {graphs.owner[0]}: a parameter changed in place or moved between this forward and its "
                f"backward ({len(changed)} of {len(ctx.params)}, shapes {[tuple(p.shape) for p in changed]}); "
                "the backward would read other weights than the forward used"
            )
        if ctx.generation != graphs.generation or ctx.done:
            why = (
                "this forward's backward ran already"
                if ctx.done
                else f"another forward of this {graphs.owner[1]} ran since"
            )
            raise RuntimeError(
                f"CUDA-graphed {graphs.owner[0]}: {why}, and the activations this backward needs were overwritten "
                f"(the graphs hold one forward's, for one backward: run each backward once, before the "
                f"{graphs.owner[1]}'s next forward, or train with train.cuda_graphs=none)"
            )
        ctx.done = True
        _fill_grad_outputs(graphs, grad_outputs)
        graphs.backward.replay()
        out = iter(_copies([g for g in graphs.grads if g is not None]))
        return (None, *(None if g is None else next(out) for g in graphs.grads))


class Signatures:
    """Captures of one caller by call signature, least recently used first; at most ``max_signatures`` kept (the
    oldest dropped). ``captures`` counts signatures captured so far, dropped ones included (each costs time and
    memory). ``direct``: how to run without graphs, in the error for tensors off a GPU."""

    max_signatures = MAX_SIGNATURES
    direct = "call it without CUDA graphs"

    def __init__(self) -> None:
        self._captured: OrderedDict[Hashable, object] = OrderedDict()
        self.captures = 0

    def __len__(self) -> int:
        """Signatures captured and kept."""
        return len(self._captured)

    def __reduce__(self):
        """A copy (``copy.deepcopy`` or pickling of the model) starts without captures: they read and write the
        original's memory, and CUDA graphs cannot be copied."""
        return (type(self), ())

    def _require_cuda(self, inputs: Sequence[Tensor]) -> None:
        """``ValueError`` (naming ``direct``, how to run without graphs) for inputs off a CUDA device."""
        if inputs[0].device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need CUDA tensors; the input is on {inputs[0].device} ({self.direct})"
            )

    def _captured_for(self, sig: Hashable, capture: Callable[[], object]):
        """The capture of ``sig``, made now with ``capture()`` if new, and marked most recently used. A full cache
        drops its oldest capture before the new one is made (a pool of its own is released first, not held beside
        the new one's; a pending backward of a layer's graphs keeps them alive through its ctx)."""
        captured = self._captured.get(sig)
        if captured is None:
            if len(self._captured) >= self.max_signatures:
                self._captured.popitem(last=False)
            captured = self._captured[sig] = capture()
            self.captures += 1
        self._captured.move_to_end(sig)
        return captured


class Graphs(Signatures):
    """The captured forward and backward graphs of one caller (a layer, its experts, a whole model), by
    signature (``Signatures``). ``owner``: what the graphs are of, in errors (a name, a noun)."""

    owner = ("MoE layer", "layer")
    direct = "set the layer's cuda_graph to None to run it directly"

    def __init__(self) -> None:
        super().__init__()
        self.capturing = False  # True while warm-up and capture call the layer's own function

    def replay(
        self,
        key: Hashable,
        fn: Callable[..., tuple[Tensor, ...]],
        inputs: Sequence[Tensor],
        params: Sequence[Tensor],
    ) -> tuple[Tensor, ...]:
        """``fn(*inputs, *params)`` -> its outputs, replayed from the graphs of this call's signature (captured
        now if new). ``key`` names what ``fn`` computes beyond its arguments (the layer's settings): a new key
        is a new capture. ``ValueError`` for inputs not on a CUDA device."""
        self._require_cuda(inputs)

        def capture() -> _Captured:
            self.capturing = True
            try:
                graphs = _capture(fn, inputs, params)
            finally:
                self.capturing = False
            graphs.owner = self.owner
            return graphs

        graphs = self._captured_for(signature(key, params, inputs), capture)
        return _Replay.apply(graphs, *inputs, *params)


class LayerGraph(Graphs):
    """CUDA graphs of one MoE layer's whole forward (module docstring); ``MoEWrapper.forward`` calls it in
    training with autograd on. CUDA tensors only (``ValueError`` otherwise)."""

    __call__ = Graphs.replay


class ExpertsGraph(Graphs):
    """CUDA graphs of one ``ExpertBank``'s experts call (module docstring); ``ExpertBank.forward`` calls it in
    training with autograd on. CUDA tensors only (``ValueError`` otherwise)."""

    def __call__(
        self,
        fn: Callable[..., Tensor],
        activation: str,
        params: Sequence[Tensor],
        x_TD: Tensor,
        indices_TK: Tensor,
        weights_TK: Tensor,
    ) -> Tensor:
        """``fn(x_TD, *params, indices_TK, weights_TK, activation)`` -> ``y_TD [T, D]``, replayed from the
        graphs of this call's signature (captured now if new)."""
        if x_TD.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors; x_TD is on {x_TD.device}")
        if not any(t.requires_grad for t in (x_TD, weights_TK, *params)):  # no backward will follow
            return fn(x_TD, *params, indices_TK, weights_TK, activation)

        def experts(x: Tensor, idx: Tensor, w: Tensor, *p: Tensor) -> tuple[Tensor]:
            return (fn(x, *p, idx, w, activation),)

        return self.replay((fn, activation), experts, (x_TD, indices_TK, weights_TK), params)[0]

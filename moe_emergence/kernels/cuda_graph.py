"""CUDA graphs of one experts layer's forward and backward, for training without ``torch.compile``.

Shapes (legend: docs/architecture.md): T tokens, D model width, E experts, K experts per token.

Uncompiled, an MoE layer is bound by the host: the triton backend launches each of its kernels behind Python and
autograd dispatch (1.9-2.9 ms of host time per layer forward+backward on the H200, against ~0.56 ms on the
device at T = 8192; docs/benchmarks.md). The fast backends (``triton``, ``grouped_mm``) never wait on the
device, so the experts call ``fn(x_TD, w1, b1, w2, b2, indices_TK, weights_TK, activation)`` can be captured as one CUDA
graph forward and one backward, and replayed: one launch each, the same kernels, bitwise the same results.

``ExpertsGraph`` holds the graphs of one ``ExpertBank`` (``ExpertBank.cuda_graph``; the trainer sets it,
``train.cuda_graphs``). How it behaves:

- Replayed only where a backward follows: the bank in training mode with autograd on. Eval, ``no_grad`` and
  generation call the backend directly.
- One pair of graphs per call signature: the shapes, dtypes and ``requires_grad`` of x, indices and weights,
  the parameters' storage (pointer, shape, dtype, ``requires_grad``), the autocast state, the float32 matmul
  precision (TF32 or not), the backend and the activation. A new signature is captured on first use, after two
  warm-up calls on a side stream (Triton autotuning and lazy initialisation stay out of the graph); at most
  ``MAX_SIGNATURES`` are kept, the least recently used dropped. A parameter whose storage moved
  (``param.data = ...``) makes a new signature, never a replay on freed memory.
- The graphs hold one forward's activations, for one backward: each call's backward must run once, before the
  same signature's next forward of this bank, as in training with gradient accumulation (forward, backward,
  forward, backward). A backward whose activations a later forward or an earlier backward overwrote raises
  ``RuntimeError``, never computes gradients of other inputs; so does non-reentrant activation checkpointing,
  which runs the forward again before the backward. So does a parameter changed in place or moved
  (``param.data = ...``) between forward and backward (stricter than the direct call, which checks only the
  float32 weights it saves).
- Inputs are copied into the graph's static buffers, and y and every gradient copied out of them: nothing
  returned aliases the graph's memory, so outputs may be kept and gradients accumulate into ``.grad`` as
  usual (DDP's hooks see ordinary gradients).
- Memory: each signature has its own memory pool, kept while it lives and allocated from by its two captures
  alone: the forward's activations and the backward's gradient buffers (E x D x F x 2 float32 gradients and the
  activations of T x K rows: by their shapes ~0.35 GB a layer at the GPT-2-small shape with T = 4096).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
MAX_SIGNATURES = 4  # per bank: e.g. the training shape and a last, shorter batch
WARMUP_CALLS = 2


@dataclass
class _Captured:
    """The graphs of one signature and the static tensors they read and write."""

    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, Tensor, Tensor]  # x_TD, indices_TK, weights_TK
    # output of the captured forward (detached: the saved activations live on in the private pool)
    y_TD: Tensor
    dy_TD: Tensor  # the backward graph's input
    grads: tuple[Tensor | None, ...]  # d x, None (indices), d weights, d each parameter; None = not required
    generation: int = 0  # forwards replayed so far; a backward belongs to the latest


def _signature(fn: Callable, activation: str, params: Sequence[Tensor], x: Tensor, idx: Tensor, w: Tensor):
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    return (
        fn,
        activation,
        x.device,
        tuple((t.shape, t.dtype, t.requires_grad) for t in (x, idx, w)),
        tuple((p.data_ptr(), p.shape, p.dtype, p.requires_grad) for p in params),
        torch.get_autocast_dtype(device_type) if autocast else None,
        torch.backends.cuda.matmul.fp32_precision,  # TF32 or not: the float32 kernels' precision is fixed at capture
    )


def _static_copy(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


def _capture(fn: Callable, activation: str, params: Sequence[Tensor], x: Tensor, idx: Tensor, w: Tensor):
    """Warm up ``fn`` on a side stream, then capture its forward and its backward (``autograd.grad`` with
    respect to every input that requires a gradient) into two graphs sharing one private memory pool, on
    ``x``'s device, with autocast's weight cache off (a cached cast would be captured stale)."""
    inputs = (_static_copy(x), idx.detach().clone(), _static_copy(w))
    # the parameters' memory under new leaves: no AccumulateGrad node of a parameter (DDP keeps those, made on
    # the default stream) takes part in the capture; in-place updates of the parameters are what the replays read
    aliases = [p.detach().requires_grad_(p.requires_grad) for p in params]
    slots = (inputs[0], None, inputs[2], *aliases)  # gradient slots, in the order of _Replay's inputs
    wrt = [t for t in slots if t is not None and t.requires_grad]
    device_type = x.device.type
    autocast = torch.autocast(
        device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type),
        cache_enabled=False,
    )

    def run() -> Tensor:
        xs, idxs, ws = inputs
        with autocast:
            return fn(xs, *aliases, idxs, ws, activation)

    with torch.cuda.device(x.device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                y = run()
                torch.autograd.grad(y, wrt, torch.ones_like(y))
        torch.cuda.current_stream().wait_stream(side)
        del y
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # one capture stream for both (they share a pool); thread_local: other threads' CUDA calls (NCCL's
        # watchdog) are no error during the capture
        kw = dict(stream=torch.cuda.Stream(), capture_error_mode="thread_local")
        with torch.cuda.graph(forward, **kw):
            y_TD = run()
        dy_TD = torch.empty_like(y_TD)
        with torch.cuda.graph(backward, pool=forward.pool(), **kw):
            computed = iter(torch.autograd.grad(y_TD, wrt, dy_TD))
    grads = tuple(next(computed) if t is not None and t.requires_grad else None for t in slots)
    # The captured autograd graph is freed here; the memory of its saved activations stays reserved in the pool,
    # which nothing else allocates from, so the replays find them where the capture put them. The backward's own
    # buffers may reuse that memory (it was free once the backward had read it): one backward per forward.
    return _Captured(forward, backward, inputs, y_TD.detach(), dy_TD, grads)


class _Replay(torch.autograd.Function):
    """Forward: copy the inputs in, replay, copy y out. Backward: copy dy in, replay, copy the gradients out."""

    @staticmethod
    def forward(
        ctx, graphs: _Captured, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, *params: Tensor
    ):
        torch._foreach_copy_(graphs.inputs, (x_TD, indices_TK, weights_TK))  # one launch per dtype
        graphs.forward.replay()
        graphs.generation += 1
        ctx.graphs, ctx.generation, ctx.done = graphs, graphs.generation, False
        ctx.params = [(p, p._version, p.data_ptr()) for p in params]  # checked in the backward
        return graphs.y_TD.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_TD: Tensor):
        graphs: _Captured = ctx.graphs
        changed = [p for p, version, ptr in ctx.params if p._version != version or p.data_ptr() != ptr]
        if changed:
            raise RuntimeError(
                f"CUDA-graphed experts: a parameter changed in place or moved between this forward and its "
                f"backward ({len(changed)} of {len(ctx.params)}, shapes {[tuple(p.shape) for p in changed]}); "
                "the backward would read other weights than the forward used"
            )
        if ctx.generation != graphs.generation or ctx.done:
            why = (
                "this forward's backward ran already"
                if ctx.done
                else "another forward of this layer ran since"
            )
            raise RuntimeError(
                f"CUDA-graphed experts: {why}, and the activations this backward needs were overwritten (the "
                "graphs hold one forward's, for one backward: run each backward once, before the layer's next "
                "forward, or train with train.cuda_graphs=none)"
            )
        ctx.done = True
        graphs.dy_TD.copy_(dy_TD)
        graphs.backward.replay()
        computed = [g for g in graphs.grads if g is not None]
        copies = [torch.empty_like(g) for g in computed]
        torch._foreach_copy_(copies, computed)  # one launch per dtype, not one per gradient
        out = iter(copies)
        return (None, *(None if g is None else next(out) for g in graphs.grads))


class ExpertsGraph:
    """CUDA graphs of one ``ExpertBank``'s experts call (module docstring); ``ExpertBank.forward`` calls it in
    training with autograd on. CUDA tensors only (``ValueError`` otherwise)."""

    def __init__(self) -> None:
        self._captured: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0  # signatures captured so far, dropped ones included (each costs time and memory)

    def __len__(self) -> int:
        """Signatures captured and kept."""
        return len(self._captured)

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
        key = _signature(fn, activation, params, x_TD, indices_TK, weights_TK)
        graphs = self._captured.get(key)
        if graphs is None:
            graphs = self._captured[key] = _capture(fn, activation, params, x_TD, indices_TK, weights_TK)
            self.captures += 1
            if len(self._captured) > MAX_SIGNATURES:
                self._captured.popitem(last=False)  # a pending backward keeps its graphs alive through ctx
        self._captured.move_to_end(key)
        return _Replay.apply(graphs, x_TD, indices_TK, weights_TK, *params)

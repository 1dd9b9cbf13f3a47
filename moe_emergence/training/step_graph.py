"""One micro-batch's whole training step replayed from one CUDA graph (``train.cuda_graphs=model``).

Shapes (legend: docs/architecture.md): B rows, S positions, T = B * S tokens, E experts, L MoE layers.

Uncompiled, the trainer's step is bound by the host, even with the model's forward and its backward each
replayed from a graph (``model_graph.ModelGraph``): the objective's small ops, autograd's walk through the
graphed function, a copy of every gradient out of the graph and one AccumulateGrad per parameter cost more
host time than the GPU takes to run the step (H200: docs/benchmarks.md). ``StepGraph`` captures all of one
micro-batch's work as one graph: the forward, the objective (``steps.micro_batch_loss``: the loss with its
shares of the step, the step's sums and flags) and the backward, whose gradients accumulate in place into
each parameter's ``.grad``. A replay copies the micro-batch's token ids, labels, mask and counts, the step's
token counts and its loss coefficients into the graph's input buffers (one launch per dtype) and launches the
graph once.

A replay leaves what the direct micro-batch leaves (bit for bit: tests/test_step_graph.py): the parameters'
``.grad`` plus this micro-batch's gradients, the ``StepSums`` tensors plus its terms and flags (and its
tokens per expert); it returns each MoE layer's ``RouterOutput`` for routing telemetry, in the graph's own
memory: read it before the next replay.

Rules:

- Gradients: every parameter that requires one keeps a ``.grad`` tensor at one address (the trainer zeroes
  them in place, ``zero_grad(set_to_none=False)``); a missing one is made, zeros, before the key is taken. The
  capture checks that the loss reaches every such parameter: a ``RuntimeError`` names those it does not (their
  zero gradient would let AdamW decay parameters the direct step leaves alone); in the trainer, at its first MoE
  step, after the dense phase.
- A new capture for a new signature: shapes and dtypes of the inputs; the storage of the parameters, their
  gradients and the sums; the model's settings and buffers (``model_graph.model_key``); the objective's
  settings (the MoE layers, the expert count, the micro-batch scale, the gradient accumulation steps, the
  entropy coefficient, global counts, tokens per expert, fp16's loss-scale tensor); autocast and the float32
  matmul precision. The coefficients a schedule changes every
  step (``lb_coef``, ``z_coef``) are inputs, not part of it; a micro-batch with padding is its own signature
  (the model is given the attention mask). At most ``max_signatures`` are kept (the trainer's batches are full:
  its training shape with and without padding; a caller's shorter batch makes more), all captured into one
  private memory pool handle. Each capture runs on a new stream, and the caching allocator reuses a freed block
  only for the stream that allocated it, so in practice the signatures do not share memory: each adds a
  micro-batch's forward and backward (a fresh review's reading of the allocator, not measured), and a dropped
  signature's memory stays reserved in the pool while another lives. Capturing all of them on one stream would
  let them share it (they never run at once; a replay may then overwrite another signature's returned router
  outputs, which the trainer reads before the next replay): not done, as it has not run on a GPU.
- The capture follows two warm-up calls on a side stream (Triton autotuning and lazy initialisation stay out
  of the graph) that leave nothing behind: their random draws under ``fork_rng``, their gradients in fresh
  tensors dropped afterwards, the sums put back. Random draws (dropout, router noise) are graph-safe: each
  replay advances the default CUDA generator as the direct step would.
- Padding: with an attention mask, transformers decides on the host whether the mask may be skipped
  (``masking_utils._ignore_causal_mask_sdpa``, a read of the mask: a host sync) unless a stream is capturing;
  for a micro-batch with padding that decision is "keep it" either way, so the graph builds and applies the
  same mask as the direct step, bit for bit (tests/test_step_graph.py, ``data.cross_documents: false``).
- What it needs (``model_setup.cuda_graphs_on``): a GPU, one process, an uncompiled MoE model, not sharded,
  whose MoE layers never wait on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from moe_emergence.kernels.cuda_graph import WARMUP_CALLS, Signatures, signature
from moe_emergence.layer import GRAPHED_ROUTER_FIELDS, from_graphed_fields, graphed_fields
from moe_emergence.routing import RouterOutput
from moe_emergence.training.model_graph import model_key
from moe_emergence.training.rollback import module_walk
from moe_emergence.training.steps import MoEStep, StepSums, micro_batch_loss

Tensor = torch.Tensor


@dataclass
class _Captured:
    """One signature's graph and the static tensors it reads (inputs) and writes (outputs)."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def _warm_up(run: Callable[[], object], params: Sequence[Tensor], state: Sequence[Tensor]) -> list[int]:
    """``run()`` ``WARMUP_CALLS`` times on a side stream, leaving no trace: random draws under ``fork_rng``,
    gradients into fresh tensors (each ``.grad`` put back after), ``state`` (tensors ``run`` adds into) restored.
    Returns the indices of the ``params`` that require a gradient and got none. A warm-up that raises (out of
    memory, a kernel that fails to compile) also leaves the gradients and ``state`` as it found them."""
    grads = [p.grad for p in params]
    saved = [t.clone() for t in state]
    for p in params:
        p.grad = None
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side), torch.random.fork_rng(devices=[current.device]):
            for _ in range(WARMUP_CALLS):
                run()
        unreached = [i for i, p in enumerate(params) if p.requires_grad and p.grad is None]
    finally:
        current.wait_stream(side)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if state:
            torch._foreach_copy_(list(state), saved)
    return unreached


def _capture(
    fn: Callable[..., tuple[Tensor, ...]],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
    names: Callable[[], Sequence[str]],
    state: Sequence[Tensor],
    pool: tuple | None,
) -> _Captured:
    """Warm up ``fn(*inputs)`` (``_warm_up``), then capture it into one graph, in the private memory pool ``pool``
    (``torch.cuda.graph_pool_handle``; None: a pool of its own). The
    autocast cache is cleared before each call and after the capture: a cast made outside the capture would be
    replayed as freed memory (``kernels.cuda_graph._capture``)."""
    statics = tuple(t.detach().clone() for t in inputs)

    def run() -> tuple[Tensor, ...]:
        torch.clear_autocast_cache()
        return fn(*statics)

    with torch.cuda.device(statics[0].device):
        unreached = _warm_up(run, params, state)
        if unreached:
            raise RuntimeError(
                "CUDA-graphed training step: the loss does not reach "
                f"{', '.join(names()[i] for i in unreached[:5])}{' ...' if len(unreached) > 5 else ''} "
                f"({len(unreached)} parameters requiring a gradient); a graph would give them zero gradients "
                "that the optimizer acts on: freeze them (requires_grad=False) or train with "
                "train.cuda_graphs=layers"
            )
        torch.clear_autocast_cache()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (NCCL's watchdog) are no error during the capture
        with torch.cuda.graph(
            graph, pool=pool, stream=torch.cuda.Stream(), capture_error_mode="thread_local"
        ):
            outputs = tuple(t.detach() for t in run())
    torch.clear_autocast_cache()
    return _Captured(graph, statics, outputs)


def _objective_key(accelerator, moe: MoEStep, scale: float, padded: bool, device: torch.device) -> tuple:
    """The objective's settings a step graph fixes (module docstring), for its key. fp16's GradScaler gets its
    loss-scale tensor here if it has none yet: the graph reads it in place, at the address in the key."""
    scaler = accelerator.scaler
    if scaler is not None and not scaler.is_enabled():
        scaler = None  # a disabled GradScaler scales nothing
    if scaler is not None and scaler._scale is None:
        scaler.scale(torch.zeros((), device=device))
    return (
        tuple(moe.layers),
        scale,
        accelerator.gradient_accumulation_steps,
        None if scaler is None else scaler._scale.data_ptr(),  # GradScaler's private _scale
        moe.num_experts,
        moe.coefs.entropy_coef,
        moe.global_counts is not None,
        moe.collect_tokens_per_expert,
        padded,
    )


class StepGraph(Signatures):
    """The captured signatures of one model's training micro-step (module docstring), least recently used
    first; at most ``max_signatures`` kept (the training shape with and without padding, and one more)."""

    max_signatures = 3
    direct = "train with train.cuda_graphs=none"

    def __init__(self) -> None:
        super().__init__()
        # one handle for all signatures (module docstring: shared in name, not yet in memory)
        self._pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

    def replay(
        self,
        key: Hashable,
        fn: Callable[..., tuple[Tensor, ...]],
        inputs: Sequence[Tensor],
        params: Sequence[Tensor],
        names: Callable[[], Sequence[str]],
        state: Sequence[Tensor],
    ) -> tuple[Tensor, ...]:
        """Run ``fn(*inputs)`` for its effects on the ``params``' ``.grad`` and on ``state`` (tensors it adds
        into in place), replayed from the graph of this call's signature (captured now if new). ``names()``: the
        parameters' names, in their order (asked for only when a capture fails). Returns ``fn``'s outputs,
        static: valid until the next replay. ``ValueError`` for inputs off a CUDA device; ``RuntimeError`` where
        the loss does not reach a parameter that requires a gradient."""
        self._require_cuda(inputs)
        for p in params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        sig = (
            signature(key, params, inputs),
            tuple(p.grad.data_ptr() if p.grad is not None else 0 for p in params),
            tuple(map(Tensor.data_ptr, state)),
        )
        captured = self._captured_for(sig, lambda: _capture(fn, inputs, params, names, state, self._pool))
        torch._foreach_copy_(list(captured.inputs), list(inputs))  # one launch per dtype
        captured.graph.replay()
        return captured.outputs

    def __call__(
        self,
        model: torch.nn.Module,
        accelerator,
        batch: dict[str, Tensor],
        n_step: Tensor,
        counts: Tensor,
        coefs: Tensor,
        moe: MoEStep,
        sums: StepSums,
        scale: float,
        padded: bool,
    ) -> dict[int, RouterOutput]:
        """The trainer's micro-batch, replayed: ``model(input_ids, labels, attention_mask if padded)`` (the
        prepared model, in training), ``steps.micro_batch_loss`` with its arguments and ``accelerator.backward``
        of the loss. ``batch``: ``input_ids``, ``labels``, ``attention_mask`` ``[B, S]`` on the GPU; ``padded``:
        does the mask hold a 0 (read on the CPU copy, ``steps.has_padding``; part of the signature, never checked
        here: a graph captured with False ignores the mask, so a wrong False gives wrong results);
        ``n_step``, ``counts``: float64 ``[2]`` token counts of the step and of this micro-batch; ``coefs``:
        float32 ``[2]``, ``lb_coef`` and ``z_coef`` in force. Returns ``{block: RouterOutput}`` (static)."""
        layers = tuple(moe.layers)

        def step(ids: Tensor, labels: Tensor, mask: Tensor, c: Tensor, n: Tensor, k: Tensor):
            mask_kw = {"attention_mask": mask} if padded else {}
            out = model(input_ids=ids, labels=labels, output_router_logits=False, **mask_kw)
            graphed = moe.with_coefs(k)
            b = {"input_ids": ids, "labels": labels, "attention_mask": mask}
            loss = micro_batch_loss(out, b, n, scale, graphed, sums, padded=padded, counts=c)
            accelerator.backward(loss)
            return tuple(t.detach() for i in layers for t in graphed_fields(out.router_outputs[i]))

        unwrapped = accelerator.unwrap_model(model)
        # one walk for the key and the parameters (host time, every micro-batch)
        walk = module_walk(unwrapped)
        objective = _objective_key(accelerator, moe, scale, padded, n_step.device)
        key = (*model_key(unwrapped, walk), objective)
        inputs = (batch["input_ids"], batch["labels"], batch["attention_mask"], counts, n_step, coefs)
        state = (sums.totals, sums.bad_L2, *sums.tokens_per_expert.values())

        def names() -> list[str]:  # for a capture's error only
            return [n for n, _ in unwrapped.named_parameters()]

        fields = self.replay(key, step, inputs, walk[1], names, state)
        n = len(GRAPHED_ROUTER_FIELDS)
        return {i: from_graphed_fields(fields[j * n : (j + 1) * n]) for j, i in enumerate(layers)}

"""A causal LM's whole training forward and backward replayed from CUDA graphs (the benchmarks' graphed loops).

Shapes (legend: docs/architecture.md): B rows, S positions, E experts, K experts per token, T = B * S tokens.

Uncompiled, a GPT-2-small training step is bound by the host: Python and dispatch take longer to issue its
kernels than the GPU takes to run them, even with each MoE layer replayed from its own graphs (on the H200,
~38 ms of host time a step for ~18 ms of device time: docs/benchmarks.md). ``ModelGraph`` captures the whole
model, from token ids and labels to the loss and every MoE layer's ``RouterOutput`` fields, as one CUDA graph
forward and one backward, with the mechanism and rules of the layers' graphs (``kernels.cuda_graph.Graphs``):
the same kernels and results; random draws (dropout, router noise) graph-safe; parameters and buffers read
in place; inputs copied in, outputs and gradients copied out; one backward per forward; a new capture for new
shapes, a moved parameter, a changed training flag or module setting (a dropout's p, a router's noise: each
module's ``extra_repr``) or attention implementation.

What it needs: a GPU, an uncompiled model, not sharded, whose MoE layers never wait on the device (the
conditions of ``train.cuda_graphs=layers``), and a batch without padding (with an attention mask transformers
reads the mask on the host). The trainer's ``train.cuda_graphs=model`` goes further: ``step_graph.StepGraph``
captures the objective and the gradient accumulation with the model; ``ModelGraph`` is what the benchmarks'
graphed loops (``scripts/bench_moe.py``, ``scripts/profile_step.py --bare``) replay. The graphed output has the
loss and ``router_outputs`` only (``logits`` None: a training step does not read them; evaluation and
generation run the model directly).

A plain ``GPT2LMHeadModel`` in training (no mask, no KV cache) is graphed but not computed alike: transformers
(5.x, ``masking_utils.find_packed_sequence_indices``) searches its position ids for packed sequences with a
check read on the host, skipped while a stream captures, so the captured forward attends through another path
than the eager one (the same values up to rounding; other dropout masks). ``GPT2MoEForCausalLM`` avoids the
search (``modeling._KeepNothingCache``): its graphs compute bit for bit what it computes directly.
"""

from __future__ import annotations

import operator

import torch
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from moe_emergence.kernels.cuda_graph import Graphs, tensor_layout
from moe_emergence.layer import GRAPHED_ROUTER_FIELDS, from_graphed_fields, graphed_fields
from moe_emergence.modeling import MoECausalLMOutput
from moe_emergence.training.rollback import module_walk


def model_key(model: torch.nn.Module, walk: tuple[list, list, list] | None = None) -> tuple:
    """What a captured training step of ``model`` computes beyond its arguments and parameters: the model itself;
    each module's class, training flag, settings (its ``extra_repr``: dropout p, router noise, experts' backend,
    ...), hooks (forward, forward-pre, backward: a graph replays none added after its capture, and runs those
    removed since) and a ``forward`` set on the instance; the config's attention implementation and the
    defaults a call may leave to it; the buffers (router step, selection bias), read in place at their address
    and layout: one replaced by another tensor is a new capture. ``walk``: ``rollback.module_walk(model)``
    when the caller has it (taken here otherwise). Built with ``map`` over the walk's lists (a step graph
    builds it for every micro-batch, on the host's critical path). Not in it: attributes a module does not
    show in ``extra_repr``, other methods patched on an instance, global module hooks and global switches
    (deterministic algorithms, the attention kernel's backend): set them before the first capture."""
    modules, _, buffers = module_walk(model) if walk is None else walk
    config = model.config
    return (
        id(model),
        tuple(map(type, modules)),
        tuple(map(_TRAINING, modules)),
        tuple([m.extra_repr() for m in modules]),
        *(tuple(map(tuple, map(hooks, modules))) for hooks in _HOOKS),
        tuple(map(_own_forward, modules)),
        tuple(
            getattr(config, k, None) for k in ("_attn_implementation", "output_router_logits", "use_cache")
        ),
        tensor_layout(buffers),
    )


_TRAINING = operator.attrgetter("training")
_HOOKS = tuple(
    operator.attrgetter(f"_{kind}_hooks") for kind in ("forward_pre", "forward", "backward_pre", "backward")
)


def _own_forward(module: torch.nn.Module):
    """A ``forward`` set on the instance (accelerate's autocast wrapper, a user's patch), else None."""
    return module.__dict__.get("forward")


class ModelGraph(Graphs):
    """CUDA graphs of one model's training forward and backward (module docstring). Each signature keeps a
    whole forward's activations in its own memory pool: at most two are kept (the training shape and a last,
    shorter batch)."""

    max_signatures = 2
    owner = ("model", "model")
    direct = "call the model itself, or train with train.cuda_graphs=none"

    def __call__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        moe_layers: list[int],
        **options: bool | int | float | None,
    ) -> CausalLMOutputWithCrossAttentions:
        """``model(input_ids=..., labels=..., **options)`` in training, replayed: ``input_ids`` and ``labels``
        ``[B, S]`` int64 CUDA tensors (labels -100 where not predicted); ``options``: plain values (e.g. the
        trainer's ``output_router_logits=False``: the loss is then the LM loss, the objective computed by the
        caller), part of the signature. ``moe_layers``: the MoE blocks whose ``RouterOutput`` the output carries
        (``[]`` for a dense model). Returns an ``MoECausalLMOutput`` (``loss`` and ``router_outputs``) or, dense,
        a ``CausalLMOutputWithCrossAttentions`` with the loss; ``logits`` None. ``ValueError`` for tensors off a
        CUDA device; ``RuntimeError`` outside training mode or with autograd off (a graph holds activations for
        a backward)."""
        if not (model.training and torch.is_grad_enabled()):
            raise RuntimeError("ModelGraph: a training forward (model.train(), autograd on) holds the graphs")
        names, params = zip(*model.named_parameters(), strict=True)
        layers = tuple(moe_layers)

        def forward(ids: torch.Tensor, lab: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = torch.func.functional_call(
                model, dict(zip(names, p, strict=True)), (), {"input_ids": ids, "labels": lab, **options}
            )
            return (out.loss, *(t for i in layers for t in graphed_fields(out.router_outputs[i])))

        key = (*model_key(model), layers, tuple(sorted(options.items())))
        loss, *fields = self.replay(key, forward, (input_ids, labels), params)
        if not layers:
            return CausalLMOutputWithCrossAttentions(loss=loss)
        n = len(GRAPHED_ROUTER_FIELDS)
        routers = {i: from_graphed_fields(fields[j * n : (j + 1) * n]) for j, i in enumerate(layers)}
        return MoECausalLMOutput(loss=loss, router_outputs=routers)

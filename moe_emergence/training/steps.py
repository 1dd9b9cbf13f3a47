"""One optimizer step's objective over its micro-batches, the step's record, and evaluation.

Shapes (legend: docs/architecture.md): B rows, S positions, T = B * S tokens, E experts, L MoE layers,
V vocabulary.

The loss of one optimizer step over ``grad_accum`` micro-batches and ``num_processes`` processes is the
sum of one ``losses.moe_objective`` per micro-batch, each with its ``Shares`` of the step:
    lm = sum over all predicted tokens of the step of CE / number of those tokens (token-weighted, so
         grad_accum x B rows, 1 x grad_accum*B rows and num_processes x B rows give the same value),
    z, entropy = the same token weighting (by real input tokens) of the per-token router terms,
    lb = mean over micro-batches (and processes) of the Switch loss; ``balance_scope: global``
         all-reduces the counts behind f_i across processes first,
    loss = lm + lb_coef * lb + z_coef * z + entropy_coef * entropy (coefficients in force this step).
``accelerator.backward`` divides by ``grad_accum`` and DDP averages over the processes, so each
micro-batch's objective is scaled by ``grad_accum * num_processes`` before its backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from moe_emergence.losses import (
    LossCoefs,
    Shares,
    layer_tokens_per_expert,
    moe_objective,
    routed_tokens_per_expert,
)
from moe_emergence.routing import RouterOutput
from moe_emergence.telemetry import DomainLossStats, LayerRoutingStats, variant_metrics
from moe_emergence.telemetry import names as keys
from moe_emergence.training.guard import StepCheck
from moe_emergence.training.rollback import by_device, local_data, on_device, reshard


def shifted_token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[predicted tokens (labels[:, 1:] != -100), real input tokens (attention_mask)] as float64 ``[2]``."""
    return torch.stack([(batch["labels"][:, 1:] != -100).sum(), batch["attention_mask"].sum()]).double()


def has_padding(batch: dict[str, torch.Tensor]) -> bool:
    """Does any row of a collated CPU batch hold padding? Where not, the trainer hands the model
    ``attention_mask=None``, which HF attention reads as all ones and the routers as every token (the same
    outputs, ``tests/test_objective.py``). Given an all-ones mask, transformers (5.24, ``masking_utils.
    _ignore_causal_mask_sdpa``) tests it with ``bool(mask.sum() == numel)`` on the device: a host sync in
    every forward, which stops the host from queueing the step ahead of the GPU."""
    return not bool(batch["attention_mask"].all())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``, with no host sync. To a GPU it goes through pinned memory (torch's
    caching host allocator, which keeps a block until its copy is done) with a non-blocking copy: a blocking
    copy from pageable memory synchronises the stream (``cudaStreamSynchronize``), so the host would wait
    at every batch for the previous step's optimizer and snapshot kernels."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated CPU batch on ``device`` (``to_device`` per column)."""
    return {k: to_device(v, device) for k, v in batch.items()}


@dataclass
class MoEStep:
    """What the step's micro-batches need to know about the MoE model (None for a dense model).

    layers: MoE block indices; coefs: the loss coefficients in force this step; global_counts: sums
    ``[L, E]`` counts across processes (``balance_scope: global``) or None; collect_tokens_per_expert: gather
    ``routed_tokens_per_expert`` for aux-loss-free balancing; selection_bias: ``{block: [E] buffer}``
    of routers with a selection bias (logged)."""

    layers: list[int]
    num_experts: int
    coefs: LossCoefs
    global_counts: Callable[[torch.Tensor], torch.Tensor] | None
    collect_tokens_per_expert: bool
    selection_bias: dict[int, torch.Tensor] = field(default_factory=dict)

    def with_coefs(self, coefs: torch.Tensor) -> MoEStep:
        """This step with ``lb_coef`` and ``z_coef`` read from ``coefs``, float32 ``[2]`` on the device (the
        same values: the objective then takes them as tensors, as the step's CUDA graph does)."""
        return replace(self, coefs=LossCoefs(coefs[0], coefs[1], self.coefs.entropy_coef))


@dataclass
class StepResult:
    """One optimizer step, on device except ``lrs`` and ``check``: the summed terms (lm, lb, z, entropy:
    this process's shares), real tokens, gradient norm, learning rates, variant telemetry (summed over
    processes), the guard's ``StepCheck`` and the step's ``MoEStep`` (None for a dense model)."""

    totals: torch.Tensor
    tokens: torch.Tensor
    grad_norm: torch.Tensor
    lrs: dict[str, float]
    variants: dict[str, torch.Tensor]
    check: StepCheck
    moe: MoEStep | None


class StepSums:
    """Device-side sums over one step's micro-batches (never a host sync).

    totals: ``[5]`` float64: the step's lm, lb, z and entropy terms and its objective (the loss whose
    gradient is taken: each micro-batch's ``moe_objective(...).loss`` with its shares, summed);
    bad_L2: per MoE layer, router logits non-finite / a router loss non-finite; variants: telemetry of the
    routing variants (``variant_metrics``), already divided by the micro-batch count; tokens_per_expert:
    ``{block: [E]}`` float32 routed tokens per expert of ``tokens_per_expert_layers`` (aux-loss-free
    balancing). Every tensor but the variants' is updated in place (a CUDA graph of the step adds into them)."""

    def __init__(
        self,
        num_layers: int,
        device: torch.device,
        tokens_per_expert_layers: Sequence[int] = (),
        num_experts: int = 0,
    ) -> None:
        self.totals = torch.zeros(5, dtype=torch.float64, device=device)
        self.bad_L2 = torch.zeros(num_layers, 2, dtype=torch.bool, device=device)
        self.variants: dict[str, torch.Tensor] = {}
        self.tokens_per_expert = {
            i: torch.zeros(num_experts, dtype=torch.float32, device=device) for i in tokens_per_expert_layers
        }

    @classmethod
    def of(cls, moe: MoEStep | None, device: torch.device) -> StepSums:
        """Zeroed sums for a step of ``moe`` (None: a dense model)."""
        if moe is None:
            return cls(0, device)
        collected = moe.layers if moe.collect_tokens_per_expert else ()
        return cls(len(moe.layers), device, collected, moe.num_experts)

    def zero_(self) -> StepSums:
        """Ready for a new step, in place (the tensors keep their addresses); the variants dropped."""
        torch._foreach_zero_([self.totals, self.bad_L2, *self.tokens_per_expert.values()])
        self.variants = {}
        return self


def nonfinite_flags(routers: list[RouterOutput], lb_L: torch.Tensor, z_L: torch.Tensor) -> torch.Tensor:
    """``[L, 2]`` bool on device, per MoE layer: router logits non-finite, a router loss non-finite. The layers'
    logits share one shape (``[T, E]``: one forward, one expert count), as ``moe_objective``, which stacks them
    too, requires; ``lb_L`` and ``z_L`` are ``[L]``."""
    logits_LTE = torch.stack([r.router_logits for r in routers])  # one check for all layers, not one each
    logits_L = ~torch.isfinite(logits_LTE).flatten(1).all(-1)
    return torch.stack([logits_L, ~torch.isfinite(torch.stack([lb_L, z_L])).all(0)], dim=-1)


def micro_batch_loss(
    out,
    batch: dict,
    n_step: torch.Tensor,
    scale: float,
    moe: MoEStep | None,
    sums: StepSums,
    routing=None,
    padded: bool = True,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss to back-propagate for one micro-batch after its forward ``out`` (module docstring): its
    objective with its ``Shares`` of the step (``n_step``: the step's [predicted, real] token counts),
    times ``scale`` = micro-batches * processes. Adds its terms, flags, telemetry and tokens_per_expert to ``sums``
    (and ``routing``, a ``LayerRoutingStats``, when given). ``padded`` False (``has_padding`` of the batch's CPU
    copy) says every token is real: the objective then skips its masking ops (the same values). ``counts``: the
    batch's ``shifted_token_counts`` on its device when the caller has them (the trainer: from the CPU copy, in
    the step's one copy), else worked out here."""
    c = shifted_token_counts(batch) if counts is None else counts
    lm = torch.where(c[0] > 0, out.loss.float(), 0.0)  # an all-padding micro-batch: 0, not NaN
    share_lm, share_tokens = (c / n_step).float().unbind()
    if moe is None:
        sums.totals[0] += (lm * share_lm).detach().double()
        sums.totals[4] += (lm * share_lm).detach().double()
        return lm * share_lm * scale
    mask_T = batch["attention_mask"].reshape(-1)
    real_T = mask_T if padded else None  # None: every token real, no masking ops in the objective
    outs = {i: out.router_outputs[i] for i in moe.layers}
    routers = list(outs.values())
    tokens_per_expert_LE = None
    if moe.global_counts is not None:
        tokens_per_expert_LE = moe.global_counts(layer_tokens_per_expert(routers, moe.num_experts, real_T))
    shares = Shares(lm=share_lm, tokens=share_tokens, batch=1.0 / scale)
    obj = moe_objective(
        lm,
        routers,
        real_T,
        moe.num_experts,
        moe.coefs,
        tokens_per_expert_LE=tokens_per_expert_LE,
        shares=shares,
    )
    terms = [
        lm * share_lm,
        obj.lb_loss / scale,
        obj.z_loss * shares.tokens,
        obj.entropy_loss * shares.tokens,
        obj.loss,
    ]
    sums.totals += torch.stack(terms).detach().double()
    sums.bad_L2 |= nonfinite_flags(routers, obj.lb_loss_L, obj.z_loss_L)
    if routing is not None:
        add_routing(outs, mask_T, batch["domain_ids"], moe, sums, routing, scale)
    if moe.collect_tokens_per_expert:
        for i, r in outs.items():
            counted = routed_tokens_per_expert(r, moe.num_experts, mask_T)
            if i in sums.tokens_per_expert:  # StepSums.of made it: added in place (a step graph adds into it)
                sums.tokens_per_expert[i] += counted
            else:  # sums made without the layer's buffer (a caller's StepSums(L, device))
                sums.tokens_per_expert[i] = counted
    return obj.loss * scale


def add_routing(
    outs: dict[int, RouterOutput],
    mask_T: torch.Tensor,
    domain_ids: torch.Tensor,
    moe: MoEStep,
    sums: StepSums,
    routing: LayerRoutingStats,
    scale: float,
) -> None:
    """A micro-batch's routing telemetry: its ``{block: RouterOutput}`` added to ``routing`` (``mask_T`` ``[T]``,
    ``domain_ids`` ``[B, S]``) and its variant metrics, divided by ``scale``, to ``sums.variants``."""
    routing.add(outs, mask_T, domain_ids)
    for k, v in variant_metrics(outs, mask_T, moe.selection_bias).items():
        sums.variants[k] = sums.variants.get(k, 0.0) + v.detach() / scale


@torch.no_grad()
def clip_grad_norm_(
    params: list[torch.nn.Parameter], max_norm: float, reduce_sum: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The L2 norm of all of ``params``' gradients taken together (every process), then the gradients
    scaled in place by ``min(1, max_norm / (norm + 1e-6))`` (torch.nn.utils.clip_grad_norm_'s rule;
    Pascanu et al. 2013, "On the difficulty of training RNNs", eq. 7). Returns the norm before clipping: a
    0-d tensor on the gradients' device, float32 (float64 where the gradients are; inf/NaN when a gradient
    is, and, as torch's, when the sum of squares overflows the gradients' dtype, e.g. float32 above ~1.8e19; no
    host sync). ``max_norm`` inf scales nothing. The coefficient has the norm's dtype.

    Plain gradients are the same on every process (one process, or DDP after its all-reduce) and count
    once; FSDP2 gradients are DTensors sharded over the processes (``Shard`` on a 1-d mesh of all of them):
    the squares of each process's shard are summed with ``reduce_sum`` (one all-reduce). The maths runs on
    the local shards, not through DTensor dispatch (~5 ms of host time a step less on FSDP2, H200). Raises
    NotImplementedError for any other DTensor layout (replicated or 2-d meshes: HSDP, tensor parallel)."""
    sharded, plain, world = [], [], None
    for p in params:
        g = p.grad
        if g is None:
            continue
        placements = None if type(g) is torch.Tensor else getattr(g, "placements", None)
        if placements is None:
            plain.append(g)  # a gradient needs no detach (no graph: the function runs under no_grad)
            continue
        mesh = g.device_mesh
        world = world or torch.distributed.get_world_size()
        if mesh.ndim != 1 or not placements[0].is_shard() or mesh.size() != world:
            raise NotImplementedError(
                f"gradient norm: a gradient with placements {placements} on a {mesh.ndim}-d mesh of "
                f"{mesh.size()} processes; only FSDP2's Shard over all processes (1-d mesh) is supported"
            )
        sharded.append(local_data(g))
    if not sharded and not plain:
        return torch.zeros(())
    device = (sharded or plain)[0].device
    plain_groups = by_device(plain)  # grouped once: for the norm and the scaling
    sharded_groups = by_device(sharded)
    parts = [_norm(plain_groups, device)] if plain else []
    if sharded:  # this process's shards: their squares summed over the processes, in float64
        part = _norm(sharded_groups, device)
        parts.append(reduce_sum(part.double().square()).sqrt().to(part.dtype))
    norm = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts), 2.0)
    norm = norm.to(torch.promote_types(norm.dtype, torch.float32))
    if max_norm != float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for groups in (sharded_groups, plain_groups):
            for dev, on_dev in groups.items():
                torch._foreach_mul_(on_dev, on_device(coef, dev))
    return norm


def _norm(groups: dict[torch.device, list[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """torch's L2 norm of the gradients ``groups`` holds (``rollback.by_device``), taken together
    (``torch.nn.utils.get_total_norm``), 0-d on ``device``: the per-tensor norms of one multi-tensor
    ``_foreach_norm`` per device (each in its tensor's dtype), stacked (mixed dtypes promote) and normed in that
    dtype, so it overflows to inf where torch's does, whatever the split into tensors; no op per tensor in
    Python."""
    parts = [
        on_device(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, 2.0)), 2.0), device)
        for group in groups.values()
    ]
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts), 2.0)


def step_flags(
    totals: torch.Tensor,
    grad_norm: torch.Tensor,
    signalled: bool,
    params_bad: torch.Tensor,
    bad_L2: torch.Tensor,
) -> torch.Tensor:
    """The step's guard vector (summed over processes, then ``StepCheck.decode``), float32: a non-finite objective
    (``totals[4]``: a term whose coefficient is 0 and that is left out, e.g. the entropy, does not count),
    non-finite gradient norm, a stop signal, non-finite parameters, the per-layer flags, then this process's
    share of the LM loss (summed: the step's LM loss). One finite test for the objective and the norm (widened
    to float64, exactly) and one concatenation (bool flags promoted): 15 dispatched ops where one per piece took 23."""
    device = totals.device
    objective_and_norm = torch.stack([totals[4], grad_norm.to(device, torch.float64).reshape(())])
    return torch.cat(
        [
            objective_and_norm.isfinite().logical_not(),
            torch.full((1,), signalled, device=device),  # a fill: no copy from the host
            params_bad.to(device, torch.bool).reshape(1),
            bad_L2.reshape(-1),
            totals[:1].float(),
        ]
    )


def train_record(totals: list[float], lrs: dict[str, float], moe: MoEStep | None, noise_std: float) -> dict:
    """The loss and learning-rate part of a ``train/`` record from the step's summed ``totals`` (lm, lb,
    z, entropy, objective); ``train/loss`` is the objective the gradient was taken of."""
    lm, lb, z, ent, loss = totals
    record = {keys.TRAIN_LM_LOSS: lm, keys.TRAIN_LR: lrs["decay"] if "decay" in lrs else lrs["no_decay"]}
    if moe is None:
        return {keys.TRAIN_LOSS: lm, **record}
    c = moe.coefs
    return {
        keys.TRAIN_LOSS: loss,
        **record,
        keys.TRAIN_LB_LOSS: lb,
        keys.TRAIN_Z_LOSS: z,
        keys.TRAIN_ENTROPY_LOSS: ent,
        keys.TRAIN_LB_COEF: c.lb_coef,
        keys.TRAIN_Z_COEF: c.z_coef,
        keys.TRAIN_ROUTER_LR: lrs["router"],
        keys.NOISE_STD: noise_std,
    }


def token_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE ``[B * (S - 1)]`` in float32 (0 where the label is -100)."""
    V = logits_BSV.shape[-1]
    return F.cross_entropy(
        logits_BSV[:, :-1].reshape(-1, V).float(),
        labels_BS[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="none",
    )


@torch.no_grad()
def evaluate(
    model, unwrapped, batches, domains: list[str], moe: bool, reduce_fn, split: str = "eval"
) -> tuple[dict, dict]:
    """Eval metrics of corpus split ``split`` over ``batches``, this process's ``(batch, counted)`` forward
    passes (``evalset.shard_batches``: a pass with ``counted`` False only keeps collectives matched and adds
    nothing). Sums are token-weighted and added over processes with ``reduce_fn``. Returns (metrics, joint
    counts): ``<p>/lm_loss``, ``<p>/loss_{domain}``, ``<p>/ppl_{domain}`` and, for MoE models,
    ``<p>_router/layer{L}/...``, with ``<p>`` = ``names.split_prefixes(split)``; joint: ``{layer: [M, E]}``
    top-1 counts (MoE) or {}."""
    prefix, router_prefix = keys.split_prefixes(split)
    was_training = model.training
    model.eval()
    device = next(unwrapped.parameters()).device
    losses = DomainLossStats(len(domains), device)
    routing = None
    if moe:
        E = unwrapped.config.moe.num_experts
        routing = LayerRoutingStats(unwrapped.config.moe_layers, E, len(domains), device)
    for batch, counted in batches:
        padded = has_padding(batch)
        batch = batch_to_device(batch, device)
        torch.compiler.cudagraph_mark_step_begin()  # compile_mode=reduce-overhead: outputs are used before the next
        # MoE: no router losses needed here, and no KV cache (scoring only). Not for a dense HF model: without a
        # mask and a cache transformers would search its position ids for packed sequences (a host sync)
        kw = {"output_router_logits": False, "use_cache": False} if moe else {}
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"] if padded else None, **kw
        )
        if not counted:
            continue
        ce_T = token_cross_entropy(out.logits, batch["labels"])
        losses.add(ce_T, batch["domain_ids"][:, 1:], batch["labels"][:, 1:] != -100)
        if routing is not None:
            routing.add(out.router_outputs, batch["attention_mask"].reshape(-1), batch["domain_ids"])
    losses.buf.copy_(reduce_fn(losses.buf))
    metrics = losses.metrics(domains, prefix)
    joint = {}
    if routing is not None:
        routing.all_reduce(reduce_fn)
        metrics.update(routing.metrics(router_prefix))
        joint = routing.joint_counts()
    model.train(was_training)
    reshard(model)  # FSDP2: forwards without a backward leave the root's parameters gathered
    return metrics, joint

"""The accelerate training loop: dense phase -> upcycle -> MoE fine-tuning, telemetry, checkpoints, resume.

Shapes (legend: docs/architecture.md): B rows of a micro-batch, S positions, T = B * S tokens, E experts.

Phases: with ``model.moe`` set, steps ``0 .. upcycle_at_step - 1`` train the dense model; at the start of
step ``upcycle_at_step`` the dense weights are upcycled (``upcycle(model, model.moe)``), and the model and a
NEW AdamW are prepared again with accelerate. The dense optimizer state (Adam moments) is dropped: the
expert banks and routers are new parameters, and the shared weights restart their moments (the schedule
does not restart: learning rates follow the same warmup-cosine curve of the whole run). Router noise
annealing counts optimizer steps since the upcycle. ``model.moe: null`` trains dense throughout.

See ``steps`` for how the loss of one optimizer step is weighted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from moe_emergence.data import block_rows, build_corpus, collate_blocks, rows_of
from moe_emergence.errors import ConfigError, as_user_error
from moe_emergence.telemetry import JsonlSink, LayerRoutingStats, expert_divergence, flat_expert_weights
from moe_emergence.telemetry import names as keys
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training import guard, model_setup
from moe_emergence.training.config import RunConfig
from moe_emergence.training.evalset import eval_blocks, shard_batches
from moe_emergence.training.guard import StepCheck
from moe_emergence.training.loop import RunLoop, Stop, TrainResult
from moe_emergence.training.optim import build_optimizer, lr_multiplier, reset_base_lrs, set_lr
from moe_emergence.training.rollback import VerifiedState, any_nonfinite, first_nonfinite, params_and_buffers
from moe_emergence.training.rundir import RunFolder, check_model_dims, resolve_resume
from moe_emergence.training.sampler import BlockSampler
from moe_emergence.training.signals import StopSignals
from moe_emergence.training.step_graph import StepGraph
from moe_emergence.training.steps import (
    MoEStep,
    StepResult,
    StepSums,
    add_routing,
    batch_to_device,
    clip_grad_norm_,
    evaluate,
    has_padding,
    micro_batch_loss,
    shifted_token_counts,
    step_flags,
    to_device,
)
from moe_emergence.training.tracking import Tracking


class Trainer:
    """Builds everything from a ``RunConfig`` and runs it; ``train()`` is the public entry point."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, overwrite: bool = False, corpus=None):
        self.parent_pid = os.getppid()  # the launcher, if any (StopSignals watches it)
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        t = cfg.train
        self.tracking = Tracking(cfg)
        self.accelerator = Accelerator(
            mixed_precision=model_setup.mixed_precision(t.mixed_precision, t.cpu),
            gradient_accumulation_steps=t.grad_accum,
            cpu=t.cpu,
            log_with=self.tracking.log_with,
            step_scheduler_with_optimizer=False,
        )
        base = model_setup.check_base(cfg)  # before anything is written
        acc = self.accelerator
        fsdp = acc.distributed_type == DistributedType.FSDP
        self.cuda_graphs, why_not = model_setup.cuda_graphs_on(cfg, base, acc.device, fsdp, acc.num_processes)
        if cfg.model.moe is not None and acc.device.type == "cuda":  # say what auto chose, and why
            acc.print(
                f"train.cuda_graphs={t.cuda_graphs}: {model_setup.said_cuda_graphs(self.cuda_graphs, why_not)}"
            )
        self.folder = folder = RunFolder(self.accelerator, cfg, resume, overwrite)  # locks the run folder
        self.resume_from = folder.resume_from
        try:
            folder.open()
            self._setup(base, folder.resume_meta, corpus)
            folder.commit()
        except BaseException:
            folder.abort()
            raise
        acc = self.accelerator
        self.metrics = JsonlSink(self.run_dir / "metrics.jsonl")
        if acc.is_main_process and resume is not None:  # drop records written after the checkpoint
            self.metrics.truncate_after(self.state.step if self.resume_from is not None else -1)
        self.tracking.start(acc, cfg, self.run_dir)

    def _setup(self, base: model_setup.BaseInfo, resume_meta: dict | None, corpus) -> None:
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        self.collate = collate_blocks
        set_seed(t.seed)
        tok_dir = self.run_dir / "tokenizer"
        if corpus is None:
            with acc.main_process_first(), as_user_error("data"):
                corpus = build_corpus(
                    cfg.data,
                    tokenizer=base.tokenizer,
                    max_positions=base.max_positions,
                    tokenizer_dir=None if tok_dir.exists() else tok_dir,  # a resumed run keeps its own
                )
        self.corpus, self.tokenizer = corpus, corpus.tokenizer
        self.train_rows = block_rows(corpus.train)  # rows_of: one take a batch, no row by row
        self.domains = list(corpus.domains)
        e = cfg.eval
        self.eval_sets = {s: eval_blocks(corpus.split(s), s, e.max_blocks, cfg.data.seed) for s in e.splits}
        set_seed(t.seed)
        model = model_setup.build_model(cfg, self.tokenizer)
        self.state = ckpt.TrainState()
        with as_user_error("data", ValueError):
            self.sampler = BlockSampler(
                len(corpus.train), t.batch_size, t.grad_accum, acc.num_processes, acc.process_index, t.seed
            )
        if resume_meta is not None:
            if resume_meta["phase"] == "moe" and not model_setup.is_moe(model):
                model = model_setup.to_moe(model, cfg)
            check_model_dims(self.resume_from, resume_meta, model_setup.model_dims(model))
            rows = resume_meta.get("train_rows")
            if rows is not None and rows != len(corpus.train):
                raise ConfigError(
                    f"cannot resume from {self.resume_from}: its training split had {rows} blocks, this one "
                    f"has {len(corpus.train)}; the data or data config changed since the checkpoint"
                )
        self._prepare(model)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from, resume_meta)
            self.verified.unverified = int(self.state.last_applied)  # its last update awaits its check
            acc.print(f"resumed from {self.resume_from} at step {self.state.step}")
        self.last_joint: tuple[int, dict] = (-1, {})  # (step, {layer: [M, E] top-1 counts}) of the last eval

    def _load_checkpoint(self, path: Path, meta: dict) -> None:
        """Model, optimizer and RNG through accelerate (tensors only: ``weights_only``), then the trainer's
        own state from JSON. Anything unreadable is a ``ConfigError`` naming the checkpoint."""
        state = ckpt.read_trainer_state(path)
        if state["sampler"]["seed"] != self.cfg.train.seed:
            raise ConfigError(
                f"cannot resume from {path}: its sampler.seed={state['sampler']['seed']} is not "
                f"train.seed={self.cfg.train.seed}"
            )
        step, meta_step = state["train_state"]["step"], meta["step"]  # meta: read by RunFolder already
        if step != meta_step or step > self.cfg.train.steps:
            raise ConfigError(
                f"cannot resume from {path}: its trainer_state.json is at step {step}, its meta.json at step "
                f"{meta_step}, and train.steps={self.cfg.train.steps}; they must agree and not exceed train.steps"
            )
        try:
            with ckpt.accelerate_view(path) as view:
                self.accelerator.load_state(str(view))
            reset_base_lrs(self.optimizer, self.cfg.optim)
            self.state.load_state_dict(state["train_state"])
            self.sampler.load_state_dict(state["sampler"])
        except (*ckpt.UNPICKLE_ERRORS, ConfigError) as e:
            first = " ".join(str(e).split())[:240]
            raise ConfigError(f"cannot resume from {path}: {first}") from e
        if self.verified.any_nonfinite(self.accelerator.device):
            bad = first_nonfinite(self.unwrapped, self.optimizer) or "a tensor of another process"
            raise ConfigError(
                f"cannot resume from {path}: it holds non-finite values ({bad}); resume an earlier one"
            )

    # ------------------------------------------------------------------ model plumbing

    def _prepare(self, model) -> None:
        """(Re-)prepare model and a new optimizer with accelerate (drops earlier references)."""
        acc = self.accelerator
        known_bad = False  # the guard's "known bad" carries into the upcycled model, which is built from it
        if getattr(self, "model", None) is not None:
            known_bad = self.verified.known_bad
            self.model = self.optimizer = self.verified = None  # the old snapshot too
            self.step_graph = self.sums = None  # the old model's graph, its memory and the sums it adds into
            acc.free_memory()
        model.train()
        if self.cfg.train.compile:
            model_setup.compile_in_place(model, self.cfg.train.compile_backend, self.cfg.train.compile_mode)
        graphed = self.cuda_graphs is not None and model_setup.is_moe(model)
        if graphed:
            model_setup.graph_layers(model, self.cuda_graphs)
        self.step_graph = StepGraph() if graphed and self.cuda_graphs == "model" else None
        self.sums = None  # with a step graph: the one StepSums its captures add into, zeroed each step
        optimizer = build_optimizer(model, self.cfg.optim)
        self.model, self.optimizer = self._wrap(model, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)
        self.moe = model_setup.is_moe(self.unwrapped)
        self.verified = VerifiedState(
            self.model, self.optimizer, self.cfg.guard.snapshot_every, self.reduce_sum, known_bad
        )

    def _wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Distributed wrapping: accelerate's ``prepare`` (DDP, FSDP2, device placement, mixed precision).
        The one seam where a test may shard the model itself (FSDP2 on CPU, where accelerate never applies
        FSDP: tests/fsdp_cpu_worker.py).

        FSDP with a per-block wrap (configs/accelerate/fsdp_per_block.yaml): one unit per block class of this
        model (``_no_split_modules``: ``GPT2Block`` dense, ``GPT2MoEBlock`` after the upcycle). Set on every
        prepare: accelerate fills the plugin's class names from the first model it wraps and would look for
        the dense block in the MoE model. configs/accelerate/fsdp.yaml (``NO_WRAP``) ignores them."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and getattr(model, "_no_split_modules", None):
            plugin.transformer_cls_names_to_wrap = list(model._no_split_modules)
        return self.accelerator.prepare(model, optimizer)

    @property
    def phase(self) -> str:
        return "moe" if self.moe else "dense"

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "sum") if self.accelerator.num_processes > 1 else x

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, routing: LayerRoutingStats | None, signals: StopSignals | None = None) -> StepResult:
        """Forward/backward all micro-batches of one step and take the optimizer step, unless the guard
        rejects it (then the step is skipped, see ``guard``). The decoded ``StepCheck`` is the step's one
        host sync."""
        acc, device = self.accelerator, self.accelerator.device
        scale = self.cfg.train.grad_accum * acc.num_processes
        batches = [self.collate(rows_of(self.train_rows, rows)) for rows in self.sampler.next_step()]
        per_batch = [shifted_token_counts(b) for b in batches]  # on the CPU copies
        step_moe = self._moe_step() if self.moe else None  # its loss coefficients as floats, for the record
        coefs = [step_moe.coefs.lb_coef, step_moe.coefs.z_coef] if step_moe else [0.0, 0.0]
        # one copy to the device: the step's token counts, each micro-batch's, the loss coefficients in force
        counts_all = to_device(
            torch.stack([sum(per_batch), *per_batch, torch.tensor(coefs).double()]), device
        )
        counts = self.reduce_sum(counts_all[0])
        n_step = counts.clamp_min(1)
        coefs_t = counts_all[-1].float()  # read on the device, by both paths of _micro_batch alike
        moe = step_moe.with_coefs(coefs_t) if step_moe else None
        sums = self._step_sums(moe, device)
        for m, batch in enumerate(batches):
            padded = has_padding(batch)  # read on the CPU copy
            batch = batch_to_device(batch, device)
            with acc.accumulate(self.model):
                torch.compiler.cudagraph_mark_step_begin()  # compile_mode=reduce-overhead: a new CUDA-graph step
                shares = (n_step, counts_all[m + 1], coefs_t, scale)
                self._micro_batch(batch, padded, shares, moe, sums, routing)
        return self._finish_step(step_moe, sums, counts[1], signals)

    def _micro_batch(
        self, batch: dict, padded: bool, shares: tuple, moe: MoEStep | None, sums: StepSums, routing
    ):
        """One micro-batch's forward, objective (``micro_batch_loss``) and backward: replayed from the step graph
        where there is one, else run directly. ``padded``: the batch's mask holds a 0 (read on its CPU copy);
        ``shares``: the step's token counts, this micro-batch's, the loss coefficients ``[2]`` and the micro-batch
        scale."""
        n_step, counts, coefs_t, scale = shares
        if self.step_graph is not None:
            outs = self.step_graph(
                self.model, self.accelerator, batch, n_step, counts, coefs_t, moe, sums, scale, padded
            )
            if routing is not None:
                add_routing(
                    outs, batch["attention_mask"].reshape(-1), batch["domain_ids"], moe, sums, routing, scale
                )
            return
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"] if padded else None,
            labels=batch["labels"],
            **({"output_router_logits": False} if moe else {}),  # the objective is computed once, below
        )
        loss = micro_batch_loss(out, batch, n_step, scale, moe, sums, routing, padded, counts=counts)
        self.accelerator.backward(loss)

    def _step_sums(self, moe: MoEStep | None, device: torch.device) -> StepSums:
        """Zeroed sums for this step: new ones, or, with a step graph, the one set its captures add into."""
        if self.step_graph is None:
            return StepSums.of(moe, device)
        if self.sums is None:
            self.sums = StepSums.of(moe, device)
        return self.sums.zero_()

    def _moe_step(self) -> MoEStep:
        """This step's ``MoEStep``: router step and loss coefficients from the steps since the upcycle."""
        model = self.unwrapped
        moe_cfg = model.config.moe
        moe_step = self.state.step - self.cfg.model.upcycle_at_step
        model.set_router_step(moe_step)
        scope_global = self.cfg.train.balance_scope == "global"
        return MoEStep(
            layers=model.config.moe_layers,
            num_experts=moe_cfg.num_experts,
            coefs=moe_cfg.loss_coefs(moe_step),
            global_counts=self.reduce_sum if scope_global else None,
            collect_tokens_per_expert=moe_cfg.bias_update_rate > 0,
            selection_bias={
                i: layer.router.selection_bias
                for i, layer in model.moe_layers().items()
                if layer.router.bias_update_rate > 0
            },
        )

    def _finish_step(
        self, moe: MoEStep | None, sums: StepSums, tokens: torch.Tensor, signals: StopSignals | None
    ) -> StepResult:
        """Clip, judge the step (``guard``), then take it or roll back; aux-loss-free balancing."""
        cfg = self.cfg
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
        self.accelerator.unscale_gradients()  # fp16: the GradScaler's scale off first (no-op otherwise)
        params, buffers = params_and_buffers(self.model)  # one walk for the clip, the check and the snapshot
        grad_norm = clip_grad_norm_(params, clip, self.reduce_sum)
        signalled = signals is not None and signals.received is not None
        params_bad = any_nonfinite(params)
        flags = step_flags(sums.totals, grad_norm, signalled, params_bad, sums.bad_L2)
        check = StepCheck.decode(self.reduce_sum(flags).tolist(), moe.layers if moe else [])  # host sync
        guard.judge(check, self.state, cfg.guard)
        lrs = set_lr(self.optimizer, self._lr_mult(self.state.step))
        verified = self.verified.verifies(check.good)  # this loss verifies the updates since the last check
        self._apply_or_roll_back(check, params + buffers)
        if sums.tokens_per_expert and check.good:  # aux-loss-free balancing: once per taken step
            self.unwrapped.update_selection_bias(
                {i: self.reduce_sum(v) for i, v in sums.tokens_per_expert.items()}
            )
        self.state.step += 1
        guard.update(self.state, check, self.state.step, cfg.guard, verified)
        self.state.last_applied = check.good
        variants = {k: self.reduce_sum(v) for k, v in sums.variants.items()}
        totals = sums.totals.clone() if sums is self.sums else sums.totals  # the next step zeroes self.sums
        return StepResult(totals, tokens, grad_norm, lrs, variants, check, moe)

    def _apply_or_roll_back(self, check: StepCheck, tensors: list[torch.Tensor]) -> None:
        """A good step: snapshot the state its loss verified (when due), then take the optimizer step. A bad
        step: no update, and the state goes back to the snapshot (``rollback.VerifiedState``). ``tensors``: the
        model's parameters and buffers (``rollback.module_tensors``), walked this step."""
        if check.good:
            self.verified.before_update(tensors)
            self.optimizer.step()
            self.verified.after_update()
        else:
            check.detail = self.verified.describe(check.params_bad, check.spike is not None)
            # fp16: the GradScaler must see non-finite gradients (it skips the update, lowers its scale and
            # accelerate calls update()); a step rejected with finite gradients still closes its unscale_
            scaler = self.accelerator.scaler
            if scaler is not None and check.grad_bad:
                self.optimizer.step()
            elif scaler is not None:
                scaler.update()
            self.verified.roll_back()
        # a step graph adds into the .grad tensors it was captured with: zeroed in place, kept at their address
        self.optimizer.zero_grad(set_to_none=self.step_graph is None)

    def _lr_mult(self, step: int) -> float:
        o = self.cfg.optim
        return lr_multiplier(step, self.cfg.train.steps, o.warmup_steps, o.min_lr_ratio)

    # ------------------------------------------------------------------ telemetry

    def log(self, metrics: dict[str, float], images: dict | None = None) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(self.state.step, metrics)
        self.tracking.log(metrics, self.state.step, images)

    def router_metrics(self, routing: LayerRoutingStats) -> dict[str, float]:
        routing.all_reduce(self.reduce_sum)
        out = routing.metrics(keys.ROUTER)
        for i, layer in self.unwrapped.moe_layers().items():
            divergence = expert_divergence(flat_expert_weights(layer.experts))
            out[keys.layer_key(keys.ROUTER, i, "expert_divergence")] = divergence
        return out

    def run_eval(self, split: str | None = None) -> None:
        """Evaluate corpus split ``split`` (default ``eval.split``) on its fixed blocks (``evalset``: the same
        for every seed and world size, each block once across processes) and log the metrics with the
        blocks' fingerprint (``<split>/blocks_fingerprint``)."""
        e, acc = self.cfg.eval, self.accelerator
        blocks = self.eval_sets[split or e.split]
        data = block_rows(self.corpus.split(blocks.split))
        passes = shard_batches(
            blocks.rows, e.batch_size or self.cfg.train.batch_size, acc.process_index, acc.num_processes
        )
        batches = ((self.collate(rows_of(data, rows)), counted) for rows, counted in passes)
        metrics, joint = evaluate(
            self.model, self.unwrapped, batches, self.domains, self.moe, self.reduce_sum, blocks.split
        )
        prefix, router_prefix = keys.split_prefixes(blocks.split)
        metrics[keys.blocks_fingerprint(prefix)] = blocks.fingerprint
        images = self.tracking.heatmaps(joint, self.domains, router_prefix) if joint else None
        self.log(metrics, images)
        if blocks.split == e.split:  # the summary's heatmaps: the periodic split's last eval
            self.last_joint = (self.state.step, joint)

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step_N`` unless the state is known bad (``VerifiedState.good_for_saving``)."""
        if not self.verified.good_for_saving(
            self.accelerator.device, self.accelerator.print, self.state.step
        ):
            return
        t = self.cfg.train
        meta = {
            "phase": self.phase,
            "upcycle_at_step": self.cfg.model.upcycle_at_step,
            "dims": model_setup.model_dims(self.unwrapped),
            "train_rows": len(self.corpus.train),
            "num_processes": self.accelerator.num_processes,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "config": self.cfg.to_dict(),
        }
        trainer_state = {"train_state": self.state.state_dict(), "sampler": self.sampler.state_dict()}
        ckpt.save_checkpoint(
            self.accelerator,
            self.run_dir / "checkpoints",
            self.state.step,
            meta,
            self.cfg.checkpoint.keep,
            trainer_state,
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run to the end (or a stop, ``loop.Stop``); the run folder's lock is released when this
        returns or raises."""
        try:
            with StopSignals(self.parent_pid) as signals:
                return RunLoop(self, signals).run()
        finally:
            self.folder.release()

    def upcycle_if_due(self) -> None:
        """At ``model.upcycle_at_step``: upcycle the dense model and prepare it (and a new optimizer)."""
        cfg, st = self.cfg, self.state
        if cfg.model.moe is not None and not self.moe and st.step >= cfg.model.upcycle_at_step:
            self._prepare(model_setup.to_moe(self.unwrapped, cfg))
            st.loss_history, st.last_applied = [], False  # the guard's spike rule restarts per phase
            self.accelerator.print(f"step {st.step}: upcycled to {cfg.model.moe.num_experts} experts")

    def routing_stats(self) -> LayerRoutingStats:
        """Empty per-layer routing accumulators for the MoE model."""
        m = self.unwrapped.config
        return LayerRoutingStats(m.moe_layers, m.moe.num_experts, len(self.domains), self.accelerator.device)

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:  # written aside and renamed into place: final/ is whole or absent
            final, tmp = self.run_dir / "final", self.run_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model_setup.save_final(self.unwrapped, self.tokenizer, tmp, state_dict)
            ckpt.discard(final)
            tmp.rename(final)
        acc.wait_for_everyone()


def train(cfg: RunConfig, resume: str | None = None, overwrite: bool = False, corpus=None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; returns where it ended."""
    return Trainer(cfg, resume=resume, overwrite=overwrite, corpus=corpus).train()


__all__ = ["Stop", "TrainResult", "Trainer", "resolve_resume", "train"]

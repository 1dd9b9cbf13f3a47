"""The accelerate training loop: dense phase -> upcycle -> MoE fine-tuning, telemetry, checkpoints, resume.

Shapes: B blocks per micro-batch, L sequence length, T = B * L tokens, E experts.

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
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from moe_emergence.errors import ConfigError, as_user_error
from moe_emergence.telemetry import JsonlSink, LayerRoutingStats, expert_divergence, flat_expert_weights
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training import guard, model_setup
from moe_emergence.training.config import RunConfig
from moe_emergence.training.guard import StepCheck
from moe_emergence.training.optim import build_optimizer, lr_multiplier, reset_base_lrs, set_lr
from moe_emergence.training.rollback import VerifiedState, any_nonfinite, first_nonfinite
from moe_emergence.training.rundir import RunFolder, check_model_dims, resolve_resume
from moe_emergence.training.sampler import BlockSampler, rows_of
from moe_emergence.training.signals import StopSignals
from moe_emergence.training.steps import (
    evaluate,
    lm_share,
    moe_terms,
    shifted_token_counts,
    step_flags,
    train_record,
)
from moe_emergence.training.tracking import Tracking


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    # None = finished; "collapse" (collapse guard), "stop_after" (time slice), "nonfinite" (non-finite
    # guard), "signal" (SIGINT/SIGTERM: ``signal`` holds its number)
    stopped: str | None = None
    signal: int | None = None
    message: str | None = None


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
        from moe_emergence.data import build_corpus, collate_blocks

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
        self.domains = list(corpus.domains)
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
        self._eval_rows: list[int] | None = None

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
            acc.free_memory()
        model.train()
        if self.cfg.train.compile:
            model_setup.compile_in_place(model, self.cfg.train.compile_backend, self.cfg.train.compile_mode)
        optimizer = build_optimizer(model, self.cfg.optim)
        self.model, self.optimizer = self._wrap(model, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)
        self.moe = model_setup.is_moe(self.unwrapped)
        self.verified = VerifiedState(
            self.model, self.optimizer, self.cfg.guard.snapshot_every, self._reduce_sum, known_bad
        )

    def _wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Distributed wrapping: accelerate's ``prepare`` (DDP, FSDP2, device placement, mixed precision).
        The one seam where a test may shard the model itself (FSDP2 on CPU, where accelerate never applies
        FSDP: tests/fsdp_cpu_worker.py)."""
        return self.accelerator.prepare(model, optimizer)

    @property
    def phase(self) -> str:
        return "moe" if self.moe else "dense"

    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "sum") if self.accelerator.num_processes > 1 else x

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, routing: LayerRoutingStats | None, signals: StopSignals | None = None) -> dict:
        """Forward/backward all micro-batches of one step and take the optimizer step, unless the loss or
        gradients are non-finite (then the step is skipped, see ``guard``). Returns on-device tensors
        (lm, lb, z totals, tokens, grad_norm) and the decoded ``StepCheck``: the step's one host sync."""
        acc, cfg, device = self.accelerator, self.cfg, self.accelerator.device
        G, P = cfg.train.grad_accum, acc.num_processes
        batches = [self.collate(rows_of(self.corpus.train, rows)) for rows in self.sampler.next_step()]
        counts = self._reduce_sum(sum(shifted_token_counts(b) for b in batches).to(device))
        n_lab, n_tok = counts[0].clamp_min(1), counts[1].clamp_min(1)
        moe_cfg = self.unwrapped.config.moe if self.moe else None
        layers = self.unwrapped.config.moe_layers if self.moe else []
        coefs, ent_coef = {"lb": 0.0, "z": 0.0}, 0.0
        bias_loads: dict[int, torch.Tensor] | None = None  # aux-loss-free balancing: this step's expert loads
        if self.moe:
            moe_step = self.state.step - self.cfg.model.upcycle_at_step
            self.unwrapped.set_router_step(moe_step)
            self.unwrapped.schedule_loss_coefs(moe_step)
            coefs, ent_coef = self.unwrapped.loss_coefs, moe_cfg["entropy_coef"]
            bias_loads = {} if moe_cfg["bias_update_rate"] > 0 else None
        global_fn = self._reduce_sum if (self.moe and cfg.train.balance_scope == "global") else None
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # lm, lb, z, entropy of this step
        bad_L2 = torch.zeros(len(layers), 2, dtype=torch.bool, device=device)
        variant_sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            c = shifted_token_counts(batch)
            with acc.accumulate(self.model):
                torch.compiler.cudagraph_mark_step_begin()  # compile_mode=reduce-overhead: a new CUDA-graph step
                out = self.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                )
                lm = lm_share(out.lm_loss if self.moe else out.loss, c[0], n_lab)
                loss = lm * (G * P)
                lb = z = ent = torch.zeros((), device=device)
                if self.moe:
                    mask_T = batch["attention_mask"].reshape(-1)
                    outs, lb, z, bad = moe_terms(self.unwrapped, layers, mask_T, c[1] / n_tok, global_fn)
                    bad_L2 |= bad
                    ent = out.entropy_loss * (c[1] / n_tok)
                    loss = loss + coefs["lb"] * lb + coefs["z"] * z * (G * P)
                    if ent_coef != 0:
                        loss = loss + ent_coef * ent * (G * P)
                    if routing is not None:
                        routing.add(outs, mask_T, batch["domain_ids"])
                        for k, v in self.unwrapped.variant_stats(mask_T).items():
                            variant_sums[k] = variant_sums.get(k, 0.0) + v.detach() / (G * P)
                    if bias_loads is not None:
                        for i, load_E in self.unwrapped.expert_load(mask_T).items():
                            bias_loads[i] = bias_loads.get(i, 0.0) + load_E
                acc.backward(loss)
                parts = [lm.detach(), lb.detach() / (G * P), z.detach(), ent.detach()]
                totals += torch.stack(parts).double()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
        signalled = signals is not None and signals.received is not None
        params_bad = any_nonfinite(list(self.model.parameters()))
        flags = step_flags(totals, grad_norm, signalled, params_bad, bad_L2)
        check = StepCheck.decode(self._reduce_sum(flags).tolist(), layers)  # the step's one host sync
        guard.judge(check, self.state, cfg.guard)
        lrs = set_lr(self.optimizer, self._lr_mult(self.state.step))
        verified = self.verified.verifies(check.good)  # this loss verifies the updates since the last check
        self._apply_or_roll_back(check)
        if bias_loads is not None and check.good:  # aux-loss-free balancing: once per taken step
            self.unwrapped.update_selection_bias({i: self._reduce_sum(v) for i, v in bias_loads.items()})
        self.state.step += 1
        guard.update(self.state, check, self.state.step, cfg.guard, verified)
        self.state.last_applied = check.good
        if variant_sums:
            variant_sums = {k: self._reduce_sum(v) for k, v in variant_sums.items()}
        return {
            "totals": totals,
            "tokens": counts[1],
            "grad_norm": grad_norm,
            "lrs": lrs,
            "variants": variant_sums,
            "check": check,
        }

    def _apply_or_roll_back(self, check: StepCheck) -> None:
        """A good step: snapshot the state its loss verified (when due), then take the optimizer step. A bad
        step: no update, and the state goes back to the snapshot (``rollback.VerifiedState``)."""
        if check.good:
            self.verified.before_update()
            self.optimizer.step()
            self.verified.after_update()
        else:
            check.detail = self.verified.describe(check.params_bad, check.spike is not None)
            # fp16: accelerate's GradScaler must see non-finite gradients (it skips the step, lowers its scale)
            if self.accelerator.scaler is not None and check.grad_bad:
                self.optimizer.step()
            self.verified.roll_back()
        self.optimizer.zero_grad(set_to_none=True)

    def _lr_mult(self, step: int) -> float:
        o = self.cfg.optim
        return lr_multiplier(step, self.cfg.train.steps, o.warmup_steps, o.min_lr_ratio)

    # ------------------------------------------------------------------ telemetry

    def _log(self, metrics: dict[str, float], images: dict | None = None) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(self.state.step, metrics)
        self.tracking.log(metrics, self.state.step, images)

    def _router_metrics(self, routing: LayerRoutingStats) -> dict[str, float]:
        routing.all_reduce(self._reduce_sum)
        out = routing.metrics("router")
        for i, layer in self.unwrapped.moe_layers().items():
            out[f"router/layer{i}/expert_divergence"] = expert_divergence(flat_expert_weights(layer.experts))
        return out

    def run_eval(self) -> None:
        e = self.cfg.eval
        bs = e.batch_size or self.cfg.train.batch_size
        acc = self.accelerator
        if self._eval_rows is None:  # a fixed seeded sample: every eval sees the same blocks
            gen = torch.Generator().manual_seed(self.cfg.train.seed)
            n = min(len(self.corpus.eval), bs * e.max_batches)
            self._eval_rows = torch.randperm(len(self.corpus.eval), generator=gen)[:n].tolist()
        rows = self._eval_rows
        starts = list(range(0, len(rows), bs))[acc.process_index :: acc.num_processes]
        batches = (self.collate(rows_of(self.corpus.eval, rows[s : s + bs])) for s in starts)
        metrics, joint = evaluate(
            self.model, self.unwrapped, batches, self.domains, self.moe, self._reduce_sum
        )
        images = self.tracking.heatmaps(joint, self.domains, "eval_router") if joint else None
        self._log(metrics, images)

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
        """Run to the end (or a stop); the run folder's lock is released when this returns or raises."""
        try:
            with StopSignals(self.parent_pid) as signals:
                return self._loop(signals)
        finally:
            self.folder.release()

    def _loop(self, signals: StopSignals) -> TrainResult:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        steps, U = cfg.train.steps, cfg.model.upcycle_at_step
        t_stop = cfg.train.stop_after
        if st.step == 0:
            self.run_eval()
        bar = tqdm(
            total=steps,
            initial=st.step,
            desc=cfg.log.run_name,
            disable=not (acc.is_main_process and cfg.log.progress),
        )
        t0, tok0 = time.perf_counter(), st.tokens
        tokens_dev = torch.zeros((), dtype=torch.float64, device=acc.device)
        # a checkpoint at step N was saved after the eval of step N, if that step had one
        evaluated = st.step == 0 or st.step >= steps or (cfg.eval.every and st.step % cfg.eval.every == 0)
        stopped, last_eval, last_ckpt, message = None, st.step if evaluated else -1, st.step, None
        while st.step < steps:
            if cfg.model.moe is not None and not self.moe and st.step >= U:
                self._prepare(model_setup.to_moe(self.unwrapped, cfg))
                st.loss_history, st.last_applied = [], False  # the guard's spike rule restarts per phase
                acc.print(f"step {st.step}: upcycled to {cfg.model.moe.num_experts} experts")
            router_step = self.moe and (st.step + 1) % cfg.log.router_every == 0
            routing = None
            if router_step:
                m = self.unwrapped.config
                routing = LayerRoutingStats(m.moe_layers, m.moe["num_experts"], len(self.domains), acc.device)
            out = self.train_step(routing, signals)
            tokens_dev += out["tokens"]
            bar.update(1)
            if not out["check"].good and st.consecutive_skips >= cfg.guard.max_consecutive_skips:
                saveable = not self.verified.known_bad
                stopped = "nonfinite"
                message = guard.stop_message(st, cfg.guard.max_consecutive_skips, saveable)
            elif out["check"].signal:
                stopped = "signal"
            record: dict[str, float] = {}
            if st.step % cfg.log.every == 0 or st.step == steps or stopped == "nonfinite":
                lm, lb, z, ent = self._reduce_sum(out["totals"]).tolist()
                st.tokens += int(tokens_dev.item())
                tokens_dev.zero_()
                dt = time.perf_counter() - t0
                tps = (st.tokens - tok0) / dt if dt > 0 else 0.0
                t0, tok0 = time.perf_counter(), st.tokens
                record = train_record(self.unwrapped if self.moe else None, lm, lb, z, ent, out["lrs"])
                record.update(
                    {
                        "train/grad_norm": float(out["grad_norm"]),
                        "train/tokens": float(st.tokens),
                        "train/skipped_steps": float(st.skipped_steps),
                        "perf/tokens_per_sec": tps,
                    }
                )
                bar.set_postfix(loss=f"{lm:.3f}", tok_s=f"{tps:,.0f}")
            if routing is not None:
                router = self._router_metrics(routing)
                router.update({k: float(v) for k, v in out["variants"].items()})
                record.update(router)
                layers = self.unwrapped.config.moe_layers
                if guard.check_collapse(st, cfg.collapse, router, layers, acc.print) and stopped is None:
                    stopped = "collapse"
            if record:
                self._log(record)
            if stopped == "collapse" or (cfg.eval.every and st.step % cfg.eval.every == 0):
                self.run_eval()
                last_eval = st.step
            if stopped or (cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0):
                st.tokens += int(tokens_dev.item())  # the token count is part of the checkpoint
                tokens_dev.zero_()
                self.save_checkpoint()  # never the weights a bad step left (save_checkpoint checks)
                last_ckpt = st.step
            if stopped:
                break
            if t_stop is not None and st.step >= t_stop:
                stopped = "stop_after"
                break
        bar.close()
        st.tokens += int(tokens_dev.item())
        sig = signals.received if stopped == "signal" else None
        if stopped in ("stop_after", "signal", "nonfinite"):  # checkpoint only, no final/
            if last_ckpt != st.step:
                self.save_checkpoint()
            if stopped == "signal":
                message = f"stopped by {signal.Signals(sig).name} at step {st.step}; checkpoint saved"
            if message:
                acc.print(message)
            self.tracking.finish()
            return TrainResult(self.run_dir, st.step, stopped, sig, message)
        if last_eval != st.step:
            self.run_eval()
        if last_ckpt != st.step:
            self.save_checkpoint()
        if not self.verified.good_for_saving(acc.device, acc.print, st.step):  # e.g. snapshot_every: 0
            message = f"bad-step guard: the final weights are known bad; no final/ written in {self.run_dir}"
            self.tracking.finish()
            return TrainResult(self.run_dir, st.step, "nonfinite", message=message)
        self.save_final()
        self.tracking.finish()
        return TrainResult(self.run_dir, st.step, stopped)

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


__all__ = ["TrainResult", "Trainer", "resolve_resume", "train"]

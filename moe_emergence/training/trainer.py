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

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from moe_emergence.telemetry import JsonlSink, LayerRoutingStats, expert_divergence, flat_expert_weights
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training import model_setup
from moe_emergence.training.config import RunConfig
from moe_emergence.training.optim import build_optimizer, lr_multiplier, set_lr
from moe_emergence.training.rundir import prepare_run_dir, resolve_resume
from moe_emergence.training.sampler import BlockSampler
from moe_emergence.training.steps import aux_losses, evaluate, shifted_token_counts
from moe_emergence.training.tracking import Tracking


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str | None = None  # None = finished; "collapse" (collapse guard) or "stop_after" (time slice)


def _mixed_precision(setting: str, cpu: bool) -> str:
    if setting != "auto":
        return setting
    gpu = torch.cuda.is_available() and not cpu
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def _rows(dataset, indices: list[int]) -> list[dict]:
    cols = dataset[indices]
    return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=False)]


class Trainer:
    """Builds everything from a ``RunConfig`` and runs it; ``train()`` is the public entry point."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, overwrite: bool = False, corpus=None):
        from moe_emergence.data import build_corpus, collate_blocks

        self.cfg, self.collate = cfg, collate_blocks
        self.run_dir = cfg.run_dir
        t = cfg.train
        self.tracking = Tracking(cfg)
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(t.mixed_precision, t.cpu),
            gradient_accumulation_steps=t.grad_accum,
            cpu=t.cpu,
            log_with=self.tracking.log_with,
            step_scheduler_with_optimizer=False,
        )
        acc = self.accelerator
        self.resume_from = prepare_run_dir(acc, cfg, resume, overwrite)
        set_seed(t.seed)
        tokenizer = model_setup.load_tokenizer(cfg.model)
        if corpus is None:
            with acc.main_process_first():
                corpus = build_corpus(
                    cfg.data,
                    tokenizer=tokenizer,
                    max_positions=model_setup.max_positions(cfg.model),
                    tokenizer_dir=self.run_dir / "tokenizer",
                )
        self.corpus, self.tokenizer = corpus, corpus.tokenizer
        self.domains = list(corpus.domains)
        set_seed(t.seed)
        model = model_setup.build_model(cfg, self.tokenizer)
        self.state = ckpt.TrainState()
        self.sampler = BlockSampler(
            len(corpus.train), t.batch_size, t.grad_accum, acc.num_processes, acc.process_index, t.seed
        )
        acc.register_for_checkpointing(self.state, self.sampler)
        if self.resume_from is not None:
            meta = ckpt.read_meta(self.resume_from)
            if meta["phase"] == "moe" and not model_setup.is_moe(model):
                model = model_setup.to_moe(model, cfg)
        self._prepare(model)
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
            acc.print(f"resumed from {self.resume_from} at step {self.state.step}")
        self._eval_rows: list[int] | None = None
        self.metrics = JsonlSink(self.run_dir / "metrics.jsonl")
        if acc.is_main_process and self.resume_from is not None:
            self.metrics.truncate_after(self.state.step)
        self.tracking.start(acc, cfg, self.run_dir)

    # ------------------------------------------------------------------ model plumbing

    def _prepare(self, model) -> None:
        """(Re-)prepare model and a new optimizer with accelerate (drops earlier references)."""
        acc = self.accelerator
        if getattr(self, "model", None) is not None:
            self.model = self.optimizer = None
            acc.free_memory()
        model.train()
        optimizer = build_optimizer(model, self.cfg.optim)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)
        self.moe = model_setup.is_moe(self.unwrapped)

    @property
    def phase(self) -> str:
        return "moe" if self.moe else "dense"

    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "sum") if self.accelerator.num_processes > 1 else x

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, routing: LayerRoutingStats | None) -> dict[str, torch.Tensor]:
        """Forward/backward all micro-batches of one step and take the optimizer step.
        Returns on-device tensors (no host sync): lm, lb, z, tokens, grad_norm."""
        acc, cfg = self.accelerator, self.cfg
        device = acc.device
        G, P = cfg.train.grad_accum, acc.num_processes
        batches = [self.collate(_rows(self.corpus.train, rows)) for rows in self.sampler.next_step()]
        counts = self._reduce_sum(sum(shifted_token_counts(b) for b in batches).to(device))
        n_lab, n_tok = counts[0].clamp_min(1), counts[1].clamp_min(1)
        moe_cfg = self.unwrapped.config.moe if self.moe else None
        coefs = {"lb": 0.0, "z": 0.0}
        bias_loads: dict[int, torch.Tensor] | None = None
        if self.moe:
            moe_step = self.state.step - self.cfg.model.upcycle_at_step
            self.unwrapped.set_router_step(moe_step)
            self.unwrapped.schedule_loss_coefs(moe_step)
            coefs = self.unwrapped.loss_coefs
            if moe_cfg["bias_update_rate"] > 0:
                bias_loads = {}
        ent_coef = moe_cfg["entropy_coef"] if self.moe else 0.0
        global_fn = self._reduce_sum if (self.moe and cfg.train.balance_scope == "global") else None
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # lm, lb, z, entropy of this step
        variant_sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            c = shifted_token_counts(batch)
            with acc.accumulate(self.model):
                out = self.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                )
                lm = (out.lm_loss if self.moe else out.loss).float() * (c[0] / n_lab)
                loss = lm * (G * P)
                lb = z = ent = torch.zeros((), device=device)
                if self.moe:
                    mask_T = batch["attention_mask"].reshape(-1)
                    outs = self.unwrapped.router_outputs()
                    lb, z = aux_losses(outs, mask_T, moe_cfg["num_experts"], global_fn)
                    z = z * (c[1] / n_tok)
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
        lrs = set_lr(self.optimizer, self._lr_mult(self.state.step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if bias_loads is not None:  # aux-loss-free balancing: once per optimizer step, global loads
            self.unwrapped.update_selection_bias({i: self._reduce_sum(v) for i, v in bias_loads.items()})
        self.state.step += 1
        if variant_sums:
            variant_sums = {k: self._reduce_sum(v) for k, v in variant_sums.items()}
        return {
            "totals": totals,
            "tokens": counts[1],
            "grad_norm": grad_norm,
            "lrs": lrs,
            "variants": variant_sums,
        }

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

    def _check_collapse(self, metrics: dict[str, float]) -> bool:
        """Update the per-layer streaks; True when the run must stop."""
        c, stop = self.cfg.collapse, False
        for i in self.unwrapped.config.moe_layers:
            key = f"layer{i}"
            frac = metrics[f"router/{key}/max_frac"]
            streak = self.state.collapse_streak.get(key, 0) + 1 if frac > c.max_frac else 0
            self.state.collapse_streak[key] = streak
            if streak >= c.patience:
                msg = (
                    f"collapse guard: layer {i} sent {frac:.1%} of its tokens to one expert for {streak} "
                    f"consecutive checks (collapse.max_frac={c.max_frac}, patience={c.patience})"
                )
                if c.action == "stop":
                    self.accelerator.print(msg + "; stopping (collapse.action=stop)")
                    stop = True
                elif streak == c.patience:
                    warnings.warn(msg, stacklevel=2)
        return stop

    def run_eval(self) -> None:
        e = self.cfg.eval
        bs = e.batch_size or self.cfg.train.batch_size
        acc = self.accelerator
        if (
            self._eval_rows is None
        ):  # a fixed seeded sample, so every eval sees the same blocks of every domain
            gen = torch.Generator().manual_seed(self.cfg.train.seed)
            n = min(len(self.corpus.eval), bs * e.max_batches)
            self._eval_rows = torch.randperm(len(self.corpus.eval), generator=gen)[:n].tolist()
        rows = self._eval_rows
        starts = list(range(0, len(rows), bs))[acc.process_index :: acc.num_processes]
        batches = (self.collate(_rows(self.corpus.eval, rows[s : s + bs])) for s in starts)
        metrics, joint = evaluate(
            self.model, self.unwrapped, batches, self.domains, self.moe, self._reduce_sum
        )
        images = self.tracking.heatmaps(joint, self.domains, "eval_router") if joint else None
        self._log(metrics, images)

    def save_checkpoint(self) -> None:
        t = self.cfg.train
        meta = {
            "phase": self.phase,
            "upcycle_at_step": self.cfg.model.upcycle_at_step,
            "num_processes": self.accelerator.num_processes,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
        }
        ckpt.save_checkpoint(
            self.accelerator, self.run_dir / "checkpoints", self.state.step, meta, self.cfg.checkpoint.keep
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
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
        stopped, last_eval, last_ckpt = None, 0 if st.step == 0 else -1, st.step
        while st.step < steps:
            if cfg.model.moe is not None and not self.moe and st.step >= U:
                self._prepare(model_setup.to_moe(self.unwrapped, cfg))
                acc.print(f"step {st.step}: upcycled to {cfg.model.moe.num_experts} experts")
            router_step = self.moe and (st.step + 1) % cfg.log.router_every == 0
            routing = None
            if router_step:
                m = self.unwrapped.config
                routing = LayerRoutingStats(m.moe_layers, m.moe["num_experts"], len(self.domains), acc.device)
            out = self.train_step(routing)
            tokens_dev += out["tokens"]
            bar.update(1)
            record: dict[str, float] = {}
            if st.step % cfg.log.every == 0 or st.step == steps:
                lm, lb, z, ent = self._reduce_sum(out["totals"]).tolist()
                st.tokens += int(tokens_dev.item())
                tokens_dev.zero_()
                dt = time.perf_counter() - t0
                tps = (st.tokens - tok0) / dt if dt > 0 else 0.0
                t0, tok0 = time.perf_counter(), st.tokens
                record = {
                    "train/loss": lm + (self._aux_total(lb, z, ent) if self.moe else 0.0),
                    "train/lm_loss": lm,
                    "train/lr": out["lrs"]["decay"] if "decay" in out["lrs"] else out["lrs"]["no_decay"],
                    "train/grad_norm": float(out["grad_norm"]),
                    "train/tokens": float(st.tokens),
                    "perf/tokens_per_sec": tps,
                }
                if self.moe:
                    coefs = self.unwrapped.loss_coefs
                    record.update(
                        {
                            "train/lb_loss": lb,
                            "train/z_loss": z,
                            "train/entropy_loss": ent,
                            "train/lb_coef": coefs["lb"],
                            "train/z_coef": coefs["z"],
                            "train/router_lr": out["lrs"]["router"],
                        }
                    )
                    record["router/noise_std"] = float(
                        next(iter(self.unwrapped.moe_layers().values())).router.noise_std_now()
                    )
                bar.set_postfix(loss=f"{lm:.3f}", tok_s=f"{tps:,.0f}")
            if routing is not None:
                router = self._router_metrics(routing)
                router.update({k: float(v) for k, v in out["variants"].items()})
                record.update(router)
                if self._check_collapse(router):
                    stopped = "collapse"
            if record:
                self._log(record)
            if stopped or (cfg.eval.every and st.step % cfg.eval.every == 0):
                self.run_eval()
                last_eval = st.step
            if stopped or (cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0):
                st.tokens += int(tokens_dev.item())  # the token count is part of the checkpoint
                tokens_dev.zero_()
                self.save_checkpoint()
                last_ckpt = st.step
            if stopped:
                break
            if t_stop is not None and st.step >= t_stop:
                stopped = "stop_after"
                break
        bar.close()
        st.tokens += int(tokens_dev.item())
        if stopped == "stop_after":  # a time slice of a longer run: checkpoint only
            if last_ckpt != st.step:
                self.save_checkpoint()
            self.tracking.finish()
            return TrainResult(self.run_dir, st.step, stopped)
        if last_eval != st.step:
            self.run_eval()
        if last_ckpt != st.step:
            self.save_checkpoint()
        self.save_final()
        self.tracking.finish()
        return TrainResult(self.run_dir, st.step, stopped)

    def _aux_total(self, lb: float, z: float, ent: float) -> float:
        """The aux part of the logged loss, with the coefficients in force this step."""
        coefs = self.unwrapped.loss_coefs
        return coefs["lb"] * lb + coefs["z"] * z + self.unwrapped.config.moe["entropy_coef"] * ent

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            model_setup.save_final(self.unwrapped, self.tokenizer, self.run_dir / "final", state_dict)
        acc.wait_for_everyone()


def train(cfg: RunConfig, resume: str | None = None, overwrite: bool = False, corpus=None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; returns where it ended."""
    return Trainer(cfg, resume=resume, overwrite=overwrite, corpus=corpus).train()


__all__ = ["TrainResult", "Trainer", "resolve_resume", "train"]

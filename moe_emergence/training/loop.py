"""The training loop around ``Trainer.train_step``: upcycle when due, log, evaluate, checkpoint, stop.

One pass of the loop is one optimizer step. When each thing happens:

- upcycle: at the start of step ``model.upcycle_at_step`` (``Trainer.upcycle_if_due``);
- ``train/`` record: every ``log.every`` steps, at the last step and when the bad-step guard stops;
  ``router/`` record: every ``log.router_every`` steps (MoE phase);
- eval of ``eval.split``: at step 0, every ``eval.every`` steps, after a collapse stop and at the end; of
  ``eval.final_split`` (the test split, for the final tables): once, at the end (after a collapse stop too),
  never at a pause;
- checkpoint: every ``checkpoint.every`` steps and at any stop; ``final/`` at the end (``_end``), then the
  run's ``summary.md``, ``plots/`` and closing lines (``summary``).

A run stops early for one of the ``Stop`` reasons.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from moe_emergence.telemetry import LayerRoutingStats
from moe_emergence.telemetry import names as keys
from moe_emergence.training import guard, model_setup
from moe_emergence.training.steps import StepResult, train_record
from moe_emergence.training.summary import RunFacts, write_summary

if TYPE_CHECKING:
    from moe_emergence.training.signals import StopSignals
    from moe_emergence.training.trainer import Trainer


class Stop(str, enum.Enum):
    """Why a run ended before ``train.steps`` (compares equal to its value, e.g. ``"collapse"``)."""

    COLLAPSE = "collapse"  # the collapse guard (``collapse.action: stop``); final/ is written
    STOP_AFTER = "stop_after"  # the time slice ``train.stop_after``; checkpoint only
    NONFINITE = "nonfinite"  # the bad-step guard gave up; checkpoint only (if the state is good)
    SIGNAL = "signal"  # SIGINT / SIGTERM; checkpoint only


# stops that end with a checkpoint and no final/ (a later --resume continues)
_PAUSES = (Stop.STOP_AFTER, Stop.SIGNAL, Stop.NONFINITE)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: Stop | None = None  # None = finished
    signal: int | None = None  # Stop.SIGNAL: the signal's number
    message: str | None = None


@contextlib.contextmanager
def long_lived_frozen():
    """Python's cyclic garbage collector set to skip what exists before the loop (``gc.freeze``): the model,
    tokenizer, data and library objects (~490k on the CPU quickstart) are moved to the permanent generation,
    so the collector's full passes walk only what the steps create. Measured on the 2-core CPU quickstart
    (2026-12-01): the full pass in its steps took 0.27 s before, 0.6 ms after. (The ~1.8 s stall at step 28 of
    ``configs/scaling.yaml``'s first run on a fresh H200 machine is not the collector: docs/benchmarks.md.)
    ``refreeze()`` (after an upcycle: the dense model's objects become garbage) collects and freezes again; on
    exit everything goes back to the collector (``gc.unfreeze``). A caller that froze objects itself keeps
    its freeze: then nothing is frozen or unfrozen here, and ``refreeze()`` only collects."""
    if gc.get_freeze_count():  # the caller's own freeze (or an outer long_lived_frozen): left as it is
        yield gc.collect
        return

    def refreeze() -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    try:
        refreeze()
        yield refreeze
    finally:
        gc.unfreeze()


class RunLoop:
    """Runs ``trainer`` from its current step to the end or a stop (``run``). Keeps the loop's
    bookkeeping: tokens counted on device since the last flush, the throughput window, the steps of the
    last eval and checkpoint."""

    def __init__(self, trainer: Trainer, signals: StopSignals) -> None:
        self.t, self.signals = trainer, signals
        cfg, st = trainer.cfg, trainer.state
        # a checkpoint at step N was saved after the eval of step N, if that step had one
        evaluated = st.step == 0 or st.step >= cfg.train.steps or self._due(cfg.eval.every)
        self.tokens_dev = torch.zeros((), dtype=torch.float64, device=trainer.accelerator.device)
        self.t0, self.tok0 = time.perf_counter(), st.tokens
        self.last_eval = st.step if evaluated else -1
        self.last_ckpt = st.step

    def run(self) -> TrainResult:
        t, cfg, st = self.t, self.t.cfg, self.t.state
        if st.step == 0:
            t.run_eval()
        bar = tqdm(
            total=cfg.train.steps,
            initial=st.step,
            desc=cfg.log.run_name,
            disable=not (t.accelerator.is_main_process and cfg.log.progress),
        )
        stop, message = None, None
        with long_lived_frozen() as refreeze:
            while st.step < cfg.train.steps and stop is None:
                stop, message = self._one_step(bar, refreeze)
        bar.close()
        return self._end(stop, message)

    def _one_step(self, bar, refreeze) -> tuple[Stop | None, str | None]:
        """Upcycle when due, train one step, log, evaluate and checkpoint when due; (stop, message)."""
        t, cfg, st = self.t, self.t.cfg, self.t.state
        was_moe = t.moe
        t.upcycle_if_due()
        if t.moe and not was_moe:
            refreeze()
        due = t.moe and (st.step + 1) % cfg.log.router_every == 0
        routing = t.routing_stats() if due else None
        out = t.train_step(routing, self.signals)
        self.tokens_dev += out.tokens
        bar.update(1)
        stop, message = self._guard_stop(out)
        stop = self._log_step(out, routing, bar, stop)
        if stop is Stop.COLLAPSE or self._due(cfg.eval.every):
            t.run_eval()
            self.last_eval = st.step
        if stop is not None or self._due(cfg.checkpoint.every):
            self._checkpoint()
        if stop is None and cfg.train.stop_after is not None and st.step >= cfg.train.stop_after:
            stop = Stop.STOP_AFTER
        return stop, message

    def _due(self, every: int | None) -> bool:
        return bool(every) and self.t.state.step % every == 0

    def _guard_stop(self, out: StepResult) -> tuple[Stop | None, str | None]:
        """(Stop.NONFINITE with the guard's message) after too many skipped steps in a row, (Stop.SIGNAL,
        None) once a stop signal reached any process, else (None, None)."""
        st, limit = self.t.state, self.t.cfg.guard.max_consecutive_skips
        if not out.check.good and st.consecutive_skips >= limit:
            return Stop.NONFINITE, guard.stop_message(st, limit, not self.t.verified.known_bad)
        return (Stop.SIGNAL, None) if out.check.signal else (None, None)

    def _log_step(self, out: StepResult, routing: LayerRoutingStats | None, bar, stop: Stop | None):
        """Write the step's record when due (train/ every ``log.every``, router/ when ``routing`` was
        collected); returns ``stop``, or Stop.COLLAPSE when the collapse guard says so."""
        t, cfg, st = self.t, self.t.cfg, self.t.state
        record: dict[str, float] = {}
        if st.step % cfg.log.every == 0 or st.step == cfg.train.steps or stop is Stop.NONFINITE:
            record = self._train_record(out)
            loss, tps = record[keys.TRAIN_LM_LOSS], record[keys.TOKENS_PER_SEC]
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        if routing is not None:
            router = t.router_metrics(routing)
            router.update({k: float(v) for k, v in out.variants.items()})
            record.update(router)
            layers = t.unwrapped.config.moe_layers
            if guard.check_collapse(st, cfg.collapse, router, layers, t.accelerator.print) and stop is None:
                stop = Stop.COLLAPSE
        if record:
            t.log(record)
        return stop

    def _train_record(self, out: StepResult) -> dict[str, float]:
        t, st = self.t, self.t.state
        totals = t.reduce_sum(out.totals).tolist()
        self._flush_tokens()
        now = time.perf_counter()
        tps = (st.tokens - self.tok0) / (now - self.t0) if now > self.t0 else 0.0
        self.t0, self.tok0 = now, st.tokens
        noise = 0.0
        if out.moe is not None:
            noise = float(next(iter(t.unwrapped.moe_layers().values())).router.noise_std_now())
        record = train_record(totals, out.lrs, out.moe, noise)
        record[keys.TRAIN_GRAD_NORM] = float(out.grad_norm)
        record[keys.TRAIN_TOKENS] = float(st.tokens)
        record[keys.TRAIN_SKIPPED_STEPS] = float(st.skipped_steps)
        record[keys.TOKENS_PER_SEC] = tps
        # graphed layers: captures that grow mid-run mean changing batch shapes (each capture stalls the step)
        if t.cuda_graphs and out.moe is not None:
            record[keys.CUDA_GRAPH_CAPTURES] = float(model_setup.graph_captures(t.unwrapped, t.step_graph))
        return record

    def _flush_tokens(self) -> None:
        """Add the on-device token count to the state (a host sync)."""
        self.t.state.tokens += int(self.tokens_dev.item())
        self.tokens_dev.zero_()

    def _checkpoint(self) -> None:
        self._flush_tokens()  # the token count is part of the checkpoint
        self.t.save_checkpoint()  # never the weights a bad step left (save_checkpoint checks)
        self.last_ckpt = self.t.state.step

    def _end(self, stop: Stop | None, message: str | None) -> TrainResult:
        """After the loop: a pause (``_PAUSES``) leaves a checkpoint; the end (or a collapse stop) also
        evaluates (``eval.split``, then ``eval.final_split``) and writes ``final/``, unless the final weights
        are known bad."""
        t, st = self.t, self.t.state
        acc = t.accelerator
        self._flush_tokens()
        if stop in _PAUSES:
            if self.last_ckpt != st.step:
                t.save_checkpoint()
            sig = self.signals.received if stop is Stop.SIGNAL else None
            if stop is Stop.SIGNAL:
                message = f"stopped by {signal.Signals(sig).name} at step {st.step}; checkpoint saved"
            if message:
                acc.print(message)
            t.tracking.finish()
            return TrainResult(t.run_dir, st.step, stop, sig, message)
        if self.last_eval != st.step:
            t.run_eval()
        if t.cfg.eval.final_split is not None:
            t.run_eval(t.cfg.eval.final_split)
        if self.last_ckpt != st.step:
            t.save_checkpoint()
        if not t.verified.good_for_saving(acc.device, acc.print, st.step):  # e.g. snapshot_every: 0
            message = f"bad-step guard: the final weights are known bad; no final/ written in {t.run_dir}"
            t.tracking.finish()
            return TrainResult(t.run_dir, st.step, Stop.NONFINITE, message=message)
        t.save_final()
        self._summarize(stop)
        t.tracking.finish()
        return TrainResult(t.run_dir, st.step, stop)

    def _summarize(self, stop: Stop | None) -> None:
        """``summary.md``, ``plots/`` and the closing lines of a finished run (the main process writes them,
        the others wait). A write that fails (disk full) is a warning: ``final/`` is already saved."""
        t, acc = self.t, self.t.accelerator
        if acc.is_main_process:
            step, joint = t.last_joint
            facts = RunFacts(
                run_dir=t.run_dir,
                cfg=t.cfg,
                step=t.state.step,
                tokens=t.state.tokens,
                domains=t.domains,
                moe_layers=list(t.unwrapped.config.moe_layers) if t.moe else [],
                processes=acc.num_processes,
                stopped=stop.value if stop is not None else None,
                wandb_mode=t.tracking.mode,
                joint={L: c.numpy() for L, c in joint.items()} if step == t.state.step else {},
            )
            try:
                write_summary(facts, acc.print)
            except OSError as e:
                acc.print(f"warning: the run summary was not written in {t.run_dir}: {e}")
        acc.wait_for_everyone()

"""The trainer's guards: bad steps (skip, roll back, stop after a streak) and expert collapse.

Per step the trainer accumulates, on device and without a host sync, one vector
``[loss non-finite, grad norm non-finite, stop signal, parameters non-finite, per MoE layer (router logits,
aux loss) ..., LM loss]`` (``steps.step_flags``), all-reduces it across processes and reads it ONCE
(``tolist``). ``StepCheck`` decodes it. A step is **bad** when

  * its loss, gradient norm, any MoE layer's router logits or aux losses, or any parameter of the weights
    it started from holds a NaN/Inf, or
  * its LM loss spikes: ``lm > guard.spike_factor * median(last guard.spike_window accepted LM losses)``
    (from the second accepted step of a phase on; the history restarts at the upcycle; ``spike_factor:
    null`` turns the rule off). The loss of step t is computed with the weights step t-1 produced, so a
    spike means the last update (or this batch) is bad.

A bad step takes no optimizer step and, with ``guard.snapshot_every`` > 0, rolls the model and optimizer
back to the last verified-good state (``rollback.Snapshot``): the weights the last good step's loss was
computed with. The data position and the learning-rate schedule move on, so a resumed run never applies
the bad step again. ``update`` keeps the counts in ``TrainState`` (they survive a resume):
``skipped_steps`` (logged as ``train/skipped_steps``), ``consecutive_skips`` (reset only once a good step
has verified an update made after the last bad one, so alternating bad and rolled-back steps still count
as a streak) and ``first_bad``: where the current streak started, naming the first MoE block whose router
logits or aux losses went non-finite, the first non-finite parameter, or the parameter that moved most.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass

from moe_emergence.telemetry import names as keys
from moe_emergence.training.checkpoint import TrainState
from moe_emergence.training.config import CollapseConfig, GuardConfig


@dataclass
class StepCheck:
    loss_bad: bool
    grad_bad: bool
    signal: bool
    bad_layers: list[tuple[int, str]]  # (block index, "router logits" | "aux loss"), forward order
    params_bad: bool = False
    lm: float = 0.0  # the step's LM loss (all processes)
    spike: str | None = None  # how the loss spiked (set by ``judge``)
    detail: str | None = None  # which parameter (set by the trainer for a bad step)

    @classmethod
    def decode(cls, values: list[float], moe_layers: list[int]) -> StepCheck:
        *flags, lm = values
        loss, grad, sig, params, *per_layer = (v > 0 for v in flags)
        bad = []
        for i, block in enumerate(moe_layers if per_layer else []):
            if per_layer[2 * i]:
                bad.append((block, "router logits"))
            elif per_layer[2 * i + 1]:
                bad.append((block, "aux loss"))
        return cls(loss, grad, sig, bad, params, lm)

    @property
    def finite(self) -> bool:
        return not (self.loss_bad or self.grad_bad or self.bad_layers or self.params_bad)

    @property
    def good(self) -> bool:
        return self.finite and self.spike is None

    def where(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        if self.bad_layers:
            block, what = self.bad_layers[0]
            also = [f"layer {b} ({w})" for b, w in self.bad_layers[1:]]
            return f"MoE layer {block} ({what})" + (f"; also {', '.join(also)}" if also else "")
        if self.params_bad:
            return f"the weights after the previous update{detail}"
        if self.loss_bad:
            return "the LM loss (no MoE layer's router logits, aux loss or parameter was non-finite)"
        if self.grad_bad:
            return "the gradients (the loss was finite)"
        return f"a loss spike ({self.spike}){detail}"

    def what(self) -> str:
        return "non-finite values" if not self.finite else "a loss spike"


def judge(check: StepCheck, state: TrainState, cfg: GuardConfig) -> None:
    """Apply the spike rule to ``check`` against ``state.loss_history`` (accepted steps' LM losses)."""
    hist = state.loss_history
    if cfg.spike_factor is None or not check.finite or not hist:
        return
    med = statistics.median(hist)
    if check.lm > cfg.spike_factor * med:
        check.spike = (
            f"LM loss {check.lm:.4g} > guard.spike_factor={cfg.spike_factor} x {med:.4g}, the median of the "
            f"last {len(hist)} good steps"
        )


def update(state: TrainState, check: StepCheck, step: int, cfg: GuardConfig, verified: bool) -> None:
    """Count a bad (skipped) or good step; warn on every bad one. ``step`` = 1-based index; ``verified``:
    this good step's loss was computed with weights an update produced since the last bad step."""
    if check.good:
        state.loss_history = [*state.loss_history, check.lm][-cfg.spike_window :]
        if verified:
            state.consecutive_skips, state.first_bad = 0, None
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    if state.first_bad is None:
        state.first_bad = f"step {step}: {check.where()}"
    warnings.warn(
        f"{check.what()} at step {step} in {check.where()}: skipped the optimizer step "
        f"({state.consecutive_skips} in a row, {state.skipped_steps} in total)",
        stacklevel=2,
    )


def stop_message(state: TrainState, limit: int, rolled_back: bool) -> str:
    saved = (
        "Saved a checkpoint of the last verified-good weights (the bad updates were rolled back)"
        if rolled_back
        else "The weights are not known to be good, so no checkpoint was written for this step"
    )
    return (
        f"bad-step guard: {state.consecutive_skips} consecutive optimizer steps skipped "
        f"(guard.max_consecutive_skips={limit}); the first bad values were at {state.first_bad}. "
        f"{saved}; lower optim.lr (it may change on --resume), raise model.moe.z_coef or check the data"
    )


def check_collapse(
    state: TrainState, c: CollapseConfig, metrics: dict[str, float], layers: list[int], print_fn=print
) -> bool:
    """Collapse guard: update the per-layer streaks of ``max_frac > c.max_frac`` from a routing check's
    ``router/layer{i}/max_frac``; warn once at ``patience``, or return True (stop) for ``action: stop``."""
    stop = False
    for i in layers:
        key = f"layer{i}"  # the streak's key in trainer_state.json
        frac = metrics[keys.layer_key(keys.ROUTER, i, "max_frac")]
        streak = state.collapse_streak.get(key, 0) + 1 if frac > c.max_frac else 0
        state.collapse_streak[key] = streak
        if streak >= c.patience:
            msg = (
                f"collapse guard: layer {i} sent {frac:.1%} of its tokens to one expert for {streak} "
                f"consecutive checks (collapse.max_frac={c.max_frac}, patience={c.patience})"
            )
            if c.action == "stop":
                print_fn(msg + "; stopping (collapse.action=stop)")
                stop = True
            elif streak == c.patience:
                warnings.warn(msg, stacklevel=2)
    return stop

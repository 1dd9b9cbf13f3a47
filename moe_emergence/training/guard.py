"""The trainer's guards: non-finite values (skip a step, stop after a streak) and expert collapse.

Per step the trainer accumulates, on device and without a host sync, one flag vector
``[loss non-finite, grad norm non-finite, stop signal, per MoE layer (router logits, aux loss) ...]``
(``steps.nonfinite_flags``), all-reduces it across processes and reads it ONCE (``tolist``). ``StepCheck``
decodes it; ``update`` keeps the counts in ``TrainState`` (so they survive a resume):
``skipped_steps`` (logged as ``train/skipped_steps``), ``consecutive_skips`` and ``first_bad``, where the
current streak of skipped steps started: the first MoE block (in forward order) whose router logits or
aux losses went non-finite, else the LM loss or the gradients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from moe_emergence.training.checkpoint import TrainState
from moe_emergence.training.config import CollapseConfig


@dataclass
class StepCheck:
    loss_bad: bool
    grad_bad: bool
    signal: bool
    bad_layers: list[tuple[int, str]]  # (block index, "router logits" | "aux loss"), forward order

    @classmethod
    def decode(cls, values: list[float], moe_layers: list[int]) -> StepCheck:
        loss, grad, sig, *per_layer = (v > 0 for v in values)
        bad = []
        for i, block in enumerate(moe_layers if per_layer else []):
            if per_layer[2 * i]:
                bad.append((block, "router logits"))
            elif per_layer[2 * i + 1]:
                bad.append((block, "aux loss"))
        return cls(loss, grad, sig, bad)

    @property
    def finite(self) -> bool:
        return not (self.loss_bad or self.grad_bad or self.bad_layers)

    def where(self) -> str:
        if self.bad_layers:
            block, what = self.bad_layers[0]
            return f"MoE layer {block} ({what})" + (
                f"; also {', '.join(f'layer {b} ({w})' for b, w in self.bad_layers[1:])}"
                if len(self.bad_layers) > 1
                else ""
            )
        if self.loss_bad:
            return "the LM loss (no MoE layer's router logits or aux loss was non-finite)"
        return "the gradients (the loss was finite)"


def update(state: TrainState, check: StepCheck, step: int) -> None:
    """Count a skipped (non-finite) or good step; warn on every skipped one. ``step`` = 1-based index."""
    if check.finite:
        state.consecutive_skips, state.first_bad = 0, None
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    if state.first_bad is None:
        state.first_bad = f"step {step}: {check.where()}"
    warnings.warn(
        f"non-finite values at step {step} in {check.where()}: skipped the optimizer step "
        f"({state.consecutive_skips} in a row, {state.skipped_steps} in total)",
        stacklevel=2,
    )


def stop_message(state: TrainState, limit: int) -> str:
    return (
        f"non-finite guard: {state.consecutive_skips} consecutive optimizer steps skipped "
        f"(guard.max_consecutive_skips={limit}); the first non-finite values were at {state.first_bad}. "
        "Saved a checkpoint of the last good weights; lower optim.lr, raise model.moe.z_coef or check the data"
    )


def check_collapse(
    state: TrainState, c: CollapseConfig, metrics: dict[str, float], layers: list[int], print_fn=print
) -> bool:
    """Collapse guard: update the per-layer streaks of ``max_frac > c.max_frac`` from a routing check's
    ``router/layer{i}/max_frac``; warn once at ``patience``, or return True (stop) for ``action: stop``."""
    stop = False
    for i in layers:
        key = f"layer{i}"
        frac = metrics[f"router/{key}/max_frac"]
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

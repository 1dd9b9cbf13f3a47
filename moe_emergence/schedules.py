"""Schedules of loss coefficients over optimizer steps: pure maths, no torch.

A schedule is a plain dict (YAML-friendly) with a ``kind`` and that kind's keys; it scales from the
config's base coefficient ``c0`` (``MoEConfig.lb_coef`` / ``z_coef``). ``s`` is the optimizer step (>= 0).

    constant:       {kind: constant}
                    c(s) = c0
    linear_warmup:  {kind: linear_warmup, warmup_steps: W >= 1, start: a >= 0 (default 0)}
                    c(s) = a + (c0 - a) * min(s, W) / W
    step:           {kind: step, step_size: S >= 1, gamma: g >= 0}
                    c(s) = c0 * g ** floor(s / S)
    cosine:         {kind: cosine, total_steps: N >= 1, final: b >= 0 (default 0)}
                    c(s) = b + (c0 - b) * (1 + cos(pi * min(s, N) / N)) / 2

``None`` means constant. ``validate_schedule`` raises ``ValueError`` naming the field, the key and what is
allowed; ``coef_at`` evaluates a validated schedule.
"""

from __future__ import annotations

import math
from typing import Any

# kind -> {key: (required, default)}
SCHEDULE_KEYS: dict[str, dict[str, tuple[bool, float | None]]] = {
    "constant": {},
    "linear_warmup": {"warmup_steps": (True, None), "start": (False, 0.0)},
    "step": {"step_size": (True, None), "gamma": (True, None)},
    "cosine": {"total_steps": (True, None), "final": (False, 0.0)},
}
_INT_KEYS = ("warmup_steps", "step_size", "total_steps")


def validate_schedule(field: str, schedule: Any) -> None:
    """Raise ``ValueError`` unless ``schedule`` is None or a dict described in the module docstring."""
    if schedule is None:
        return
    if not isinstance(schedule, dict) or schedule.get("kind") not in SCHEDULE_KEYS:
        raise ValueError(
            f"MoEConfig.{field}={schedule!r} is invalid: None or a dict with 'kind' one of "
            f"{tuple(SCHEDULE_KEYS)}"
        )
    spec = SCHEDULE_KEYS[schedule["kind"]]
    unknown = sorted(set(schedule) - set(spec) - {"kind"})
    if unknown:
        raise ValueError(
            f"MoEConfig.{field}: unknown keys {unknown} for kind {schedule['kind']!r}; allowed: {sorted(spec)}"
        )
    for key, (required, _) in spec.items():
        if key not in schedule:
            if required:
                raise ValueError(f"MoEConfig.{field}: kind {schedule['kind']!r} needs key {key!r}")
            continue
        v = schedule[key]
        if key in _INT_KEYS:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MoEConfig.{field}.{key}={v!r} is invalid: an integer >= 1")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"MoEConfig.{field}.{key}={v!r} is invalid: a finite number >= 0")


def coef_at(base: float, schedule: dict | None, step: int) -> float:
    """The coefficient at optimizer step ``step`` (formulas in the module docstring)."""
    if step < 0:
        raise ValueError(f"schedule step={step} is invalid: an integer >= 0")
    if schedule is None or schedule["kind"] == "constant":
        return float(base)
    kind = schedule["kind"]
    if kind == "linear_warmup":
        w, a = schedule["warmup_steps"], schedule.get("start", 0.0)
        return float(a + (base - a) * min(step, w) / w)
    if kind == "step":
        return float(base * schedule["gamma"] ** (step // schedule["step_size"]))
    if kind == "cosine":
        n, b = schedule["total_steps"], schedule.get("final", 0.0)
        return float(b + (base - b) * (1.0 + math.cos(math.pi * min(step, n) / n)) / 2.0)
    raise ValueError(f"unknown schedule kind {kind!r}; allowed: {tuple(SCHEDULE_KEYS)}")

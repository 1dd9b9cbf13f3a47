"""Where metrics go: ``metrics.jsonl`` (always) and wandb (through ``accelerator.log``).

wandb and matplotlib are imported inside the functions that need them, never at import time.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any

from moe_emergence.telemetry import names as keys

WANDB_HOST = "api.wandb.ai"


class JsonlSink:
    """Appends one JSON object per record (``{"step": s, ...}``) and flushes it at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step > step`` (written after the checkpoint a run resumes from), and a torn
        last line left by a process killed mid-write. Rewritten through a temporary file and renamed, so a
        kill here loses nothing. Returns how many lines were dropped."""
        if not self.path.exists():
            return 0
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()  # only the last line can be torn: every write is one appended line
        keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)
        return len(lines) - len(keep)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible instead of invalid JSON
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl``."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def wandb_api_key_configured() -> bool:
    """True if ``WANDB_API_KEY`` is set or the netrc file has credentials for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    if not os.path.isfile(path):
        return False
    try:
        return netrc.netrc(path).authenticators(WANDB_HOST) is not None
    except (netrc.NetrcParseError, OSError) as e:
        raise ValueError(f"cannot read the netrc file {path!r} to look for a wandb key: {e}") from e


def resolve_wandb_mode(setting: str) -> tuple[str, str | None]:
    """(mode, notice) for ``log.wandb``: ``disabled`` | ``online`` | ``offline``.

    ``WANDB_MODE`` in the environment wins over the config (except ``disabled`` in the config, which
    never starts wandb). ``auto`` is online when an API key is configured, else offline with a notice.
    """
    if setting == "disabled":
        return "disabled", None
    env = os.environ.get("WANDB_MODE")
    if env:
        if env not in ("online", "offline", "disabled", "dryrun", "run"):
            raise ValueError(f"WANDB_MODE={env!r} is not one of online, offline, disabled")
        mode = {"dryrun": "offline", "run": "online"}.get(env, env)
        return mode, None
    if setting == "auto":
        if wandb_api_key_configured():
            return "online", None
        return "offline", "wandb: no API key configured, logging offline (sync later with `wandb sync`)."
    return setting, None


def heatmap_images(joint_counts: dict[int, Any], domains: list[str], prefix: str) -> dict[str, Any]:
    """``{prefix}/layer{L}/domain_expert: wandb.Image}`` of P(expert | domain) per layer (rows sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    out = {}
    for layer, joint_ME in joint_counts.items():
        joint_ME = joint_ME.double()
        p = (joint_ME / joint_ME.sum(1, keepdim=True).clamp_min(1)).numpy()
        fig, ax = plt.subplots(figsize=(1 + 0.5 * p.shape[1], 1 + 0.4 * p.shape[0]))
        im = ax.imshow(p, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(domains)), domains[: p.shape[0]])
        ax.set_xticks(range(p.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}: P(expert | domain)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out[keys.layer_key(prefix, layer, keys.DOMAIN_EXPERT)] = wandb.Image(fig)
        plt.close(fig)
    return out

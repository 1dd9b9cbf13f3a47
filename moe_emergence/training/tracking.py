"""wandb through accelerate: mode resolution, run id kept in the run folder for resumes, metric
definitions (summaries), heatmaps.

``log.wandb: disabled`` never imports wandb. Only the main process talks to wandb (accelerate's rule).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from accelerate import Accelerator

from moe_emergence.telemetry import names as keys
from moe_emergence.telemetry.sinks import heatmap_images, resolve_wandb_mode
from moe_emergence.training.config import RunConfig

BEST_AND_LAST = "min,last"


def metric_definitions() -> list[tuple[str, str]]:
    """``(key or glob, summary)`` for wandb's ``define_metric``, covering every key family of ``names``.

    The language-model losses keep their minimum and last value in the run summary (the runs table);
    throughput its mean and last; everything else (coefficients, shares, routing statistics, heatmaps) its
    last value. wandb globs match a name's prefix only, an exact name wins over a glob, and two globs that
    both match a key give an unpredictable summary (tried on wandb 0.31), so the globs here never overlap:
    there is no ``eval/*`` or ``val/*``, whose four kinds of key are named one by one (the blocks'
    fingerprint, a string, keeps its last value). The x-axis stays wandb's step, which is the optimizer step
    (``Tracking.log`` passes it).
    """
    star = "*"
    evals = []
    for prefix, _ in keys.SPLIT_PREFIXES.values():
        evals += [
            (keys.lm_loss(prefix), BEST_AND_LAST),
            (keys.domain_loss(star, prefix), BEST_AND_LAST),
            (keys.domain_ppl(star, prefix), BEST_AND_LAST),
            (keys.blocks_fingerprint(prefix), "last"),
        ]
    return [
        (keys.TRAIN_LOSS, BEST_AND_LAST),
        (keys.TRAIN_LM_LOSS, BEST_AND_LAST),
        *evals,
        (keys.join(keys.TRAIN, star), "last"),
        (keys.join(keys.PERF, star), "mean,last"),
        (keys.join(keys.ROUTER, star), "last"),
        *[(keys.join(router, star), "last") for _, router in keys.SPLIT_PREFIXES.values()],
    ]


class Tracking:
    """Resolve the wandb mode before the ``Accelerator`` exists (``log_with``), then ``start`` it."""

    def __init__(self, cfg: RunConfig) -> None:
        self.mode, self.notice = resolve_wandb_mode(cfg.log.wandb)
        self.enabled = self.mode != "disabled"
        self.log_with = "wandb" if self.enabled else None
        self.acc: Accelerator | None = None

    def start(self, acc: Accelerator, cfg: RunConfig, run_dir: Path) -> None:
        self.acc = acc
        if not self.enabled:
            return
        if self.notice:
            acc.print(self.notice)
        id_file = run_dir / "wandb_id.txt"
        if acc.is_main_process and not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        acc.wait_for_everyone()
        acc.init_trackers(
            cfg.log.project,
            config=cfg.to_dict(),
            init_kwargs={
                "wandb": {
                    "name": cfg.log.run_name,
                    "mode": self.mode,
                    "dir": str(run_dir),
                    "id": id_file.read_text().strip(),
                    "resume": "allow",
                    # no banner, run history or summary tables on the console: the trainer prints its own
                    # progress and summary, and the notice above says where the offline run is
                    "settings": {"quiet": True},
                }
            },
        )
        if acc.is_main_process:
            run = acc.get_tracker("wandb", unwrap=True)
            for name, summary in metric_definitions():
                run.define_metric(name, summary=summary)

    def log(self, metrics: dict[str, float], step: int, images: dict | None = None) -> None:
        if self.enabled:
            self.acc.log({**metrics, **(images or {})}, step=step)

    def heatmaps(self, joint_counts: dict, domains: list[str], prefix: str) -> dict | None:
        if not self.enabled or not self.acc.is_main_process:
            return None
        return heatmap_images(joint_counts, domains, prefix)

    def finish(self) -> None:
        """Close the trackers (if any) and the distributed process group (accelerate's end_training)."""
        self.acc.end_training()

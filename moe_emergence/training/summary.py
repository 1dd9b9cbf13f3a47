"""What a finished run leaves to look at: ``summary.md`` and ``plots/`` in the run folder, and a few closing
lines on the console.

Written by the main process once ``final/`` is (``RunLoop._end``: the end of ``train.steps`` or a collapse
stop); a run that paused (``train.stop_after``, a signal, the bad-step guard) is not finished and gets none.
Every number comes from ``metrics.jsonl`` (the last record of each evaluated split: ``eval.split``, then
``eval.final_split``; the routing of the ``eval.split`` record's ``<split>_router/`` keys, else of the last
``router/`` record), except the domain x expert heatmap: the last ``eval.split`` evaluation's top-1 counts,
which the trainer hands over (``RunFacts.joint``). A dense run (``model.moe: null``) gets the loss part.

``summary.md`` layout: what was trained, the final loss per domain of each evaluated split, the routing per
MoE layer at the end, where to look next (the exact commands). Plots (``analysis.figures``, matplotlib imported there):
``plots/loss_by_domain.png``, and per MoE layer ``plots/expert_share_layer{L}.png`` and
``plots/domain_expert_layer{L}.png``.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import moe_emergence
from moe_emergence.telemetry import names as keys
from moe_emergence.telemetry import read_metrics
from moe_emergence.training.config import RunConfig

SUMMARY, PLOTS = "summary.md", "plots"
ROUTING_NAMES = ("entropy", "max_frac", "dead_experts", "domain_nmi")
SPLIT_NAMES = {"val": "the validation split", "eval": "the eval split, the test split of the final tables"}


@dataclass
class RunFacts:
    """What the summary needs beyond ``metrics.jsonl``."""

    run_dir: Path
    cfg: RunConfig
    step: int
    tokens: int
    domains: list[str]
    moe_layers: list[int]  # empty for a dense run
    processes: int = 1
    stopped: str | None = None  # "collapse" when the collapse guard ended the run
    wandb_mode: str = "disabled"
    joint: dict[int, np.ndarray] = field(default_factory=dict)  # last eval: {layer: [M, E] top-1 counts}


def write_summary(facts: RunFacts, print_fn: Callable[[str], None] = print) -> Path:
    """Write ``plots/`` and ``summary.md`` into the run folder, then print the closing lines."""
    records = read_metrics(facts.run_dir / "metrics.jsonl")
    evals = final_evals(records, facts.cfg.eval.splits)
    plots = write_plots(facts, records)
    sections = [
        trained_section(facts),
        *(loss_section(split, ev, plot=split == facts.cfg.eval.split) for split, ev in evals.items()),
        routing_section(facts, records, plots) if facts.moe_layers else [],
        next_section(facts),
    ]
    path = facts.run_dir / SUMMARY
    path.write_text("\n".join(line for s in sections for line in s) + "\n")
    for line in closing_lines(facts, evals):
        print_fn(line)
    return path


def final_evals(records: list[dict], splits: list[str]) -> dict[str, dict]:
    """``{split: its last eval record}`` for each of ``splits`` (``{}`` for a split without a record)."""
    return {s: last_record(records, keys.lm_loss(keys.split_prefixes(s)[0])) for s in splits}


def last_record(records: list[dict], key: str) -> dict:
    """The last record holding ``key`` ({} if none)."""
    return next((r for r in reversed(records) if key in r), {})


def domains_of(record: dict, prefix: str = keys.EVAL) -> list[str]:
    """The domains of an eval record's ``<prefix>/loss_<domain>`` keys, in the record's order."""
    return [d for k in record if (d := keys.parse_domain_loss(k, prefix)) is not None]


def routing_record(records: list[dict], layer: int, split: str = "eval") -> tuple[str, dict]:
    """(prefix, record) of the layer's last routing statistics: the last eval's of ``split``
    (``<split>_router/``), else the last training step's (``router/``); (``router``, {}) without any."""
    for prefix in (keys.split_prefixes(split)[1], keys.ROUTER):
        record = last_record(records, keys.layer_key(prefix, layer, "entropy"))
        if record:
            return prefix, record
    return keys.ROUTER, {}


def write_plots(facts: RunFacts, records: list[dict]) -> dict[str, Path]:
    """``{name: path}`` of the PNGs written into ``plots/``: ``loss_by_domain`` always, per MoE layer
    ``expert_share_layer{L}`` (from the routing records) and ``domain_expert_layer{L}`` (from the last
    eval's counts)."""
    from moe_emergence.analysis import figures

    d, cfg = facts.run_dir / PLOTS, facts.cfg
    upcycle = cfg.model.upcycle_at_step if cfg.model.moe is not None and cfg.model.upcycle_at_step else None
    split = cfg.eval.split
    loss_prefix, eval_router = keys.split_prefixes(split)
    out = {
        "loss_by_domain": figures.eval_loss_curves(
            records, facts.domains, d / "loss_by_domain.png", upcycle, loss_prefix
        )
    }
    prefix = keys.ROUTER if figures.router_layers(records, keys.ROUTER) else eval_router
    for L in facts.moe_layers:
        if L in figures.router_layers(records, prefix):
            name = f"expert_share_layer{L}"
            out[name] = figures.collapse_trajectory(records, d / f"{name}.png", prefix, layers=[L])
        if L in facts.joint:
            joint_ME = np.asarray(facts.joint[L], dtype=float)
            p_ME = joint_ME / np.maximum(joint_ME.sum(1, keepdims=True), 1)
            title = f"layer {L}: P(top-1 expert | domain), {split} at step {facts.step}"
            name = f"domain_expert_layer{L}"
            out[name] = figures.heatmap(p_ME, facts.domains, title, 1 / p_ME.shape[1], d / f"{name}.png")
    return out


def _rel(facts: RunFacts, path: Path) -> str:
    return path.relative_to(facts.run_dir).as_posix()


def trained_section(facts: RunFacts) -> list[str]:
    """Title, how the run ended and a table of what was trained."""
    cfg, m = facts.cfg, facts.cfg.model
    t = cfg.train
    end = f"Finished at step {facts.step} of {t.steps}"
    if facts.stopped:
        end = f"Stopped by the {facts.stopped} guard at step {facts.step} of {t.steps}"
    base = m.base
    if base == "tiny":
        sizes = f"{m.tiny_n_layer} blocks, {m.tiny_n_embd} dims, {m.tiny_n_head} heads"
        base += f" (GPT-2 built from config: {sizes})"
    rows = [("base model", base)]
    if m.moe is not None:
        rows += [
            ("MoE layers", ", ".join(map(str, facts.moe_layers))),
            ("experts, top_k", f"{m.moe.num_experts}, top-{m.moe.top_k} ({m.moe.routing})"),
            ("upcycled at step", f"{m.upcycle_at_step} (dense before)" if m.upcycle_at_step else "0"),
        ]
    else:
        rows.append(("MoE", "none (dense control, `model.moe: null`)"))
    rows += [
        (
            "steps",
            f"{facts.step} (batch {t.batch_size} x grad_accum {t.grad_accum} x {facts.processes} "
            f"process{'es' if facts.processes != 1 else ''})",
        ),
        ("tokens seen", f"{facts.tokens:,}"),
        ("domains", ", ".join(facts.domains)),
        ("seed", str(t.seed)),
    ]
    return [
        f"# Run summary: {cfg.log.run_name}",
        "",
        f"{end}; `final/` holds the model, `config.yaml` the full config, `metrics.jsonl` every record.",
        "",
        "## What was trained",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]


def loss_section(split: str, ev: dict, plot: bool = True) -> list[str]:
    """The last ``split`` eval's loss and perplexity per domain and over all tokens, the blocks'
    fingerprint and (``plot``) the loss curves."""
    if not ev:
        return [f"## Final {split} loss", "", f"No `{split}/` eval record in `metrics.jsonl`.", ""]
    p = keys.split_prefixes(split)[0]
    lines = [
        f"## Final {split} loss (step {ev['step']})",
        "",
        f"On {SPLIT_NAMES[split]}, blocks `{ev.get(keys.blocks_fingerprint(p), '?')}`.",
        "",
        "| domain | loss | perplexity |",
        "| --- | --- | --- |",
    ]
    for d in domains_of(ev, p):
        lines.append(f"| {d} | {ev[keys.domain_loss(d, p)]:.4f} | {ev[keys.domain_ppl(d, p)]:.2f} |")
    lm = ev[keys.lm_loss(p)]
    lines += [f"| all tokens | {lm:.4f} | {math.exp(min(lm, 80.0)):.2f} |", ""]
    if not plot:
        return lines
    return [
        *lines,
        f"{split.capitalize()} loss per domain over training:",
        "",
        "![loss_by_domain](plots/loss_by_domain.png)",
        "",
    ]


def routing_section(facts: RunFacts, records: list[dict], plots: dict[str, Path]) -> list[str]:
    """Per MoE layer: expert shares, mean router entropy, largest share, dead experts, domain NMI."""
    E = facts.cfg.model.moe.num_experts
    lines = [
        "## Routing at the end",
        "",
        f"Expert shares of the routing assignments (1/E = {1 / E:.3f} is balanced); entropy is the mean "
        f"per-token router entropy in nats (ln E = {math.log(E):.3f} is uniform); domain NMI = "
        "I(domain; top-1 expert) / H(domain), 0 = routing ignores the domain, 1 = the expert names it.",
        "",
        "| layer | from | expert shares | entropy | max share | dead experts | domain NMI |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [routing_row(L, *routing_record(records, L, facts.cfg.eval.split), E) for L in facts.moe_layers]
    lines.append("")
    for L in facts.moe_layers:
        names = [n for n in (f"expert_share_layer{L}", f"domain_expert_layer{L}") if n in plots]
        if names:
            lines.append(
                f"Layer {L}: expert shares over training; P(top-1 expert | domain) at the last "
                f"{facts.cfg.eval.split} eval."
            )
            lines += ["", " ".join(f"![{n}]({_rel(facts, plots[n])})" for n in names), ""]
    return lines


def routing_row(layer: int, prefix: str, record: dict, num_experts: int) -> str:
    """One layer's row of the routing table from its record's ``<prefix>/layer<L>/...`` keys."""
    if not record:
        return f"| {layer} | no routing record | | | | | |"
    v = {name: record[keys.layer_key(prefix, layer, name)] for name in ROUTING_NAMES}
    shares = " ".join(
        f"{record[keys.layer_key(prefix, layer, keys.expert_frac(e))]:.2f}" for e in range(num_experts)
    )
    return (
        f"| {layer} | `{prefix}/` step {record['step']} | {shares} | {v['entropy']:.3f} "
        f"| {v['max_frac']:.2f} "
        f"| {v['dead_experts']:.0f} | {v['domain_nmi']:.3f} |"
    )


def commands(facts: RunFacts) -> dict[str, str]:
    """The exact next commands, ``{what: command}``: the analysis report, the notebook and, for an offline
    wandb run, ``wandb sync``; with this Python environment's programs. Paths inside the repository are
    relative when the run was started from its root, else absolute."""
    root = Path(moe_emergence.__file__).resolve().parents[1]
    here = Path.cwd().resolve() == root

    def path(p: Path) -> str:
        p = Path(os.path.abspath(p))
        return shlex.quote(str(p.relative_to(root)) if here and p.is_relative_to(root) else str(p))

    bin_dir, run, name = Path(sys.executable).parent, path(facts.run_dir), facts.cfg.log.run_name
    report, script = shlex.quote(f"reports/{name}"), path(root / "scripts" / "analyze.py")
    notebook = f"{path(bin_dir / 'jupyter')} nbconvert --to notebook --execute"
    out = {
        "analysis": f"{path(Path(sys.executable))} {script} {run} --out {report}",
        "notebook": f"MOE_RUN_DIR={run} {notebook} {path(root / 'notebooks' / 'specialization.ipynb')} "
        f"--output {shlex.quote(f'/tmp/{name}-spec.ipynb')}",
    }
    offline = wandb_runs(facts.run_dir) if facts.wandb_mode == "offline" else []
    if offline:
        out["wandb"] = " ".join([path(bin_dir / "wandb"), "sync", *map(path, offline)])
    return out


def wandb_runs(run_dir: Path) -> list[Path]:
    """This run's offline wandb folders (``wandb/offline-run-<date>_<time>-<id>``, one per invocation),
    oldest first."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file():
        return []
    run_id = id_file.read_text().strip()
    return sorted(p for p in (run_dir / "wandb").glob(f"offline-run-*-{run_id}") if p.is_dir())


def next_section(facts: RunFacts) -> list[str]:
    """Where to look next: the commands, each with where it is documented."""
    cmd = commands(facts)
    lines = [
        "## Where to look next",
        "",
        "Specialisation metrics with confidence intervals, the report's figures and `report.md` "
        "(docs/analysis.md; list several run folders, e.g. an MoE run and its dense control, to compare them "
        "on the same eval blocks):",
        "",
        "```bash",
        cmd["analysis"],
        "```",
        "",
        "The same for this run as a notebook (notebooks/README.md):",
        "",
        "```bash",
        cmd["notebook"],
        "```",
        "",
    ]
    if "wandb" in cmd:
        lines += [
            "wandb logged offline into `wandb/`; upload it with:",
            "",
            "```bash",
            cmd["wandb"],
            "```",
            "",
        ]
    elif facts.wandb_mode == "online":
        project, run_id = facts.cfg.log.project, _read(facts.run_dir / "wandb_id.txt")
        lines += [f"wandb logged online: project `{project}`, run id `{run_id}`.", ""]
    return lines


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else "?"


def closing_lines(facts: RunFacts, evals: dict[str, dict]) -> list[str]:
    """The console's closing summary: the final loss per domain of each evaluated split (``{split: its last
    eval record}``), the folder, the next commands."""
    how = f"stopped by the {facts.stopped} guard" if facts.stopped else "finished"
    lines = [f"{how} at step {facts.step} ({facts.tokens:,} tokens); summary: {facts.run_dir / SUMMARY}"]
    for split, ev in evals.items():
        if not ev:
            continue
        p = keys.split_prefixes(split)[0]
        per_domain = ", ".join(f"{d} {ev[keys.domain_loss(d, p)]:.4f}" for d in domains_of(ev, p))
        lines.append(
            f"final {split} loss (step {ev['step']}): {per_domain}; all tokens {ev[keys.lm_loss(p)]:.4f}"
        )
    cmd = commands(facts)
    lines.append(f"next: {cmd['analysis']}")
    if "wandb" in cmd:
        lines.append(f"      {cmd['wandb']}")
    return lines

"""Figures of the specialisation report, each a function that writes one PNG and returns its path.

matplotlib is imported inside the functions with the Agg backend (no display needed; never imported at
import time of the package).

Shapes (legend: docs/architecture.md): E experts, M domains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_emergence.telemetry import names as keys


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def heatmap(
    values: np.ndarray, row_labels: list[str], title: str, baseline: float, path, xlabel: str = "expert"
) -> Path:
    """Rows x experts heatmap of fractions ``values`` (``[len(row_labels), E]``: rows are domains, token
    types, ...), coloured red above / blue below the uniform ``baseline`` (white = uniform), each cell
    annotated, the baseline stated in the colour bar."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    v = np.asarray(values, dtype=float)
    n_rows, E = v.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * E, 0.9 + 0.45 * n_rows))
    vmax = max(float(np.nanmax(v)) if v.size else 1.0, baseline * 1.01, 1e-9)
    im = ax.imshow(v, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=baseline, vmin=0.0, vmax=vmax), aspect="auto")
    for r in range(n_rows):
        for e in range(E):
            ax.text(e, r, f"{v[r, e]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(n_rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.05)
    cb.ax.axhline(baseline, color="k", lw=1.5)
    cb.set_label(f"fraction (uniform = {baseline:.3g}, black line)", fontsize=7)
    return _save(fig, path)


REFERENCE_MARKERS = {"step 0": "v", "shuffled p95": "_", "token-id router": "x"}  # nmi_per_layer's refs


def nmi_per_layer(
    nmi_by_run: dict[str, dict[str, dict]],
    path,
    title: str = "NMI(domain; top-1 expert)",
    refs_by_run: dict[str, dict[str, dict[str, float]]] | None = None,
) -> Path:
    """Grouped bars: per MoE layer (x) and run (colour) the NMI with its bootstrap CI as an error bar; with
    ``refs_by_run`` ({run: {layer: {name: value}}}, names in ``REFERENCE_MARKERS``) a black marker per
    reference value on each bar (e.g. the step-0 router, the shuffled-domain 95th percentile)."""
    plt = _plt()
    runs = list(nmi_by_run)
    layers = sorted({int(L) for r in runs for L in nmi_by_run[r]})
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * max(len(layers), 1) * max(len(runs), 1) ** 0.5, 3.0))
    width = 0.8 / max(len(runs), 1)
    labelled = set()
    for i, run in enumerate(runs):
        xs, ys, lo, hi = [], [], [], []
        for j, L in enumerate(layers):
            ci = nmi_by_run[run].get(str(L))
            if ci is None:
                continue
            xs.append(j + (i - (len(runs) - 1) / 2) * width)
            ys.append(ci["value"])
            # a percentile interval of few resamples can miss the point estimate: no negative bar lengths
            lo.append(max(ci["value"] - ci["ci_low"], 0.0) if ci["n_boot"] else 0.0)
            hi.append(max(ci["ci_high"] - ci["value"], 0.0) if ci["n_boot"] else 0.0)
            for name, v in ((refs_by_run or {}).get(run, {}).get(str(L)) or {}).items():
                if v is not None:
                    label = None if name in labelled else name
                    ax.plot(xs[-1], v, REFERENCE_MARKERS[name], color="black", ms=7, mew=1.5, label=label)
                    labelled.add(name)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=run)
    ax.set_xticks(range(len(layers)), [f"layer {L}" for L in layers])
    ax.set_ylabel("NMI = I / H(domain)")
    ax.set_ylim(0, max(0.05, ax.get_ylim()[1]))
    ax.set_title(title + " (95% CI over documents)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if key in r and "step" in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, float), np.asarray(v, float)


def _layer_names(records: list[dict], prefix: str) -> set[tuple[int, str]]:
    """``(layer, name)`` of every per-layer key ``<prefix>/layer<i>/<name>`` (``names.layer_key``) of the
    metrics records."""
    return {(p[1], p[2]) for r in records for k in r if (p := keys.parse_layer_key(k)) and p[0] == prefix}


def router_layers(records: list[dict], prefix: str = keys.ROUTER) -> list[int]:
    """MoE layers that appear in ``<prefix>/layer<i>/...`` keys of the metrics records."""
    return sorted({layer for layer, _ in _layer_names(records, prefix)})


def training_curves(
    records: list[dict], path, prefix: str = keys.ROUTER, collapse_max_frac: float | None = None
) -> Path:
    """Mean token entropy (left) and max expert fraction (right) per MoE layer over training steps,
    with ln(E) / 1/E reference levels when the number of experts is known from the keys."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for L in router_layers(records, prefix):
        for ax, name in zip(axes, ("entropy", "max_frac"), strict=True):
            s, v = _series(records, keys.layer_key(prefix, L, name))
            ax.plot(s, v, label=f"layer {L}")
    E = num_experts_in(records, prefix)
    if E:
        axes[0].axhline(np.log(E), color="gray", ls=":", label=f"ln E = {np.log(E):.2f} (uniform)")
        axes[1].axhline(1 / E, color="gray", ls=":", label=f"1/E = {1 / E:.2f} (balanced)")
    if collapse_max_frac is not None:
        axes[1].axhline(collapse_max_frac, color="red", ls="--", label=f"collapse guard {collapse_max_frac}")
    axes[0].set_title("mean per-token router entropy (nats)", fontsize=9)
    axes[1].set_title("largest expert's share of tokens", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    return _save(fig, path)


def num_experts_in(records: list[dict], prefix: str = keys.ROUTER) -> int:
    """Number of experts: one more than the highest e of the records' ``<prefix>/layer<i>/expert<e>_frac``
    keys (0 without any)."""
    experts = (keys.parse_expert_frac(name) for _, name in _layer_names(records, prefix))
    found = {e for e in experts if e is not None}
    return max(found) + 1 if found else 0


def collapse_trajectory(
    records: list[dict],
    path,
    prefix: str = keys.ROUTER,
    collapse_max_frac: float | None = None,
    layers: list[int] | None = None,
) -> Path:
    """Per MoE layer (``layers``, default every layer of the records), every expert's share of tokens over
    training as stacked areas: balanced routing is even bands, collapse is one band swallowing the plot."""
    plt = _plt()
    layers = router_layers(records, prefix) if layers is None else layers
    E = num_experts_in(records, prefix)
    fig, axes = plt.subplots(1, max(len(layers), 1), figsize=(3.2 * max(len(layers), 1), 2.8), squeeze=False)
    for ax, L in zip(axes[0], layers, strict=False):
        steps = None
        fr = []
        for e in range(E):
            s, v = _series(records, keys.layer_key(prefix, L, keys.expert_frac(e)))
            steps = s if steps is None or len(s) > len(steps) else steps
            fr.append(v)
        n = min(len(x) for x in fr) if fr else 0
        if n:
            ax.stackplot(steps[:n], *[f[:n] for f in fr], labels=[f"e{e}" for e in range(E)])
        if collapse_max_frac is not None:
            ax.axhline(collapse_max_frac, color="k", ls="--", lw=1)
        ax.set_ylim(0, 1)
        ax.set_title(f"layer {L}: expert shares", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=6, loc="lower left")
    return _save(fig, path)


def eval_loss_curves(
    records: list[dict],
    domains: list[str],
    path,
    upcycle_at_step: int | None = None,
    prefix: str = keys.EVAL,
) -> Path:
    """Loss of each domain (and of all tokens, dashed) over training steps from the ``<prefix>/`` eval
    records (``eval`` or ``val``), with the upcycle step marked when given."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for d in domains:
        ax.plot(*_series(records, keys.domain_loss(d, prefix)), marker="o", ms=3, label=d)
    ax.plot(*_series(records, keys.lm_loss(prefix)), color="k", ls="--", lw=1, label="all tokens")
    if upcycle_at_step is not None:
        ax.axvline(upcycle_at_step, color="gray", ls=":", label=f"upcycle (step {upcycle_at_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{prefix} loss (nats / token)")
    ax.set_title(f"{prefix} loss per domain", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_comparison(loss_by_run: dict[str, dict[str, dict]], domains: list[str], path) -> Path:
    """Per-domain eval loss of each run (bars) with document-bootstrap 95% CIs."""
    plt = _plt()
    runs = list(loss_by_run)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains), 3))
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        cis = [loss_by_run[run][d] for d in domains]
        xs = np.arange(len(domains)) + (i - (len(runs) - 1) / 2) * width
        ys = [c["value"] for c in cis]
        err = [[c["value"] - c["ci_low"] for c in cis], [c["ci_high"] - c["value"] for c in cis]]
        ax.bar(xs, ys, width, yerr=np.nan_to_num(err), capsize=3, label=run)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("eval loss (nats / token)")
    ax.set_title("per-domain eval loss on the same blocks (95% CI over documents)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ablation_heatmap(delta_EM: np.ndarray, domains: list[str], layer: int, path) -> Path:
    """Experts x domains (``delta_EM``): the eval loss increase when that expert is removed (red = needed)."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    d = np.asarray(delta_EM, float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * d.shape[1], 0.9 + 0.4 * d.shape[0]))
    lim = max(float(np.abs(d).max()), 1e-6)
    im = ax.imshow(d, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), aspect="auto")
    for e in range(d.shape[0]):
        for j in range(d.shape[1]):
            ax.text(j, e, f"{d[e, j]:+.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(d.shape[0]), [f"expert {e}" for e in range(d.shape[0])])
    ax.set_title(f"layer {layer}: loss increase when the expert is removed", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05).set_label("Δ loss (nats)", fontsize=7)
    return _save(fig, path)


def example_text(
    pieces: list[str], experts: list[int], num_experts: int, path, title: str, width: int = 90
) -> Path:
    """Render text with each token's background coloured by its top-1 expert (monospace, wrapped at
    ``width`` characters; newlines and tabs shown as ⏎ and spaces)."""
    plt = _plt()
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")
    lines: list[list[tuple[str, int]]] = [[]]
    col = 0
    for piece, e in zip(pieces, experts, strict=True):
        parts = piece.replace("\t", "    ").split("\n")
        for k, part in enumerate(parts):
            if k > 0:
                lines[-1].append(("⏎", e))
                lines.append([])
                col = 0
            while part:
                room = width - col
                if room <= 0:
                    lines.append([])
                    col, room = 0, width
                lines[-1].append((part[:room], e))
                col += len(part[:room])
                part = part[room:]
    lines = lines[:40]
    fig = plt.figure(
        figsize=(width * 0.602 * 7 / 72, 0.6 + 0.2 * len(lines))
    )  # DejaVu Sans Mono: 0.602 em per character
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines) + 1.5, 0)
    ax.axis("off")
    for r, line in enumerate(lines):
        c = 0
        for text, e in line:
            ax.add_patch(
                plt.Rectangle((c, r + 0.55), len(text), 0.95, color=cmap(e % cmap.N), alpha=0.45, lw=0)
            )
            ax.text(c, r + 1, text, family="monospace", fontsize=7, va="center", ha="left")
            c += len(text)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e % cmap.N), alpha=0.45) for e in range(num_experts)]
    ax.legend(
        handles,
        [f"expert {e}" for e in range(num_experts)],
        ncol=min(num_experts, 8),
        fontsize=6,
        loc="lower left",
    )
    ax.text(0, 0.3, title, fontsize=8, weight="bold")
    return _save(fig, path)

"""Write report.md: the figures of an analysis (``report_figures.write_figures``), each with one line of
interpretation computed from the numbers. Called by ``report.analyze_runs``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_emergence.analysis import figures
from moe_emergence.analysis.collect import TOKEN_TYPES


def _ci(c: dict, fmt: str = ".3f") -> str:
    if c.get("ci_low") is None or not c.get("n_boot"):
        return f"{c['value']:{fmt}}"
    return f"{c['value']:{fmt}} [{c['ci_low']:{fmt}}, {c['ci_high']:{fmt}}]"


def _img(out: Path, path, alt: str) -> str:
    return f"![{alt}]({Path(path).relative_to(out).as_posix()})"


def _layer_line(L: str, lm: dict, domains: list[str]) -> str:
    base = lm["uniform_baseline"]
    best = max(domains, key=lambda d: lm["max_specialization"][d])
    spec = ", ".join(f"{d} → e{lm['top_expert'][d]} ({lm['max_specialization'][d]:.2f})" for d in domains)
    lo = lm["domain_nmi"].get("ci_low")
    if not lm["domain_nmi"].get("n_boot"):
        sig = "no CI: --bootstrap 0"
    else:
        sig = "its CI excludes 0" if lo > 0 else "its CI does not exclude 0"
    return (
        f"Layer {L}: NMI = {_ci(lm['domain_nmi'])} ({sig}); top expert per domain: {spec}; uniform = {base:.2f}. "
        f"Most concentrated domain: {best} ({lm['max_specialization'][best] / base:.1f}x uniform)."
    )


def _training_line(records: list[dict], thr: float | None) -> str:
    layers = figures.router_layers(records, "router")
    parts = []
    for L in layers:
        s, h = figures._series(records, f"router/layer{L}/entropy")
        _, mf = figures._series(records, f"router/layer{L}/max_frac")
        if len(s):
            parts.append(f"layer {L}: entropy {h[0]:.2f} → {h[-1]:.2f}, max share {mf[0]:.2f} → {mf[-1]:.2f}")
    E = figures.num_experts_in(records, "router")
    ref = f" (uniform: entropy ln E = {np.log(E):.2f}, share 1/E = {1 / E:.2f})" if E else ""
    return "From the first to the last logged step, " + "; ".join(parts) + ref + "."


def _collapse_line(records: list[dict], thr: float | None) -> str:
    thr = 0.9 if thr is None else thr
    hits = []
    for L in figures.router_layers(records, "router"):
        s, mf = figures._series(records, f"router/layer{L}/max_frac")
        over = np.flatnonzero(mf > thr)
        if len(over):
            hits.append(f"layer {L} first at step {int(s[over[0]])} ({len(over)} of {len(s)} checks)")
    if not hits:
        return f"No layer's largest expert share ever exceeded {thr} (no collapse)."
    return f"Largest expert share above {thr}: " + "; ".join(hits) + "."


def _types_line(lm: dict) -> str:
    fr = np.array(lm["token_type_fractions"])
    n = np.array(lm["token_type_counts"]).sum(1)
    ok = n >= 10
    if not ok.any():
        return "Too few code tokens per type (< 10) to read this figure."
    conc = np.where(ok, fr.max(1), -1)
    t = int(conc.argmax())
    return (
        f"Most concentrated type: {TOKEN_TYPES[t]} → e{int(fr[t].argmax())} ({fr[t].max():.2f} of {int(n[t])} tokens; "
        f"uniform {1 / lm['num_experts']:.2f}); NMI(type; expert) = {_ci(lm['token_type_nmi'])}."
    )


def _ablation_line(per_e: list[dict], domains: list[str]) -> str:
    best = max(
        ((e, d) for e in range(len(per_e)) for d in domains),
        key=lambda t: per_e[t[0]]["delta"][t[1]]["value"],
    )
    c = per_e[best[0]]["delta"][best[1]]
    return f"Largest loss increase: removing expert {best[0]} costs {_ci(c, '+.4f')} nats on {best[1]}."


def _docs_line(docs: dict[str, int]) -> str:
    line = "Documents per domain: " + ", ".join(f"{d} {n}" for d, n in docs.items()) + "."
    few = [d for d, n in docs.items() if n < 10]
    if few:
        line += (
            f" Fewer than 10 documents in {', '.join(few)}: bootstrap CIs there understate the uncertainty "
            "(one document gives no spread at all); use more eval blocks."
        )
    return line


def write_report(out: Path, result: dict, analyses) -> None:
    """report.md: eval set, loss comparison, then per run each figure with one line computed from metrics."""
    ev = result["eval_set"]
    domains = ev["domains"]
    lines = [
        "# Specialisation report",
        "",
        f"Eval set: {ev['blocks']} blocks of {ev['seq_len']} tokens (fingerprint `{ev['fingerprint']}`), domains "
        f"{', '.join(domains)}; the same blocks for every run. CIs: 95% percentile bootstrap over documents "
        f"({result['bootstrap']['n_boot']} replicates, seed {result['bootstrap']['seed']}). All numbers: `metrics.json`.",
        "",
        _docs_line(analyses[0].metrics["documents"]),
        "",
        "## Eval loss per domain",
        "",
        "| run | " + " | ".join(domains) + " | all |",
        "|---" * (len(domains) + 2) + "|",
    ]
    for a in analyses:
        lines.append(
            f"| {a.run.name} | " + " | ".join(_ci(a.metrics["loss"][d]) for d in [*domains, "all"]) + " |"
        )
    shared = analyses[0].figures
    best = {d: min(analyses, key=lambda a: a.metrics["loss"][d]["value"]).run.name for d in domains}
    lines += [
        "",
        _img(out, shared["shared_loss"], "loss by domain"),
        "",
        "Lowest loss per domain: " + ", ".join(f"{d}: {r}" for d, r in best.items()) + ".",
        "",
    ]
    if "shared_nmi" in shared:
        moe = [a for a in analyses if a.metrics["is_moe"]]
        top = max(
            ((a, L) for a in moe for L in a.metrics["layers"]),
            key=lambda t: t[0].metrics["layers"][t[1]]["domain_nmi"]["value"],
        )
        c = top[0].metrics["layers"][top[1]]["domain_nmi"]
        lines += [
            "## Domain–expert NMI per layer",
            "",
            _img(out, shared["shared_nmi"], "NMI per layer"),
            "",
            f"Highest NMI: {top[0].run.name} layer {top[1]}, {_ci(c)} (0 = routing ignores the domain, 1 = the expert identifies it).",
            "",
        ]
    for a in analyses:
        m, fig = a.metrics, a.figures
        lines += [f"## Run `{a.run.name}` ({m['model_type']})", ""]
        if "training" in fig:
            lines += [
                _img(out, fig["training"], "router entropy and max share"),
                "",
                _training_line(a.run.metrics, a.run.collapse_threshold),
                "",
                _img(out, fig["collapse"], "collapse trajectory"),
                "",
                _collapse_line(a.run.metrics, a.run.collapse_threshold),
                "",
            ]
        elif not a.run.metrics:
            lines += ["No metrics.jsonl in the run folder: no training curves.", ""]
        if not m["is_moe"]:
            lines += ["Dense model: loss metrics only (no routing).", ""]
            continue
        for L, lm in m["layers"].items():
            lines += [
                f"### Layer {L}",
                "",
                _img(out, fig[f"heatmap_{L}"], f"domain x expert layer {L}"),
                "",
                _layer_line(L, lm, domains),
                f"Vocabulary specialisation {lm['vocab_specialization']['value']:.2f} over {lm['vocab_specialization']['num_token_ids']} "
                f"token ids seen ≥ {lm['vocab_specialization']['min_count']} times (uniform {lm['uniform_baseline']:.2f}, 1 = each id always to one expert); "
                f"expert weights: mean pairwise cosine distance {m['weights'][L]['mean_pairwise_cosine_distance']:.2e}.",
                "",
            ]
            if f"types_{L}" in fig:
                lines += [_img(out, fig[f"types_{L}"], f"token types layer {L}"), "", _types_line(lm), ""]
            if f"ablation_{L}" in fig:
                lines += [
                    _img(out, fig[f"ablation_{L}"], f"ablation layer {L}"),
                    "",
                    _ablation_line(m["ablation"]["layers"][L], domains),
                    "",
                ]
        if m.get("cross_layer_nmi"):
            lines += [
                "Cross-layer consistency (symmetric NMI of top-1 choices): "
                + ", ".join(f"layers {k}: {v:.3f}" for k, v in m["cross_layer_nmi"].items())
                + ".",
                "",
            ]
        if m.get("saturation"):
            sat = "; ".join(
                f"step {s}: " + ", ".join(f"L{L} {v['overlap']:.2f}" for L, v in per.items())
                for s, per in m["saturation"].items()
            )
            lines += [f"Router saturation (top-k overlap with the final model): {sat}.", ""]
        for dom in domains:
            if f"example_{dom}" in fig:
                lines += [_img(out, fig[f"example_{dom}"], f"{dom} example"), ""]
        L = str(a.routing.layers[-1])
        lines += [
            f"Examples: colours are layer {L}'s top-1 expert; its usage over all eval tokens is "
            + ", ".join(f"e{e} {u:.2f}" for e, u in enumerate(m["layers"][L]["expert_usage"]))
            + ".",
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))

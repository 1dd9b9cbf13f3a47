"""Write report.md: the figures of an analysis (``report_figures.write_figures``), each with one line of
interpretation computed from the numbers. Called by ``report.analyze_runs``.

Top to bottom: formatting helpers, the one-line readings of the numbers, then one function per report
section in the order they appear in report.md, and ``write_report`` joining them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_emergence.analysis import figures
from moe_emergence.analysis.collect import TOKEN_TYPES
from moe_emergence.telemetry import names as keys


def _ci(c: dict, fmt: str = ".3f") -> str:
    """``value [ci_low, ci_high]`` of a metric dict in format ``fmt``; the value alone without a bootstrap."""
    if c.get("ci_low") is None or not c.get("n_boot"):
        return f"{c['value']:{fmt}}"
    return f"{c['value']:{fmt}} [{c['ci_low']:{fmt}}, {c['ci_high']:{fmt}}]"


def _img(out: Path, path, alt: str) -> str:
    """A markdown image of the PNG at ``path`` (under ``out``), linked relative to report.md."""
    return f"![{alt}]({Path(path).relative_to(out).as_posix()})"


def _docs_line(docs: dict[str, int]) -> str:
    """Documents per domain, with a warning for domains of fewer than 10 (their CIs are too narrow)."""
    line = "Documents per domain: " + ", ".join(f"{d} {n}" for d, n in docs.items()) + "."
    few = [d for d, n in docs.items() if n < 10]
    if few:
        line += (
            f" Fewer than 10 documents in {', '.join(few)}: bootstrap CIs there understate the uncertainty "
            "(one document gives no spread at all); use more eval blocks."
        )
    return line


def _training_line(records: list[dict]) -> str:
    """Router entropy (nats) and largest expert share per layer, first vs last logged step, with the
    uniform reference."""
    layers = figures.router_layers(records, keys.ROUTER)
    parts = []
    for L in layers:
        s, h = figures._series(records, keys.layer_key(keys.ROUTER, L, "entropy"))
        _, mf = figures._series(records, keys.layer_key(keys.ROUTER, L, "max_frac"))
        if len(s):
            parts.append(f"layer {L}: entropy {h[0]:.2f} → {h[-1]:.2f}, max share {mf[0]:.2f} → {mf[-1]:.2f}")
    E = figures.num_experts_in(records, keys.ROUTER)
    ref = f" (uniform: entropy ln E = {np.log(E):.2f}, share 1/E = {1 / E:.2f})" if E else ""
    return "From the first to the last logged step, " + "; ".join(parts) + ref + "."


def _collapse_line(records: list[dict], thr: float | None) -> str:
    """First step and count of router checks where a layer's largest expert share exceeded ``thr``
    (0.9 when the run config sets none)."""
    thr = 0.9 if thr is None else thr
    hits = []
    for L in figures.router_layers(records, keys.ROUTER):
        s, mf = figures._series(records, keys.layer_key(keys.ROUTER, L, "max_frac"))
        over = np.flatnonzero(mf > thr)
        if len(over):
            hits.append(f"layer {L} first at step {int(s[over[0]])} ({len(over)} of {len(s)} checks)")
    if not hits:
        return f"No layer's largest expert share ever exceeded {thr} (no collapse)."
    return f"Largest expert share above {thr}: " + "; ".join(hits) + "."


def _layer_line(L: str, lm: dict, domains: list[str]) -> str:
    """Domain NMI of layer ``L`` with its CI, each domain's top expert and its share, against uniform."""
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


def _step0_reading(change: dict) -> str:
    """Whether a change-from-step-0 CI dict lies above, below or around 0."""
    if not change.get("n_boot"):
        return "no CI"
    if change["ci_low"] > 0:
        return "above step 0"
    if change["ci_high"] < 0:
        return "BELOW step 0: training removed domain information the initial router had"
    return "CI includes 0"


def _baseline_line(lm: dict) -> str:
    """Layer ``lm``'s first-choice domain NMI against its null baselines, the step-0 router and
    I(domain; expert | token id); with top-k > 1 also the NMI over all k choices."""
    null, ti, cmi = lm["null_permutation"], lm["token_identity_nmi"], lm["domain_cmi_given_token"]
    nd, nc = null["domain_nmi"], null["domain_cmi_given_token"]
    parts = [
        f"Baselines: shuffled domains (whole documents, {null['n_perm']} permutations) give NMI {nd['mean']:.3f} "
        f"(95th percentile {nd['p95']:.3f}; p = {nd['p_value']:.3g})",
        f"a router by token id alone (2-fold cross-fitted) gives {_ci(ti)}",
    ]
    s0 = lm.get("step0")
    if s0:
        ch = s0["change_domain_nmi"]
        parts.append(
            f"the step-0 router gave {_ci(s0['domain_nmi'])}, change {_ci(ch, '+.3f')} ({_step0_reading(ch)})"
        )
    line = "; ".join(parts) + ". "
    line += (
        f"Beyond token identity: I(domain; expert | token id) = {cmi['value']:.3f} nats over {cmi['num_token_ids']} ids "
        f"seen ≥ {cmi['min_count']} times ({cmi['token_frac']:.0%} of tokens; at most H(domain | token id) = "
        f"{cmi['h_domain_given_token']:.3f}); shuffled-domain null mean {nc['mean']:.3f}, 95th percentile "
        f"{nc['p95']:.3f} (p = {nc['p_value']:.3g}): {cmi['excess_over_null']:+.3f} nats above the null mean."
    )
    if lm["top_k"] > 1:
        topk = f"All {lm['top_k']} choices per token: NMI {_ci(lm['domain_nmi_topk'])}"
        topk += f" (shuffled-domain 95th percentile {null['domain_nmi_topk']['p95']:.3f})"
        if s0:
            ch = s0["change_domain_nmi_topk"]
            topk += f", step 0 {_ci(s0['domain_nmi_topk'])}, change {_ci(ch, '+.3f')} ({_step0_reading(ch)})"
        line += " " + topk + "."
    return line


def nmi_table(runs: dict[str, dict]) -> str:
    """Markdown table of every MoE run and layer of a metrics.json ``runs`` dict: domain NMI (first choice and
    all top-k choices) beside its baselines and the other normalisations (keys: docs/analysis.md)."""
    rows = [
        "| run | layer | NMI | NMI all top-k | step 0 | change from step 0 | shuffled null mean / p95 "
        "| token-id router NMI | I(D; E \\| token) nats (null mean) | MI nats | NMI sqrt | NMI arith |",
        "|---" * 12 + "|",
    ]
    for name, rm in runs.items():
        for L, lm in (rm.get("layers") or {}).items():
            s0, null = lm.get("step0"), lm["null_permutation"]["domain_nmi"]
            cmi = lm["domain_cmi_given_token"]
            null_cmi = lm["null_permutation"]["domain_cmi_given_token"]["mean"]
            cells = [
                name,
                L,
                _ci(lm["domain_nmi"]),
                _ci(lm["domain_nmi_topk"]),
                _ci(s0["domain_nmi"]) if s0 else "n/a",
                _ci(s0["change_domain_nmi"], "+.3f") if s0 else "n/a",
                f"{null['mean']:.3f} / {null['p95']:.3f}",
                _ci(lm["token_identity_nmi"]),
                f"{cmi['value']:.3f} ({null_cmi:.3f})",
                _ci(lm["domain_mi_nats"]),
                _ci(lm["domain_nmi_sqrt"]),
                _ci(lm["domain_nmi_arith"]),
            ]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def _vocab_line(lm: dict, weights: dict) -> str:
    """Vocabulary specialisation of one layer and the mean pairwise cosine distance of its expert weights."""
    vs = lm["vocab_specialization"]
    return (
        f"Vocabulary specialisation {vs['value']:.2f} over {vs['num_token_ids']} "
        f"token ids seen ≥ {vs['min_count']} times (uniform {lm['uniform_baseline']:.2f}, 1 = each id always to one expert); "
        f"expert weights: mean pairwise cosine distance {weights['mean_pairwise_cosine_distance']:.2e}."
    )


def _types_line(lm: dict) -> str:
    """The code token type routed most to one expert (types with < 10 tokens ignored) and NMI(type; expert)."""
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
    """The (expert, domain) whose ablation raised the eval loss most (nats per token), from the per-expert
    ``delta`` dicts of one layer."""
    best = max(
        ((e, d) for e in range(len(per_e)) for d in domains),
        key=lambda t: per_e[t[0]]["delta"][t[1]]["value"],
    )
    c = per_e[best[0]]["delta"][best[1]]
    return f"Largest loss increase: removing expert {best[0]} costs {_ci(c, '+.4f')} nats on {best[1]}."


def _header(result: dict, analyses) -> list[str]:
    """Title, the eval set and bootstrap used, and the documents per domain."""
    ev, boot = result["eval_set"], result["bootstrap"]
    return [
        "# Specialisation report",
        "",
        f"Eval set: {ev['blocks']} blocks of {ev['seq_len']} tokens (fingerprint `{ev['fingerprint']}`), domains "
        f"{', '.join(ev['domains'])}; the same blocks for every run. CIs: 95% percentile bootstrap over documents "
        f"({boot['n_boot']} replicates, seed {boot['seed']}). All numbers: `metrics.json`.",
        "",
        _docs_line(analyses[0].metrics["documents"]),
        "",
    ]


def _loss_section(out: Path, analyses, domains: list[str]) -> list[str]:
    """Eval loss per domain of every run (table with CIs), its figure, and the best run per domain."""
    lines = [
        "## Eval loss per domain",
        "",
        "| run | " + " | ".join(domains) + " | all |",
        "|---" * (len(domains) + 2) + "|",
    ]
    for a in analyses:
        lines.append(
            f"| {a.run.name} | " + " | ".join(_ci(a.metrics["loss"][d]) for d in [*domains, "all"]) + " |"
        )
    best = {d: min(analyses, key=lambda a: a.metrics["loss"][d]["value"]).run.name for d in domains}
    return lines + [
        "",
        _img(out, analyses[0].figures["shared_loss"], "loss by domain"),
        "",
        "Lowest loss per domain: " + ", ".join(f"{d}: {r}" for d, r in best.items()) + ".",
        "",
    ]


def _nmi_section(out: Path, analyses) -> list[str]:
    """Domain-expert NMI per layer of every MoE run and the highest one; empty when no run is MoE."""
    shared = analyses[0].figures
    if "shared_nmi" not in shared:
        return []
    moe = [a for a in analyses if a.metrics["is_moe"]]
    top = max(
        ((a, L) for a in moe for L in a.metrics["layers"]),
        key=lambda t: t[0].metrics["layers"][t[1]]["domain_nmi"]["value"],
    )
    c = top[0].metrics["layers"][top[1]]["domain_nmi"]
    return [
        "## Domain–expert NMI per layer",
        "",
        _img(out, shared["shared_nmi"], "NMI per layer"),
        "",
        f"Highest NMI: {top[0].run.name} layer {top[1]}, {_ci(c)} (0 = routing ignores the domain, 1 = the expert identifies it).",
        "",
        "Domain NMI beside its baselines (first choice unless named; CIs: bootstrap over documents; "
        "definitions: docs/analysis.md):",
        "",
        nmi_table({a.run.name: a.metrics for a in moe}),
        "",
    ]


def _training_section(out: Path, analysis) -> list[str]:
    """Router entropy / max share and collapse trajectory over training, or a note that the run folder has
    no metrics.jsonl; empty when metrics.jsonl has no router curves."""
    fig, records = analysis.figures, analysis.run.metrics
    thr = analysis.run.collapse_threshold
    if "training" in fig:
        return [
            _img(out, fig["training"], "router entropy and max share"),
            "",
            _training_line(records),
            "",
            _img(out, fig["collapse"], "collapse trajectory"),
            "",
            _collapse_line(records, thr),
            "",
        ]
    if not records:
        return ["No metrics.jsonl in the run folder: no training curves.", ""]
    return []


def _layer_section(out: Path, L: str, metrics: dict, fig: dict, domains: list[str]) -> list[str]:
    """One MoE layer ``L`` of a run: domain x expert heatmap with its reading, vocabulary specialisation and
    weight distance, then the token type and ablation figures when they exist."""
    lm = metrics["layers"][L]
    lines = [
        f"### Layer {L}",
        "",
        _img(out, fig[f"heatmap_{L}"], f"domain x expert layer {L}"),
        "",
        _layer_line(L, lm, domains),
        _baseline_line(lm),
        _vocab_line(lm, metrics["weights"][L]),
        "",
    ]
    if f"types_{L}" in fig:
        lines += [_img(out, fig[f"types_{L}"], f"token types layer {L}"), "", _types_line(lm), ""]
    if f"ablation_{L}" in fig:
        lines += [
            _img(out, fig[f"ablation_{L}"], f"ablation layer {L}"),
            "",
            _ablation_line(metrics["ablation"]["layers"][L], domains),
            "",
        ]
    return lines


def _across_layers_section(metrics: dict) -> list[str]:
    """Cross-layer consistency and router saturation against earlier checkpoints, when measured."""
    lines = []
    if metrics.get("cross_layer_nmi"):
        lines += [
            "Cross-layer consistency (symmetric NMI of top-1 choices): "
            + ", ".join(f"layers {k}: {v:.3f}" for k, v in metrics["cross_layer_nmi"].items())
            + ".",
            "",
        ]
    if metrics.get("saturation"):
        sat = "; ".join(
            f"step {s}: " + ", ".join(f"L{L} {v['overlap']:.2f}" for L, v in per.items())
            for s, per in metrics["saturation"].items()
        )
        lines += [f"Router saturation (top-k overlap with the final model): {sat}.", ""]
    return lines


def _examples_section(out: Path, analysis, domains: list[str]) -> list[str]:
    """The text example of each domain and the last MoE layer's expert usage over all eval tokens."""
    fig = analysis.figures
    lines = []
    for dom in domains:
        if f"example_{dom}" in fig:
            lines += [_img(out, fig[f"example_{dom}"], f"{dom} example"), ""]
    L = str(analysis.routing.layers[-1])
    usage = analysis.metrics["layers"][L]["expert_usage"]
    return lines + [
        f"Examples: colours are layer {L}'s top-1 expert; its usage over all eval tokens is "
        + ", ".join(f"e{e} {u:.2f}" for e, u in enumerate(usage))
        + ".",
        "",
    ]


def _run_section(out: Path, analysis, domains: list[str]) -> list[str]:
    """Everything about one run: training curves, then for an MoE run each layer, the across-layer
    measures and the text examples (a dense run gets a one-line note instead)."""
    m = analysis.metrics
    lines = [f"## Run `{analysis.run.name}` ({m['model_type']})", ""]
    lines += _training_section(out, analysis)
    if not m["is_moe"]:
        return lines + ["Dense model: loss metrics only (no routing).", ""]
    for L in m["layers"]:
        lines += _layer_section(out, L, m, analysis.figures, domains)
    return lines + _across_layers_section(m) + _examples_section(out, analysis, domains)


def write_report(out: Path, result: dict, analyses) -> None:
    """Write ``out/report.md``: header, loss per domain, NMI per layer, then one section per run.

    ``result`` is the metrics.json dict of ``report.analyze_runs``; ``analyses`` its ``RunAnalysis`` list
    (at least one), whose ``figures`` ``report_figures.write_figures`` has already filled (a missing
    figure key raises KeyError).
    """
    domains = result["eval_set"]["domains"]
    lines = _header(result, analyses) + _loss_section(out, analyses, domains) + _nmi_section(out, analyses)
    for a in analyses:
        lines += _run_section(out, a, domains)
    (out / "report.md").write_text("\n".join(lines))

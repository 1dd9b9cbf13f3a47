"""Write every figure of an analysis (PNG, through ``figures``) and record it in ``RunAnalysis.figures``
(key -> path) for ``markdown.write_report`` to place. Called by ``report.analyze_runs``.

Keys per run: ``training`` and ``collapse`` when metrics.jsonl has router curves; for an MoE run also
``heatmap_{L}``, ``types_{L}`` (token types counted), ``ablation_{L}`` (ablation run) per MoE layer L and
``example_{domain}``. On the first analysis: ``shared_loss`` and, when any run is MoE, ``shared_nmi``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_emergence.analysis import figures
from moe_emergence.analysis.collect import TOKEN_TYPES, Routing, token_bytes
from moe_emergence.analysis.runs import load_tokenizer
from moe_emergence.telemetry import names as keys


def example_pieces(
    routing: Routing, tokenizer, domain: int, layer: int, max_tokens: int = 160
) -> tuple[list[str], list[int]]:
    """Text pieces and top-1 experts of the first ``max_tokens`` tokens of the first document of domain
    index ``domain``: two lists of equal length (each token's text, invalid UTF-8 replaced, and its top-1
    expert id at MoE layer ``layer``), both empty when the eval set has no token of that domain."""
    docs = np.flatnonzero(routing.domain == domain)
    if len(docs) == 0:
        return [], []
    sel = np.flatnonzero(routing.doc == routing.doc[docs[0]])[:max_tokens]
    pieces = [
        b.decode("utf-8", errors="replace") for b in token_bytes(tokenizer, routing.token_ids[sel].tolist())
    ]
    return pieces, routing.topk[layer][sel, 0].tolist()


def _layer_figures(d: Path, name: str, L: str, metrics: dict, domains: list[str]) -> dict[str, Path]:
    """Figures of MoE layer ``L`` of one run, written under ``d``: the domain x expert heatmap, the code
    token type x expert heatmap (when token types were counted) and the ablation Δloss heatmap (when the
    run was ablated). Keys ``heatmap_{L}``, ``types_{L}``, ``ablation_{L}``."""
    lm = metrics["layers"][L]
    fig = {
        f"heatmap_{L}": figures.heatmap(
            np.array(lm["domain_specialization"]),
            domains,
            f"{name} layer {L}: spec(e, D) = N_D(e) / N_D",
            lm["uniform_baseline"],
            d / f"domain_expert_layer{L}.png",
        )
    }
    if "token_type_fractions" in lm:
        fig[f"types_{L}"] = figures.heatmap(
            np.array(lm["token_type_fractions"]),
            list(TOKEN_TYPES),
            f"{name} layer {L}: code token type -> expert",
            1 / lm["num_experts"],
            d / f"token_types_layer{L}.png",
        )
    if "ablation" in metrics:
        delta_EM = np.array(
            [[e["delta"][dom]["value"] for dom in domains] for e in metrics["ablation"]["layers"][L]]
        )
        fig[f"ablation_{L}"] = figures.ablation_heatmap(
            delta_EM, domains, int(L), d / f"ablation_layer{L}.png"
        )
    return fig


def _example_figures(d: Path, analysis, domains: list[str]) -> dict[str, Path]:
    """One text example per domain, coloured by the top-1 expert of the last MoE layer (key
    ``example_{domain}``); a domain without tokens in the eval set gets none."""
    tok = load_tokenizer(analysis.run)
    routing = analysis.routing
    last = routing.layers[-1]
    fig = {}
    for i, dom in enumerate(domains):
        pieces, experts = example_pieces(routing, tok, i, last)
        if pieces:
            fig[f"example_{dom}"] = figures.example_text(
                pieces,
                experts,
                routing.num_experts,
                d / f"example_{dom}.png",
                f"{analysis.run.name}: {dom} text coloured by top-1 expert of layer {last}",
            )
    return fig


def _run_figures(out: Path, analysis, domains: list[str]) -> None:
    """The figures of one run, under ``out/<run name>/``, recorded in ``analysis.figures``: training
    curves and collapse trajectory when its metrics.jsonl has router curves, then (MoE runs only) each
    layer's figures and the text examples."""
    m, name, fig = analysis.metrics, analysis.run.name, analysis.figures
    d = out / name
    records, thr = analysis.run.metrics, analysis.run.collapse_threshold
    if figures.router_layers(records, keys.ROUTER):
        fig["training"] = figures.training_curves(records, d / "training_router.png", keys.ROUTER, thr)
        fig["collapse"] = figures.collapse_trajectory(records, d / "collapse.png", keys.ROUTER, thr)
    if not m["is_moe"]:
        return
    for L in m["layers"]:
        fig.update(_layer_figures(d, name, L, m, domains))
    fig.update(_example_figures(d, analysis, domains))


def _nmi_references(lm: dict) -> dict[str, float | None]:
    """The reference markers of one layer's NMI bar (``figures.REFERENCE_MARKERS``) from metrics.json."""
    return {
        "step 0": (lm.get("step0") or {}).get("domain_nmi", {}).get("value"),
        "shuffled p95": lm["null_permutation"]["domain_nmi"]["p95"],
        "token-id router": lm["token_identity_nmi"]["value"],
    }


def _shared_figures(out: Path, analyses, domains: list[str]) -> None:
    """Figures comparing the runs, directly under ``out``, recorded in the first analysis's ``figures``:
    ``shared_nmi`` (domain NMI per layer of every MoE run; only when there is one) and ``shared_loss``
    (eval loss per domain of every run)."""
    moe = {a.run.name: a.metrics["layers"] for a in analyses if a.metrics["is_moe"]}
    shared = {}
    if moe:
        shared["nmi"] = figures.nmi_per_layer(
            {r: {L: v["domain_nmi"] for L, v in ls.items()} for r, ls in moe.items()},
            out / "nmi_per_layer.png",
            refs_by_run={r: {L: _nmi_references(v) for L, v in ls.items()} for r, ls in moe.items()},
        )
    shared["loss"] = figures.loss_comparison(
        {a.run.name: a.metrics["loss"] for a in analyses}, domains, out / "loss_by_domain.png"
    )
    analyses[0].figures.update({f"shared_{k}": v for k, v in shared.items()})


def write_figures(out: Path, analyses, eval_set) -> None:
    """Write every figure of ``analyses`` (``report.RunAnalysis``, at least one) as PNG under ``out`` and
    record each in its analysis's ``figures`` (key -> path under ``out``; keys in the module docstring)."""
    for a in analyses:
        _run_figures(out, a, eval_set.domains)
    _shared_figures(out, analyses, eval_set.domains)

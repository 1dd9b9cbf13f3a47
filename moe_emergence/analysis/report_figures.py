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


def example_pieces(
    routing: Routing, tokenizer, domain: int, layer: int, max_tokens: int = 160
) -> tuple[list[str], list[int]]:
    """Text pieces and top-1 experts of the first ``max_tokens`` tokens of the first document of a domain."""
    docs = np.flatnonzero(routing.domain == domain)
    if len(docs) == 0:
        return [], []
    sel = np.flatnonzero(routing.doc == routing.doc[docs[0]])[:max_tokens]
    pieces = [
        b.decode("utf-8", errors="replace") for b in token_bytes(tokenizer, routing.token_ids[sel].tolist())
    ]
    return pieces, routing.topk[layer][sel, 0].tolist()


def write_figures(out: Path, analyses, eval_set) -> None:
    """Every figure, recorded in ``analysis.figures`` (name -> path relative to ``out``)."""
    domains = eval_set.domains
    for a in analyses:
        m, name, fig = a.metrics, a.run.name, a.figures
        d = out / name
        records = a.run.metrics
        thr = a.run.collapse_threshold
        if figures.router_layers(records, "router"):
            fig["training"] = figures.training_curves(records, d / "training_router.png", "router", thr)
            fig["collapse"] = figures.collapse_trajectory(records, d / "collapse.png", "router", thr)
        if not m["is_moe"]:
            continue
        tok = load_tokenizer(a.run)
        for L, lm in m["layers"].items():
            fig[f"heatmap_{L}"] = figures.heatmap(
                np.array(lm["domain_specialization"]),
                domains,
                f"{name} layer {L}: spec(e, D) = N_D(e) / N_D",
                lm["uniform_baseline"],
                d / f"domain_expert_layer{L}.png",
            )
            if "token_type_fractions" in lm:
                fig[f"types_{L}"] = figures.heatmap(
                    np.array(lm["token_type_fractions"]),
                    list(TOKEN_TYPES),
                    f"{name} layer {L}: code token type -> expert",
                    1 / lm["num_experts"],
                    d / f"token_types_layer{L}.png",
                )
            if "ablation" in m:
                delta = np.array(
                    [[e["delta"][dom]["value"] for dom in domains] for e in m["ablation"]["layers"][L]]
                )
                fig[f"ablation_{L}"] = figures.ablation_heatmap(
                    delta, domains, int(L), d / f"ablation_layer{L}.png"
                )
        last = a.routing.layers[-1]
        for i, dom in enumerate(domains):
            pieces, experts = example_pieces(a.routing, tok, i, last)
            if pieces:
                fig[f"example_{dom}"] = figures.example_text(
                    pieces,
                    experts,
                    a.routing.num_experts,
                    d / f"example_{dom}.png",
                    f"{name}: {dom} text coloured by top-1 expert of layer {last}",
                )
    moe = {a.run.name: a.metrics["layers"] for a in analyses if a.metrics["is_moe"]}
    shared = {}
    if moe:
        shared["nmi"] = figures.nmi_per_layer(
            {r: {L: v["domain_nmi"] for L, v in ls.items()} for r, ls in moe.items()},
            out / "nmi_per_layer.png",
        )
    shared["loss"] = figures.loss_comparison(
        {a.run.name: a.metrics["loss"] for a in analyses}, domains, out / "loss_by_domain.png"
    )
    analyses[0].figures.update({f"shared_{k}": v for k, v in shared.items()})

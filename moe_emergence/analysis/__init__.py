"""Specialisation analysis of finished runs: collect routing on eval blocks, metrics with document-bootstrap
CIs, causal expert ablation, figures and a report. Not imported by ``moe_emergence`` itself.

    from moe_emergence.analysis import analyze_runs
    result, analyses = analyze_runs(["runs/a", "runs/b"], "reports/ab", max_blocks=64, n_boot=1000)
"""

from moe_emergence.analysis.ablation import expert_ablation, keep_all_but
from moe_emergence.analysis.collect import (
    TOKEN_TYPES,
    Routing,
    code_token_types,
    collect_routing,
    document_ids,
)
from moe_emergence.analysis.report import RunAnalysis, analyze_run, analyze_runs
from moe_emergence.analysis.runs import EvalSet, Run, load_eval_set, load_model, load_run, load_tokenizer
from moe_emergence.analysis.summarize import routing_summary

__all__ = [
    "TOKEN_TYPES",
    "EvalSet",
    "Routing",
    "Run",
    "RunAnalysis",
    "analyze_run",
    "analyze_runs",
    "code_token_types",
    "collect_routing",
    "document_ids",
    "expert_ablation",
    "load_eval_set",
    "load_model",
    "load_run",
    "load_tokenizer",
    "keep_all_but",
    "routing_summary",
]

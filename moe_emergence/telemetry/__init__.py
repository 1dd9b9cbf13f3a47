"""Routing telemetry: per-step statistics -> flat ``{name: float}`` dicts; sinks only write."""

from moe_emergence.telemetry.sinks import JsonlSink, read_metrics, resolve_wandb_mode
from moe_emergence.telemetry.stats import (
    DomainLossStats,
    LayerRoutingStats,
    RoutingStats,
    coefficient_of_variation,
    entropy,
    expert_divergence,
    flat_expert_weights,
    fractions,
    mutual_information,
    normalized_mutual_information,
    variant_metrics,
)

__all__ = [
    "DomainLossStats",
    "JsonlSink",
    "LayerRoutingStats",
    "RoutingStats",
    "coefficient_of_variation",
    "entropy",
    "expert_divergence",
    "flat_expert_weights",
    "fractions",
    "mutual_information",
    "normalized_mutual_information",
    "read_metrics",
    "resolve_wandb_mode",
    "variant_metrics",
]

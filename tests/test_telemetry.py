"""Telemetry formulas against hand-computed cases, accumulators, wandb mode resolution."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from moe_emergence.routing import RouterOutput, entropy_from_probs
from moe_emergence.telemetry import (
    DomainLossStats,
    LayerRoutingStats,
    coefficient_of_variation,
    entropy,
    expert_divergence,
    fractions,
    mutual_information,
    normalized_mutual_information,
    resolve_wandb_mode,
)
from moe_emergence.telemetry import names as keys
from moe_emergence.telemetry.stats import routing_metrics


def test_basic_formulas():
    assert fractions(torch.tensor([1.0, 3.0])).tolist() == [0.25, 0.75]
    assert entropy(torch.full((4,), 0.25)) == pytest.approx(math.log(4))
    assert entropy(torch.tensor([1.0, 0.0])) == 0.0
    assert coefficient_of_variation(torch.full((4,), 0.25)) == 0.0
    assert coefficient_of_variation(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(math.sqrt(3))


def test_mutual_information_hand_cases():
    assert mutual_information(torch.tensor([[2.0, 0], [0, 2]])) == pytest.approx(math.log(2))
    assert normalized_mutual_information(torch.tensor([[2.0, 0], [0, 2]])) == pytest.approx(1.0)
    assert mutual_information(torch.tensor([[1.0, 1], [1, 1]])) == pytest.approx(0.0, abs=1e-12)
    # p(d,e) = [[3, 1], [1, 3]] / 8, marginals 1/2: MI = 3/4 ln(3/2) + 1/4 ln(1/2)
    mi = mutual_information(torch.tensor([[3.0, 1], [1, 3]]))
    assert mi == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert normalized_mutual_information(torch.tensor([[3.0, 1], [1, 3]])) == pytest.approx(mi / math.log(2))
    assert normalized_mutual_information(torch.tensor([[5.0, 3]])) == 0.0  # one domain


def test_expert_divergence_hand_cases():
    assert expert_divergence(torch.ones(3, 5)) == pytest.approx(0.0, abs=1e-12)
    assert expert_divergence(torch.tensor([[1.0, 0], [0, 1]])) == pytest.approx(1.0)
    assert expert_divergence(torch.tensor([[1.0, 0], [-1, 0]])) == pytest.approx(2.0)
    # pairs: (a,b)=1, (a,c)=0, (b,c)=1 -> mean 2/3
    assert expert_divergence(torch.tensor([[1.0, 0], [0, 1], [2, 0]])) == pytest.approx(2 / 3)


def _router_output(probs_TE: torch.Tensor, k: int = 1) -> RouterOutput:
    w, idx = probs_TE.topk(k, dim=-1)
    return RouterOutput(w, idx, probs_TE, probs_TE, probs_TE.log(), entropy_from_probs(probs_TE))


def test_routing_stats_hand_case_with_padding():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0]]) + 1e-9
    probs = probs / probs.sum(-1, keepdim=True)
    mask = torch.tensor([1, 1, 1, 0])  # the last token (expert 2) is padding
    domain = torch.tensor([0, 1, 0, -1])
    m = routing_metrics([({3: _router_output(probs)}, mask, domain)], num_experts=3, num_domains=2)
    assert [m[f"router/layer3/expert{i}_frac"] for i in range(3)] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert m["router/layer3/max_frac"] == pytest.approx(2 / 3)
    assert m["router/layer3/dead_experts"] == 1.0
    ent = entropy_from_probs(probs[:3]).double().mean()
    assert m["router/layer3/entropy"] == pytest.approx(float(ent))
    assert m["router/layer3/marginal_entropy"] == pytest.approx(entropy(probs[:3].double().mean(0)))
    # domain 0 -> expert 0 twice, domain 1 -> expert 1: perfectly informative
    assert m["router/layer3/domain_nmi"] == pytest.approx(1.0)
    assert m["router/layer3/cv"] == pytest.approx(coefficient_of_variation(torch.tensor([2 / 3, 1 / 3, 0])))


def test_micro_batches_accumulate_like_one_batch():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 4, generator=gen).softmax(-1)
    mask = (torch.rand(40, generator=gen) > 0.2).long()
    dom = torch.randint(0, 3, (40,), generator=gen)
    whole = routing_metrics([({0: _router_output(probs, 2)}, mask, dom)], 4, 3)
    parts = routing_metrics(
        [
            ({0: _router_output(probs[:25], 2)}, mask[:25], dom[:25]),
            ({0: _router_output(probs[25:], 2)}, mask[25:], dom[25:]),
        ],
        4,
        3,
    )
    assert whole == pytest.approx(parts)
    assert sum(whole[f"router/layer0/expert{i}_frac"] for i in range(4)) == pytest.approx(1.0)
    assert 0.0 <= whole["router/layer0/domain_nmi"] <= 1.0


def test_all_reduce_sums_buffers():
    stats = LayerRoutingStats([0, 2], 2, 1, "cpu")
    stats.add(
        {0: _router_output(torch.tensor([[0.7, 0.3]])), 2: _router_output(torch.tensor([[0.2, 0.8]]))},
        torch.ones(1),
    )
    stats.all_reduce(lambda t: 2 * t)  # a fake 2-process sum of equal buffers
    assert (
        float(stats.layers[0].tokens_per_expert_E.sum()) == 2.0
        and float(stats.layers[2].tokens_per_expert_E[1]) == 2.0
    )


def test_metric_keys_are_built_and_parsed_in_names():
    assert keys.join(keys.TRAIN, "loss") == keys.TRAIN_LOSS == "train/loss"
    assert keys.layer_key(keys.EVAL_ROUTER, 3, keys.expert_frac(12)) == "eval_router/layer3/expert12_frac"
    assert keys.parse_layer_key("eval_router/layer3/expert12_frac") == ("eval_router", 3, "expert12_frac")
    assert keys.parse_layer_key("router/noise_std") is None
    assert keys.parse_expert_frac("expert12_frac") == 12
    assert keys.parse_expert_frac("expert_frac") is None and keys.parse_expert_frac("max_frac") is None
    assert (
        keys.parse_domain_loss(keys.domain_loss("code")) == "code"
        and keys.domain_loss("code") == "eval/loss_code"
    )
    assert (
        keys.parse_domain_loss("eval/lm_loss") is None and keys.parse_domain_loss("train/loss_code") is None
    )


def test_domain_loss_stats_token_weighted():
    s = DomainLossStats(2, "cpu")
    s.add(torch.tensor([1.0, 3.0, 2.0, 9.0]), torch.tensor([0, 0, 1, -1]), torch.tensor([1, 1, 1, 1]))
    s.add(torch.tensor([4.0]), torch.tensor([1]), torch.tensor([0]))  # masked: ignored
    m = s.metrics(["a", "b"])
    assert m["eval/loss_a"] == 2.0 and m["eval/loss_b"] == 2.0
    assert m["eval/lm_loss"] == 2.0 and m["eval/ppl_a"] == pytest.approx(math.exp(2))


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    mode, notice = resolve_wandb_mode("auto")
    assert mode == "offline" and "offline" in notice
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == ("online", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == ("offline", None)
    assert resolve_wandb_mode("disabled") == ("disabled", None)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == ("online", None)


def test_telemetry_libraries_not_imported_eagerly():
    code = (
        "import sys, moe_emergence, moe_emergence.telemetry, moe_emergence.config_loader;"
        "import moe_emergence.telemetry.dashboard, moe_emergence.training.tracking;"
        "bad = [m for m in ('wandb', 'wandb_workspaces', 'matplotlib') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

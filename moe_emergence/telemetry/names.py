"""Metric keys: every ``train/``, ``val/``, ``eval/``, ``router/``, ``val_router/``, ``eval_router/`` and ``perf/``
name is built here.

The rest of the package (trainer, guard, telemetry, analysis, scripts) imports these; a key's text is
part of the run folder's format (``metrics.jsonl``, wandb), so changing one here changes it everywhere.
Readers of ``metrics.jsonl`` take keys apart here too: ``parse_layer_key``, ``parse_expert_frac``,
``parse_domain_loss``, ``logged_layers``.

Layout::

    train/{loss, lm_loss, lb_loss, z_loss, entropy_loss, lb_coef, z_coef, lr, router_lr, grad_norm,
           tokens, skipped_steps}
    perf/{tokens_per_sec, cuda_graph_captures}   (the second with train.cuda_graphs on: captures so far)
    val/{lm_loss, loss_<domain>, ppl_<domain>, blocks_fingerprint}    (an evaluation on the val split)
    eval/{lm_loss, loss_<domain>, ppl_<domain>, blocks_fingerprint}   (an evaluation on the eval = test split)
    router/noise_std
    router/layer<i>/{expert<e>_frac, entropy, marginal_entropy, max_frac, cv, dead_experts, domain_mi,
                     domain_nmi, expert_divergence, dropped_frac, unrouted_frac, selection_bias_e<e>}
    val_router/layer<i>/..., eval_router/layer<i>/...   (the routing statistics above, on that split)
    <router prefix>/layer<i>/domain_expert   (wandb heatmap image)

An evaluation's keys are prefixed by the corpus split it read (``split_prefixes``): ``val`` for the periodic
evaluation by default, ``eval`` for the test split (``eval.final_split``, or ``eval.split: eval``), so a key
always says which split it was measured on. ``<split>/blocks_fingerprint`` is a string (16 hex digits naming
the evaluated blocks, ``training.evalset``); every other value is a number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TRAIN, VAL, EVAL, PERF = "train", "val", "eval", "perf"
ROUTER, VAL_ROUTER, EVAL_ROUTER = "router", "val_router", "eval_router"
# corpus split -> (loss prefix, routing prefix) of an evaluation on it
SPLIT_PREFIXES = {"val": (VAL, VAL_ROUTER), "eval": (EVAL, EVAL_ROUTER)}

TRAIN_LOSS = "train/loss"
TRAIN_LM_LOSS = "train/lm_loss"
TRAIN_LB_LOSS = "train/lb_loss"
TRAIN_Z_LOSS = "train/z_loss"
TRAIN_ENTROPY_LOSS = "train/entropy_loss"
TRAIN_LB_COEF = "train/lb_coef"
TRAIN_Z_COEF = "train/z_coef"
TRAIN_LR = "train/lr"
TRAIN_ROUTER_LR = "train/router_lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_TOKENS = "train/tokens"
TRAIN_SKIPPED_STEPS = "train/skipped_steps"
TOKENS_PER_SEC = "perf/tokens_per_sec"
CUDA_GRAPH_CAPTURES = "perf/cuda_graph_captures"
NOISE_STD = "router/noise_std"

VAL_LM_LOSS = "val/lm_loss"
EVAL_LM_LOSS = "eval/lm_loss"
DOMAIN_EXPERT = "domain_expert"  # per-layer name of the P(expert | domain) heatmap (wandb image only)
_LAYER_RE = re.compile(r"^(?P<prefix>[a-z_]+)/layer(?P<layer>\d+)/(?P<name>.+)$")
_EXPERT_FRAC_RE = re.compile(r"^expert(?P<expert>\d+)_frac$")


def join(prefix: str, name: str) -> str:
    """``<prefix>/<name>``: the one way a key joins its prefix and name, e.g. ``join(TRAIN, "loss")``."""
    return f"{prefix}/{name}"


def split_prefixes(split: str) -> tuple[str, str]:
    """(loss prefix, routing prefix) of an evaluation on corpus split ``split``: ``("val", "val_router")`` or
    ``("eval", "eval_router")``; ``ValueError`` for another split (train is never evaluated)."""
    if split not in SPLIT_PREFIXES:
        raise ValueError(f"no evaluation keys for split {split!r}; one of {list(SPLIT_PREFIXES)}")
    return SPLIT_PREFIXES[split]


def blocks_fingerprint(prefix: str = EVAL) -> str:
    """``eval/blocks_fingerprint``: the fingerprint of the blocks an evaluation read (a string)."""
    return join(prefix, "blocks_fingerprint")


def lm_loss(prefix: str = EVAL) -> str:
    """``eval/lm_loss``: mean next-token loss over all domains' tokens."""
    return join(prefix, "lm_loss")


def domain_loss(domain: str, prefix: str = EVAL) -> str:
    """``eval/loss_<domain>``: mean next-token loss of one domain."""
    return join(prefix, f"loss_{domain}")


def domain_ppl(domain: str, prefix: str = EVAL) -> str:
    """``eval/ppl_<domain>``: exp of ``domain_loss``."""
    return join(prefix, f"ppl_{domain}")


def layer_prefix(prefix: str, layer: int | str) -> str:
    """``<prefix>/layer<i>``: the prefix of one MoE layer's keys (``prefix`` ``router`` or ``eval_router``)."""
    return join(prefix, f"layer{layer}")


def layer_key(prefix: str, layer: int | str, name: str) -> str:
    """``<prefix>/layer<i>/<name>``, e.g. ``layer_key(ROUTER, 3, "max_frac")``."""
    return join(layer_prefix(prefix, layer), name)


def expert_frac(expert: int) -> str:
    """Per-layer name of expert e's share of the routing assignments: ``expert<e>_frac``."""
    return f"expert{expert}_frac"


def selection_bias(expert: int) -> str:
    """Per-layer name of expert e's aux-loss-free selection bias: ``selection_bias_e<e>``."""
    return f"selection_bias_e{expert}"


def parse_layer_key(key: str) -> tuple[str, int, str] | None:
    """``(prefix, layer, name)`` of a per-layer key, or None for any other key."""
    m = _LAYER_RE.match(key)
    return None if m is None else (m["prefix"], int(m["layer"]), m["name"])


def parse_expert_frac(name: str) -> int | None:
    """Expert e of a per-layer name ``expert<e>_frac`` (``expert_frac``), or None for any other name."""
    m = _EXPERT_FRAC_RE.match(name)
    return None if m is None else int(m["expert"])


def parse_domain_loss(key: str, prefix: str = EVAL) -> str | None:
    """The domain of a ``<prefix>/loss_<domain>`` key (``domain_loss``), or None for any other key."""
    head = domain_loss("", prefix)
    return key[len(head) :] if key.startswith(head) else None


def logged_layers(logged: Iterable[str], prefix: str) -> dict[int, set[str]]:
    """Layer -> the per-layer names logged under ``<prefix>/layer<i>/`` among the keys ``logged``."""
    out: dict[int, set[str]] = {}
    for key in logged:
        p = parse_layer_key(key)
        if p is not None and p[0] == prefix:
            out.setdefault(p[1], set()).add(p[2])
    return out

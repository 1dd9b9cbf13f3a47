"""Pipeline steps: document-level train / val / eval split, token budgets for mixing, and packing with
per-token domain ids.

Shapes (legend: docs/architecture.md): B packed rows (blocks) of S = ``seq_len`` positions; packed arrays
are ``ids_BS`` (token ids), ``mask_BS`` (1 = real token, 0 = padding) and ``dom_BS`` (domain id per token,
-1 on padding).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class DocSplit(NamedTuple):
    """One domain's documents, split by whole documents: ``train``, ``val`` (validation: every choice of
    budgets and learning rates) and ``eval`` (the test split of the final tables), each in shuffled order."""

    train: list[str]
    val: list[str]
    eval: list[str]


def split_documents(
    docs: Sequence[str],
    eval_fraction: float,
    min_eval_docs: int,
    seed: int,
    domain: str,
    *,
    val_fraction: float,
) -> DocSplit:
    """Shuffle one domain's documents with the seed; hold out ``max(min_eval_docs, round(eval_fraction * n))``
    for eval, then ``max(1, round(val_fraction * n))`` for val (none when ``val_fraction`` is 0).

    The split is by whole documents, before tokenising or packing, so no eval or val document's text is in
    train or in the other held-out split (documents are de-duplicated by the sources). Eval takes the first
    documents of the shuffled order and val the next ones, so the eval split does not depend on
    ``val_fraction``: val comes out of what was train. Raises ``ValueError`` naming the domain when fewer
    than one document would be left for train.
    """
    n = len(docs)
    n_eval = max(min_eval_docs, round(eval_fraction * n))
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_eval - n_val < 1:
        raise ValueError(
            f"data.domains.{domain}: only {n} documents, too few to hold out {n_eval} for eval and {n_val} for "
            f"val and keep one for train (eval_fraction={eval_fraction}, min_eval_docs={min_eval_docs}, "
            f"val_fraction={val_fraction})"
        )
    order = list(range(n))
    random.Random(f"split-{seed}-{domain}").shuffle(order)
    cut = n_eval + n_val
    return DocSplit(
        train=[docs[i] for i in order[cut:]],
        val=[docs[i] for i in order[n_eval:cut]],
        eval=[docs[i] for i in order[:n_eval]],
    )


def mix_targets(available: dict[str, int], mixing: str, weights: dict[str, float]) -> dict[str, int]:
    """Train tokens to keep per domain.

    ``balanced``: every domain gets as many tokens as the smallest has. ``weighted``: tokens in proportion
    to ``weights``, as many as the scarcest domain (relative to its weight) allows. ``natural``: all.
    """
    if mixing == "natural":
        return dict(available)
    w = {d: 1.0 for d in available} if mixing == "balanced" else {d: float(weights[d]) for d in available}
    total_w = sum(w.values())
    share = {d: w[d] / total_w for d in available}
    scale = min(available[d] / share[d] for d in available)
    return {d: min(available[d], int(share[d] * scale)) for d in available}


def truncate_to_budget(docs_ids: Sequence[np.ndarray], budget: int) -> list[np.ndarray]:
    """Documents in order until ``budget`` tokens are taken; the last one is cut to fit exactly."""
    out, left = [], budget
    for ids in docs_ids:
        if left <= 0:
            break
        out.append(ids[:left])
        left -= len(out[-1])
    return out


def pack_documents(
    docs: Sequence[tuple[np.ndarray, int]], seq_len: int, pad_id: int, cross_documents: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack (token ids, domain id) documents into blocks; returns (ids_BS, mask_BS, dom_BS).

    With ``cross_documents`` the documents are concatenated in order and cut every ``seq_len`` tokens;
    otherwise every document starts a new block. The last block of a stream or document is padded.
    """
    if cross_documents:
        streams = [
            (
                np.concatenate([ids for ids, _ in docs]) if docs else np.zeros(0, np.int64),
                np.concatenate([np.full(len(ids), d, np.int64) for ids, d in docs])
                if docs
                else np.zeros(0, np.int64),
            )
        ]
    else:
        streams = [(ids, np.full(len(ids), d, np.int64)) for ids, d in docs]
    ids_blocks, dom_blocks, mask_blocks = [], [], []
    for stream_ids, stream_dom in streams:
        n_blocks = -(-len(stream_ids) // seq_len)
        if n_blocks == 0:
            continue
        pad = n_blocks * seq_len - len(stream_ids)
        ids_blocks.append(
            np.concatenate([stream_ids, np.full(pad, pad_id, np.int64)]).reshape(n_blocks, seq_len)
        )
        dom_blocks.append(np.concatenate([stream_dom, np.full(pad, -1, np.int64)]).reshape(n_blocks, seq_len))
        mask = np.ones(n_blocks * seq_len, np.int64)
        mask[len(stream_ids) :] = 0
        mask_blocks.append(mask.reshape(n_blocks, seq_len))
    if not ids_blocks:
        empty = np.zeros((0, seq_len), np.int64)
        return empty, empty.copy(), empty.copy()
    return np.concatenate(ids_blocks), np.concatenate(mask_blocks), np.concatenate(dom_blocks)


def pack_split(
    docs_by_domain: Sequence[Sequence[np.ndarray]],
    seq_len: int,
    pad_id: int,
    cross_documents: bool,
    cross_domains: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack every domain's documents (token ids with EOS, index = domain id) into one set of blocks.

    Without ``cross_domains`` each domain is packed on its own, so no block holds two domains; with it
    the documents of all domains are interleaved in a seeded order and packed as one stream.
    """
    if cross_domains:
        docs = [(ids, d) for d, domain_docs in enumerate(docs_by_domain) for ids in domain_docs]
        random.Random(f"interleave-{seed}").shuffle(docs)
        return pack_documents(docs, seq_len, pad_id, cross_documents)
    parts = [
        pack_documents([(ids, d) for ids in domain_docs], seq_len, pad_id, cross_documents)
        for d, domain_docs in enumerate(docs_by_domain)
    ]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def block_stats(
    mask_BS: np.ndarray, dom_BS: np.ndarray, domains: Sequence[str], documents: Sequence[int]
) -> dict[str, dict[str, int]]:
    """Per domain: documents, real tokens and blocks holding at least one of its tokens."""
    out = {}
    for d, name in enumerate(domains):
        is_d = (dom_BS == d) & (mask_BS == 1)
        out[name] = {
            "documents": int(documents[d]),
            "tokens": int(is_d.sum()),
            "blocks": int(is_d.any(axis=1).sum()) if len(is_d) else 0,
        }
    return out

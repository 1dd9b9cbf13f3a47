"""Pipeline steps: document-level split, token budgets for mixing, and packing with per-token domain ids.

Shapes (legend: docs/architecture.md): B packed rows (blocks) of S = ``seq_len`` positions; packed arrays
are ``ids_BS`` (token ids), ``mask_BS`` (1 = real token, 0 = padding) and ``dom_BS`` (domain id per token,
-1 on padding).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


def split_documents(
    docs: Sequence[str], eval_fraction: float, min_eval_docs: int, seed: int, domain: str
) -> tuple[list[str], list[str]]:
    """Shuffle one domain's documents with the seed and hold out ``max(min_eval_docs, eval_fraction * n)``.

    The split is by whole documents, before tokenising or packing, so no eval document's text is in train
    (documents are de-duplicated by the sources). Returns (train_docs, eval_docs), both in shuffled order.
    """
    n = len(docs)
    n_eval = max(min_eval_docs, round(eval_fraction * n))
    if n - n_eval < 1:
        raise ValueError(
            f"data.domains.{domain}: only {n} documents, too few to hold out {n_eval} for eval and keep one "
            f"for train (eval_fraction={eval_fraction}, min_eval_docs={min_eval_docs})"
        )
    order = list(range(n))
    random.Random(f"split-{seed}-{domain}").shuffle(order)
    return [docs[i] for i in order[n_eval:]], [docs[i] for i in order[:n_eval]]


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

"""The blocks an evaluation reads, and how they are split over data-parallel processes.

Which blocks: every block of one corpus split (``eval.split``: ``val``, or ``eval`` = the test split), or,
with ``eval.max_blocks = N``, the first N of ``numpy.random.default_rng(data.seed).permutation(rows)``, in
corpus order. Nothing else enters: not ``train.seed``, the batch size or the number of processes, so every
run, seed and world size evaluates the same blocks. ``EvalBlocks.fingerprint`` names them: the first 16 hex
digits of the sha256 of the block indices (int64) followed by the blocks' ``input_ids`` and
``attention_mask`` (int64, row-major), logged with every eval record (``<split>/blocks_fingerprint``).

How they are split: the rows are cut, in order, into batches of ``batch_size`` (the last one shorter), the
same batches for any number of processes; batch ``i`` goes to process ``i % P``. Each block is evaluated
exactly once, and the per-domain sums (token-weighted: loss sum and token count per domain) are added over
processes, so the result is the 1-process result up to the order of float64 additions. Every process runs
the same number of forward passes, ``ceil(batches / P)``: a process with one batch fewer runs a batch again
whose statistics are not counted, so the collective operations inside a forward (FSDP's all-gathers) stay
matched across processes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalBlocks:
    """The blocks of one evaluation: ``split`` (corpus split name), ``rows`` (sorted row indices into it)
    and their ``fingerprint`` (module docstring)."""

    split: str
    rows: list[int]
    fingerprint: str


def select_rows(num_rows: int, max_blocks: int | None, seed: int) -> list[int]:
    """Sorted row indices: all ``num_rows`` (``max_blocks`` None or 0), else the first ``max_blocks`` of
    the permutation of ``default_rng(seed)`` (all rows when ``max_blocks >= num_rows``)."""
    if not max_blocks or max_blocks >= num_rows:
        return list(range(num_rows))
    return sorted(np.random.default_rng(seed).permutation(num_rows)[:max_blocks].tolist())


def blocks_fingerprint(rows: list[int], input_ids: np.ndarray, attention_mask: np.ndarray) -> str:
    """16 hex digits of sha256(rows, input_ids ``[B, S]``, attention_mask ``[B, S]``), all as int64."""
    h = hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(attention_mask, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def eval_blocks(dataset, split: str, max_blocks: int | None, seed: int) -> EvalBlocks:
    """The ``EvalBlocks`` of a corpus split (a ``datasets.Dataset`` with ``input_ids`` and
    ``attention_mask`` columns). ``ValueError`` naming the split when it has no block."""
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split has no block to evaluate")
    rows = select_rows(len(dataset), max_blocks, seed)
    picked = dataset.select(rows).with_format("numpy")
    ids, mask = (np.asarray(picked[c], dtype=np.int64) for c in ("input_ids", "attention_mask"))
    return EvalBlocks(split, rows, blocks_fingerprint(rows, ids, mask))


def shard_batches(
    rows: list[int], batch_size: int, process_index: int, num_processes: int
) -> list[tuple[list[int], bool]]:
    """This process's forward passes as ``(row indices, counted)``: its batches (module docstring), then,
    if it has one fewer than the busiest process, batch 0 again with ``counted`` False."""
    batches = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    mine = [(b, True) for b in batches[process_index::num_processes]]
    passes = math.ceil(len(batches) / num_processes)
    return mine + [(batches[0], False)] * (passes - len(mine))

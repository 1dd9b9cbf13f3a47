"""Deterministic, resumable order of training blocks, sharded over data-parallel processes.

Epoch e visits the rows in the order ``randperm(num_rows, seed + e)``; every optimizer step takes the next
``batch_size * grad_accum * num_processes`` rows (the tail of an epoch that does not fill a step is
skipped). Row r of the step's slice goes to micro-batch ``r // (batch_size * num_processes)`` and
process ``(r // batch_size) % num_processes``, so the same step sees the same rows whether it runs as
1 x 2B, 2 micro-batches x B or 2 processes x B. The position (epoch, offset) is the whole state.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


class BlockSampler:
    """``next_step() -> [micro-batch row indices for this process] * grad_accum``; checkpointable."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        grad_accum: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
    ) -> None:
        self.step_rows = batch_size * grad_accum * num_processes
        if num_rows < self.step_rows:
            raise ValueError(
                f"the training split has {num_rows} blocks, fewer than one optimizer step needs "
                f"(train.batch_size={batch_size} x train.grad_accum={grad_accum} x {num_processes} processes)"
            )
        self.num_rows, self.batch_size, self.grad_accum = num_rows, batch_size, grad_accum
        self.num_processes, self.process_index, self.seed = num_processes, process_index, seed
        self.epoch, self.offset = 0, 0
        self._perm: tuple[int, list[int]] | None = None

    def _order(self) -> list[int]:
        if self._perm is None or self._perm[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.num_rows, generator=gen).tolist())
        return self._perm[1]

    def next_step(self) -> list[list[int]]:
        if self.offset + self.step_rows > self.num_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        rows = self._order()[self.offset : self.offset + self.step_rows]
        self.offset += self.step_rows
        B, n_proc = self.batch_size, self.num_processes
        micro = []
        for m in range(self.grad_accum):
            start = m * B * n_proc + self.process_index * B
            micro.append(rows[start : start + B])
        return micro

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(
                f"the checkpoint's training split had {state['num_rows']} blocks, this one has "
                f"{self.num_rows}: the data config or data changed since the checkpoint"
            )
        self.epoch, self.offset, self.seed = state["epoch"], state["offset"], state["seed"]


def block_rows(dataset):
    """``dataset`` (a ``datasets.Dataset`` of packed blocks) as ``rows_of`` reads it: arrow format, the block
    columns (``data.corpus.COLUMNS``) only, other columns left out. Raises ValueError naming a missing one."""
    from moe_emergence.data.corpus import COLUMNS

    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset has no {missing} column (packed blocks have {list(COLUMNS)})")
    return dataset.with_format("arrow", columns=list(COLUMNS))


def rows_of(dataset, indices: list[int]) -> dict[str, np.ndarray]:
    """Rows ``indices`` (a list of ints) of a ``datasets.Dataset`` of packed blocks as ``[B, S]`` numpy columns
    (for ``collate_blocks``), B = ``len(indices)``, each in its column's integer type. ``dataset`` in arrow format
    with the block columns only (``block_rows(dataset)``, made once): its gather is one
    pyarrow ``take`` and each column one flat copy, ~0.1 ms for 8 blocks of 512 tokens against ~0.25 ms through
    the numpy format, which builds an array per row (2-core CPU, 2026-12-04; 1.5 -> 1.0 ms a step on the H200
    machine's host). Raises TypeError for a dataset in another format and ValueError naming a column that is
    not a list of numbers or whose rows are missing, hold missing values or differ in length."""
    table = dataset[indices]
    if not isinstance(table, pa.Table):
        raise TypeError(
            f"rows_of: a dataset in arrow format (with_format('arrow')), not {type(table).__name__}"
        )
    return {name: _blocks(table.column(name), len(indices), name) for name in table.column_names}


def _blocks(column: pa.ChunkedArray, rows: int, name: str) -> np.ndarray:
    """A list column of ``rows`` rows as a ``[rows, S]`` numpy array (a copy: writable)."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise ValueError(f"column {name!r} holds {kind}, not rows of token ids (lists of integers)")
    if not (pa.types.is_integer(kind.value_type) or pa.types.is_boolean(kind.value_type)):
        raise ValueError(f"column {name!r} holds {kind}: rows of {kind.value_type}, not of integers")
    if column.null_count:
        raise ValueError(f"column {name!r}: {column.null_count} of the {rows} rows missing (null)")
    flat = pc.list_flatten(column)
    if flat.null_count:
        raise ValueError(f"column {name!r}: {flat.null_count} missing (null) values in its rows")
    if rows == 0:
        return np.zeros((0, 0), dtype=kind.value_type.to_pandas_dtype())
    lengths = pc.min_max(pc.list_value_length(column)).as_py()
    if lengths["min"] != lengths["max"]:
        raise ValueError(
            f"column {name!r}: rows of lengths {lengths['min']} to {lengths['max']}; packed blocks all have one length"
        )
    return flat.to_numpy().reshape(rows, lengths["max"]).copy()

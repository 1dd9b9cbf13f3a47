"""Deterministic, resumable order of training blocks, sharded over data-parallel processes.

Epoch e visits the rows in the order ``randperm(num_rows, seed + e)``; every optimizer step takes the next
``batch_size * grad_accum * num_processes`` rows (the tail of an epoch that does not fill a step is
skipped). Row r of the step's slice goes to micro-batch ``r // (batch_size * num_processes)`` and
process ``(r // batch_size) % num_processes``, so the same step sees the same rows whether it runs as
1 x 2B, 2 micro-batches x B or 2 processes x B. The position (epoch, offset) is the whole state.
``StepBatches`` reads and collates each step's rows, one step ahead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_emergence.data import rows_of


class BlockSampler:
    """``next_step() -> [micro-batch row indices for this process] * grad_accum`` (``peek_step``: the same without
    moving); checkpointable."""

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

    def peek_step(self) -> list[list[int]]:
        """What ``next_step`` will return, without moving to it (``StepBatches.read_ahead``)."""
        epoch, offset = self.epoch, self.offset
        try:
            return self.next_step()
        finally:
            self.epoch, self.offset = epoch, offset

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(
                f"the checkpoint's training split had {state['num_rows']} blocks, this one has "
                f"{self.num_rows}: the data config or data changed since the checkpoint"
            )
        self.epoch, self.offset, self.seed = state["epoch"], state["offset"], state["seed"]


class StepBatches:
    """Each optimizer step's collated CPU micro-batches: ``sampler``'s rows read from ``table`` (``data.rows_of``)
    and collated (``collate``), one step read ahead on request.

    ``read_ahead()`` reads the next step's rows without moving the sampler (``peek_step``): the trainer calls it
    while the device still runs a step, before the step's host sync, so that the reading (~1.3 ms a step on the
    H200 host at the GPT-2-small shape, B = 8 x 512) is not done after the sync, while the device waits for the
    next forward. ``next()`` moves the sampler and returns the batches read ahead when they are that step's rows
    (a sampler moved since, e.g. by a resume, is read anew)."""

    def __init__(self, sampler: BlockSampler, table, collate: Callable[[dict], dict]) -> None:
        self.sampler, self.table, self.collate = sampler, table, collate
        self._ahead: tuple[list[list[int]], list[dict]] | None = None  # (rows, their batches)

    def _read(self, rows: list[list[int]]) -> list[dict]:
        return [self.collate(rows_of(self.table, r)) for r in rows]

    def next(self) -> list[dict]:
        rows = self.sampler.next_step()
        ahead, self._ahead = self._ahead, None
        return ahead[1] if ahead is not None and ahead[0] == rows else self._read(rows)

    def read_ahead(self) -> None:
        rows = self.sampler.peek_step()
        self._ahead = (rows, self._read(rows))

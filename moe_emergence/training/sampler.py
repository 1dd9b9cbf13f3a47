"""Deterministic, resumable order of training blocks, sharded over data-parallel processes.

Epoch e visits the rows in the order ``randperm(num_rows, seed + e)``; every optimizer step takes the next
``batch_size * grad_accum * num_processes`` rows (the tail of an epoch that does not fill a step is
skipped). Row r of the step's slice goes to micro-batch ``r // (batch_size * num_processes)`` and
process ``(r // batch_size) % num_processes``, so the same step sees the same rows whether it runs as
1 x 2B, 2 micro-batches x B or 2 processes x B. The position (epoch, offset) is the whole state.
"""

from __future__ import annotations

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

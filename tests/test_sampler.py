"""The sampler's look at the next step (``BlockSampler.peek_step``) and the step batches read one step ahead
(``StepBatches``): the same rows and tensors as reading each step when it comes, the sampler left where it was,
a read made stale by a moved sampler (a resume) never used. The sharding itself: tests/test_distributed.py."""

from __future__ import annotations

import datasets
import torch

from moe_emergence.data import block_rows, collate_blocks
from moe_emergence.training.sampler import BlockSampler, StepBatches


def _table(n: int = 23, positions: int = 5):
    ids = [[10 * r + s for s in range(positions)] for r in range(n)]
    return block_rows(
        datasets.Dataset.from_dict(
            {
                "input_ids": ids,
                "attention_mask": [[1] * positions] * n,
                "domain_ids": [[r % 3] * positions for r in range(n)],
            }
        )
    )


def test_peek_step_is_the_next_step_and_moves_nothing():
    sampler, twin = (BlockSampler(23, batch_size=3, grad_accum=2, seed=4) for _ in range(2))
    for _ in range(9):  # across epoch ends (23 rows: 3 steps of 6 an epoch, 5 rows left out)
        state = sampler.state_dict()
        peeked = sampler.peek_step()
        assert sampler.state_dict() == state
        assert peeked == sampler.next_step() == twin.next_step()


def test_batches_read_ahead_are_the_steps_own_and_read_once():
    table, reads = _table(), []

    def collate(rows):
        reads.append(rows["input_ids"][:, 0].tolist())
        return collate_blocks(rows)

    ahead = StepBatches(BlockSampler(23, batch_size=3, grad_accum=2, seed=1), table, collate)
    plain = StepBatches(BlockSampler(23, batch_size=3, grad_accum=2, seed=1), table, collate_blocks)
    for step in range(7):
        if step % 3 != 2:  # some steps were read ahead, some not
            ahead.read_ahead()
        n = len(reads)
        got, want = ahead.next(), plain.next()
        assert len(reads) == n + (2 if step % 3 == 2 else 0)  # read at next() only where not ahead
        assert len(got) == len(want) == 2
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_moved_sampler_is_read_anew():
    table = _table()
    sampler = BlockSampler(23, batch_size=3, grad_accum=1, seed=2)
    batches = StepBatches(sampler, table, collate_blocks)
    batches.read_ahead()
    sampler.load_state_dict({"epoch": 5, "offset": 6, "num_rows": 23, "seed": 2})  # as a resume does
    expected = BlockSampler(23, batch_size=3, grad_accum=1, seed=2)
    expected.load_state_dict({"epoch": 5, "offset": 6, "num_rows": 23, "seed": 2})
    rows = expected.next_step()[0]
    got = batches.next()[0]["input_ids"][:, 0]
    assert got.tolist() == [10 * r for r in rows]

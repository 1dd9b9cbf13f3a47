"""The eval set is fixed by the data alone: the same blocks for every train.seed and world size, each block
counted once across processes, named by a stable fingerprint (``training/evalset.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import test_training_run
from test_training_run import make_cfg

from moe_emergence.errors import ConfigError
from moe_emergence.telemetry import read_metrics
from moe_emergence.training.config import config_from_dict
from moe_emergence.training.evalset import blocks_fingerprint, select_rows, shard_batches
from moe_emergence.training.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """One corpus cache for the module (``make_cfg`` reads it from test_training_run)."""
    test_training_run.CACHE = tmp_path_factory.mktemp("data_cache")


def test_subset_depends_on_the_data_seed_only():
    assert select_rows(10, None, 0) == select_rows(10, 0, 5) == select_rows(10, 10, 1) == list(range(10))
    a = select_rows(100, 12, seed=0)
    assert len(a) == 12 == len(set(a)) and a == sorted(a) and a == select_rows(100, 12, seed=0)
    assert select_rows(100, 12, seed=1) != a  # another data.seed, another subset
    assert set(select_rows(100, 6, seed=0)) <= set(a)  # the first N of one permutation


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_block_counts_once_with_as_many_passes_per_process(rows, batch_size):
    order = list(range(100, 100 + rows))
    one = shard_batches(order, batch_size, 0, 1)
    assert all(counted for _, counted in one) and [r for b, _ in one for r in b] == order
    for procs in (2, 3, 4):
        shards = [shard_batches(order, batch_size, p, procs) for p in range(procs)]
        counted = [b for shard in shards for b, c in shard if c]
        assert sorted(r for b in counted for r in b) == order  # no block dropped or counted twice
        assert sorted(map(tuple, counted)) == sorted(tuple(b) for b, _ in one)  # the 1-process batches
        assert len({len(shard) for shard in shards}) == 1  # every process runs the same forwards


def test_fingerprint_is_stable_and_names_indices_and_contents():
    ids, mask = np.arange(6).reshape(2, 3), np.ones((2, 3), dtype=int)
    fp = blocks_fingerprint([4, 9], ids, mask)
    assert fp == "6488d1d2d6287a20" and len(fp) == 16  # a stable format: records stay comparable
    assert blocks_fingerprint([4, 10], ids, mask) != fp
    assert blocks_fingerprint([4, 9], ids + 1, mask) != fp
    assert blocks_fingerprint([4, 9], ids, mask * 0) != fp


def test_train_seeds_evaluate_the_same_blocks(tmp_path):
    """Two train seeds (and a run with max_blocks) log the same fingerprint at every eval; the blocks come
    from data.seed alone."""
    fingerprints, rows = [], []
    for seed in (0, 1):
        cfg = make_cfg(tmp_path, f"s{seed}", "model.moe=null", "train.steps=3", f"train.seed={seed}")
        cfg.eval.max_blocks = 7
        trainer = Trainer(cfg)
        rows.append(trainer.eval_sets["val"].rows)
        trainer.train()
        records = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val/lm_loss" in r]
        assert [r["step"] for r in records] == [0, 3]
        fingerprints.append({r["val/blocks_fingerprint"] for r in records})
    assert rows[0] == rows[1] and len(rows[0]) == 7
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 1
    other = Trainer(
        make_cfg(tmp_path, "d1", "model.moe=null", "train.steps=3", "eval.max_blocks=7", "data.seed=1")
    )
    assert other.eval_sets["val"].fingerprint not in fingerprints[0]  # data.seed picks (and splits) the data
    other.folder.release()


def test_final_split_needs_its_split():
    with pytest.raises(ConfigError, match=r"eval\.final_split='val' is invalid: 'eval' or null when"):
        config_from_dict(
            test_training_run.TINY, ["eval.split=eval", "eval.final_split=val", "data.val_fraction=0"]
        )
    cfg = config_from_dict(test_training_run.TINY, ["eval.split=eval", "data.val_fraction=0"])
    assert cfg.eval.splits == ["eval"]  # the old behaviour: the periodic eval on the eval split
    with pytest.raises(ConfigError, match=r"eval\.max_blocks=-1 is invalid: null or 0"):
        config_from_dict(test_training_run.TINY, ["eval.max_blocks=-1"])


def test_resuming_a_run_without_val_split_says_how(tmp_path):
    """A run folder made without a val split (data.val_fraction 0: every run from before it) resumed under
    the new default is refused with the overrides that resume it."""
    old = make_cfg(
        tmp_path, "old", "model.moe=null", "train.steps=4", "train.stop_after=2", "data.val_fraction=0",
        "eval.split=eval",
    )  # fmt: skip
    Trainer(old).train()  # paused at step 2 with a checkpoint
    now = make_cfg(tmp_path, "old", "model.moe=null", "train.steps=4")
    with pytest.raises(
        ConfigError, match=r"data\.val_fraction.*resumes with data\.val_fraction=0 eval\.split=eval"
    ):
        Trainer(now, resume="auto")
    again = make_cfg(
        tmp_path, "old", "model.moe=null", "train.steps=4", "data.val_fraction=0", "eval.split=eval"
    )
    Trainer(again, resume="auto").folder.release()  # the hint's overrides are accepted

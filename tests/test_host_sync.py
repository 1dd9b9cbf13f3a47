"""The trainer's step on a GPU queues its work without waiting for the device, except once: the guard reads
its flags (``StepCheck``, one ``tolist``). Every other host sync, a blocking copy of the batch from pageable
memory included, would stall the host behind the previous step's optimizer and snapshot kernels (issue 20
item 5: no host syncs from telemetry on steps that do not log)."""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch
from test_training_run import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA host syncs need a GPU")


def _syncs(fn) -> list[str]:
    """Where ``fn`` makes a synchronising CUDA call (``torch.cuda.set_sync_debug_mode``'s warnings): the
    Python stack of each, innermost call last."""
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):  # not the mode's one-time prototype notice
            found.append("".join(traceback.format_stack(limit=8)[:-1]))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


@pytest.mark.parametrize(
    "backend,grad_accum,graphs", [("grouped_mm", 1, "auto"), ("triton", 2, "auto"), ("triton", 2, "layers")]
)
def test_a_step_that_does_not_log_syncs_the_host_once(tmp_path, backend, grad_accum, graphs):
    """(Not the eager backend: it reads its per-expert row counts on the host, a sync per layer.) ``auto``:
    the whole model from CUDA graphs; ``layers``: each MoE layer."""
    from tqdm import tqdm

    from moe_emergence.training.config import config_from_dict
    from moe_emergence.training.loop import RunLoop
    from moe_emergence.training.trainer import Trainer

    overrides = [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "log.run_name=sync"]
    overrides += ["train.steps=20", f"train.grad_accum={grad_accum}", "model.upcycle_at_step=0"]
    overrides += ["log.every=10", "log.router_every=10", "eval.every=0", "checkpoint.every=0"]
    overrides += [f"model.moe.backend={backend}", f"train.cuda_graphs={graphs}"]
    trainer = Trainer(config_from_dict(TINY, overrides))
    assert (trainer.cuda_graphs == "model") == (graphs == "auto")
    try:
        loop = RunLoop(trainer, signals=None)
        bar = tqdm(disable=True)
        for _ in range(3):  # warm-up: upcycle, autotuning, CUDA-graph captures, lazy initialisation
            loop._one_step(bar, refreeze=lambda: None)
        assert trainer.moe and trainer.state.step == 3
        syncs = _syncs(lambda: loop._one_step(bar, refreeze=lambda: None))
        assert len(syncs) == 1, "\n\n".join(syncs)  # the guard's read of the step's flags
        assert "tolist" in syncs[0], syncs[0]
        assert trainer.state.step == 4 and trainer.state.last_applied
    finally:
        trainer.folder.release()

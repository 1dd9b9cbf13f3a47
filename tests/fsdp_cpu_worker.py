"""Worker of ``test_distributed.py::test_fsdp2_step_on_cpu`` (run under torchrun, 2 gloo processes): the real
``Trainer`` on FSDP2-sharded parameters (DTensors).

accelerate reports ``MULTI_CPU`` on CPU processes and never applies FSDP there, so this worker replaces the
trainer's one wrapping seam (``Trainer._wrap``) by what accelerate's FSDP2 plugin does on GPUs:
``fully_shard`` on every GPT-2 block, then on the root (``FSDP_WRAP=root``: the root only, one unit). Everything else (the step's loss terms, gradient
clipping, the guard's flags and rollback snapshot, telemetry with expert divergence, evaluation, the
upcycle mid-run) is the trainer's own code. Checkpoints of a self-sharded CPU model are not accelerate's
FSDP checkpoints, so saves only run the guard's pre-save check here (GPU: scripts/gpu_scaling.sh).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_cpu_worker.py CONFIG OUT_JSON [key=value ...]
"""

from __future__ import annotations

import json
import os
import sys

from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moe_emergence.training.config import load_config
from moe_emergence.training.optim import build_optimizer
from moe_emergence.training.trainer import Trainer


def _wrap(self, model, optimizer):
    if os.environ.get("FSDP_WRAP", "block") == "block":  # configs/accelerate/fsdp_per_block.yaml
        for block in model.transformer.h:
            fully_shard(block)
    fully_shard(model)  # the root: the one unit of configs/accelerate/fsdp.yaml (FSDP_WRAP=root)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # fully_shard replaced the parameters: the optimizer is built again over the DTensors (accelerate's
    # FSDP2 preparation switches the optimizer's parameters the same way)
    return model, build_optimizer(model, self.cfg.optim)


def _save_checkpoint(self):
    assert self.verified.good_for_saving(
        self.accelerator.device, print, self.state.step
    )  # all-reduced, DTensors


def main(argv: list[str]) -> None:
    config, out, *overrides = argv
    Trainer._wrap = _wrap
    Trainer.save_checkpoint = _save_checkpoint
    Trainer.save_final = lambda self: None
    trainer = Trainer(load_config(config, overrides))
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.model.reshard()  # the root unit keeps its parameters gathered after a forward without backward
        sharded = [n for n, p in trainer.model.named_parameters() if isinstance(p, DTensor)]
        with open(out, "w") as f:
            json.dump({"step": result.step, "stopped": result.stopped, "sharded": len(sharded)}, f)


if __name__ == "__main__":
    main(sys.argv[1:])

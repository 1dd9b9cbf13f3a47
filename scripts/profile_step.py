"""Where one optimizer step's time goes, per process: ``[accelerate launch ...] scripts/profile_step.py OUT.json
[--config FILE] [--warmup N] [--steps M] [key=value ...]``.

Builds the run's ``Trainer`` in its run folder ``output_dir/log.run_name``, which must be missing or empty:
the profile is a scratch run, whose files are removed at the end (also after Ctrl-C or SIGTERM), and wandb is
off. ``train.steps`` is the config's (its learning-rate schedule), raised to
``--warmup + --steps x --repeat`` when smaller. Runs ``--warmup`` steps, upcycling when
``model.upcycle_at_step`` is reached as training does (a later upcycle step profiles the dense phase, and says
so), then profiles ``--steps`` optimizer steps with ``torch.profiler`` (CUDA) and writes, per process, the
mean per step (ms). As in the training loop, the steps run with the objects made before them frozen from the
garbage collector (``loop.long_lived_frozen``; frozen again after the warm-up and its upcycle):

    wall        the step as the host sees it (CUDA synchronised at both ends)
    compute     device time of the kernels that are not collectives
    collective  device time of NCCL kernels (all-gather, reduce-scatter, all-reduce), by kind
    exposed     wall - compute: time the GPU's compute stream waited (host overhead, collectives not
                hidden behind compute)

With ``--no-profiler`` the steps run without ``torch.profiler`` (which adds host time of its own): only
``wall`` is measured, plus, with ``--time-snapshot``, the guard's snapshot ``take()`` per call: ``snapshot_walk``
(the lookup of the live parameter and optimizer-state tensors) and ``snapshot_copy`` (the copy, CUDA
synchronised before and after, so these runs' walls are not comparable with plain ones). ``--repeat N`` times
``--steps`` steps N times in a row in the same process: ``wall_ms`` is their median, ``wall_ms_windows`` each.

Under the profiler the record also holds ``host_<phase>_ms``: the host (CPU) time per step spent inside each
phase of ``Trainer.train_step`` (``rows``: reading the step's rows, ``collate``, ``to_device``: the batch's
copies, ``forward``, ``loss``, ``backward`` (of micro-batches run directly), ``graph``: the step graph's replay of a
micro-batch's forward, loss and backward (``train.cuda_graphs=model``), ``walk``: listing the parameters,
``clip_grad_norm``, ``nonfinite``, ``guard_vector``, ``reduce_sum``, ``snapshot``, ``optimizer``, ``zero_grad``;
this script wraps those calls in
``torch.profiler.record_function``, the trainer is unchanged; times are inclusive and may nest, e.g.
``reduce_sum`` also runs inside ``clip_grad_norm``, so do not add them up) and in FSDP2's own ranges (``FSDP::...``);
``--top N`` prints each process's N operators with the most host (self CPU) time.

``--host-phases`` (with ``--no-profiler``, not with ``--bare``) measures the same ``host_<phase>_ms`` with a
``time.perf_counter`` around each of those calls instead of the profiler, which records every operator and
inflates host time (~1.6x on the GPT-2-small MoE step, H200 host): on a step bound by the host, these are the
costs that add up to the wall.

``--trace DIR`` writes each process's profiled steps as a Chrome trace (``DIR/rank<r>.json``: open in
Perfetto or chrome://tracing) to see, rank beside rank, where a step waits.

``--bare`` (with ``--no-profiler``) sets the trainer beside the benchmark's loop (issue 20 item 5) in one
process: each of the ``--repeat`` rounds times ``--steps`` trainer steps and ``--steps`` bare steps, the order
alternating. A bare step is ``scripts/bench_moe.py``'s training step on the trainer's own model, optimizer
(the torch AdamW inside accelerate's wrapper) and one fixed batch of its training data: forward with labels
under the run's autocast, backward, ``optimizer.step()``, ``zero_grad`` (no guard, clip, snapshot or
telemetry); forward and backward from a CUDA graph of the whole model (a ``ModelGraph``) where the trainer
has a step graph (``train.cuda_graphs=model``), as bench_moe's "graphed" models. The record adds ``bare_wall_ms`` (median),
``bare_wall_ms_windows`` (with ``--repeat`` > 1, as ``wall_ms_windows``), ``tokens_per_s`` and
``bare_tokens_per_s`` (this process's tokens, from the medians), ``vs_bare_rounds``: each round's trainer tokens/s over its bare tokens/s (the two windows of a round run back to
back, so the host's drift, 40% and more between windows of one process on the H200 machines, largely cancels), and
``vs_bare``: their median (bench_moe's end-to-end rows take the same median of interleaved rounds). The bare
steps train the model too.

On a GPU the record also holds ``peak_allocated_gib`` (``torch.cuda.max_memory_allocated``: the process's peak
since its start, warm-up, CUDA-graph captures and bare steps included) and ``reserved_gib`` (what the caching
allocator holds at the end, graph pools included); ``timed_cuda_graph_captures``: captures during the timed
steps (a new batch shape or setting; their time is in the walls).

OUT.json gets ``{"rank": r, "world": P, ...}`` lines, one per process. Needs a GPU, except with
``--no-profiler`` (walls; ``--time-snapshot``, ``--bare`` and ``--host-phases`` too), which also runs on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from moe_emergence.console import ArgumentParser, check_output_file, stopped_by, stops_as_interrupt
from moe_emergence.errors import ConfigError, run_cli


def _kernel_times(prof) -> dict[str, float]:
    """Device time (ms) of the kernels summed over the profiled steps: ``compute`` and one key per NCCL
    collective kind (CPU-side ops are left out: they would count their kernels a second time)."""
    out: dict[str, float] = defaultdict(float)
    kinds = ("allgather", "reducescatter", "allreduce", "broadcast")
    for evt in prof.key_averages():
        if evt.device_type.name != "CUDA":
            continue
        t = getattr(evt, "device_time_total", 0.0) / 1000.0
        name = evt.key.lower()
        if "nccl" in name:
            out["collective_" + next((k for k in kinds if k in name), "other")] += t
        elif not name.startswith(("memcpy", "memset")):
            out["compute"] += t
    return out


@contextlib.contextmanager
def _time_snapshot():
    """Inside the block ``rollback.Snapshot.take`` sums its walk and copy times (ms) into the dict yielded."""
    from moe_emergence.training import rollback

    sums = {"snapshot_walk": 0.0, "snapshot_copy": 0.0, "calls": 0}
    take = rollback.Snapshot.take

    def timed(self, tensors=None):
        _sync()
        t0 = time.perf_counter()
        self._live_state(tensors)  # the lookup of the live tensors (cached while they stay in place)
        t1 = time.perf_counter()
        take(self, tensors)
        _sync()
        sums["snapshot_walk"] += (t1 - t0) * 1000.0
        sums["snapshot_copy"] += (time.perf_counter() - t1) * 1000.0
        sums["calls"] += 1

    with _patched(rollback.Snapshot, "take", timed):
        yield sums


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bare_step(trainer, batch: dict[str, torch.Tensor], graph=None) -> None:
    """One step of the benchmark's loop (``bench_moe.train_step``) on the trainer's model and torch optimizer;
    with ``graph`` (a ``ModelGraph`` of its own, where the trainer has a step graph: ``train.cuda_graphs=model``)
    its forward and backward replayed from it, as bench_moe's "graphed" models run. The trainer's ``.grad``
    tensors (zeros between its steps) are set aside meanwhile and put back: its step graph adds into them."""
    from moe_emergence.training.rollback import inner_optimizer

    params = list(trainer.model.parameters())
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    device = trainer.accelerator.device  # the precision accelerate resolved (train.mixed_precision=auto too)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.accelerator.mixed_precision)
    torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if graph is None:
            loss = trainer.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        else:
            layers = trainer.unwrapped.config.moe_layers if trainer.moe else []
            loss = graph(trainer.model, batch["input_ids"], batch["labels"], layers).loss
    loss.backward()
    opt = inner_optimizer(trainer.optimizer)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for p, g in zip(params, kept, strict=True):
        p.grad = g


def _timed_windows(steps: int, repeat: int, trainer_step, bare_step) -> tuple[list[float], list[float]]:
    """ms per step of ``repeat`` windows of ``steps`` trainer steps and (``bare_step`` not None) as many bare
    steps, the order alternating each round."""
    walls: list[float] = []
    bare: list[float] = []
    for r in range(repeat):
        order = [(trainer_step, walls), (bare_step, bare)] if bare_step else [(trainer_step, walls)]
        for step, out in order if r % 2 == 0 else order[::-1]:
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync()
            out.append((time.perf_counter() - t0) * 1000.0 / steps)
    return walls, bare


def _measure(
    trainer, args, refreeze, host: dict[str, float]
) -> tuple[list[float], list[float], object, dict | None, int | None]:
    """Warm up, then time (and profile) the steps: (trainer walls, bare walls, profiler or None, snapshot
    times or None, CUDA-graph captures during the timed steps or None for a dense model), walls in ms per
    step; with ``--host-phases`` the phases' host seconds are summed into
    ``host``. ``refreeze``: ``loop.long_lived_frozen``'s, called after the warm-up (and its upcycle), as the
    loop does after an upcycle."""
    from moe_emergence.data import rows_of
    from moe_emergence.training import model_setup

    for _ in range(args.warmup):
        trainer.upcycle_if_due()
        trainer.train_step(None)
    trainer.upcycle_if_due()
    refreeze()
    if trainer.cfg.model.moe is not None and not trainer.moe:
        trainer.accelerator.print(
            f"profile_step: the dense phase (model.upcycle_at_step={trainer.cfg.model.upcycle_at_step} "
            f"> --warmup {args.warmup})"
        )
    bare_step = None
    if args.bare:
        rows = list(range(trainer.cfg.train.batch_size))
        batch = {
            k: v.to(trainer.accelerator.device)
            for k, v in trainer.collate(rows_of(trainer.train_rows, rows)).items()
        }
        graph = None
        if trainer.step_graph is not None:
            from moe_emergence.training.model_graph import ModelGraph

            graph = ModelGraph()
        _bare_step(trainer, batch, graph)  # its own warm-up (and capture)
        bare_step = functools.partial(_bare_step, trainer, batch, graph)
    captures = model_setup.graph_captures(trainer.unwrapped, trainer.step_graph) if trainer.moe else None
    with contextlib.ExitStack() as patches:  # the wrappers go again at the end (a later run in this process)
        snapshot = patches.enter_context(_time_snapshot()) if args.time_snapshot else None
        if not args.no_profiler:
            patches.enter_context(
                _annotated_phases(trainer, lambda name: torch.profiler.record_function(f"step:{name}"))
            )
        elif args.host_phases:
            patches.enter_context(_annotated_phases(trainer, functools.partial(_timed, host)))
        _sync()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with (
            contextlib.nullcontext() if args.no_profiler else torch.profiler.profile(activities=acts) as prof
        ):
            walls, bare = _timed_windows(args.steps, args.repeat, lambda: trainer.train_step(None), bare_step)
    if (
        captures is not None
    ):  # a capture among the timed steps (a new batch shape, a setting) is in their walls
        captures = model_setup.graph_captures(trainer.unwrapped, trainer.step_graph) - captures
    return walls, bare, prof, snapshot, captures


@contextlib.contextmanager
def _timed(sums: dict[str, float], name: str):
    """Add the host seconds spent in the block to ``sums[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sums[name] += time.perf_counter() - t0


@contextlib.contextmanager
def _patched(obj, attr: str, value):
    """``obj.attr`` is ``value`` inside the block; afterwards what it was (an attribute of its own, or none: then
    ``obj``'s class provides it again)."""
    own, old = attr in vars(obj), getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if own:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


@contextlib.contextmanager
def _annotated_phases(trainer, scope):
    """Inside the block the calls a step makes (see the module docstring) run in ``scope(phase)`` (the
    profiler's ``record_function("step:<phase>")`` or ``_timed``), on the trainer's current model and optimizer
    (after the upcycle) and in the trainer module."""
    from moe_emergence.training import trainer as trainer_module

    def wrapped(name, fn):
        def call(*args, **kwargs):
            with scope(name):
                return fn(*args, **kwargs)

        return call

    acc = trainer.accelerator
    calls = (
        (trainer.model, "forward", "forward"),
        (acc, "backward", "backward"),
        (trainer_module, "clip_grad_norm_", "clip_grad_norm"),
        (trainer, "reduce_sum", "reduce_sum"),
        (trainer.verified, "before_update", "snapshot"),
        (trainer.verified, "after_update", "snapshot"),
        (trainer.optimizer, "step", "optimizer"),
        (trainer.optimizer, "zero_grad", "zero_grad"),
        (trainer_module, "micro_batch_loss", "loss"),
        (trainer_module, "any_nonfinite", "nonfinite"),
        (trainer_module, "rows_of", "rows"),
        (trainer, "collate", "collate"),
        (trainer_module, "batch_to_device", "to_device"),
        (trainer_module, "params_and_buffers", "walk"),
        (trainer_module, "step_flags", "guard_vector"),
    )
    if trainer.step_graph is not None:  # train.cuda_graphs=model: forward, loss and backward in one replay
        calls += ((trainer, "step_graph", "graph"),)
    with contextlib.ExitStack() as patches:
        for obj, attr, name in calls:
            patches.enter_context(_patched(obj, attr, wrapped(name, getattr(obj, attr))))
        yield


def _host_times(prof, steps: int) -> dict[str, float]:
    """Host time per step (ms) inside each ``step:<phase>`` range and each FSDP2 range."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith(("step:", "FSDP::")):
            out["host_" + evt.key.removeprefix("step:")] += evt.cpu_time_total / 1000.0 / steps
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="JSON lines file to append this process's summary to")
    p.add_argument("--config", default=None)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-profiler", action="store_true", help="wall time only (no torch.profiler)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --no-profiler: time --steps steps this many times in a row",
    )
    p.add_argument("--time-snapshot", action="store_true", help="time the guard snapshot's take()")
    p.add_argument(
        "--host-phases",
        action="store_true",
        help="with --no-profiler: host time per step of each phase, by perf_counter (see above)",
    )
    p.add_argument(
        "--bare",
        action="store_true",
        help="with --no-profiler: also time the benchmark's bare loop (see above)",
    )
    p.add_argument(
        "--trace", default=None, help="also write each process's timeline (Chrome trace) as DIR/rank<r>.json"
    )
    p.add_argument(
        "--top", type=int, default=0, help="print each process's N operators with the most host time"
    )
    p.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")
    args = p.parse_intermixed_args(argv)
    if (args.trace or args.top) and args.no_profiler:
        raise ConfigError("--trace and --top need the profiler: leave out --no-profiler")
    for flag, value, least in (
        ("--top", args.top, 0),
        ("--warmup", args.warmup, 0),
        ("--steps", args.steps, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} {value}: an integer >= {least}")
    if args.repeat < 1 or (args.repeat > 1 and not args.no_profiler):
        raise ConfigError(f"--repeat {args.repeat}: an integer >= 1, above 1 only with --no-profiler")
    if args.bare and (not args.no_profiler or args.time_snapshot):
        raise ConfigError(
            "--bare compares plain walls: add --no-profiler, leave out --time-snapshot (whose CUDA syncs would "
            "count in the trainer's walls alone)"
        )
    if args.host_phases and (args.bare or args.time_snapshot or not args.no_profiler):
        raise ConfigError(
            "--host-phases times the trainer's phases: add --no-profiler, leave out --bare and --time-snapshot "
            "(whose CUDA syncs would count in the snapshot's phase)"
        )
    if not torch.cuda.is_available() and not args.no_profiler:
        raise ConfigError(
            "profile_step.py profiles CUDA kernels: no GPU here (--no-profiler times walls on the CPU)"
        )
    return args


def _load(args: argparse.Namespace):
    """The run's config for a scratch profile (wandb off; ``train.steps`` raised to the steps profiled when
    smaller), after checking that its run folder is free and OUT can be written (nothing written yet)."""
    from moe_emergence.training.config import load_config
    from moe_emergence.training.model_setup import mixed_precision

    needed = args.warmup + args.steps * args.repeat
    overrides = [*args.overrides, "log.wandb=disabled"]
    cfg = load_config(args.config, overrides)
    if cfg.train.steps < needed:
        cfg = load_config(args.config, [*overrides, f"train.steps={needed}"])
    if args.bare and mixed_precision(cfg.train.mixed_precision, cfg.train.cpu) == "fp16":
        raise ConfigError(
            "--bare: train.mixed_precision=fp16 needs loss scaling, which the bare loop has not"
        )
    run_dir, out = cfg.run_dir, Path(args.out)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        what = "is a file" if not run_dir.is_dir() else "is not empty"
        raise ConfigError(
            f"run folder {str(run_dir)!r} {what}: the profile is a scratch run in a missing or empty folder "
            "(removed again at the end); choose another log.run_name or output_dir"
        )
    for name, path in (("OUT", out), ("--trace", args.trace)):
        if path is not None and Path(path).resolve().is_relative_to(run_dir.resolve()):
            raise ConfigError(
                f"{name} {str(path)!r} lies in the run folder {str(run_dir)!r}, removed at the end"
            )
    check_output_file(out, "OUT", "a JSON lines file")
    return cfg


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    from moe_emergence.training.loop import long_lived_frozen
    from moe_emergence.training.trainer import Trainer

    cfg = _load(args)
    host: dict[str, float] = defaultdict(float)  # --host-phases: seconds per phase over all timed steps
    with stops_as_interrupt():  # so that a killed profile still removes its scratch run
        trainer = Trainer(cfg)
        try:
            with long_lived_frozen() as refreeze:  # as the training loop runs its steps
                walls, bare, prof, snapshot, timed_captures = _measure(trainer, args, refreeze, host)
        finally:
            trainer.folder.abort()  # scratch: remove what this profile wrote (never anything else)
    per_step = {} if prof is None else {k: v / args.steps for k, v in _kernel_times(prof).items()}
    if prof is not None:
        per_step |= _host_times(prof, args.steps)
        if args.top:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
            print(f"rank {trainer.accelerator.process_index}: top {args.top} operators by host time\n{table}")
    if args.trace and prof is not None:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"rank{trainer.accelerator.process_index}.json"))
    per_step |= {f"host_{k}": v * 1000.0 / (args.steps * args.repeat) for k, v in host.items()}
    if snapshot is not None:
        per_step |= {k: v / max(snapshot["calls"], 1) for k, v in snapshot.items() if k != "calls"}
    acc = trainer.accelerator
    record = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "moe": trainer.moe,
        "wall_ms": statistics.median(walls),
        **({"wall_ms_windows": walls} if args.repeat > 1 else {}),
        **{f"{k}_ms": v for k, v in sorted(per_step.items())},
        **({} if timed_captures is None else {"timed_cuda_graph_captures": timed_captures}),
    }
    if torch.cuda.is_available():  # the process's peak since its start (warm-up, captures and bare steps too)
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    if prof is not None:
        record["exposed_ms"] = record["wall_ms"] - record.get("compute_ms", 0.0)
    if bare:
        t, bare_ms = cfg.train, statistics.median(bare)
        tokens = t.batch_size * cfg.data.seq_len
        record |= {
            "bare_wall_ms": bare_ms,
            **({"bare_wall_ms_windows": bare} if args.repeat > 1 else {}),
            "tokens_per_s": tokens * t.grad_accum / record["wall_ms"] * 1000.0,
            "bare_tokens_per_s": tokens / bare_ms * 1000.0,
        }
        # per round: trainer tokens/s over bare tokens/s of the windows timed back to back
        rounds = [t.grad_accum * b / w for w, b in zip(walls, bare, strict=True)]
        record |= {"vs_bare_rounds": rounds, "vs_bare": statistics.median(rounds)}
    with Path(args.out).open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``_main``; a user mistake is one ``error:`` line (exit 2); Ctrl-C or SIGTERM one line and 128 + the
    signal's number (130, 143, as scripts/train.py), after the scratch run folder was removed."""
    try:
        return run_cli(_main, argv)
    except KeyboardInterrupt as e:
        return stopped_by("profile_step", e, "nothing it wrote is left")


if __name__ == "__main__":
    sys.exit(main())

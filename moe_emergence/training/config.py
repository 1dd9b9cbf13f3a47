"""Typed run configuration: one dataclass per component, loaded from YAML with dotted overrides.

``load_config(path, overrides)`` reads a YAML file (with ``base:`` inheritance), applies ``key=value``
overrides and builds a ``RunConfig``, all through the package's one loader (``moe_emergence.config_loader``:
unknown keys, types, hints); every dataclass checks only its own values in ``__post_init__`` and raises
``ConfigError`` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from moe_emergence.config import MoEConfig
from moe_emergence.config_loader import ConfigError, load, to_dict
from moe_emergence.data import DataConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


CompileBackend = Literal["inductor", "aot_eager", "eager", "cudagraphs"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_BACKENDS, COMPILE_MODES = get_args(CompileBackend), get_args(CompileMode)


MAX_RUN_NAME = 128  # bytes of UTF-8: the lock and .replaced names add to it within the 255-byte limit


def is_plain_name(name: str) -> bool:
    """One path component that names a child of its folder: not empty, ``.``/``..``, absolute or hidden, no
    separator or control character."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_RUN_NAME
        and not name.startswith(".")
        and not name.endswith(".replaced")  # the suffix --overwrite uses while it replaces a run
        and not any(c in name for c in "/\\")
        and all(c.isprintable() for c in name)
        and name.strip() == name
    )


MAX_SEED = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy too)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """``ConfigError`` (a ``ValueError``) ``name=value is invalid: allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def _finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (the loader already refuses those; Python callers may not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


@dataclass
class ModelConfig:
    """Which model is trained.

    base: ``"tiny"`` (a small GPT-2 built from the ``tiny_*`` sizes, tokenizer trained by the data
        pipeline), a hub id (e.g. ``"gpt2"``) or a local checkpoint folder (tokenizer from it).
    upcycle_at_step: optimizer steps of dense training before ``upcycle(model, moe)`` (0 = MoE from
        the first step). Ignored when ``moe`` is null.
    dropout: GPT-2's resid/embd/attn dropout. ``null`` keeps the checkpoint's values (0.0 for ``tiny``);
        a number overrides them for a loaded checkpoint too (the hub ``gpt2`` ships 0.1).
    moe: the MoE layers' options, or null for the dense control (no upcycling at all).
    """

    base: str = "tiny"
    tiny_n_layer: int = 2
    tiny_n_embd: int = 64
    tiny_n_head: int = 2
    tiny_n_positions: int = 256
    dropout: float | None = None
    upcycle_at_step: int = 0
    moe: MoEConfig | None = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        for name in ("tiny_n_layer", "tiny_n_embd", "tiny_n_head", "tiny_n_positions"):
            _check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        _check(
            self.tiny_n_embd % self.tiny_n_head == 0,
            "model.tiny_n_embd",
            self.tiny_n_embd,
            f"a multiple of tiny_n_head={self.tiny_n_head}",
        )
        _check(
            self.dropout is None or (_finite(self.dropout) and 0.0 <= self.dropout < 1.0),
            "model.dropout",
            self.dropout,
            "null or in [0, 1)",
        )
        _check(self.upcycle_at_step >= 0, "model.upcycle_at_step", self.upcycle_at_step, "an integer >= 0")
        _check(bool(self.base), "model.base", self.base, '"tiny", a hub id or a checkpoint folder')


@dataclass
class OptimConfig:
    """AdamW with three parameter groups (decayed weights, no-decay biases/LayerNorms, routers) and a
    linear-warmup cosine schedule down to ``min_lr_ratio * lr``; the router group follows the same
    shape from ``router_lr`` (null = ``lr``) and never decays."""

    lr: float = 3e-4
    router_lr: float | None = None
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        _check(_positive(self.lr), "optim.lr", self.lr, "a number > 0")
        _check(
            self.router_lr is None or _positive(self.router_lr),
            "optim.router_lr",
            self.router_lr,
            "> 0 or null",
        )
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        _check(
            len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        _check(_positive(self.eps), "optim.eps", self.eps, "a number > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(
            _finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            "optim.min_lr_ratio",
            self.min_lr_ratio,
            "a number in [0, 1]",
        )
        _check(
            self.grad_clip is None or _positive(self.grad_clip),
            "optim.grad_clip",
            self.grad_clip,
            "> 0 or null",
        )


@dataclass
class TrainConfig:
    """The loop. ``batch_size`` is per process and micro-batch: one optimizer step sees
    ``batch_size * grad_accum * num_processes`` blocks.

    balance_scope: ``micro`` computes the load-balance fractions f_i per micro-batch and process;
        ``global`` all-reduces them across data-parallel processes before the dot product with P_i.
    mixed_precision: ``auto`` = bf16 on a GPU that supports it, else no.
    cpu: force the CPU even when a GPU is present.
    stop_after: end this invocation (with a checkpoint) after this many optimizer steps without changing
        the schedule, which still runs to ``steps``; continue with ``--resume auto`` (time-sliced jobs).
    compile: ``torch.compile`` the model (dense and, after the upcycle, MoE) with ``compile_backend``, in place
        (``nn.Module.compile``: the parameters, state-dict keys, checkpoints and ``final/`` are those of an
        uncompiled run, so a run may be resumed with compile switched on or off). The first steps (and the
        first eval) include the compilation time.
    compile_backend: the ``torch.compile`` backend: ``inductor`` (generated kernels), ``aot_eager`` (graph
        capture and AOT autograd, no code generation: a quick check), ``eager`` (graph capture only) or
        ``cudagraphs``.
    compile_mode: inductor's mode: ``default``; ``reduce-overhead`` replays each compiled forward and backward
        as a CUDA graph (no per-kernel launch cost: the fast MoE backends have no host syncs, so the MoE model
        is captured whole; +0.1-0.2x tokens/s on the H100, docs/benchmarks.md); ``max-autotune`` (CUDA
        graphs and GEMM autotuning; long compiles) or ``max-autotune-no-cudagraphs``. Other backends take
        only ``default``.
    cuda_graphs: replay the MoE model's training forward and backward, or parts of them, from CUDA graphs when
        the model is not compiled (``kernels/cuda_graph.py``: the same kernels and results, without their
        launch cost). ``model``: each micro-batch's whole step, forward, objective and backward into the
        parameters' ``.grad``, as one graph (``training/step_graph.py``), on one process (micro-batches with
        padding as a signature of their own); ``layers``: each MoE layer whole (router, experts, shared
        expert, dropout); both for token-choice routing without capacity, random
        routing or expert dropout (``layer.whole_layer_graph_unsupported``); ``experts``: each layer's experts
        call alone, for any routing. Each is refused where it cannot run (the CPU, ``train.compile``, FSDP, a
        backend that waits on the device, a routing variant it does not take, and for ``model`` several
        processes: ``model_setup.cuda_graphs_on``); ``auto`` (the default) takes ``model`` where it can, else
        ``experts``, on one process, and says so at start on a GPU; ``none`` never. The dense phase before
        the upcycle runs without graphs.
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    balance_scope: Literal["micro", "global"] = "micro"
    cpu: bool = False
    stop_after: int | None = None
    compile: bool = False
    compile_backend: CompileBackend = "inductor"
    compile_mode: CompileMode = "default"
    cuda_graphs: Literal["auto", "model", "layers", "experts", "none"] = "auto"

    def __post_init__(self) -> None:
        _check(isinstance(self.compile, bool), "train.compile", self.compile, "true or false")
        _check(
            self.compile_backend in COMPILE_BACKENDS,
            "train.compile_backend",
            self.compile_backend,
            f"one of {list(COMPILE_BACKENDS)}",
        )
        _check(
            self.compile_mode in COMPILE_MODES,
            "train.compile_mode",
            self.compile_mode,
            f"one of {list(COMPILE_MODES)}",
        )
        _check(
            self.compile_mode == "default" or self.compile_backend == "inductor",
            "train.compile_mode",
            self.compile_mode,
            f"'default' with train.compile_backend={self.compile_backend!r} (modes are inductor's)",
        )
        _check(
            self.cuda_graphs in ("auto", "model", "layers", "experts", "none"),
            "train.cuda_graphs",
            self.cuda_graphs,
            "auto, model, layers, experts or none",
        )
        _check(
            not (self.compile and self.cuda_graphs in ("model", "layers", "experts")),
            "train.cuda_graphs",
            self.cuda_graphs,
            "'auto' or 'none' with train.compile=true (the compiler captures its own graphs: compile_mode="
            "reduce-overhead)",
        )
        for name in ("steps", "batch_size", "grad_accum"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "an integer >= 1")
        _check(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"an integer in [0, {MAX_SEED}]")
        _check(
            self.stop_after is None or self.stop_after >= 1,
            "train.stop_after",
            self.stop_after,
            ">= 1 or null",
        )


@dataclass
class CollapseConfig:
    """Collapse guard: one expert above ``max_frac`` of a layer's tokens for ``patience`` consecutive
    router checks (every ``log.router_every`` steps) -> warn, or save a checkpoint and stop."""

    max_frac: float = 0.9
    patience: int = 5
    action: Literal["warn", "stop"] = "warn"

    def __post_init__(self) -> None:
        _check(
            _finite(self.max_frac) and 0 < self.max_frac <= 1,
            "collapse.max_frac",
            self.max_frac,
            "a number in (0, 1]",
        )
        _check(self.patience >= 1, "collapse.patience", self.patience, "an integer >= 1")


@dataclass
class GuardConfig:
    """Bad-step guard (``training/guard.py``): a step whose loss, gradients, router logits, aux losses or
    starting weights hold a NaN/Inf, or whose LM loss exceeds ``spike_factor`` x the median of the last
    ``spike_window`` good steps' LM losses, is skipped (no parameter or optimizer-state update; the data and
    the schedule move on) and counted in ``train/skipped_steps``; with ``snapshot_every`` > 0 the model and
    optimizer are also rolled back to the last verified-good state (kept in memory: one extra copy of the
    weights and optimizer moments, refreshed every ``snapshot_every`` good steps). After
    ``max_consecutive_skips`` bad steps in a row the run saves a checkpoint of the verified-good state and
    stops (exit 4), naming the first layer or parameter that went bad."""

    max_consecutive_skips: int = 5
    spike_factor: float | None = 3.0
    spike_window: int = 20
    snapshot_every: int = 1

    def __post_init__(self) -> None:
        _check(
            self.max_consecutive_skips >= 1,
            "guard.max_consecutive_skips",
            self.max_consecutive_skips,
            "an integer >= 1",
        )
        _check(
            self.spike_factor is None or (math.isfinite(self.spike_factor) and self.spike_factor > 1),
            "guard.spike_factor",
            self.spike_factor,
            "a finite number > 1, or null (no spike rule)",
        )
        _check(self.spike_window >= 1, "guard.spike_window", self.spike_window, "an integer >= 1")
        _check(
            self.snapshot_every >= 0,
            "guard.snapshot_every",
            self.snapshot_every,
            "an integer >= 0 (0: no rollback)",
        )


@dataclass
class LogConfig:
    """Logging. ``wandb: auto`` = online when an API key is configured, else offline (``WANDB_MODE`` in
    the environment wins); ``disabled`` never imports wandb. ``run_name`` null = the config file's stem."""

    every: int = 10
    router_every: int = 10
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "moe-emergence"
    run_name: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.every >= 1, "log.every", self.every, "an integer >= 1")
        _check(self.router_every >= 1, "log.router_every", self.router_every, "an integer >= 1")
        _check(
            self.run_name is None or is_plain_name(self.run_name),
            "log.run_name",
            self.run_name,
            f"one plain folder name of at most {MAX_RUN_NAME} bytes (not empty, '.', '..' or absolute, "
            "no '/' or '\\', no leading '.', no '.replaced' ending, no control characters): the run folder "
            "is always output_dir/run_name",
        )


EvalSplit = Literal["val", "eval"]


@dataclass
class EvalConfig:
    """Evaluation of corpus split ``split`` (``val``: the validation split every choice is made on; ``eval``:
    the test split) at step 0, every ``every`` steps (0 = only at 0 and the end) and at the end, and of
    ``final_split`` (null = none; ``eval`` for the final tables) once more at the end. Each reads every block
    of its split, or the first ``max_blocks`` (null or 0 = all) of a permutation seeded by ``data.seed``:
    the same blocks for every ``train.seed`` and number of processes (``training.evalset``).
    ``batch_size``: blocks per forward pass and process (null = ``train.batch_size``)."""

    every: int = 50
    split: EvalSplit = "val"
    final_split: EvalSplit | None = None
    max_blocks: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", self.every, "an integer >= 0")
        _check(
            self.final_split != self.split,
            "eval.final_split",
            self.final_split,
            f"null or a split other than eval.split={self.split!r} (that one is evaluated at the end anyway)",
        )
        _check(
            self.max_blocks is None or self.max_blocks >= 0,
            "eval.max_blocks",
            self.max_blocks,
            "null or 0 (every block of the split) or an integer >= 1",
        )
        _check(
            self.batch_size is None or self.batch_size >= 1,
            "eval.batch_size",
            self.batch_size,
            "null (= train.batch_size) or an integer >= 1",
        )

    @property
    def splits(self) -> list[str]:
        """The corpus splits this run evaluates: ``split``, then ``final_split`` if set."""
        return [self.split] + ([self.final_split] if self.final_split else [])


@dataclass
class CheckpointConfig:
    """``accelerator.save_state`` every ``every`` steps (0 = only at the end); keep the last ``keep``."""

    every: int = 50
    keep: int = 2

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass
class RunConfig:
    """One training run; its folder is ``output_dir / log.run_name``."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        m = self.model
        _check(
            m.moe is None or m.upcycle_at_step < self.train.steps,
            "model.upcycle_at_step",
            m.upcycle_at_step,
            f"an integer < train.steps={self.train.steps} when model.moe is set (the run would never be "
            "upcycled and final/ would be dense); for a dense run set model.moe=null",
        )
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a folder name")
        for key in ("split", "final_split"):
            _check(
                getattr(self.eval, key) != "val" or self.data.val_fraction > 0,
                f"eval.{key}",
                getattr(self.eval, key),
                ("'eval'" if key == "split" else "'eval' or null")
                + " when data.val_fraction=0: there is no val split",
            )

    @property
    def run_dir(self) -> Path:
        name = self.log.run_name
        if name is None:
            raise ValueError("log.run_name is not set")
        if not is_plain_name(name):  # e.g. a config file's stem that starts with '.'
            raise ConfigError(
                f"log.run_name={name!r} is invalid: one plain folder name, e.g. log.run_name=main"
            )
        return Path(self.output_dir) / name

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """``RunConfig`` from a YAML file (default ``configs/quickstart.yaml``) plus ``key=value`` overrides.

    ``log.run_name`` defaults to the file's stem. Raises ``ConfigError`` (a ``ValueError``) naming the
    offending dotted key (and the file and line where the key was written).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = load(RunConfig, path, overrides=overrides or ())
    if cfg.log.run_name is None:
        cfg.log.run_name = path.stem
    return cfg


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """``RunConfig`` from a mapping (e.g. a saved ``config.yaml``) plus overrides; ``ConfigError`` naming the
    offending dotted key."""
    return load(RunConfig, data=data, overrides=overrides or ())


__all__ = [
    "CheckpointConfig",
    "CollapseConfig",
    "ConfigError",
    "EvalConfig",
    "EvalSplit",
    "GuardConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
]

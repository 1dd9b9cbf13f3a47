"""Launching the ``triton`` backend's kernels with less host time per launch than ``kernel[grid](...)``.

An MoE layer's forward and backward launch 11 Triton kernels (13 for top-k > 1), 6 of them autotuned. Uncompiled
(and, under the interpreter, inside the opaque custom ops under ``torch.compile``) each launch pays
``Autotuner.run`` (its key rebuilt from a dict of every argument and the dtype string of each tensor, the arguments
copied into dicts for the config hook) and ``JITFunction.run`` (its specialisation and options turned into a cache
key with ``str``). On the H200 machines' CPUs a row-GEMM launch took ~125 us of host time that way, the compiled
kernel's own launcher call ~20 us and Triton's binder ~21 us (docs/benchmarks.md, issue 20 item 2).

``Launcher(kernel)`` keeps what those recompute:
  - the autotuner's choice, read from the autotuner's own cache under the key it would compute (on a new key
    the autotuner itself tunes and launches);
  - the compiled kernel per (device, config, specialisation), the specialisation from Triton's own binder, so a
    launch reuses a compiled kernel only where ``JITFunction.run`` would (same dtypes, the same 16-byte
    alignment of each pointer, the same integer specialisations, the same constexprs); on a new one
    ``JITFunction.run`` compiles and launches. Triton's knobs (debug, instrumentation) are those of that first
    launch.
A launch on a cached kernel then costs the binder and the launcher call (which encodes the TMA descriptors on
the host each time). Measured in one process, cached against ``kernel[grid]``: a forward+backward of the layer
(T = 8192, E = 8, bf16) 2.72 ms of host time against 3.07 ms for top-1, 3.43 against 3.83 for top-2.
``Launcher`` returns the ``triton.Config`` the launch ran (tile sizes that later kernels depend on), instead of
the autotuner's ``best_config`` attribute.

Under ``torch.compile`` the ops built by ``triton_op`` (below) are traced, not run: their bodies see fake tensors,
and ``Launcher`` hands each launch to ``torch.library.wrap_triton`` with one fixed config (the kernel's
``traced_config``; no autotuning on fake tensors), so Inductor launches the kernels itself, from its generated
code, without this module's Python on the hot path (not where Inductor replays CUDA graphs: ``triton_op``).
On fake tensors outside such a trace (a plain ``FakeTensorMode`` run of the eager path, e.g. to size memory) a
launch does nothing: fake tensors hold no data.
torch's compile caches key a traced op on its kernels' sources (``triton_op`` lists them), not on the Python of
the op bodies or of this module: after editing those, run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` once.

Under ``TRITON_INTERPRET=1`` (no compiled kernels) and on Triton versions whose internals differ from the ones
this reads (``JITFunction.device_caches`` entries of (kernel cache, key cache, target, backend, binder), the
``CompiledKernel.run`` launcher call; checked at import against the lines of ``JITFunction.run`` it reproduces;
read from Triton 3.6 and 3.9) it launches with ``kernel[grid]``, and on the latter says so once (a warning).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

INTERPRET = bool(knobs.runtime.interpret)  # TRITON_INTERPRET as Triton reads it (1, true, on, yes)

# The lines of JITFunction.run that Launcher reproduces (whitespace removed): where a Triton version differs, its
# launches go through kernel[grid]
_RUN_LINES = (
    "kernel_cache,kernel_key_cache,target,backend,binder=self.device_caches[device]",
    "bound_args,specialization,options=binder(*args,**kwargs)",
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())",
)


def _internals_match() -> bool:
    """Whether this Triton's ``JITFunction.run`` binds, caches and launches as ``Launcher`` does (its source holds
    ``_RUN_LINES``: Triton 3.6's and 3.9's do, read from their sources; by a review, 3.4's caches have another
    layout)."""
    try:
        source = "".join(inspect.getsource(JITFunction.run).split())
    except (OSError, TypeError):  # no source to check
        return False
    return all(line in source for line in _RUN_LINES)


CACHED = not INTERPRET and _internals_match()
if not INTERPRET and not CACHED:
    warnings.warn(
        f"triton {triton.__version__}: JITFunction.run is not the one moe_emergence's cached launcher reproduces "
        "(it was read from Triton 3.6 and 3.9); the triton backend launches through kernel[grid] (same results, "
        "more host time)",
        stacklevel=2,
    )

_ABSENT = object()  # a key argument left to its default: the autotuner leaves it out of its key


def _jit_type() -> type:
    """What ``@triton.jit`` makes in this process: a ``JITFunction``, or under the interpreter its stand-in."""
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction
    return JITFunction


def triton_op(name: str, impl: Callable, kernels: list, fake: Callable) -> Callable:
    """``impl`` registered as the custom op ``name``, with ``fake`` its fake implementation (shapes and dtypes).

    On the GPU: ``torch.library.triton_op``. ``torch.compile`` traces its body, whose launches ``Launcher`` hands
    to ``wrap_triton``, so Inductor sees and launches the kernels (fixed tiles, pointer loads), except where
    Inductor replays the compiled graphs from CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``:
    ``cudagraphs_requested``). There the traced body calls the op's opaque twin ``name + "_graphed"`` (a
    ``custom_op`` of the same ``impl``; internal: it has no autograd of its own, the op's handles it), which at
    run time launches through ``Launcher`` on real tensors: autotuned tiles and TMA loads. Its host cost, which
    the traced launches save, does not recur on a replay, and its kernels' device time does (docs/benchmarks.md,
    issue 20: 0.90x the compiled dense model's tokens/s opaque against 0.87x traced, GPT-2-small shape, one H200).
    Under ``TRITON_INTERPRET=1``: an opaque ``torch.library.custom_op`` (the interpreter's kernels cannot be
    traced). ``kernels``: every Triton kernel the op's body and its backward launch, for torch's compile caches,
    which key the op on their sources (torch finds a kernel by reading the body for ``wrap_triton(name)``, which
    ``Launcher`` hides)."""
    if INTERPRET:
        op = torch.library.custom_op(name, mutates_args=())(impl)
        op.register_fake(fake)
        return op
    registry = getattr(torch._library.triton, "triton_ops_to_kernels", None)  # torch 2.11 and 2.13 have it
    if registry is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch._library.triton.triton_ops_to_kernels: the triton ops' "
            "kernels cannot be listed for its compile caches (moe_emergence.kernels.triton_launch.triton_op)"
        )
    # internal: called only from the traced body below, under autograd (which the op's registration handles)
    twin = torch.library.custom_op(f"{name}_graphed", mutates_args=())(impl)
    twin.register_fake(fake)

    @functools.wraps(impl)
    def body(*args, **kwargs):
        # the body runs on real tensors (an op called eagerly), in a plain fake run, or traced: only a trace
        # for CUDA graphs takes the twin
        if _tracing() and cudagraphs_requested():
            return twin(*args, **kwargs)
        return impl(*args, **kwargs)

    # the op's schema is inferred from impl's signature, its annotations evaluated in impl's module
    body.__signature__ = inspect.signature(impl, eval_str=True)
    op = torch.library.triton_op(name, body, mutates_args=())
    op.register_fake(fake)
    registry[name] = list(kernels)
    return op


def cudagraphs_requested() -> bool:
    """Does the compile under way ask Inductor to replay its graphs from CUDA graphs? ``torch.compile`` modes
    ``reduce-overhead`` and ``max-autotune`` (or ``options={"triton.cudagraphs": True}``) set
    ``torch._inductor.config.triton.cudagraphs`` while Inductor traces and compiles the graph, the backward's
    included; dynamo's own fake-tensor pass before it sees the setting off. Read while a ``triton_op``'s body is
    traced. A request, not a promise: where Inductor then declines the graphs for a graph (dynamic shapes, CPU
    tensors, mutated inputs; it logs why), the ops run opaque without them, paying their host time at each call;
    the ``cudagraphs`` dynamo backend (no Inductor) does not set it, and the ops are traced there."""
    import torch._inductor.config as inductor_config

    return bool(inductor_config.triton.cudagraphs)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # types that are never fake (see fake_arg)


def fake_arg(first: Any) -> bool:
    """Is ``first`` a fake tensor (an op's body traced by ``torch.compile``, or a fake run)? Asked of a launch's
    first argument (every launch's first argument is a tensor, fake or not alike with the rest) and of the tensors
    a launch may address by TMA. A plain tensor or parameter is not looked into (0.08 us a launch on this
    project's 2-core CPU, where ``is_fake`` on every argument took 20-30 us): ``nn.Parameter`` of a fake tensor is
    that fake tensor, not a ``Parameter``."""
    return type(first) not in _PLAIN and isinstance(first, torch.Tensor) and is_fake(first)


def _tracing() -> bool:
    """Is a trace running (functionalization, or proxy tracing, pre-dispatch included), as opposed to a plain
    fake-tensor run?"""
    functional = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL)
    return functional is not None or get_proxy_mode() is not None


def _fake_run() -> bool:
    """Is a ``FakeTensorMode`` active (fake tensors computed through, no trace recorded)?"""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs) -> triton.Config``: ``kernel[grid](*args, **constexprs)``
    through cached compiled kernels (module docstring). ``kernel``: a ``@triton.jit`` function, or an
    ``@triton.autotune`` over one (TypeError otherwise); ``grid``: a tuple, or a callable of the bound arguments
    (by name, the config's meta-parameters included) as Triton takes it; ``args``: the kernel's arguments before
    its constexprs, positionally; ``constexprs``: the rest by name. Returns the config the launch ran (an empty
    ``triton.Config`` for a kernel without autotune). Where the kernel has pre-run hooks, or Triton a stages
    inspection hook, the launch goes through ``kernel[grid]`` (they change what runs).

    On fake tensors (``torch.compile`` tracing a ``triton_op``'s body) the launch goes to ``wrap_triton`` with
    ``traced_config(args, constexprs)`` (required for an autotuned kernel), whose tile sizes, warps and stages
    the traced graph keeps (it must fit the device: nothing prunes it); a config pre-hook does not run there (the
    caller passes no TMA descriptors)."""

    def __init__(
        self,
        kernel: JITFunction | Autotuner,
        traced_config: Callable[[tuple, dict], triton.Config] | None = None,
    ) -> None:
        self.kernel = kernel
        self.traced_config = traced_config
        self.tuner = kernel if isinstance(kernel, Autotuner) else None
        self.jit: JITFunction = kernel.fn if self.tuner is not None else kernel
        if not isinstance(self.jit, _jit_type()):
            raise TypeError(
                f"Launcher needs a @triton.jit kernel (or an autotune over one), got {type(self.jit)}"
            )
        names = self.jit.arg_names
        self._arg_names = frozenset(names)
        # the autotuner's key arguments and their positions (passed positionally, or by name as constexprs)
        self._key_pos = tuple(
            (k, names.index(k)) for k in (self.tuner.keys if self.tuner is not None else ())
        )
        self._compiled: dict[tuple, Any] = {}
        self._plain = triton.Config({})

    def __call__(self, grid: tuple | Callable, *args: Any, **constexprs: Any) -> triton.Config:
        if args and fake_arg(args[0]):
            return self._wrapped(grid, args, constexprs)
        if not CACHED or self.jit.pre_run_hooks or getattr(knobs.runtime, "add_stages_inspection_hook", None):
            self.kernel[grid](*args, **constexprs)
            return self.tuner.best_config if self.tuner is not None else self._plain
        config = self._config(grid, args, constexprs)
        if config is None:  # a new tuning key: the autotuner tuned and launched
            return self.tuner.best_config
        return self._launch(config, grid, args, constexprs)

    def with_scratch(self, grid: tuple | Callable, *args: Any, **constexprs: Any) -> triton.Config:
        """``self(grid, *args, **constexprs)`` for a kernel that makes tensor descriptors on the device
        (``tl.make_tensor_descriptor``: each takes global scratch memory from Triton's allocator). The allocator,
        torch's caching allocator on ``args[0]``'s device, is set for this launch only: Triton keeps it in a
        ContextVar, which ``triton.set_allocator`` would set for the caller's whole context and which autograd's
        backward threads do not inherit, so it is set in a copy of the context that the launch runs in. In a
        CUDA graph capture the scratch comes from the graph's pool."""

        def launch() -> triton.Config:
            triton.set_allocator(functools.partial(_scratch, args[0].device))
            return self(grid, *args, **constexprs)

        return contextvars.copy_context().run(launch)

    def _wrapped(self, grid, args: tuple, constexprs: dict) -> triton.Config:
        """The launch traced into the graph (``wrap_triton``), with one fixed config for an autotuned kernel
        (``traced_config``: RuntimeError without one); in a plain fake-tensor run, nothing (module docstring),
        returning the first config; RuntimeError for fake tensors outside both (the kernels would be dropped)."""
        if not _tracing():
            if not _fake_run():
                raise RuntimeError(
                    f"Launcher: fake tensors for {self.jit.__name__} outside a trace or fake mode"
                )
            return self.tuner.configs[0] if self.tuner is not None else self._plain
        if self.tuner is None:
            torch.library.wrap_triton(self.jit)[grid](*args, **constexprs)
            return self._plain
        if self.traced_config is None:
            raise RuntimeError(
                f"Launcher: {self.jit.__name__} is autotuned and has no traced_config for tracing"
            )
        config = self.traced_config(args, constexprs)
        torch.library.wrap_triton(self.jit)[grid](
            *args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
        return config

    def _config(self, grid, args: tuple, constexprs: dict) -> triton.Config | None:
        """The config for these arguments, from the autotuner's own cache under its own key (the key arguments'
        values, then the dtype string of each argument that has one); None after the autotuner, meeting a new
        key, has tuned and launched. RuntimeError if the autotuner then stored its choice under another key."""
        if self.tuner is None:
            return self._plain
        if len(self.tuner.configs) == 1:  # as the autotuner: no key, no tuning
            return self.tuner.configs[0]
        passed = (
            args[pos] if pos < len(args) else constexprs.get(name, _ABSENT) for name, pos in self._key_pos
        )
        by_name = (v for k, v in constexprs.items() if k in self._arg_names)
        key = tuple(v for v in passed if v is not _ABSENT) + tuple(
            str(a.dtype) for a in (*args, *by_name) if hasattr(a, "dtype")
        )
        config = self.tuner.cache.get(key)
        if config is None:
            self.kernel[grid](*args, **constexprs)
            if key not in self.tuner.cache:
                raise RuntimeError(
                    f"Launcher: the autotuner of {self.jit.__name__} stored its choice under another key than "
                    f"{key!r} (its keys: {list(self.tuner.cache)!r}); this Triton's Autotuner.run keys differently"
                )
        return config

    def _launch(self, config: triton.Config, grid, args: tuple, constexprs: dict) -> triton.Config:
        """Launch with ``config`` through the compiled kernel cached for these arguments' specialisation (first
        time: through ``JITFunction.run``, which compiles or finds it)."""
        kwargs = {**constexprs, **config.all_kwargs()} if config is not self._plain else constexprs
        if config.pre_hook is not None:  # e.g. the TMA descriptors' boxes follow the tile sizes
            config.pre_hook({**dict(zip(self.jit.arg_names, args, strict=False)), **kwargs})
        device = driver.active.get_current_device()
        bound, specialization, options = self.jit.device_caches[device][4](*args, **kwargs)  # Triton's binder
        key = (
            device, tuple(specialization), tuple(map(type, bound.values())),  # 1 and True are one constexpr else
            tuple(options.items()), knobs.runtime.debug, knobs.compilation.instrumentation_mode,
        )  # fmt: skip
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self.jit.run(*args, grid=grid, warmup=False, **kwargs)
            self._compiled[key] = compiled.result() if hasattr(compiled, "result") else compiled
            return config
        for (name, _), (value, globals_) in self.jit.used_global_vals.items():  # as JITFunction.run checks
            if globals_.get(name, _ABSENT) != value:
                raise RuntimeError(
                    f"Global variable {name} has changed since {self.jit.__name__} was compiled"
                )
        grid = grid(bound) if callable(grid) else grid
        stream = driver.active.get_current_stream(device)
        values = bound.values()
        hooks = knobs.runtime
        compiled.run(
            grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
            compiled.function, compiled.packed_metadata, compiled.launch_metadata(grid, stream, *values),
            hooks.launch_enter_hook, hooks.launch_exit_hook, *values,
        )  # fmt: skip
        return config


def _scratch(device: torch.device, size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's global scratch for one launch (torch's CUDA blocks are 512-byte aligned; ValueError past that)."""
    if alignment > 512:
        raise ValueError(
            f"Triton asked for scratch aligned to {alignment} bytes; torch's blocks align to 512"
        )
    return torch.empty(size, dtype=torch.uint8, device=device)

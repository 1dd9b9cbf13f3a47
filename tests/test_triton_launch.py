"""``kernels.triton_launch.Launcher``: the triton backend's launches through cached compiled kernels give bitwise
the results of ``kernel[grid]``, reuse a compiled kernel only where Triton would (a misaligned view gets its own),
take the autotuner's choice from its own cache under its own key, and after the first calls launch without
``JITFunction.run`` or the autotuner. Compiled kernels need a GPU; on the CPU: the installed Triton's
``JITFunction.run`` is the one reproduced, the tuning key against the real autotuner (its benchmark and launch
stubbed), ``TRITON_INTERPRET`` spellings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import CASES, forced_configs, make_case

from moe_emergence.kernels import triton_launch

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _run(case, dtype=torch.bfloat16, shift: int = 0):
    """y and every gradient of the triton experts on ``case``; ``shift``: x starts ``shift`` elements into its
    storage (for shift 1 a pointer no longer 16-byte aligned, read by the gathering GEMMs)."""
    from moe_emergence.experts import get_backend

    params, indices, dy = make_case(case, "cuda")
    leaves = [p.detach().to(dtype, copy=True) for p in params[:5]] + [params[5].detach().clone()]
    if shift:
        buf = torch.empty(leaves[0].numel() + shift, device="cuda", dtype=dtype)
        leaves[0] = buf[shift:].view(leaves[0].shape).copy_(leaves[0])
        assert leaves[0].data_ptr() % 16 != 0
    for t in leaves:
        t.requires_grad_()
    y = get_backend("triton", torch.device("cuda"))(*leaves[:5], indices, leaves[5], "gelu_new")
    (y.float() * dy).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.skipif(triton_launch.INTERPRET, reason="the interpreter launches through kernel[grid]")
def test_this_tritons_jit_run_is_the_one_the_launcher_reproduces():
    """A Triton upgrade that changes how JITFunction.run binds, caches or launches fails here, not silently."""
    assert triton_launch._internals_match() and triton_launch.CACHED


def test_any_spelling_of_triton_interpret_selects_the_interpreter():
    code = (
        "import torch; from moe_emergence.kernels import triton_launch as t, available_backends as a; "
        "assert t.INTERPRET and not t.CACHED; print(a(torch.device('cpu'), 64, 256))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "true"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "triton" in out.stdout, out.stderr[-2000:]


def test_launcher_refuses_what_is_not_a_triton_kernel():
    with pytest.raises(TypeError, match="@triton.jit"):
        triton_launch.Launcher(lambda: None)


@pytest.mark.skipif(triton_launch.INTERPRET, reason="the interpreter launches through kernel[grid]")
def test_the_tuning_key_is_the_autotuners_own(monkeypatch):
    """On the CPU, the autotuner's benchmark and launch stubbed: the first call tunes through the autotuner
    (which must store its choice under the key the launcher computed, else RuntimeError), the second finds it
    in the autotuner's cache and launches it without the autotuner."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 16})], key=["n"])
    @triton.jit
    def toy(x_ptr, n, BLOCK: tl.constexpr):
        pass

    monkeypatch.setattr(toy, "_bench", lambda *a, config, **k: [float(config.kwargs["BLOCK"])])
    monkeypatch.setattr(toy.fn, "run", lambda *a, **k: None)
    launcher = triton_launch.Launcher(toy)
    launched = []
    monkeypatch.setattr(launcher, "_launch", lambda config, *a: launched.append(config) or config)
    x = torch.zeros(4)
    assert launcher((1,), x, 7).kwargs == {"BLOCK": 16} and not launched  # tuned by the autotuner
    assert launcher((1,), x, 7).kwargs == {"BLOCK": 16} and len(launched) == 1
    assert launcher((1,), x.double(), 7) is not None and len(launched) == 1  # another dtype: tuned anew
    assert len(toy.cache) == 2


@gpu
@pytest.mark.parametrize("case", ["top1", "top2", "top3_odd", "top2_empty_experts"])
def test_cached_launches_match_kernel_grid_bitwise(case, monkeypatch):
    first = _run(case)  # compiles (or tunes) and caches
    cached = _run(case)
    monkeypatch.setattr(triton_launch, "CACHED", False)
    plain = _run(case)
    for a, b, c in zip(first, cached, plain, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


@gpu
def test_second_launch_skips_jit_run_and_a_misaligned_pointer_gets_its_own_kernel(monkeypatch):
    from moe_emergence.kernels import triton_kernels as tk

    case = CASES["top2"]
    _run(case)  # every kernel of the case compiled and cached
    calls = []
    run = tk._ROWS.jit.run
    monkeypatch.setattr(tk._ROWS.jit, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    again = _run(case)
    assert calls == [], "a launch with cached arguments went through JITFunction.run"
    before = len(tk._ROWS._compiled)
    shifted = _run(case, shift=1)  # x's rows are read by the up GEMM: a new specialisation, compiled anew
    assert calls and len(tk._ROWS._compiled) > before
    monkeypatch.setattr(triton_launch, "CACHED", False)
    for a, b in zip(shifted, _run(case, shift=1), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(again, _run(case), strict=True):  # the aligned kernels were not replaced
        assert torch.equal(a, b)


@gpu
def test_the_config_comes_from_the_autotuners_cache():
    """Two configs forced on the rows kernel: the launcher tunes once through the autotuner, then returns the
    autotuner's cached choice, and a config forced alone is used as the autotuner would use it."""
    from moe_emergence.kernels import triton_kernels as tk

    shapes = [(64, 128, 32, 4, 2, False), (128, 128, 32, 4, 2, False)]  # tiles no smaller than the fixed one
    configs = tk.tile_configs(shapes, tk.ROWS_PRE_HOOK, tk.ROWS_FLAGS)
    with forced_configs(tk._rows_kernel, configs):
        ref = _run("top2", torch.float32)
        assert len(tk._rows_kernel.cache) >= 1
        chosen = set(tk._rows_kernel.cache.values())
        assert chosen <= set(configs)
        runs = []
        tuner_run = tk._rows_kernel.run
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tk._rows_kernel, "run", lambda *a, **k: runs.append(1) or tuner_run(*a, **k))
            again = _run("top2", torch.float32)
        assert runs == [], "the launcher went through the autotuner with a tuned key"
        for a, b in zip(ref, again, strict=True):
            assert torch.equal(a, b)
        assert set(tk._rows_kernel.cache.values()) == chosen  # no new tuning
    for config in configs:
        with forced_configs(tk._rows_kernel, [config]):
            out = _run("top2", torch.float32)
        for a, b in zip(ref, out, strict=True):  # float32: every tile size gives the same sums up to rounding
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(triton_launch.INTERPRET, reason="under the interpreter the ops are opaque custom ops")
def test_every_launched_kernel_is_listed_for_torchs_compile_caches():
    """torch's compile caches key a traced triton_op on the sources of the kernels registered for it; the ones
    ``Launcher`` launches are invisible to torch's own search of the body, so each op lists them: every kernel a
    Launcher of the backend launches is listed for the ops that launch it (the backward's under the forward op,
    the one in the graph), else an edited kernel could come back stale from the cache."""
    from moe_emergence.kernels import triton_experts, triton_kernels, triton_routing, triton_rowwise

    def launched(*modules) -> set:
        return {v.kernel for m in modules for v in vars(m).values() if isinstance(v, triton_launch.Launcher)}

    listed = torch._library.triton.triton_ops_to_kernels
    assert set(listed["moe_emergence::triton_routing"]) == launched(triton_routing)
    experts = launched(triton_kernels, triton_rowwise)
    assert len(experts) == 5 and triton_experts.triton_experts_fwd is not None
    for op in ("fwd", "bwd"):
        assert set(listed[f"moe_emergence::triton_experts_{op}"]) == experts


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="CUDA present: the GPU case runs")),
        pytest.param("cuda", marks=gpu),
    ],
)
def test_a_fake_tensor_run_launches_nothing_and_gives_the_shapes(device):
    """Outside a compile trace, fake tensors reach the launches only in a plain ``FakeTensorMode`` run (e.g. to
    size memory): forward and backward give the real run's shapes and dtypes, and no launch is handed to
    ``wrap_triton`` (trapped here). On the CPU under the interpreter (an opaque custom op; such a launch failed
    with a storage error), on the GPU through the ``triton_op``s."""
    code = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from moe_emergence.experts import get_backend
def trap(kernel):
    raise AssertionError("a fake run traced a launch")
torch.library.wrap_triton = trap
from kernel_cases import make_case
params, indices, dy = make_case("top2", DEVICE)
fn = get_backend("triton", torch.device(DEVICE))
real = [p.detach().clone().requires_grad_() for p in params]
y_real = fn(*real[:5], indices, real[5], "gelu_new")
(y_real * dy).sum().backward()
with FakeTensorMode() as mode:
    fake = [mode.from_tensor(p).requires_grad_() for p in params]
    y = fn(*fake[:5], mode.from_tensor(indices), fake[5], "gelu_new")
    (y * mode.from_tensor(dy)).sum().backward()
    got = [(tuple(t.shape), t.dtype) for t in (y, *(p.grad for p in fake))]
want = [(tuple(t.shape), t.dtype) for t in (y_real, *(p.grad for p in real))]
assert got == want, (got, want)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    code = code.replace("DEVICE", repr(device))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_a_compile_trace_of_a_triton_op_is_told_from_a_fake_run():
    """``Launcher`` traces a launch (``wrap_triton``) only inside a compile trace of an op's body, and launches
    nothing on fake tensors otherwise; if torch traced the body in another way, compiled models would skip their
    kernels, so the two are checked where torch decides them, on the CPU: a toy ``triton_op`` compiled with
    ``aot_eager``, forward and backward."""
    seen = []

    def body(x: torch.Tensor) -> torch.Tensor:
        seen.append((triton_launch.fake_arg(x), triton_launch._tracing()))
        return x * 2

    op = torch.library.triton_op("moe_emergence_test::double", body, mutates_args=())

    @op.register_fake
    def _(x):
        seen.append((triton_launch.fake_arg(x), triton_launch._tracing()))
        return torch.empty_like(x)

    op.register_autograd(lambda ctx, g: g * 2)
    x = torch.randn(4, requires_grad=True)
    torch.compile(lambda x: op(x) + 1, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert (True, False) in seen  # dynamo's fake run of the op
    assert (True, True) in seen  # the op's body traced into the graph
    assert set(seen) == {(True, False), (True, True)}, seen
    assert torch.equal(x.grad, torch.full((4,), 2.0))
    seen.clear()
    op(torch.randn(4))  # eager: the body on real tensors
    assert seen == [(False, False)]
    from torch.fx.experimental.proxy_tensor import make_fx

    seen.clear()  # torch.export's pre-dispatch trace of the body
    make_fx(body, tracing_mode="fake", pre_dispatch=True)(torch.randn(4))
    assert seen == [(True, True)]


def test_fake_arg_tells_fake_tensors_and_parameters_apart():
    """``fake_arg`` skips ``is_fake`` only for types that cannot be fake: a fake tensor made from a parameter, and
    a parameter made from a fake tensor, are fake tensors; plain tensors and parameters are not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = torch.nn.Parameter(torch.randn(3))
    assert not triton_launch.fake_arg(param) and not triton_launch.fake_arg(torch.randn(3))
    assert not triton_launch.fake_arg(None)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(3))
        assert triton_launch.fake_arg(fake)
        assert triton_launch.fake_arg(mode.from_tensor(param))
        assert triton_launch.fake_arg(torch.nn.Parameter(fake))


@pytest.mark.skipif(triton_launch.INTERPRET, reason="under the interpreter the ops are opaque custom ops")
@pytest.mark.parametrize("graphed", [False, True])
def test_a_triton_op_stays_opaque_where_inductor_replays_cuda_graphs(graphed):
    """``triton_launch.triton_op``: traced, the op's body goes into the graph (Inductor launches its kernels); where
    Inductor will replay the graphs from CUDA graphs (``triton.cudagraphs``, set by the reduce-overhead and
    max-autotune modes) the graph calls the op's opaque twin instead, forward and backward, which at run time
    runs the body on real tensors (autotuned launches). Checked on the CPU on a toy op: the graphs AOTAutograd
    hands to the compiler, and the result and gradient."""
    import torch._inductor.config as inductor_config
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    calls = []

    def body(k: int, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # a non-tensor first argument
        calls.append(triton_launch.fake_arg(x))
        return x * (k * scale)

    name = f"moe_emergence_test::times_{int(graphed)}"
    op = triton_launch.triton_op(name, body, [], lambda k, x, scale=1.0: torch.empty_like(x))
    op.register_autograd(lambda ctx, g: (None, op(3, g, scale=0.5), None))
    codes = []

    def keep(gm, _inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    x = torch.randn(4, requires_grad=True)
    with inductor_config.patch({"triton.cudagraphs": graphed}):
        compiled = torch.compile(
            lambda x: op(3, x, scale=0.5) + 1, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)
        )
        y = compiled(x)
        y.sum().backward()
    assert len(codes) == 2  # forward and backward
    twin = f"torch.ops.moe_emergence_test.times_{int(graphed)}_graphed"
    for code in codes:
        assert (twin in code) == graphed, code
        assert ("mul" in code) != graphed, code  # the body's x * (k * scale) traced in, or not
    assert torch.equal(y, x.detach() * 1.5 + 1) and torch.equal(x.grad, torch.full((4,), 1.5))
    assert (False in calls) == graphed  # the twin ran the body on real tensors
    assert triton_launch.cudagraphs_requested() is False  # the patch is gone


def test_with_scratch_sets_tritons_allocator_for_the_launch_only():
    """``Launcher.with_scratch``: during the launch Triton's allocator hands out torch memory of the size asked on
    the first argument's device; before and after (also after a failed launch) the caller's allocator is back."""
    from triton.runtime import _allocation

    from moe_emergence.kernels.triton_kernels import _rows_kernel

    seen = []

    class Recording(triton_launch.Launcher):
        def __call__(self, grid, *args, **constexprs):
            buf = _allocation._allocator.get()(300, 128, None)
            seen.append((buf.numel(), buf.device))
            if constexprs.get("fail"):
                raise RuntimeError("launch failed")

    before = _allocation._allocator.get()
    launcher = Recording(_rows_kernel)
    launcher.with_scratch((1,), torch.zeros(4))
    assert seen == [(300, torch.device("cpu"))]
    assert _allocation._allocator.get() is before
    with pytest.raises(RuntimeError, match="launch failed"):
        launcher.with_scratch((1,), torch.zeros(4), fail=True)
    assert _allocation._allocator.get() is before
    with pytest.raises(ValueError, match="aligned to 1024"):
        triton_launch._scratch(torch.device("cpu"), 16, 1024, None)


def test_tma_only_on_nvidia_gpus_of_capability_9_or_more(monkeypatch):
    """TMA descriptors (the row GEMM's loads, the up GEMM's stores) only on an NVIDIA GPU of Hopper or newer: not
    on an A100, not on a ROCm GPU that reports a major capability of 9 (MI300), not on the CPU."""
    from moe_emergence.kernels import triton_kernels as tk

    gpu = torch.device("cuda", 0)
    for capability, hip, tma in [((9, 0), None, True), ((10, 0), None, True), ((8, 0), None, False), ((9, 4), "6.2", False)]:  # fmt: skip
        monkeypatch.setattr(tk, "_capability", lambda index, c=capability: c)
        monkeypatch.setattr(torch.version, "hip", hip)
        assert tk._nvidia_sm90(gpu) is tma, (capability, hip)
    assert tk._nvidia_sm90(torch.device("cpu")) is False

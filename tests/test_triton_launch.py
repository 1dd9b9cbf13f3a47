"""``kernels.triton_launch.Launcher``: the triton backend's launches through cached compiled kernels give bitwise
the results of ``kernel[grid]``, reuse a compiled kernel only where Triton would (a misaligned view gets its own),
take the autotuner's choice from its own cache, and after the first calls launch without ``JITFunction.run``.
The cached path exists only on a GPU (the interpreter launches through ``kernel[grid]``: the CPU test)."""

from __future__ import annotations

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


def test_interpreter_or_cpu_launches_through_kernel_grid():
    """Without compiled kernels (``TRITON_INTERPRET=1``) nothing is cached: the launcher is ``kernel[grid]``."""
    if triton_launch.INTERPRET:
        assert not triton_launch.CACHED
    elif CUDA:
        assert triton_launch.CACHED, "this Triton's launch internals are not the ones the launcher reads"


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
        for a, b in zip(ref, _run("top2", torch.float32), strict=True):
            assert torch.equal(a, b)
        assert set(tk._rows_kernel.cache.values()) == chosen  # no new tuning
    for config in configs:
        with forced_configs(tk._rows_kernel, [config]):
            out = _run("top2", torch.float32)
        for a, b in zip(ref, out, strict=True):  # float32: every tile size gives the same sums up to rounding
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

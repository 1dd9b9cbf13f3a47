"""Fast experts backends against the eager reference: outputs and every gradient.

On a machine without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (float32
and float16; the interpreter computes bfloat16 wrongly); ``grouped_mm`` runs in-process on the CPU.
With CUDA everything runs in-process on the GPU in float32 and bfloat16.
Tolerances (relative, norm-wise, against eager in float32): float32 1e-5; float16 5e-3; bfloat16 3e-2.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import (
    ALIGNED,
    CASES,
    ISOLATION_CASES,
    ISOLATION_KEYS,
    ISOLATION_PERSISTENT_KEYS,
    POISONS,
    compare,
    compare_autocast,
    compare_frozen,
    compare_isolation,
    compare_model,
    compare_persistent,
    compare_poisoned_dz,
    compare_routing,
    compare_segment_sums,
    compare_tma,
    eager_errors,
    forced_configs,
)

from moe_emergence import MoEConfig, MoEWrapper
from moe_emergence.experts import eager_experts, get_backend
from moe_emergence.kernels import available_backends, load_backend, triton_launch
from moe_emergence.kernels.routing_meta import routing_meta

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FAST_DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
ROOT = Path(__file__).resolve().parents[1]


def assert_close(errors: dict[str, float], tol: float, what: str) -> None:
    bad = {n: e for n, e in errors.items() if not e <= tol}  # NaN fails too
    assert not bad, f"{what}: relative errors over {tol}: {bad}"


@contextlib.contextmanager
def deterministic(on: bool):
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside (if ``on``), the previous mode after.
    warn_only: cuBLAS would otherwise refuse without ``CUBLAS_WORKSPACE_CONFIG`` (its matmuls are deterministic
    on one stream anyway); an op left nondeterministic can only make the exact comparison fail, never pass."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="module")
def interpreted_triton() -> dict[str, dict]:
    """Triton kernels under TRITON_INTERPRET=1 (CPU only), one subprocess per dtype, both at once (the interpreter
    keeps about one core busy)."""
    if CUDA:
        pytest.skip("CUDA present: the Triton kernels are tested on the GPU")
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    procs = {
        dtype: subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "kernel_cases.py"), "triton", "cpu", dtype],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for dtype in ("float32", "float16")
    }
    results = {}
    try:
        for dtype, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-4000:]
            results[dtype] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():  # a failed or timed-out one: the other is not left running
            proc.kill()
            proc.wait()
    return results


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreted_matches_eager(interpreted_triton, case, dtype):
    assert_close(interpreted_triton[dtype][case], TOL[getattr(torch, dtype)], f"triton {case} {dtype}")


@pytest.mark.parametrize("case", [f"model_top{k}_ckpt{c}" for k in (1, 2) for c in (0, 1)])
def test_triton_interpreted_model_matches_eager(interpreted_triton, case):
    assert_close(interpreted_triton["float32"][case], 1e-5, f"triton {case}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_interpreted_tma_loads_match_pointer_loads(interpreted_triton, dtype):
    assert_close(interpreted_triton[dtype]["tma_vs_pointer"], 1e-6, f"triton TMA vs pointer loads {dtype}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_interpreted_dz_isolates_poisoned_rows(interpreted_triton, dtype):
    """NaN in dead rows, inf in a row a tile reads past its expert's end: live dZ and row dots exact, dead slots
    untouched."""
    assert_close(
        interpreted_triton[dtype]["poisoned_dz"], TOL[getattr(torch, dtype)], f"triton dZ poisoned {dtype}"
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreted_persistent_matches_eager(interpreted_triton, case, dtype):
    errors = interpreted_triton[dtype][f"persistent_{case}"]
    assert_close(errors, TOL[getattr(torch, dtype)], f"triton persistent row GEMMs {case} {dtype}")


def test_triton_interpreted_autocast_matches_eager(interpreted_triton):
    """float32 parameters under float16 autocast: the parameters' gradients come back in float32."""
    assert_close(interpreted_triton["float16"]["top2_autocast"], TOL[torch.float16], "triton under autocast")


def test_triton_interpreted_routing_matches_torch_routing(interpreted_triton):
    assert_close(
        interpreted_triton["float32"]["routing"], 0.0, "triton routing metadata vs torch (1 = differs)"
    )


def test_triton_interpreted_segment_sums_match_torch(interpreted_triton):
    assert_close(
        interpreted_triton["float32"]["segment_sums"], 1e-6, "triton per-expert partial sums vs torch"
    )


def test_triton_interpreted_frozen_weights_match_eager(interpreted_triton):
    assert_close(interpreted_triton["float32"]["top2_frozen_weights"], 1e-5, "triton, w1 w2 weights frozen")
    errors = interpreted_triton["float32"]["top2_row_dots_after_autotuning"]
    assert_close(errors, 1e-5, "triton, dZ autotuned over two BLOCK_N")
    for dtype in ("float32", "float16"):
        errors = interpreted_triton[dtype]["top2_strided_bias"]
        assert_close(errors, TOL[getattr(torch, dtype)], f"triton, strided biases, {dtype}")
    errors = interpreted_triton["float32"]["top2_only_routing_weights"]
    assert set(errors) == {"weights"}, errors
    assert_close(errors, 1e-5, "triton, only the routing weights trained")


@pytest.mark.parametrize("key", ISOLATION_KEYS + ISOLATION_PERSISTENT_KEYS)
def test_triton_interpreted_zero_weight_assignments_isolated(interpreted_triton, key):
    """Weight-0 assignments to an expert with an inf / NaN bias, or of x rows with inf / NaN, change nothing: y and
    every gradient finite and equal to eager on the finite case (``experts`` docstring)."""
    assert_close(interpreted_triton["float32"][key], 1e-5, f"triton {key}")


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("case", list(ISOLATION_CASES))
@pytest.mark.parametrize("backend", ["eager", "grouped_mm"] + (["triton"] if CUDA else []))
def test_zero_weight_assignments_isolated(backend, case, poison):
    """As above, in-process: eager exactly (the same live rows), grouped_mm on the aligned cases.

    On CUDA eager runs under deterministic algorithms: its ``index_add_`` (and the gather's backward) add a
    token's K >= 3 rows with atomics otherwise, in an order that changes from call to call, so two runs on the
    same rows would differ in the last bit."""
    if backend == "grouped_mm" and (ISOLATION_CASES[case][1] % 8 or ISOLATION_CASES[case][2] % 8):
        pytest.skip("grouped_mm needs D and F multiples of 8")
    for dtype in [torch.float32] + ([torch.bfloat16] if CUDA and backend != "eager" else []):
        with deterministic(CUDA and backend == "eager"):
            errors = compare_isolation(backend, DEVICE, dtype, f"{case}/{poison}")
        tol = 0.0 if backend == "eager" else TOL[dtype]
        assert_close(errors, tol, f"{backend} {case} {poison} {dtype}")


@pytest.mark.parametrize("backend", ["grouped_mm"] + (["triton"] if CUDA else []))
def test_frozen_weights_match_eager(backend):
    assert_close(compare_frozen(backend, DEVICE), 1e-5, f"{backend}, w1 w2 weights frozen")
    assert_close(
        compare_frozen(backend, DEVICE, trainable=(5,)), 1e-5, f"{backend}, only the routing weights trained"
    )


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_gpu_matches_eager(case, dtype):
    assert_close(compare("triton", DEVICE, dtype, case), TOL[dtype], f"triton {case} {dtype}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_triton_gpu_tma_loads_match_pointer_loads(dtype):
    assert_close(compare_tma(DEVICE, dtype), TOL[dtype] / 10, f"triton TMA vs pointer loads {dtype}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_triton_gpu_dz_isolates_poisoned_rows(dtype):
    assert_close(compare_poisoned_dz(DEVICE, dtype), TOL[dtype], f"triton dZ poisoned {dtype}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_gpu_autocast_matches_eager(backend):
    """float32 parameters under bfloat16 autocast, as the trainer runs them; gradients in float32."""
    errors = compare_autocast(backend, DEVICE, torch.bfloat16)
    assert_close(errors, TOL[torch.bfloat16], f"{backend} under bf16 autocast")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_gpu_routing_matches_torch_routing():
    assert_close(compare_routing(DEVICE), 0.0, "triton routing metadata vs torch (1 = differs)")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_gpu_segment_sums_match_torch():
    assert_close(compare_segment_sums(DEVICE), 1e-6, "triton per-expert partial sums vs torch")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["rows", "wgrad"])
def test_triton_gpu_every_hopper_tile_matches_eager(kernel):
    """Each tile config the autotuner may pick on Hopper, forced in turn (the other GPU tests run one fixed config,
    MOE_TRITON_AUTOTUNE=0), on a case whose main loops run 8-16 iterations (software-pipelining faults show only
    then), bf16 against eager float32; the bound is twice eager's own bf16 error (plus 1e-3): a fault that
    misplaces a few tiles must not hide under the general bf16 tolerance."""
    import triton

    from moe_emergence.kernels import triton_kernels as tk

    case = (1024, 512, 1024, 4, 2, "random")
    jit, configs = {
        "rows": (tk._rows_kernel, tk.tile_configs(tk.ROWS_SHAPES, tk.ROWS_PRE_HOOK, tk.ROWS_FLAGS)),
        "wgrad": (tk._wgrad_kernel, tk.tile_configs(tk.WGRAD_SHAPES)),
    }[kernel]
    bound = {n: 2 * e + 1e-3 for n, e in eager_errors(DEVICE, torch.bfloat16, case).items()}
    ran = 0
    for config in configs:
        with forced_configs(jit, [config]):
            try:
                errors = compare("triton", DEVICE, torch.bfloat16, case)
            except triton.runtime.errors.OutOfResources:  # the autotuner skips such configs too
                continue
        ran += 1
        bad = {n: (e, bound[n]) for n, e in errors.items() if not e <= bound[n]}
        assert not bad, f"triton {kernel} kernel with {config}: (error, bound) {bad}"
    assert ran >= len(configs) // 2, f"only {ran} of {len(configs)} {kernel} configs fit this GPU"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_gpu_persistent_matches_eager(case, dtype):
    errors = compare_persistent(DEVICE, dtype)[case]
    assert_close(errors, TOL[dtype], f"triton persistent row GEMMs {case} {dtype}")


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", ALIGNED)
def test_grouped_mm_matches_eager(case, dtype):
    assert_close(compare("grouped_mm", DEVICE, dtype, case), TOL[dtype], f"grouped_mm {case} {dtype}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_tolerance_is_rounding_scale():
    """The documented bf16 tolerance is not loose: eager itself in bf16 errs by a similar amount."""
    errs = eager_errors(DEVICE, torch.bfloat16, "top2")
    assert max(errs.values()) > TOL[torch.bfloat16] / 30, errs


@pytest.mark.parametrize("backend", ["grouped_mm"] + (["triton"] if CUDA else []))
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_matches_eager(backend, top_k, checkpointing):
    assert_close(compare_model(backend, DEVICE, top_k, checkpointing), 1e-5, f"{backend} model")


@pytest.mark.parametrize("backend", ["grouped_mm"] + (["triton"] if CUDA else []))
def test_moe_wrapper_backend_matches_eager(backend):
    torch.manual_seed(0)
    layers = {}
    for name in ("eager", backend):
        cfg = MoEConfig(num_experts=4, top_k=2, noise_std=0.0, backend=name)
        torch.manual_seed(0)
        layer = MoEWrapper(cfg, 32, 64).to(DEVICE)
        torch.nn.init.normal_(layer.experts.w1_EDF, std=0.1)
        torch.nn.init.normal_(layer.experts.w2_EFD, std=0.1)
        torch.nn.init.normal_(layer.experts.b1_EF, std=0.1)
        layers[name] = layer
    x = torch.randn(2, 9, 32, device=DEVICE)
    outs = {}
    for name, layer in layers.items():
        xx = x.clone().requires_grad_()
        y, _ = layer(xx)
        (y * torch.arange(32, device=DEVICE)).sum().backward()
        outs[name] = [y, xx.grad] + [p.grad for p in layer.parameters()]
    for ref, got in zip(outs["eager"], outs[backend], strict=True):
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


def test_grouped_mm_rejects_unaligned_shapes():
    case = CASES["top3_odd"]
    x = torch.randn(case[0], case[1])
    w1, b1 = torch.randn(case[3], case[1], case[2]), torch.randn(case[3], case[2])
    w2, b2 = torch.randn(case[3], case[2], case[1]), torch.randn(case[3], case[1])
    idx, wts = torch.zeros(case[0], 1, dtype=torch.long), torch.ones(case[0], 1)
    with pytest.raises(ValueError, match="D=17, F=23"):
        load_backend("grouped_mm", "cpu")(x, w1, b1, w2, b2, idx, wts, "gelu_new")


def test_registry_on_cpu():
    assert get_backend("auto", torch.device("cpu")) is eager_experts
    assert get_backend("eager", torch.device("cpu")) is eager_experts
    assert "grouped_mm" in available_backends("cpu")
    with pytest.raises(ValueError, match="unknown experts backend 'fast'"):
        get_backend("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        MoEConfig(backend="fast")
    for name in ("auto", "eager", "grouped_mm", "triton"):
        assert MoEConfig(backend=name).backend == name


@pytest.mark.skipif(CUDA or triton_launch.INTERPRET, reason="CPU without the interpreter")
def test_triton_refuses_cpu_without_interpreter():
    assert "triton" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        load_backend("triton", "cpu")


def test_grouped_mm_fits_only_aligned_sizes():
    from moe_emergence.kernels import grouped_mm

    assert grouped_mm.fits(768, 3072) and grouped_mm.fits(8, 16)
    assert not grouped_mm.fits(12, 3072) and not grouped_mm.fits(768, 36)
    assert available_backends("cpu", 12, 36) == [n for n in available_backends("cpu") if n != "grouped_mm"]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    cuda = torch.device("cuda")
    assert available_backends(cuda, 768, 3072) == ["triton", "grouped_mm"]
    assert available_backends(cuda, 12, 36) == ["triton"]
    assert (
        get_backend("auto", cuda, 768, 3072)
        is get_backend("auto", cuda, 12, 36)
        is load_backend("triton", cuda)
    )


def test_routing_meta_sorts_and_counts():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (50, 3), generator=g)
    idx[:, 1] = (idx[:, 0] + 1) % 7
    idx[:, 2] = (idx[:, 0] + 3) % 7
    meta = routing_meta(idx.to(DEVICE), 9)
    flat = idx.reshape(-1)
    assert torch.equal(meta.offsets_E1.cpu(), torch.cat([torch.zeros(1, dtype=torch.long),
                                                         torch.bincount(flat, minlength=9).cumsum(0)]))  # fmt: skip
    assert torch.equal(flat[meta.order_A.cpu()], meta.expert_A.cpu().long())
    assert torch.equal(meta.token_A.cpu(), meta.order_A.cpu() // 3)
    assert (meta.expert_A.diff() >= 0).all()
    same = meta.expert_A[1:] == meta.expert_A[:-1]  # stable: assignments of one expert stay in id order
    assert (meta.order_A.diff()[same] > 0).all()
    assert meta.expert_A.dtype == torch.int16  # 2 radix passes instead of 8


def test_routing_meta_many_experts_sorts_as_int32():
    idx = torch.tensor([[40000], [3], [40000], [0]])
    meta = routing_meta(idx.to(DEVICE), 40001)
    assert meta.expert_A.dtype == torch.int32
    assert meta.order_A.tolist() == [3, 1, 0, 2]
    assert meta.offsets_E1[[0, 1, 3, 4, 40000, 40001]].tolist() == [0, 1, 1, 2, 2, 4]


def test_routing_meta_zero_weights_sort_last_as_dead_rows():
    """A weight-0 assignment gets the sentinel expert E: after every expert's rows, in offsets[E]:A, in
    assignment order; the live ones keep their sorted order and offsets as without them."""
    idx = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    weights = torch.tensor([[0.5, 0.0], [0.0, 0.3], [0.2, 0.1], [0.0, 0.0]])
    meta = routing_meta(idx.to(DEVICE), 3, weights.to(DEVICE))
    assert meta.order_A.tolist() == [4, 5, 0, 3, 1, 2, 6, 7]
    assert meta.expert_A.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert meta.offsets_E1.tolist() == [0, 1, 2, 4]  # offsets[E] = 4 live rows of A = 8
    assert meta.token_A.tolist() == [2, 2, 0, 1, 0, 1, 3, 3]
    assert routing_meta(idx.to(DEVICE), 3).offsets_E1.tolist() == [0, 2, 5, 8]  # no weights: all live


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_routing_meta_has_no_host_sync():
    idx = torch.randint(0, 8, (4096, 2), device="cuda")
    weights = torch.rand(4096, 2, device="cuda").masked_fill_(torch.rand(4096, 2, device="cuda") < 0.2, 0.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing_meta(idx, 8)
        routing_meta(idx, 8, weights)
        if "triton" in available_backends(torch.device("cuda")):
            from moe_emergence.kernels.triton_routing import triton_routing_meta

            triton_routing_meta(idx, 8)
            triton_routing_meta(idx, 8, weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")

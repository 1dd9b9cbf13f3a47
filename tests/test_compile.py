"""The fast backends as ``torch.library`` custom ops: ``opcheck``, and ``torch.compile(fullgraph=True)`` of a tiny
GPT2MoEForCausalLM using them gives the eager loss and gradients (no graph break, non-zero w1 gradient).

On a machine without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (float32);
``grouped_mm`` runs in-process on the CPU. With CUDA both run in-process on the GPU.
The compiled model uses ``backend="aot_eager"`` (dynamo + AOT autograd; on the GPU the triton ops' bodies are
traced, their kernels run with the traced fixed configs): gradients agree within 1e-5 relative (float32). On the
GPU Inductor compiles it too (the triton kernels launched from its code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compile_cases import ALL_CHECKS, compare_compiled, opcheck_ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def check_compiled(errors: dict[str, float], what: str) -> None:
    norm = errors.pop("norm:w1")
    assert norm > 0, f"{what}: compiled w1 gradient is zero"
    assert any(".experts.w1_EDF" in n for n in errors) and any(".router." in n for n in errors), sorted(
        errors
    )
    bad = {n: e for n, e in errors.items() if not e <= TOL}  # NaN fails too
    assert not bad, f"{what}: compiled vs eager relative errors over {TOL}: {bad}"


def check_opcheck(results: dict[str, list[str]], backend: str) -> None:
    assert results[f"{backend}_experts_fwd"] == sorted(ALL_CHECKS), results
    assert results[f"{backend}_experts_bwd"] == sorted(ALL_CHECKS), results
    if backend == "triton":
        assert results["triton_routing"] == sorted(ALL_CHECKS), results
        assert results["triton_experts_fwd/float32 params"] == sorted(ALL_CHECKS[:2]), results


@pytest.fixture(scope="module")
def interpreted_triton() -> dict:
    """opcheck + compiled top-2 model under TRITON_INTERPRET=1 (CPU only), in one subprocess."""
    if CUDA:
        pytest.skip("CUDA present: the Triton ops are tested on the GPU")
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compile_cases.py"), "triton", "cpu", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_ops_pass_opcheck_interpreted(interpreted_triton):
    results = interpreted_triton["opcheck"]
    check_opcheck(results, "triton")
    assert results["triton_experts_bwd/partial"] == sorted(ALL_CHECKS[:2]), results


def test_triton_compiled_fullgraph_matches_eager_interpreted(interpreted_triton):
    check_compiled(interpreted_triton["compile_top2"], "triton top-2")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_ops_gpu():
    check_opcheck(opcheck_ops("triton", DEVICE), "triton")
    for k in (1, 2):
        check_compiled(compare_compiled("triton", DEVICE, k), f"triton top-{k}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("top_k", [1, 2])
def test_triton_under_inductor_launches_the_kernels_itself(top_k):
    """On the GPU the triton backend's ops are ``triton_op``s: Inductor traces their bodies, so its generated
    code launches the routing, row-GEMM, weight-gradient and row-wise kernels itself (no call of the opaque op
    left), and the compiled model's loss and gradients match eager (float32; Inductor's own fusions of the
    dense parts reorder sums: 1e-4 relative)."""
    import torch._inductor.config

    codes: list[str] = []
    with torch._inductor.config.patch(force_disable_caches=True):  # the caches do not key on the ops' Python
        errors = compare_compiled("triton", DEVICE, top_k, compile_backend="inductor", codes=codes)
    code = "\n".join(codes)
    kernels = (
        "_count_kernel",
        "_place_kernel",
        "_rows_kernel",
        "_wgrad_kernel",
        "_bwd_prep_kernel",
        "_segsum_kernel",
    )
    for kernel in kernels:
        assert kernel in code, f"{kernel} not launched by Inductor's code"
    assert "torch.ops.moe_emergence" not in code  # no opaque op call left
    norm = errors.pop("norm:w1")
    assert norm > 0
    bad = {n: e for n, e in errors.items() if not e <= 1e-4}
    assert not bad, f"inductor top-{top_k}: relative errors over 1e-4: {bad}"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("top_k", [1, 2])
def test_triton_under_reduce_overhead_calls_its_opaque_ops(top_k):
    """Where Inductor replays the graphs from CUDA graphs (``mode="reduce-overhead"``) the triton backend's ops stay
    opaque (``triton_launch.triton_op``'s twins ``*_graphed``: autotuned launches with TMA loads, recorded into
    the CUDA graphs), forward and backward, and no kernel of theirs is in Inductor's code; loss and every
    gradient of the third step (the first replay of the captured graphs) match eager (float32, 1e-4 relative)."""
    import torch._inductor.config

    codes: list[str] = []
    with torch._inductor.config.patch(force_disable_caches=True):
        errors = compare_compiled(
            "triton", DEVICE, top_k, compile_backend="inductor", codes=codes, mode="reduce-overhead", steps=3
        )
    code = "\n".join(codes)
    for op in ("triton_routing", "triton_experts_fwd", "triton_experts_bwd"):
        assert f"torch.ops.moe_emergence.{op}_graphed" in code, f"{op}'s opaque twin not called"
    for kernel in ("_rows_kernel", "_wgrad_kernel", "_place_kernel"):
        assert kernel not in code, f"{kernel} traced into Inductor's code"
    assert errors.pop("norm:w1") > 0
    bad = {n: e for n, e in errors.items() if not e <= 1e-4}
    assert not bad, f"reduce-overhead top-{top_k}: relative errors over 1e-4: {bad}"


def test_grouped_mm_ops_pass_opcheck():
    check_opcheck(opcheck_ops("grouped_mm", DEVICE), "grouped_mm")


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_mm_compiled_fullgraph_matches_eager(top_k):
    check_compiled(compare_compiled("grouped_mm", DEVICE, top_k), f"grouped_mm top-{top_k}")


def test_compiled_graph_calls_the_custom_op_eager_calls_the_function():
    """Traced by dynamo, the backend calls its custom op (opaque to the compiler); eagerly, the op's body under
    a plain autograd.Function (no custom-op dispatch cost)."""
    from kernel_cases import _tiny_model

    torch._dynamo.reset()
    model = _tiny_model("grouped_mm", DEVICE, 1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    explain = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    code = "\n".join(g.code for g in explain.graphs)
    assert explain.graph_break_count == 0 and "grouped_mm_experts_fwd" in code
    loss = model(input_ids=ids, labels=ids).loss
    seen, stack = (
        {},
        [loss.grad_fn],
    )  # id -> node: held, so that ids stay unique (node wrappers are transient)
    while stack:  # every node of the autograd graph
        fn = stack.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = fn
            stack.extend(f for f, _ in fn.next_functions)
    names = {type(fn).__name__ for fn in seen.values()}
    assert "EagerBackward" in names and not any("grouped_mm_experts_fwd" in n for n in names), names


def test_backend_lookup_is_cached_outside_compile():
    from moe_emergence.experts import get_backend, resolve_backend

    cpu = torch.device("cpu")
    assert (
        get_backend("grouped_mm", cpu) is get_backend("grouped_mm", cpu) is resolve_backend("grouped_mm", cpu)
    )
    assert get_backend.cache_info().hits >= 1

"""The triton backend's kernels one by one against ``torch._grouped_mm`` (CUTLASS) on one CUDA device (bf16),
E=8 experts, T=8192 tokens, top-1, D=768, F=3072: where the layer's time goes, kernel by kernel.

Row GEMMs: each of the four ``_rows_kernel`` calls of a forward+backward (up: gathered x rows, bias, GELU;
down: bias, routing-weight scale, scattered rows; dZ: GELU'; dX: scattered rows), the same GEMM with no
gather and no epilogue, and ``torch._grouped_mm`` on the same (pre-gathered) rows without epilogue.
Weight gradients: dW1 = x[token]^T @ dZ (rows gathered) and dW2 = a^T @ dO, each with its bias gradient:
the Triton wgrad kernel plus the column-sum kernel (as the backend runs them), each alone, and ``torch._grouped_mm``
(CUTLASS) on pre-gathered rows, alone and with the gather and the bias gradient as a one-hot GEMM (the grouped_mm
backend's way). Times are device times: each call is captured in a CUDA graph and replayed (median of ``--iters``).

    python scripts/bench_kernels.py [--iters 50]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moe_emergence.kernels.routing_meta import routing_meta
from moe_emergence.kernels.triton_kernels import (
    EPI_GELU,
    EPI_GELU_BWD,
    launch_rows,
    launch_wgrad,
)

T, D, FF, E = 8192, 768, 3072, 8


def timed(fn, iters: int, warmup: int = 5) -> float:
    """Median device ms of one ``fn()``: ``fn`` captured in a CUDA graph and replayed (no host launch cost)."""
    for _ in range(warmup):  # autotunes outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def bench_case(title: str, x, g, meta, gather: bool, iters: int) -> None:
    """Time every variant of dW = x[rows]^T @ G (+ db = column sums of G) for one routing and shape."""
    offs = meta.offsets_E1[1:].to(torch.int32)
    onehot = F.one_hot(meta.expert_A.long(), E).to(torch.bfloat16)
    N = g.shape[1]
    x_rows = x.index_select(0, meta.token_A) if gather else x
    variants = {
        "triton GEMM + colsum": lambda: launch_wgrad(x, g, meta, gather=gather, want_bias=True),
        "triton GEMM only": lambda: launch_wgrad(x, g, meta, gather=gather, want_bias=False),
        "colsum only (bias gradient)": lambda: launch_wgrad(
            x, g, meta, gather=gather, want_w=False, want_bias=True
        ),
        "grouped_mm GEMM only (rows pre-gathered)": lambda: torch._grouped_mm(x_rows.t(), g, offs=offs),
        "grouped_mm + gather + one-hot bias": lambda: (
            torch._grouped_mm((x.index_select(0, meta.token_A) if gather else x).t(), g, offs=offs),
            onehot.t() @ g,
        ),
    }
    ref = torch._grouped_mm(x_rows.t(), g, offs=offs).float()
    dw, db_split = launch_wgrad(x, g, meta, gather=gather, want_bias=True)
    db_ref = onehot.t().float() @ g.float()
    err = ((dw.float() - ref).norm() / ref.norm()).item()
    berr = ((db_split.float() - db_ref).norm() / db_ref.norm()).item()
    flop = 2 * T * x.shape[1] * N
    print(f"\n{title}: triton vs grouped_mm dW rel err {err:.1e}, db vs float32 {berr:.1e}")
    for name, fn in variants.items():
        ms = timed(fn, iters)
        print(f"  {name:45s} {ms * 1e3:8.1f} us  ({flop / ms / 1e9:6.0f} TFLOP/s of the GEMM)", flush=True)


def bench_rows(meta, iters: int) -> None:
    """The four row-GEMM calls of a forward+backward, each against the bare kernel and torch._grouped_mm."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    offs = meta.offsets_E1[1:].to(torch.int32)
    x_TD, dz_AF, do_AD = torch.randn(T, D, **bf16), torch.randn(T, FF, **bf16), torch.randn(T, D, **bf16)
    w1, b1 = torch.randn(E, D, FF, **bf16) * 0.02, torch.randn(E, FF, **bf16)
    w2, b2 = torch.randn(E, FF, D, **bf16) * 0.02, torch.randn(E, D, **bf16)
    z, a, o, out = (
        torch.empty(T, FF, **bf16),
        torch.empty(T, FF, **bf16),
        torch.empty(T, D, **bf16),
        x_TD.clone(),
    )
    w_A = torch.rand(T, device="cuda")
    x_AD = x_TD.index_select(0, meta.token_A)
    cases = {
        "up (gather, bias, GELU)": (
            lambda: launch_rows(x_TD, w1, a, meta, bias=b1, aux=z, gather=True, epilogue=EPI_GELU),
            lambda: launch_rows(x_AD, w1, a, meta),
            lambda: torch._grouped_mm(x_AD, w1, offs=offs),
        ),
        "down (bias, scale, scatter)": (
            lambda: launch_rows(a, w2, out, meta, bias=b2, aux=o, scale=w_A, scatter=True),
            lambda: launch_rows(a, w2, out, meta),
            lambda: torch._grouped_mm(a, w2, offs=offs),
        ),
        "dZ (w2^T, GELU')": (
            lambda: launch_rows(do_AD, w2.transpose(1, 2), dz_AF, meta, aux=z, epilogue=EPI_GELU_BWD),
            lambda: launch_rows(do_AD, w2.transpose(1, 2), dz_AF, meta),
            lambda: torch._grouped_mm(do_AD, w2.transpose(1, 2), offs=offs),
        ),
        "dX (w1^T, scatter)": (
            lambda: launch_rows(dz_AF, w1.transpose(1, 2), out, meta, scatter=True),
            lambda: launch_rows(dz_AF, w1.transpose(1, 2), out, meta),
            lambda: torch._grouped_mm(dz_AF, w1.transpose(1, 2), offs=offs),
        ),
    }
    flop = 2 * T * D * FF
    for name, (fused, bare, cutlass) in cases.items():
        t = [timed(fn, iters) for fn in (fused, bare, cutlass)]
        tf = [flop / ms / 1e9 for ms in t]
        print(
            f"  rows {name:28s} triton {t[0] * 1e3:6.1f} us ({tf[0]:4.0f} TFLOP/s), bare GEMM {t[1] * 1e3:6.1f} us "
            f"({tf[1]:4.0f}), grouped_mm {t[2] * 1e3:6.1f} us ({tf[2]:4.0f})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for routing in ("balanced", "zipf"):
        if routing == "balanced":
            idx = (torch.randperm(T, generator=gen) % E)[:, None]
        else:
            p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
            idx = torch.multinomial(p.expand(T, E), 1, generator=gen)
        meta = routing_meta(idx.cuda(), E)
        print(f"\n{routing} routing, row GEMMs:")
        bench_rows(meta, args.iters)
        x_TD, dz_AF = torch.randn(T, D, **bf16), torch.randn(T, FF, **bf16)
        bench_case(f"{routing} dW1 (x gathered, G=dZ [A,F])", x_TD, dz_AF, meta, True, args.iters)
        a_AF, do_AD = torch.randn(T, FF, **bf16), torch.randn(T, D, **bf16)
        bench_case(f"{routing} dW2 (a [A,F], G=dO [A,D])", a_AF, do_AD, meta, False, args.iters)


if __name__ == "__main__":
    main()

"""The triton backend's kernels one by one against ``torch._grouped_mm`` (CUTLASS) on one CUDA device (bf16),
E=8 experts, T=8192 tokens, top-1, D=768, F=3072: where the layer's time goes, kernel by kernel.

Row GEMMs: each of the four ``_rows_kernel`` calls of a forward+backward (up: gathered x rows, bias, GELU; down:
bias, routing-weight scale, scattered rows; dZ: GELU' and the routing weights' row dots; dX: scattered rows), the
same GEMM with no gather and no epilogue, and ``torch._grouped_mm`` on the same (pre-gathered) rows without
epilogue. Each row GEMM is also timed with plain pointer loads instead of TMA. Weight gradients: dW1 = x[token]^T @
dZ and dW2 = a^T @ dO: the Triton wgrad kernel after an index_select of the x rows (the backend's way), on rows sorted
beforehand, and ``torch._grouped_mm`` (CUTLASS) on pre-gathered
rows, alone and with the gather and the bias gradient as a grouped GEMM of a ones block (the grouped_mm backend's
way). The triton backend sums the bias gradients in the epilogues of dZ and of the row-prep kernel (timed with and
without them). Times are device times: each call is captured in a CUDA graph and replayed (median of ``--iters``).

    python scripts/bench_kernels.py [--iters 50]
"""

from __future__ import annotations

import sys

import torch
from bench_moe import graph_time  # device time of fn captured in a CUDA graph (scripts/ is on sys.path)

from moe_emergence.console import ArgumentParser
from moe_emergence.errors import run_cli
from moe_emergence.kernels.grouped_mm import _bias_grad
from moe_emergence.kernels.routing_meta import routing_meta
from moe_emergence.kernels.triton_kernels import EPI_GELU, EPI_GELU_BWD, launch_rows, launch_wgrad
from moe_emergence.kernels.triton_rowwise import launch_bwd_prep

T, D, FF, E = 8192, 768, 3072, 8


def bench_case(title: str, x, g, meta, gather: bool, iters: int) -> None:
    """Time every variant of dW = x[rows]^T @ g for one routing and shape (the bias gradient is summed in the
    epilogues of the kernels that produce g; the grouped GEMM of a ones block is the grouped_mm backend's way)."""
    offs = meta.offsets_E1[1:].to(torch.int32)
    O_ = g.shape[1]  # the GEMM's output width O
    x_rows = x.index_select(0, meta.token_A) if gather else x
    variants = {  # with gather, the backend's way first (an index_select of the rows, then the GEMM)
        **(
            {
                "triton GEMM after an index_select of the rows": lambda: launch_wgrad(
                    x.index_select(0, meta.token_A), g, meta
                )
            }
            if gather
            else {}
        ),
        "triton GEMM (rows sorted beforehand)": lambda: launch_wgrad(x_rows, g, meta),
        "grouped_mm GEMM only (rows pre-gathered)": lambda: torch._grouped_mm(x_rows.t(), g, offs=offs),
        "grouped_mm + gather + bias": lambda: (
            torch._grouped_mm((x.index_select(0, meta.token_A) if gather else x).t(), g, offs=offs),
            _bias_grad(g, offs),
        ),
    }
    ref = torch._grouped_mm(x_rows.t(), g, offs=offs).float()
    dw = launch_wgrad(x_rows, g, meta)
    err = ((dw.float() - ref).norm() / ref.norm()).item()
    flop = 2 * T * x.shape[1] * O_
    print(f"\n{title}: triton vs grouped_mm dW rel err {err:.1e}")
    for name, fn in variants.items():
        ms = graph_time(fn, iters)
        print(f"  {name:45s} {ms * 1e3:8.1f} us  ({flop / ms / 1e9:6.0f} TFLOP/s of the GEMM)", flush=True)


def bench_rows(meta, iters: int) -> None:
    """The four row-GEMM calls of a forward+backward as the backend makes them (TMA loads where possible),
    with plain pointer loads, as a bare GEMM, and ``torch._grouped_mm``; then the backward's row-prep kernel."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    offs = meta.offsets_E1[1:].to(torch.int32)
    x_TD, dz_AF, do_AD = torch.randn(T, D, **bf16), torch.randn(T, FF, **bf16), torch.randn(T, D, **bf16)
    w1, b1 = torch.randn(E, D, FF, **bf16) * 0.02, torch.randn(E, FF, **bf16)
    w2, b2 = torch.randn(E, FF, D, **bf16) * 0.02, torch.randn(E, D, **bf16)
    z, a, out = torch.empty(T, FF, **bf16), torch.empty(T, FF, **bf16), x_TD.clone()
    dweights_A = torch.zeros(T, device="cuda")
    w_A = torch.rand(T, device="cuda")
    # the backend's dZ call
    dz_kw = dict(aux=z, epilogue=EPI_GELU_BWD, bias_grad=True, row_dots=(w_A, dweights_A))
    x_AD = x_TD.index_select(0, meta.token_A)
    w2t, w1t = w2.transpose(1, 2), w1.transpose(1, 2)
    cases = {  # name: (launch with the backend's keywords, bare GEMM inputs, grouped_mm)
        "up (gather, bias, GELU)": (
            lambda tma: launch_rows(
                x_TD, w1, a, meta, bias=b1, aux=z, gather=True, epilogue=EPI_GELU, tma=tma
            ),
            lambda: launch_rows(x_AD, w1, a, meta),
            lambda: torch._grouped_mm(x_AD, w1, offs=offs),
        ),
        "down (bias, scale, scatter)": (
            lambda tma: launch_rows(a, w2, out, meta, bias=b2, scale=w_A, scatter=True, tma=tma),
            lambda: launch_rows(a, w2, out, meta),
            lambda: torch._grouped_mm(a, w2, offs=offs),
        ),
        "dZ (w2^T, GELU', db1, d(weights))": (
            lambda tma: launch_rows(do_AD, w2t, dz_AF, meta, **dz_kw, tma=tma),
            lambda: launch_rows(do_AD, w2t, dz_AF, meta),
            lambda: torch._grouped_mm(do_AD, w2t, offs=offs),
        ),
        "dX (w1^T, scatter)": (
            lambda tma: launch_rows(dz_AF, w1t, out, meta, scatter=True, tma=tma),
            lambda: launch_rows(dz_AF, w1t, out, meta),
            lambda: torch._grouped_mm(dz_AF, w1t, offs=offs),
        ),
    }
    flop = 2 * T * D * FF
    for name, (fused, bare, cutlass) in cases.items():
        t = [graph_time(fn, iters) for fn in (lambda: fused(True), lambda: fused(False), bare, cutlass)]  # noqa: B023
        tf = [flop / ms / 1e9 for ms in t]
        print(
            f"  rows {name:28s} triton {t[0] * 1e3:6.1f} us ({tf[0]:4.0f} TFLOP/s), pointer loads "
            f"{t[1] * 1e3:6.1f} us, bare GEMM {t[2] * 1e3:6.1f} us ({tf[2]:4.0f}), grouped_mm {t[3] * 1e3:6.1f} us "
            f"({tf[3]:4.0f})",
            flush=True,
        )
    variants = {  # one feature of the backend's call left out: what it costs
        "dZ without db1 column sums": lambda: launch_rows(
            do_AD, w2t, dz_AF, meta, aux=z, epilogue=EPI_GELU_BWD, row_dots=(w_A, dweights_A)
        ),
        "dZ without d(weights) row dots": lambda: launch_rows(
            do_AD, w2t, dz_AF, meta, aux=z, epilogue=EPI_GELU_BWD, bias_grad=True
        ),
        "dZ loading z after the main loop": lambda: launch_rows(
            do_AD, w2t, dz_AF, meta, **dz_kw, prefetch=False
        ),
    }
    for name, fn in variants.items():
        print(f"  rows {name:45s} {graph_time(fn, iters) * 1e3:6.1f} us", flush=True)
    dy = torch.randn(T, D, **bf16)
    for want in (False, True):
        ms = graph_time(lambda: launch_bwd_prep(dy, b2, w_A, meta, want_dweights=True, bias_grad=want), iters)  # noqa: B023
        print(f"  row prep (dO, <dy, b2>{', db2' if want else ''}): {ms * 1e3:6.1f} us", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
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
    from moe_emergence.kernels import triton_kernels as tk

    for kernel in (tk._rows_kernel, tk._wgrad_kernel):
        for key, cfg in kernel.cache.items():
            print(f"autotuned {kernel.fn.__name__} {key}: {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

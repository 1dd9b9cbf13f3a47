"""Registers and spills of the triton backend's row-GEMM kernel for each call of a layer's forward+backward and
each tile config, compiled for Hopper (sm_90a) on a machine without a GPU: Triton's front end, then the ptxas
Triton itself uses for sm_90 (``ptxas -v``). No kernel runs; nothing needs CUDA.

For kernel work where device time is scarce: on 2026-12-03 the calls that spilled were the ones whose epilogues
cost most on the H200 (the up GEMM's two pointer stores, dZ's routing-weight row dots; docs/benchmarks.md).
Spills are a hint; the GPU's time decides. ``--ttgir`` also counts what Triton's layout passes made of the
epilogue: its layout conversions and tanh instructions (a chain computed twice shows as two tanh).
The calls are compiled as ``launch_rows`` makes them at the GPT-2 shape, top-1, in bf16 (D = 768, F = 3072,
T = 8192, E = 8; integer arguments specialised as Triton would for those sizes; at top-k > 1 the down call writes
float32 slots, which this does not compile):

  up    x[token] @ w1 + b1, GELU: gathered input rows (pointer loads), W by TMA, stores z and a
  down  a @ w2 + b2, times the routing weight, scattered rows: input rows and W by TMA
  dZ    dO @ w2^T times GELU'(z) (z loaded before the main loop), db1 column sums, routing-weight row dots
  dX    dZ @ w1^T, scattered rows

    python scripts/kernel_registers.py [--calls up dZ ...] [--configs tuned | all] [--ttgir]

``tuned``: the autotuner's Hopper list (``triton_kernels.ROWS_SHAPES``); ``all`` adds the persistent form of each.
One line per (call, config): registers per thread, and the spill stores / loads in bytes. Run it with the Triton
the GPU has (e.g. ``pip install --target DIR triton==3.6.0`` and ``PYTHONPATH=DIR``): other Triton versions
allocate registers differently.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from moe_emergence.console import ArgumentParser
from moe_emergence.errors import ConfigError, run_cli
from moe_emergence.kernels import triton_kernels as tk
from moe_emergence.kernels.triton_launch import INTERPRET
from moe_emergence.kernels.triton_rowwise import e_pow2

E = 8
_COMMON = dict(GATHER=False, SCATTER=False, HAS_BIAS=False, SCALE=False, COL_SUMS=False, ROW_DOTS=False,
               PREFETCH_AUX=True, IN_TMA=True, W_TMA=True, W_TRANS=False, E_POW2=e_pow2(E), PRECISION="tf32",
               APPROX_TANH=True)  # fmt: skip
# name: the kernel's constexprs as launch_rows sets them for that call
CALLS = {
    "up": dict(_COMMON, EPILOGUE=tk.EPI_GELU, GATHER=True, HAS_BIAS=True, IN_TMA=False),
    "down": dict(_COMMON, EPILOGUE=tk.EPI_NONE, SCATTER=True, HAS_BIAS=True, SCALE=True),
    "dZ": dict(_COMMON, EPILOGUE=tk.EPI_GELU_BWD, COL_SUMS=True, ROW_DOTS=True, W_TRANS=True),
    "dX": dict(_COMMON, EPILOGUE=tk.EPI_NONE, SCATTER=True, W_TRANS=True),
}
_INDEX = {"in_idx_ptr", "out_idx_ptr", "offsets_ptr"}


def _float32_pointers(constexprs: dict) -> set[str]:
    """The pointers that are float32 in the call (the routing weights, the partial sums); launch_rows passes
    ``out`` (bf16 here) for those the call does not use."""
    used = {
        "scale_ptr": constexprs["SCALE"] or constexprs["ROW_DOTS"],
        "part_ptr": constexprs["COL_SUMS"],
        "dots_ptr": constexprs["ROW_DOTS"],
    }
    return {name for name, on in used.items() if on}


def signature(constexprs: dict, tile: tuple[int, int, int]) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) of ``_rows_kernel`` for one call: pointers 16-byte aligned, integers
    that are multiples of 16 at the GPT-2 shape marked so (E = 8 is not), unit strides constant, as Triton's
    JIT specialises them; the TMA descriptors' boxes follow the tile (``_tma_block_shapes``)."""
    bm, bn, bk = tile
    fn = tk._rows_kernel.fn
    unit = {"s_in_k", "s_wk" if constexprs["W_TRANS"] else "s_wn"}
    sig, consts, attrs, fp32 = {}, dict(constexprs), {}, _float32_pointers(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PERSISTENT"):
            sig[name] = "constexpr"
        elif name == "in_desc" or name == "w_desc":
            on = constexprs["IN_TMA" if name == "in_desc" else "W_TMA"]
            box = [bm, bk] if name == "in_desc" else [1, bn, bk] if constexprs["W_TRANS"] else [1, bk, bn]
            sig[name] = f"tensordesc<bf16[{', '.join(map(str, box))}]>" if on else "constexpr"
            if not on:
                consts[name] = None
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32 else "*i64" if name in _INDEX else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in unit:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if name != "E":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_call(call: str, config: tuple):
    """``_rows_kernel`` compiled for sm_90a as ``launch_rows`` launches ``call``, with ``config`` = (BLOCK_M,
    BLOCK_N, BLOCK_K, warps, stages, persistent): Triton's ``CompiledKernel`` (its ``asm`` has ttgir and ptx)."""
    bm, bn, bk, warps, stages, persistent = config
    constexprs = dict(CALLS[call], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PERSISTENT=persistent)
    if "OUT_TMA" in tk._rows_kernel.fn.arg_names:  # a tree with TMA stores: as launch_rows picks them
        constexprs["OUT_TMA"] = call == "up"
    sig, consts, attrs = signature(constexprs, (bm, bn, bk))
    src = ASTSource(tk._rows_kernel.fn, sig, consts, attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)
    )


def registers(kernel) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) of a ``compile_call`` kernel, from ``ptxas -v``.
    RuntimeError if ptxas fails or says neither."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(kernel.asm["ptx"])
        run = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp, "k.cubin"))],
            capture_output=True,
            text=True,
        )
    log = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if run.returncode or not regs or not spill:
        raise RuntimeError(f"ptxas: {log.strip()[-600:]}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def layout_ops(kernel) -> tuple[int, int]:
    """(layout conversions of 2-d tensors, tanh instructions) in a ``compile_call`` kernel's TTGIR: a 2-d
    conversion moves a tile through shared memory; a one-tile-per-program epilogue whose GELU chain Triton computed
    in two layouts shows two tanh (dZ before 2026-12-03; a persistent loop may show two for one chain)."""
    ttgir = kernel.asm["ttgir"]
    conversions = re.findall(r"ttg\.convert_layout %\S+ : tensor<\d+x\d+x", ttgir)
    return len(conversions), ttgir.count("tanh.approx")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", nargs="+", default=list(CALLS), help=f"of {', '.join(CALLS)}")
    ap.add_argument("--configs", choices=("tuned", "all"), default="tuned")
    ap.add_argument("--ttgir", action="store_true", help="also the 2-d layout conversions and tanh count")
    args = ap.parse_args(argv)
    if INTERPRET:
        raise ConfigError("TRITON_INTERPRET is set: unset it, this compiles for the GPU (no kernel runs)")
    unknown = [c for c in args.calls if c not in CALLS]
    if unknown:
        raise ConfigError(f"--calls: unknown {', '.join(unknown)}; allowed: {', '.join(CALLS)}")
    configs = list(dict.fromkeys(tuple(s) for s in tk.ROWS_SHAPES))
    if args.configs == "all":
        configs = list(dict.fromkeys(configs + [(*s[:5], not s[5]) for s in configs]))
    print(f"triton {triton.__version__}, ptxas {get_ptxas(90).path}")
    for call in args.calls:
        for config in configs:
            kernel = compile_call(call, config)
            regs, stores, loads = registers(kernel)
            bm, bn, bk, warps, stages, persistent = config
            tile = f"{bm}x{bn}x{bk} {warps} warps {stages} stages{' persistent' if persistent else ''}"
            extra = ", {} 2-d layout conversions, {} tanh".format(*layout_ops(kernel)) if args.ttgir else ""
            print(
                f"{call:5s} {tile:40s} {regs:4d} registers, spills {stores:6d} / {loads:6d} bytes{extra}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

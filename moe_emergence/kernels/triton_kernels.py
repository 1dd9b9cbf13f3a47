"""The Triton GEMM kernels of the ``triton`` backend and their launchers (``triton_experts`` registers the ops;
the row-wise kernels and the expert-block layout are in ``triton_rowwise``).

Shapes (legend: docs/architecture.md): T tokens, D model width, F expert intermediate width, E experts,
K experts per token, A = T * K assignments, I and O a GEMM's input and output width (``w_EIO``; ``I_``,
``O_`` as Python names). Inside the kernels, ``M``, ``N``, ``K`` and the tiles ``BLOCK_M``, ``BLOCK_N``,
``BLOCK_K`` keep the usual GEMM naming (rows, output columns, reduction), not the legend's.
Rows ``*_A?`` are in the expert-sorted order of ``routing_meta`` (expert e owns rows
offsets[e]:offsets[e+1]); token-order tensors are ``*_T?``. Row blocks are laid out expert after expert
(``triton_rowwise.block_layout``), so no block mixes two experts' rows.

Kernels:
  ``_rows_kernel``  out[row'] = epilogue(in[row] @ W[e]) for the sorted rows of every expert. The input
                    rows may be gathered (``in_idx``: token rows read inside the GEMM, no padded copy of X)
                    and the output rows scattered (written in assignment order).
                    Epilogues: + bias; GELU-tanh forward (storing the pre-activation too); scale by the
                    routing weight; GELU-tanh backward (times gelu'(z)), optionally with each row's
                    <acc, gelu(z)> / w per column block (the routing-weight gradient's partials).
                    Optionally the float32 column sums of each row block's result (bias-gradient partials).
                    W (and un-gathered input rows) are read by TMA where the tensors allow it (Hopper;
                    not under torch.compile); with the GELU forward epilogue, z and a are written by TMA
                    stores through descriptors made on the device, bounded at the expert's last row.
                    One tile per program, or persistent (one program per SM looping over the tiles).
  ``_wgrad_kernel`` dW[e] = x[rows_e]^T @ g[rows_e] over expert e's sorted rows (TMA loads measured no faster;
                    gathering x's rows from token order inside the GEMM cost 106 us against 73 + 8 us for
                    a sorted copy and this GEMM, H200, 2026-12-03, docs/benchmarks.md).
Tile sizes are autotuned for Hopper; under ``TRITON_INTERPRET=1`` one small fixed config is used. Under
``torch.compile`` (the ops traced by Inductor, ``triton_launch``) each kernel runs one fixed config
(``_traced_tiles``) with pointer loads, no TMA; not where Inductor replays CUDA graphs (``reduce-overhead``), where
the ops stay opaque and launch as uncompiled (``triton_launch.triton_op``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_emergence.kernels.routing_meta import RoutingMeta
from moe_emergence.kernels.triton_launch import INTERPRET, Launcher, fake_arg
from moe_emergence.kernels.triton_rowwise import block_at, block_layout, e_pow2, segment_sums

# MOE_TRITON_AUTOTUNE=0: one fixed config on the GPU too (tests: many small shapes, no tuning time)
AUTOTUNE = os.environ.get("MOE_TRITON_AUTOTUNE", "1") != "0"

EPI_NONE, EPI_GELU, EPI_GELU_BWD = 0, 1, 2


def _tma_block_shapes(nargs: dict) -> None:
    """Config pre-hook of the row kernel: the TMA descriptors' boxes follow the config's tile sizes."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if nargs.get("in_desc") is not None:
        nargs["in_desc"].block_shape = [bm, bk]
    if nargs.get("w_desc") is not None:
        nargs["w_desc"].block_shape = [1, bn, bk] if nargs["W_TRANS"] else [1, bk, bn]


# BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, then the values of the kernel's ``flags`` constexprs (if any)
TileShape = tuple


def tile_configs(shapes: list[TileShape], pre_hook=None, flags: tuple[str, ...] = ()) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **dict(zip(flags, rest, strict=True))},
            num_warps=w,
            num_stages=s,
            pre_hook=pre_hook,
        )
        for m, n, k, w, s, *rest in shapes
    ]


def _tuned(shapes: list[TileShape], flag_values: tuple = ()) -> list[TileShape]:
    """The shapes to autotune over: the Hopper list, or one small fixed shape (interpreter, MOE_TRITON_AUTOTUNE=0)
    with ``flag_values``."""
    if INTERPRET:
        return [(16, 16, 16, 1, 1, *flag_values)]
    return shapes if AUTOTUNE else [(64, 64, 32, 4, 3, *flag_values)]


# PERSISTENT: one program per SM looping over the tiles, the loop flattened (the next tile's loads are issued
# before this tile's epilogue). 128 x 128 tiles with 4 warps and 3 stages fit two programs per SM (one's epilogue
# overlaps the other's main loop). The list: the winners among 28 configs on the H100 (docs/benchmarks.md).
ROWS_FLAGS = ("PERSISTENT",)
ROWS_SHAPES: list[TileShape] = [
    (128, 128, 64, 4, 3, False),  # up and dZ (the fused GELU epilogues), E=8 T=8192
    (128, 128, 64, 4, 4, False),
    (128, 256, 64, 8, 3, False),
    (128, 256, 64, 8, 4, False),
    (128, 256, 64, 8, 4, True),
    (128, 128, 128, 8, 3, False),
    (128, 128, 128, 8, 3, True),  # down and dX (O = 768), E=8 T=8192
    (256, 128, 64, 8, 3, False),
    (64, 128, 64, 4, 3, False),
    (128, 256, 64, 8, 3, True),  # up with TMA stores, E=8 T=8192 and 16384
]
WGRAD_SHAPES: list[TileShape] = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 256, 32, 8, 4),
    (128, 128, 128, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]
ROWS_PRE_HOOK = _tma_block_shapes
ROWS_CONFIGS = tile_configs(_tuned(ROWS_SHAPES, (False,)), ROWS_PRE_HOOK, ROWS_FLAGS)
WGRAD_CONFIGS = tile_configs(_tuned(WGRAD_SHAPES))


@functools.cache
def _large_shared_memory(device: torch.device) -> bool:
    """Can a block of ``device`` opt into 200 KB of shared memory or more (Hopper: 227 KB)?"""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin >= 200 * 1024


def _traced_tiles(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages) of the traced configs, for GEMM operands like ``t``: K-steps of 128
    bytes (64 16-bit or 32 float32 values); 128 x 128 tiles over 3 stages (96 KB of shared memory for the
    operands with pointer loads, ~160 KB with the epilogue's) where the device allows 200 KB a block, else 64 x 128
    tiles over 2 stages (~80 KB). Nothing prunes a traced config, as the autotuner prunes its candidates that do
    not fit: the 128 x 128 x 128 pick of the eager tuning asked 256 KB there (docs/benchmarks.md)."""
    block_k = 128 // t.element_size()
    return (128, 128, block_k, 3) if _large_shared_memory(t.device) else (64, 128, block_k, 2)


def _traced_rows_config(args: tuple, constexprs: dict) -> triton.Config:
    """The row kernel's one config under ``torch.compile`` (no autotuning while tracing: ``Launcher``), tiles by
    ``_traced_tiles``: persistent with 8 warps for the calls that scatter their rows (down, dX), one tile per
    program with 4 warps for the rest (up, dZ), as the tuning picked at the GPT-2 shape on Hopper. RuntimeError
    if the tile were smaller than the one ``launch_rows`` sizes its partial-sum buffers for."""
    scatter = bool(constexprs["SCATTER"])
    bm, bn, bk, stages = _traced_tiles(args[0])
    if bm < _smallest_rows_tile("BLOCK_M") or bn < _smallest_rows_tile("BLOCK_N"):  # launch_rows' buffers
        raise RuntimeError(
            f"traced row-kernel tile {bm} x {bn} below the smallest tile its buffers are sized for"
        )
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSISTENT": scatter},
        num_warps=8 if scatter and bm == 128 else 4,
        num_stages=stages,
    )


def _traced_wgrad_config(args: tuple, constexprs: dict) -> triton.Config:
    """The weight-gradient kernel's one config under ``torch.compile``, tiles by ``_traced_tiles``."""
    bm, bn, bk, stages = _traced_tiles(args[0])
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8 if bm == 128 else 4, num_stages=stages
    )


@triton.jit
def _tanh(u, APPROX: tl.constexpr):
    if APPROX:  # one MUFU instruction, max relative error ~2^-11: below bf16/fp16 rounding of the result
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1
        )
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


# ROWS: the number of rows rounded up to a power of two (the best tile depends on it, e.g. persistent or not)
_ROWS_SIZES = ["ROWS", "N", "K", "E"]
_ROWS_KEY = _ROWS_SIZES + [
    "EPILOGUE",
    "GATHER",
    "SCATTER",
    "HAS_BIAS",
    "COL_SUMS",
    "ROW_DOTS",
    "IN_TMA",
    "W_TMA",
    "OUT_TMA",
]


@triton.jit
def _rows_tile(
    pid_m, pid_n, e, row0, row_end,
    in_ptr, in_desc, w_ptr, w_desc, bias_ptr, out_ptr, aux_ptr, scale_ptr, part_ptr, dots_ptr, in_idx_ptr,
    out_idx_ptr, N, K, A, s_in_m, s_in_k, s_we, s_wk, s_wn, s_be, s_out_m, s_aux_m,
    EPILOGUE: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE: tl.constexpr, COL_SUMS: tl.constexpr, ROW_DOTS: tl.constexpr, PREFETCH_AUX: tl.constexpr,
    IN_TMA: tl.constexpr, W_TMA: tl.constexpr, W_TRANS: tl.constexpr, OUT_TMA: tl.constexpr,
    PRECISION: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] output tile: rows row0.. of expert e (up to row_end), columns of block pid_n."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    in_rows = tl.load(in_idx_ptr + rows, mask=row_mask, other=0) if GATHER else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    rk = tl.arange(0, BLOCK_K)
    in_ptrs = in_ptr + in_rows[:, None].to(tl.int64) * s_in_m + rk[None, :] * s_in_k
    w_ptrs = w_ptr + e.to(tl.int64) * s_we + rk[:, None] * s_wk + cols[None, :] * s_wn
    mask = row_mask[:, None] & col_mask[None, :]
    aux_ptrs = aux_ptr + rows[:, None].to(tl.int64) * s_aux_m + cols[None, :]
    # loads of the epilogue issued before the main loop: their latency hides behind the GEMM. Each row's
    # assignment (where needed), and its routing weight (SCALE: the factor; ROW_DOTS: the divisor)
    slots = tl.load(out_idx_ptr + rows, mask=row_mask, other=0) if SCALE or SCATTER or ROW_DOTS else rows
    if SCALE or ROW_DOTS:
        w_row = tl.load(scale_ptr + slots, mask=row_mask, other=0.0 if SCALE else 1.0).to(tl.float32)
    if EPILOGUE == 2 and PREFETCH_AUX:
        z = tl.load(aux_ptrs, mask=mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = rk < K - k * BLOCK_K
        if IN_TMA:  # rows past e's end belong to the next expert: they only reach masked output rows
            a = in_desc.load([row0.to(tl.int32), k * BLOCK_K])
        else:
            a = tl.load(in_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if W_TMA:  # zero-filled past K and N by the descriptor (a 3-d [E, ., .] box never crosses experts)
            if W_TRANS:
                b = tl.trans(w_desc.load([e, pid_n * BLOCK_N, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K))
            else:
                b = w_desc.load([e, k * BLOCK_K, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
        else:
            b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        in_ptrs += BLOCK_K * s_in_k
        w_ptrs += BLOCK_K * s_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * s_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SCALE:  # scale by the routing weight
        acc *= w_row[:, None]
    c = 0.7978845608028654  # sqrt(2 / pi)
    if EPILOGUE == 1:  # GELU-tanh; aux <- pre-activation z
        _store_tile(aux_ptr, aux_ptrs, acc, mask, row0, row_end, pid_n, N, s_aux_m, OUT_TMA, BLOCK_M, BLOCK_N)
        acc = 0.5 * acc * (1.0 + _tanh(c * (acc + 0.044715 * acc * acc * acc), APPROX_TANH))
    if EPILOGUE == 2:  # times gelu'(z), z read from aux
        if not PREFETCH_AUX:
            z = tl.load(aux_ptrs, mask=mask, other=0.0)
        z = z.to(tl.float32)
        t = _tanh(c * (z + 0.044715 * z * z * z), APPROX_TANH)
        gelu_grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
        # acc = w dy W2^T: this column block's part of <dy, a W2> = <acc, gelu(z)> / w (in assignment order).
        # Both products are formed before the row sum: with the sum between them, Triton 3.6 computed z's GELU
        # chain twice, in two register layouts, and moved the [BLOCK_M, BLOCK_N] float32 factor between them
        # through shared memory (two tanh a value; 400 bytes of spills at 128 x 128, 4 warps, against none:
        # scripts/kernel_registers.py)
        if ROW_DOTS:  # no mask: z = 0 (its masked load) off the tile's rows and columns
            acc_gelu = acc * (z * (1.0 + t))
        acc *= gelu_grad
        if ROW_DOTS:
            dots = 0.5 * tl.sum(acc_gelu, 1)
            # a subnormal w (below float32's smallest normal): dO = w dy underflowed already, and the GPU's
            # division flushes it to zero; its term is dropped rather than divided by 0
            dots = tl.where(tl.abs(w_row) >= 1.1754943508222875e-38, dots / w_row, 0.0)
            tl.store(dots_ptr + pid_n.to(tl.int64) * A + slots, dots, mask=row_mask)
    if COL_SUMS:  # float32 column sums of this block (partials of e's bias gradient)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(tl.where(mask, acc, 0.0), 0), mask=col_mask)
    out_ptrs = out_ptr + (slots if SCATTER else rows)[:, None].to(tl.int64) * s_out_m + cols[None, :]
    _store_tile(out_ptr, out_ptrs, acc, mask, row0, row_end, pid_n, N, s_out_m, OUT_TMA, BLOCK_M, BLOCK_N)


@triton.jit
def _store_tile(base_ptr, ptrs, acc, mask, row0, row_end, pid_n, N, s_m, TMA: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Store the tile ``acc`` in the pointers' dtype: to ``ptrs`` under ``mask``, or (TMA, rows in sorted order)
    as an asynchronous TMA store through a descriptor made here, its rows bounded at ``row_end`` (the rows past
    it, the next expert's, are clipped by the hardware, never written)."""
    if TMA:
        desc = tl.make_tensor_descriptor(
            base_ptr, shape=[row_end, N], strides=[s_m, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
        desc.store([row0.to(tl.int32), pid_n * BLOCK_N], acc.to(base_ptr.dtype.element_ty))
    else:
        tl.store(ptrs, acc.to(base_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=ROWS_CONFIGS, key=_ROWS_KEY)
@triton.jit
def _rows_kernel(
    in_ptr, in_desc, w_ptr, w_desc, bias_ptr, out_ptr, aux_ptr, scale_ptr, part_ptr, dots_ptr,
    in_idx_ptr, out_idx_ptr, offsets_ptr,
    ROWS, N, K, E, A,
    s_in_m, s_in_k, s_we, s_wk, s_wn, s_be, s_out_m, s_aux_m,
    EPILOGUE: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE: tl.constexpr, COL_SUMS: tl.constexpr, ROW_DOTS: tl.constexpr, PREFETCH_AUX: tl.constexpr,
    IN_TMA: tl.constexpr, W_TMA: tl.constexpr, OUT_TMA: tl.constexpr,
    W_TRANS: tl.constexpr, E_POW2: tl.constexpr, PRECISION: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """One tile per program, or (PERSISTENT) one program per SM looping over the tiles: the loop is flattened
    so that the next tile's loads are issued before this tile's epilogue. With SCATTER, the dead rows
    ``offsets[E]:A`` (zero-weight assignments, computed by no expert) write zeros to their output rows, in a
    loop of their own after the tiles (empty when there are none)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    start_E, end_E, first_E, nblk_E = block_layout(offsets_ptr, E, BLOCK_M, E_POW2)
    tiles = (tl.sum(nblk_E, 0) * num_n).to(tl.int32)  # int32 tile ids: TMA offsets are 32-bit
    if not PERSISTENT:  # this program's tile only (none past the last block)
        tiles = tl.minimum(tiles, pid + 1)
    for tile in tl.range(pid, tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m = tile // num_n
        e, row0, row_end = block_at(pid_m, start_E, end_E, first_E, nblk_E, BLOCK_M, E_POW2)
        _rows_tile(
            pid_m, tile % num_n, e, row0, row_end,
            in_ptr, in_desc, w_ptr, w_desc, bias_ptr, out_ptr, aux_ptr, scale_ptr, part_ptr, dots_ptr, in_idx_ptr,
            out_idx_ptr, N, K, A, s_in_m, s_in_k, s_we, s_wk, s_wn, s_be, s_out_m, s_aux_m,
            EPILOGUE, GATHER, SCATTER, HAS_BIAS, SCALE, COL_SUMS, ROW_DOTS, PREFETCH_AUX, IN_TMA, W_TMA, W_TRANS,
            OUT_TMA, PRECISION, APPROX_TANH, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    if SCATTER:
        _zero_dead_rows(pid, out_ptr, out_idx_ptr, offsets_ptr, N, E, A, s_out_m, BLOCK_M, BLOCK_N)


@triton.jit
def _zero_dead_rows(pid, out_ptr, out_idx_ptr, offsets_ptr, N, E, A, s_out_m, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    """out[out_idx[r]] = 0 for the dead rows r in offsets[E]:A, tiles spread over the programs like the GEMM's."""
    dead0 = tl.load(offsets_ptr + E)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles = (tl.cdiv(A - dead0, BLOCK_M) * num_n).to(tl.int32)
    for tile in tl.range(pid, tiles, tl.num_programs(0)):
        rows = dead0 + (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < A
        slots = tl.load(out_idx_ptr + rows, mask=row_mask, other=0)
        out_ptrs = out_ptr + slots[:, None].to(tl.int64) * s_out_m + cols[None, :]
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptrs, zeros, mask=row_mask[:, None] & (cols[None, :] < N))


@triton.autotune(configs=WGRAD_CONFIGS, key=["M", "N", "E"])
@triton.jit
def _wgrad_kernel(
    x_ptr, g_ptr, dw_ptr, offsets_ptr,
    M, N, E,
    s_x_m, s_g_m, s_dw_e, s_dw_m,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    e = pid // (num_m * num_n)
    pid_m = (pid // num_n) % num_m
    pid_n = pid % num_n
    row0 = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(row0, row_end, BLOCK_K):
        rows = r + rk
        rmask = rows < row_end
        x = tl.load(  # [BLOCK_K rows, BLOCK_M cols]: coalesced along the columns, transposed for the dot
            x_ptr + rows[:, None].to(tl.int64) * s_x_m + cm[None, :],
            mask=rmask[:, None] & (cm[None, :] < M),
            other=0.0,
        )
        g = tl.load(
            g_ptr + rows[:, None].to(tl.int64) * s_g_m + cn[None, :],
            mask=rmask[:, None] & (cn[None, :] < N),
            other=0.0,
        )
        acc = tl.dot(tl.trans(x), g, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * s_dw_e + cm[:, None] * s_dw_m + cn[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(cm[:, None] < M) & (cn[None, :] < N))


KERNELS = (_rows_kernel, _wgrad_kernel)  # for triton_launch.triton_op
_ROWS = Launcher(_rows_kernel, traced_config=_traced_rows_config)
_WGRAD = Launcher(_wgrad_kernel, traced_config=_traced_wgrad_config)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not (INTERPRET or torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _smallest_rows_tile(name: str) -> int:
    """The smallest ``name`` (BLOCK_M or BLOCK_N) of any config the row kernel may run: those it tunes over now
    and those its cache holds (tests force configs; a disk cache may hold others), to size per-tile buffers."""
    return min(c.kwargs[name] for c in (*_rows_kernel.configs, *_rows_kernel.cache.values()))


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _nvidia_sm90(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or higher (TMA)."""
    return device.type == "cuda" and torch.version.hip is None and _capability(device.index)[0] >= 9


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address ``t`` (an NVIDIA GPU of Hopper or newer, or the interpreter; last dim
    contiguous, 16-byte aligned base and strides, no empty dim). Not on ROCm (whose MI300 also reports a major
    capability of 9), and not while ``torch.compile`` traces the op (a fake ``t`` has no address; the traced
    launches take no config pre-hook to size the descriptors' boxes): pointer loads."""
    if fake_arg(t) or not INTERPRET and not _nvidia_sm90(t.device):
        return False
    size = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(s * size % 16 == 0 for s in t.stride()[:-1])
        and all(n > 0 for n in t.shape)
    )


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A descriptor over ``t``; its box is set per config by ``_tma_block_shapes`` (this one is a placeholder)."""
    return TensorDescriptor.from_tensor(t, [1] * (t.dim() - 2) + [16, 16])


@functools.cache
def _programs_per_device(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (3 under the interpreter: several tiles each)."""
    return 3 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def launch_rows(
    inp, w_EIO, out, meta: RoutingMeta, *, bias=None, aux=None, scale=None, gather=False, scatter=False,
    epilogue=EPI_NONE, bias_grad=False, grad_dtype=None, row_dots=None, tma=True, prefetch=True,
):  # fmt: skip
    """out[out rows] = epilogue(inp[in rows] @ w_EIO[e]) (with ``scatter``, zeros at the dead rows' output rows:
    ``routing_meta``'s zero-weight assignments); ``w_EIO`` may be a transposed view; ``scale`` holds
    one routing weight per assignment (assignment order: [T, K] or flat). With ``bias_grad``
    returns the per-expert column sums of the result [E, O] (float32 sums, in ``grad_dtype``, default out's
    dtype), else None. ``row_dots=(weights, out)`` (only with ``EPI_GELU_BWD``, whose input rows are
    dO = w dy; weights: the routing weights w, [T, K] or flat): adds to ``out`` ([A] float32, assignment order)
    <dO[r] @ w_EIO[e], gelu(z[r])> / w = <dy, a W2> for each live row (nothing for the dead rows): the routing
    weight's gradient less its bias term <dy, b2>, from float32 partial sums per column block.
    ``tma=False`` forces plain pointer loads and stores, ``prefetch=False`` loads z after the main loop
    (benchmarks)."""
    A, E = meta.order_A.numel(), meta.num_experts
    I_, O_ = w_EIO.shape[1:]
    aux = out if aux is None else aux
    bias = out if bias is None else bias.contiguous()  # the kernel reads a bias row with unit stride
    w_trans = w_EIO.stride(1) == 1 and w_EIO.stride(2) != 1  # a transposed view of an [E, O, I] weight
    w_base = w_EIO.transpose(1, 2) if w_trans else w_EIO
    w_desc = _descriptor(w_base) if tma and _tma_ok(w_base) else None
    in_desc = _descriptor(inp) if tma and not gather and _tma_ok(inp) else None
    # TMA stores where they measured faster: the up GEMM's two [A, F] stores (z and a; docs/benchmarks.md
    # 2026-12-03 06:12); dZ's one store measured slower, the scattered rows cannot be
    out_tma = (
        tma and epilogue == EPI_GELU and not scatter and aux is not out and _tma_ok(out) and _tma_ok(aux)
    )
    part = out  # placeholder without bias_grad
    if bias_grad:  # one row of partial sums per row block, for the smallest BLOCK_M the autotuner may pick
        max_blocks = triton.cdiv(A, _smallest_rows_tile("BLOCK_M")) + E
        part = torch.empty(max_blocks, O_, device=out.device, dtype=torch.float32)
    dots = out  # placeholder without row_dots
    if row_dots is not None:
        if epilogue != EPI_GELU_BWD or scale is not None:
            raise ValueError("launch_rows: row_dots needs epilogue=EPI_GELU_BWD and no scale")
        # one row of partial dots per column block, for the smallest BLOCK_N; dead rows and blocks past N stay 0
        dots = torch.zeros(triton.cdiv(O_, _smallest_rows_tile("BLOCK_N")), A,
                           device=out.device, dtype=torch.float32)  # fmt: skip
        scale = row_dots[0]

    def grid(meta_):
        tiles = (triton.cdiv(A, meta_["BLOCK_M"]) + E) * triton.cdiv(O_, meta_["BLOCK_N"])  # an upper bound
        return (min(tiles, _programs_per_device(out.device)) if meta_["PERSISTENT"] else tiles,)

    config = (_ROWS.with_scratch if out_tma else _ROWS)(
        grid, inp, in_desc, w_EIO, w_desc, bias, out, aux, out if scale is None else scale.contiguous().view(-1), part,
        dots, meta.token_A if gather else meta.order_A, meta.order_A, meta.offsets_E1,
        triton.next_power_of_2(A), O_, I_, E, A,
        inp.stride(0), inp.stride(1), *w_EIO.stride(), bias.stride(0), out.stride(0), aux.stride(0),
        EPILOGUE=epilogue, GATHER=gather, SCATTER=scatter, HAS_BIAS=bias is not out,
        SCALE=scale is not None and row_dots is None, COL_SUMS=bias_grad,
        ROW_DOTS=row_dots is not None, PREFETCH_AUX=prefetch,
        IN_TMA=in_desc is not None, W_TMA=w_desc is not None, OUT_TMA=out_tma,
        W_TRANS=w_trans, E_POW2=e_pow2(E), PRECISION=_precision(inp.dtype),
        APPROX_TANH=not INTERPRET and out.element_size() == 2,  # 16-bit outputs: exact tanh would be rounded away
    )  # fmt: skip
    # the partial dots of the config that ran (the autotuner's trials of other BLOCK_N left rows of theirs)
    if row_dots is not None:
        row_dots[1].add_(dots[: triton.cdiv(O_, config.kwargs["BLOCK_N"])].sum(0))
    if not bias_grad:
        return None
    return segment_sums(part, meta, config.kwargs["BLOCK_M"], grad_dtype or out.dtype)


def launch_wgrad(x, g, meta: RoutingMeta, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dW ``[E, I, O]`` = sum over each expert's sorted rows r of x[r]^T g[r] (x ``[A, I]``, g ``[A, O]``;
    float32 sums, stored in ``dtype``, default x's)."""
    E, I_, O_ = meta.num_experts, x.shape[1], g.shape[1]
    dw = torch.empty(E, I_, O_, device=x.device, dtype=dtype or x.dtype)

    def grid(meta_):
        return (E * triton.cdiv(I_, meta_["BLOCK_M"]) * triton.cdiv(O_, meta_["BLOCK_N"]),)

    _WGRAD(
        grid, x, g, dw, meta.offsets_E1, I_, O_, E, x.stride(0), g.stride(0), dw.stride(0), dw.stride(1),
        PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return dw

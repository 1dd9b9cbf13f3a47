"""Benchmark the experts backends against the dense GPT-2 MLP on one CUDA device (bf16).

Shapes (legend: docs/architecture.md): T tokens, D = 768, F = 3072, E experts, K experts per token.

Layer: dense MLP on K*T tokens (the physical reference: same active FLOPs), each experts backend and a
naive per-expert mask loop; forward and forward+backward median times (CUDA events), peak activation
memory of forward+backward (peak allocated minus allocated before the forward); top-1/top-2,
E in {4, 8, 16}, T in {4096, 8192, 16384}, balanced and Zipf(1.0)-skewed routing.
End to end: training tokens/s of a GPT-2-small-shaped model (random init) with MoE in blocks 8-11
(E=8) vs the same dense model, bf16 autocast, fused AdamW, same batch and sequence length, every variant built
first and measured in interleaved rounds; "graphed" variants run the whole model's forward and backward from
CUDA graphs (``training.model_graph.ModelGraph``; the trainer's ``train.cuda_graphs=model``, what ``auto``
takes, also graphs the objective and the gradient accumulation; "dense graphed" is the dense model run alike,
for scale: the ratios stay against the plain dense model), "layers-graphed" ones each MoE layer whole
(``train.cuda_graphs=layers``), "experts-graphed" ones only its experts (``train.cuda_graphs=experts``); with
``--compile`` also every model compiled (dense and MoE alike), against the compiled dense model. In the layer
rows, which time the experts function alone, "graphed" is that function from its CUDA graphs (``ExpertsGraph``).
Also: torch.profiler summaries of the E=8, T=8192 layers, and a torch.compile check (graph breaks).

    python scripts/bench_moe.py [--quick] [--skip-layer] [--skip-e2e] [--compile [MODE ...]] [--skip-compile]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
import torch.nn.functional as F

from moe_emergence.console import ArgumentParser, check_output_file
from moe_emergence.errors import ConfigError
from moe_emergence.experts import eager_experts, get_backend
from moe_emergence.kernels.cuda_graph import ExpertsGraph

D, FF = 768, 3072
ACT = "gelu_pytorch_tanh"  # same maths as GPT-2's gelu_new, one fused kernel in eager PyTorch


def naive_experts(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, indices_TK, weights_TK, activation):
    """Per-expert mask loop, as common MoE code does (host syncs in torch.where)."""
    y_TD = torch.zeros(x_TD.shape, device=x_TD.device, dtype=torch.float32)
    for e in range(w1_EDF.shape[0]):
        tok, slot = torch.where(indices_TK == e)
        h = F.gelu(x_TD[tok] @ w1_EDF[e] + b1_EF[e], approximate="tanh")
        o = h @ w2_EFD[e] + b2_ED[e]
        y_TD.index_add_(0, tok, o.float() * weights_TK[tok, slot, None])
    return y_TD.to(x_TD.dtype)


def dense_mlp(x, w1, b1, w2, b2):
    return torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1), approximate="tanh"), w2)


def routing(T, E, K, kind, gen):
    if kind == "balanced":  # exactly T*K/E assignments per expert, distinct experts per token
        base = torch.randperm(T, generator=gen) % E
        idx = torch.stack([(base + j * max(1, E // K)) % E for j in range(K)], 1)
    else:  # Zipf(1.0) over experts, K distinct experts per token
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        idx = torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)
    w = torch.rand(T, K, generator=gen)
    return idx.cuda(), (w / w.sum(1, keepdim=True)).cuda()


def experts_inputs(T: int, E: int, Fw: int, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A layer's bf16 input ``x [T, D]`` (requiring grad) and expert weights ``[w1 [E, D, F], b1 [E, F], w2 [E, F, D],
    b2 [E, D]]`` (GPT-2-like scales), drawn from the CPU RNG in that order and moved to ``device``."""
    x = torch.randn(T, D).to(device, torch.bfloat16).requires_grad_()
    p = [torch.randn(E, D, Fw) * 0.02, torch.randn(E, Fw) * 0.1, torch.randn(E, Fw, D) * 0.02]
    return x, [t.to(device, torch.bfloat16) for t in p + [torch.randn(E, D) * 0.1]]


def tune_like_training(impls: dict, E: int, Fw: int, idx, wts, device: str) -> None:
    """One forward and backward of each of ``impls`` (name: (fn, to_layout, _)) on the routing ``idx``, ``wts``
    ([T, K]; callers pass a Zipf routing from a generator of its own) before any is timed at this shape: the
    autotuned kernels (ours and ScatterMoE's; their caches key on the shape, not the routing) pick their configs on
    per-expert counts that are not multiples of a tile, as training routes, rather than on ``balanced``'s (exactly
    T*K/E each, multiples of 128 here; on the H200 the triton layer tuned that way ran Zipf routing 5% slower,
    docs/benchmarks.md 2026-12-03 14:33)."""
    idx, wts = idx.to(device), wts.to(device).requires_grad_()
    x, p = experts_inputs(idx.shape[0], E, Fw, device)
    for fn, to_layout, _ in impls.values():
        q = [t.detach().requires_grad_() for t in to_layout(*p)]
        y = fn(x, *q, idx, wts, ACT)
        torch.autograd.grad(y, [x, *q, wts], torch.ones_like(y))


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def graph_time(fn, iters):
    """Median ms of replaying ``fn`` captured in a CUDA graph: device time without host launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t = timed(graph.replay, iters)
    del graph
    return t


def host_ms(step, n=10) -> float:
    """Host milliseconds to issue one ``step`` while the device is kept busy (a sleep kernel queued first), so
    that neither waits on the other: the launch and dispatch cost alone."""
    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)  # ~0.2 s of device time, more than n steps take to issue
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    ms = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return ms


class Measured(NamedTuple):
    """``measure``'s timings of one forward (and backward): ms, MiB; ``graph_ms`` None when not asked for."""

    fwd_ms: float
    fwdbwd_ms: float
    peak_mem_mib: float
    graph_ms: float | None
    host_ms: float


def measure(fwd, inputs, iters, graph=False) -> Measured:
    """Forward ms, forward+backward ms, peak activation MiB of forward+backward, forward+backward ms as a CUDA
    graph (with ``graph``) and host ms of one forward+backward."""
    # the output gradient from the CPU RNG: a failed CUDA-graph capture breaks CUDA's generator
    y = fwd().detach()
    gy = torch.randn(y.shape).to(y.device, y.dtype)
    del y  # no reference to the autograd graph may stay alive (it breaks graph capture)
    t_f = timed(lambda: fwd(), iters)

    def step():
        torch.autograd.grad(fwd(), inputs, gy)

    t_fb = timed(step, iters)
    gc.collect()  # garbage of earlier rows freed now, not inside the measured step (it would lower the peak)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    return Measured(t_f, t_fb, mem, graph_time(step, iters) if graph else None, host_ms(step))


def bench_layer(quick: bool, iters: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    backends = {"naive": naive_experts, "eager": eager_experts}
    backends |= {n: get_backend(n, torch.device("cuda")) for n in ("grouped_mm", "triton")}
    backends |= {f"{n} graphed": backends[n] for n in ("grouped_mm", "triton")}
    rows = []
    for K in (1, 2):
        for T in (8192,) if quick else (4096, 8192, 16384):
            x = torch.randn(K * T, D).to("cuda", dt).requires_grad_()
            w = [torch.randn(D, FF), torch.randn(FF) * 0.1, torch.randn(FF, D), torch.randn(D) * 0.1]
            w = [(t * (0.02 if t.dim() == 2 else 1)).to("cuda", dt).requires_grad_() for t in w]
            f, fb, mem, gr, host = measure(lambda x=x, w=w: dense_mlp(x, *w), [x, *w], iters, graph=True)
            dense = dict(K=K, T=T, fwd=f, fwdbwd=fb, mem=mem, graph=gr, host_ms=host)
            rows.append(dict(dense, E=0, routing="-", impl="dense(K*T)"))
            print(f"dense K={K} T={T}: fwd {f:.3f} ms fwd+bwd {fb:.3f} ms (graph {gr:.3f}, host {host:.3f}) "
                  f"mem {mem:.0f} MiB")  # fmt: skip
            for E in (8,) if quick else (4, 8, 16):
                tuned = {n: (backends[n], lambda *p: p, None) for n in ("grouped_mm", "triton")}
                tune_like_training(
                    tuned, E, FF, *routing(T, E, K, "zipf", torch.Generator().manual_seed(1)), "cuda"
                )
                for kind in ("balanced", "zipf"):
                    idx, wts = routing(T, E, K, kind, gen)
                    wts.requires_grad_()
                    x, p = experts_inputs(T, E, FF, "cuda")
                    p = [t.requires_grad_() for t in p]
                    for name, fn in backends.items():
                        if name == "naive" and T > 8192:
                            continue
                        graphs = ExpertsGraph() if name.endswith("graphed") else None

                        def fwd(fn=fn, x=x, p=p, idx=idx, wts=wts, graphs=graphs):
                            if graphs is not None:  # the layer's own CUDA graphs (train.cuda_graphs)
                                return graphs(fn, ACT, p, x, idx, wts)
                            return fn(x, *p, idx, wts, ACT)

                        sync_free = name in ("grouped_mm", "triton")  # naive/eager sync; graphed: no nesting
                        f, fb, mem, gr, host = measure(fwd, [x, *p, wts], iters, graph=sync_free)
                        r = dict(K=K, T=T, E=E, routing=kind, impl=name, fwd=f, fwdbwd=fb, mem=mem, graph=gr)
                        r["host_ms"] = host
                        r |= dict(
                            fwd_x=f / dense["fwd"], fwdbwd_x=fb / dense["fwdbwd"], mem_x=mem / dense["mem"]
                        )
                        r["graph_x"] = gr / dense["graph"] if gr is not None else None
                        rows.append(r)
                        gtxt = f"graph {gr:7.3f} ({r['graph_x']:5.2f}x)" if gr is not None else "graph n/a"
                        print(
                            f"K={K} T={T} E={E} {kind:8s} {name:10s} fwd {f:7.3f} ({r['fwd_x']:5.2f}x) "
                            f"fwd+bwd {fb:7.3f} ({r['fwdbwd_x']:5.2f}x) {gtxt} host {host:6.3f} ms "
                            f"mem {mem:6.0f} MiB ({r['mem_x']:.2f}x)",
                            flush=True,
                        )
    return rows


def check_autotuned() -> None:
    """Autotuned Triton kernels at benchmark shapes, bf16, vs eager in float32 (relative errors); exits if any is
    past 1e-2."""
    gen = torch.Generator().manual_seed(2)
    T, E = 8192, 8
    for K in (1, 2):
        idx, wts = routing(T, E, K, "zipf", gen)
        base = [
            torch.randn(T, D),
            torch.randn(E, D, FF) * 0.02,
            torch.randn(E, FF),
            torch.randn(E, FF, D) * 0.02,
        ]
        base = [t.cuda() for t in base + [torch.randn(E, D)]]
        gy = torch.randn(T, D).cuda()
        res = []
        for name, dt in (("eager", torch.float32), ("triton", torch.bfloat16)):
            leaves = [t.to(dt).requires_grad_() for t in base] + [wts.clone().requires_grad_()]
            y = get_backend(name, torch.device("cuda"))(*leaves[:5], idx, leaves[5], ACT)
            res.append([y.float()] + [g.float() for g in torch.autograd.grad(y.float(), leaves, gy)])
        errs = [((b - a).norm() / a.norm()).item() for a, b in zip(*res, strict=True)]
        names = ["y", "x", "w1", "b1", "w2", "b2", "weights"]
        report = ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs, strict=True))
        print(f"autotuned triton bf16 vs eager fp32, K={K}: {report}")
        # bf16 rounding gives ~2-4e-3 here; timings of wrong kernels are not reported
        if not max(errs) <= 1e-2:
            raise SystemExit(f"autotuned triton kernels disagree with eager (K={K}): {report}")


def profile_e2e(compile_mode: str | None = None) -> None:
    """Device-time profiles of 3 training steps (B=8, L=512) of the dense model and of MoE top-1 triton,
    compiled with ``compile_mode`` if given (``--profile-e2e-compile``; "default" shows each kernel, CUDA graphs
    would hide them): each model's device time a step by class (``device_ms_by_class``), then its kernels."""
    from torch.profiler import ProfilerActivity, profile

    for name, moe in (("dense", None), ("moe top-1 triton", e2e_moe(1, "triton"))):
        model = gpt2_small(moe)
        if compile_mode:
            torch._dynamo.reset()
            model.compile(mode=compile_mode)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, 50257, (8, 512), device="cuda")
        for _ in range(3):
            train_step(model, opt, ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                train_step(model, opt, ids)
            torch.cuda.synchronize()
        events = prof.key_averages()
        by_class = device_ms_by_class(events, 3, project_kernel_names())
        print(f"\n## profile: e2e {name} training step x3 (B=8, L=512), compile={compile_mode}: "
              f"{by_class['all']:.2f} ms device time per step; by class (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in by_class.items() if k != "all"))  # fmt: skip
        print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
        del model, opt
        torch.cuda.empty_cache()


# the classes of a training step's device time (``profile_e2e``): a kernel is in the first whose pattern its name
# matches; this project's Triton kernels by name (``project_kernel_names``), before any pattern
# (attention before the GEMMs: PyTorch's own flash and memory-efficient kernels are cutlass templates; under
# max-autotune Inductor's GEMM templates, triton_tem_*, count as Inductor's)
KERNEL_CLASSES = (
    ("fused AdamW", re.compile(r"FusedOptimizer|fused_adamw", re.IGNORECASE)),
    ("attention", re.compile(r"cudnn|fmha|flash", re.IGNORECASE)),
    ("cuBLAS", re.compile(r"nvjet|xmma|cublas|cutlass|gemm", re.IGNORECASE)),
    ("Inductor", re.compile(r"^triton_")),
)


def project_kernel_names() -> frozenset[str]:
    """The names of this project's Triton kernels, as the profiler shows them (the jit functions' names)."""
    from moe_emergence.kernels import triton_kernels, triton_routing, triton_rowwise

    kernels = (*triton_kernels.KERNELS, *triton_rowwise.KERNELS, *triton_routing.KERNELS)
    return frozenset(getattr(k, "fn", k).__name__ for k in kernels)


def device_ms_by_class(events, steps: int, ours: frozenset[str]) -> dict[str, float]:
    """Device time a step (ms) of profiler ``events`` (``key``, ``self_device_time_total`` in us, e.g.
    ``prof.key_averages()`` of a CUDA-only profile over ``steps`` steps) by ``KERNEL_CLASSES``, this project's
    kernels (names in ``ours``) as "this project" and the rest as "other"; every class listed, "all" last."""
    out = {"this project": 0.0, **{name: 0.0 for name, _ in KERNEL_CLASSES}, "other": 0.0}
    for e in events:
        patterns = (name for name, pattern in KERNEL_CLASSES if pattern.search(e.key))
        cls = "this project" if e.key in ours else next(patterns, "other")
        out[cls] += e.self_device_time_total / (1e3 * steps)
    out["all"] = sum(out.values())
    return out


def _profile(title: str, fwd, leaves, iters: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    gy = torch.randn_like(fwd())
    for _ in range(3):
        torch.autograd.grad(fwd(), leaves, gy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(fwd(), leaves, gy)
        torch.cuda.synchronize()
    print(f"\n## profile: {title} T=8192 E=8 fwd+bwd, {iters} iterations")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def profile_layer(iters: int = 5) -> None:
    """Device-time profiles of the E=8, T=8192 layer fwd+bwd: dense MLP on K*T tokens and both fast backends;
    then the tile configs the autotuner chose for each Triton kernel call."""

    gen = torch.Generator().manual_seed(1)
    T, E, dt = 8192, 8, torch.bfloat16
    for K in (1, 2):
        idx, wts = routing(T, E, K, "balanced", gen)
        x = torch.randn(T, D).to("cuda", dt).requires_grad_()
        p = [
            torch.randn(E, D, FF) * 0.02,
            torch.randn(E, FF),
            torch.randn(E, FF, D) * 0.02,
            torch.randn(E, D),
        ]
        p = [t.to("cuda", dt).requires_grad_() for t in p]
        xd = torch.randn(K * T, D).to("cuda", dt).requires_grad_()
        pd = [t[0].detach().clone().requires_grad_() for t in p]
        _profile(f"dense K={K}", lambda: dense_mlp(xd, *pd), [xd, *pd], iters)  # noqa: B023 (called here)
        for name in ("triton", "grouped_mm"):
            fn = get_backend(name, torch.device("cuda"))
            _profile(f"{name} K={K}", lambda: fn(x, *p, idx, wts, ACT), [x, *p], iters)  # noqa: B023
    from moe_emergence.kernels import triton_kernels as tk

    for kernel in (tk._rows_kernel, tk._wgrad_kernel):
        for key, cfg in getattr(kernel, "cache", {}).items():
            print(f"autotuned {kernel.fn.__name__} {key}: {cfg}")


# GPT2Config keys of the end-to-end model besides GPT-2 small's shape: "gpt2" = GPT-2's vocabulary, the fused
# GELU and GPT2Config's dropout 0.1; "scaling" = the model configs/scaling.yaml trains (model.base tiny: its own
# 8192-token vocabulary, gelu_new, no dropout), to set the trainer's tokens/s beside this benchmark's (issue 20.5)
E2E_MODELS = {
    "gpt2": dict(vocab_size=50257, activation_function=ACT),
    "scaling": dict(
        vocab_size=8192, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
}


class WholeModelGraph(torch.nn.Module):
    """``model`` with each training forward and its backward replayed from a ``ModelGraph`` (the model's own
    loss inside the graph; the trainer's ``train.cuda_graphs=model`` also graphs its objective and the gradient
    accumulation, ``training.step_graph``); ``config`` is the model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        from moe_emergence.training.model_graph import ModelGraph

        super().__init__()
        self.model, self.graph, self.config = model, ModelGraph(), model.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        return self.graph(self.model, input_ids, labels, list(getattr(self.config, "moe_layers", [])))


def gpt2_small(moe: dict | None, graphs: str | None = None, kind: str = "gpt2"):
    """GPT-2-small-shaped model (random init, ``E2E_MODELS[kind]``) on the GPU; ``graphs``: ``"model"``, its
    forward and backward run from CUDA graphs (``WholeModelGraph``), ``"layers"``, each MoE layer does, or
    ``"experts"``, their experts do, as the trainer's ``train.cuda_graphs``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM
    from moe_emergence.lm_head import align_lm_head

    kw = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, **E2E_MODELS[kind])
    torch.manual_seed(0)
    if moe is None:
        dense = GPT2LMHeadModel(GPT2Config(**kw))
        # as model_setup.build_model does (not imported here: it needs datasets): the loss type (else transformers'
        # warning breaks the compiled graph) and the aligned LM head GPT2MoEForCausalLM has
        dense.loss_type = "ForCausalLM"
        align_lm_head(dense)
        return WholeModelGraph(dense.cuda()) if graphs == "model" else dense.cuda()
    model = GPT2MoEForCausalLM(GPT2MoEConfig(**kw, moe=moe))
    with torch.no_grad():  # the stacked expert weights are not initialised by from-config construction
        for layer in model.moe_layers().values():
            for p in layer.experts.parameters():
                p.normal_(std=0.02)
    if graphs == "model":
        return WholeModelGraph(model.cuda())
    if graphs is not None:
        from moe_emergence.training.model_setup import graph_layers

        graph_layers(model, graphs)
    return model.cuda()


def e2e_moe(top_k: int, backend: str) -> dict:
    """The MoE part of the end-to-end model: E=8 experts in blocks 8-11."""
    return dict(num_experts=8, top_k=top_k, layers=[8, 9, 10, 11], backend=backend)


def train_step(model, opt, ids) -> None:
    """One bf16-autocast training step of the end-to-end benchmarks and profiles."""
    torch.compiler.cudagraph_mark_step_begin()  # for mode="reduce-overhead" (CUDA graphs); no-op otherwise
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def e2e_variants(only: list[str] | None) -> list[tuple[str, dict | None]]:
    """(name, MoE part) of every end-to-end variant, dense first; ``only``: dense and these."""
    variants = [("dense", None), ("dense graphed", None)]
    for K in (1, 2):
        for backend in ("triton", "grouped_mm", "eager"):
            if K == 2 and backend == "eager":
                continue
            variants.append((f"moe top-{K} {backend}", e2e_moe(K, backend)))
            # graphed: the whole model (train.cuda_graphs=auto); layers-graphed: whole layers; experts-graphed:
            # experts only
            if backend != "eager":
                for graphs in ("graphed", "layers-graphed", "experts-graphed"):
                    variants.append((f"moe top-{K} {backend} {graphs}", e2e_moe(K, backend)))
    if only:
        unknown = sorted(set(only) - {n for n, _ in variants})
        if unknown:
            raise ValueError(f"e2e models: unknown {unknown}; choose from {[n for n, _ in variants]}")
        variants = [v for v in variants if v[0] == "dense" or v[0] in only]
    return variants


def e2e_graphs(name: str) -> str | None:
    """What of an end-to-end variant runs from CUDA graphs (``train.cuda_graphs``), by its name's suffix."""
    for suffix, graphs in (
        (" experts-graphed", "experts"),
        (" layers-graphed", "layers"),
        (" graphed", "model"),
    ):
        if name.endswith(suffix):
            return graphs
    return None


def interleaved(names: list[str], rounds: int, measure: Callable[[str], float]) -> dict[str, list[float]]:
    """``measure(name)`` for every name in each of ``rounds`` rounds, the order rotating by one each round (drift
    of the machine then falls on every name, not on the last ones; with ``rounds`` a multiple of ``len(names)``
    each name takes every position equally often): ``{name: [one value per round]}`` in ``names``' order."""
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            values[name].append(measure(name))
    return values


def median_ratio(values: list[float], reference: list[float]) -> float:
    """Median over rounds of ``values[r] / reference[r]`` (both from ``interleaved``)."""
    return statistics.median(a / b for a, b in zip(values, reference, strict=True))


def tokens_per_s(model, opt, ids, steps: int) -> float:
    """Training tokens/s over ``steps`` back-to-back steps (one sync at the end, as training runs: the host may
    run ahead of the device), between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        train_step(model, opt, ids)
    end.record()
    end.synchronize()
    return steps * ids.numel() / start.elapsed_time(end) * 1e3


def bench_e2e(
    modes: list[str] | tuple[str, ...] = (),
    only: list[str] | None = None,
    kind: str = "gpt2",
    rounds: int = 3,
    steps: int = 20,
    done: Callable[[list[dict]], None] | None = None,
    uncompiled: bool = True,
) -> list[dict]:
    """Training tokens/s of each variant, all built first and then measured in ``rounds`` interleaved rounds of
    ``steps`` steps (B=8, L=512; the order rotates each round), so that drift of the machine hits every variant
    alike; ratio = median over rounds of (variant / dense of the same round). For each of ``modes``
    (``--compile``) every variant is measured again compiled with that torch.compile mode (``nn.Module.compile``
    in place, as ``train.compile`` does; compiled during the 5 warm-up steps each model takes once all are
    built), against the dense model compiled alike. Rows: ``{model, compiled: False or the compile mode, tokens_per_s
    (median), ratio, rounds: [tokens/s...], e2e_model}``; ``done(rows)`` after each mode but the last where given (the
    rows so far: a caller can save them before the next mode). ``uncompiled=False``: the compiled modes only."""
    if isinstance(modes, str) or not set(modes) <= set(COMPILE_MODES):
        raise ValueError(f"compile modes: a list of {COMPILE_MODES}, got {modes!r}")
    measured = e2e_modes(modes, uncompiled)
    rows = []
    gen = torch.Generator().manual_seed(0)
    last_mode = measured[-1]
    for compile_mode in measured:
        compiled = compile_mode is not None
        runs = {}
        if compiled:
            torch._dynamo.reset()  # the previous mode's compiled code; none between this mode's models
        for name, moe in e2e_variants(only):
            if compiled and name.endswith("graphed"):
                continue  # the compiler captures its own graphs (train.cuda_graphs refuses the pair)
            model = gpt2_small(moe, e2e_graphs(name), kind=kind).train()
            if compiled:
                model.compile(mode=compile_mode)  # compiles at its first step, in the warm-up below
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ids = torch.randint(0, model.config.vocab_size, (8, 512), generator=gen).cuda()
            runs[name] = (model, opt, ids)
        # warm-up once all are built (autotuning, graph captures, compilation), so that nothing compiles in a
        # measured round (until f924d7a a reset before each build dropped the earlier models' compiled code and
        # they recompiled in the first round: 21-22k tokens/s against ~300k, 2026-12-02 08:10)
        for run in runs.values():
            tokens_per_s(*run, 5)
        by_name = interleaved(list(runs), rounds, lambda name, runs=runs: tokens_per_s(*runs[name], steps))
        dense = by_name["dense"]
        for name, rates in by_name.items():
            ratio = median_ratio(rates, dense)
            tps = statistics.median(rates)
            rows.append(dict(model=name, compiled=compile_mode or False, tokens_per_s=tps, ratio=ratio,
                             rounds=rates, e2e_model=kind))  # fmt: skip
            tag = f"{name} (compiled {compile_mode})" if compiled else name
            spread = ", ".join(f"{a / b:.2f}" for a, b in zip(rates, dense, strict=True))
            print(f"e2e {tag:35s} {tps:9.0f} tokens/s ({ratio:.2f}x {'compiled ' if compiled else ''}dense; "
                  f"rounds {spread})", flush=True)  # fmt: skip
        del runs
        torch.cuda.empty_cache()
        if done is not None and compile_mode != last_mode:
            done(list(rows))
    return rows


def e2e_modes(modes, uncompiled: bool = True) -> tuple:
    """The compile modes ``bench_e2e`` measures, in order: None (uncompiled) first unless ``uncompiled`` is False,
    then ``modes``; ValueError where that is none."""
    measured = ((None,) if uncompiled else ()) + tuple(modes)
    if not measured:
        raise ValueError("bench_e2e: nothing to measure (uncompiled=False and no compile mode)")
    return measured


COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's


def compile_modes(asked: list[str] | None) -> list[str]:
    """The torch.compile modes of ``--compile [MODE ...]`` (argparse checked them against ``COMPILE_MODES``):
    none when absent, ``["default"]`` when given bare."""
    if asked is None:
        return []
    return list(dict.fromkeys(asked)) or ["default"]  # each once, in the order given


def check_compile() -> dict:
    """Graphs and graph breaks of a compiled 2-block MoE model (triton backend: custom ops), and its loss and
    w1 gradient against eager (compiled with ``fullgraph=True`` when explain found no break)."""
    from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM

    moe = dict(num_experts=4, top_k=2, layers=[1], backend="triton", noise_std=0.0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # else each run draws its own masks
    cfg = GPT2MoEConfig(
        n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=128, moe=moe, **no_dropout
    )
    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(cfg)
    with torch.no_grad():
        for p in model.transformer.h[1].mlp.experts.parameters():
            p.normal_(std=0.05)
    model = model.cuda().train()
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    explain = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    reasons = [str(b.reason) for b in explain.break_reasons]
    print(f"\n## torch.compile: {explain.graph_count} graphs, {explain.graph_break_count} graph breaks")
    for b in explain.break_reasons:
        where = b.user_stack[-1] if b.user_stack else "?"
        print("  break:", str(b.reason).splitlines()[0][:200], "| at", str(where).replace("\n", " ")[:200])
    torch._dynamo.reset()
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    g_ref = model.transformer.h[1].mlp.experts.w1_EDF.grad.clone()
    model.zero_grad()
    fullgraph = explain.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=fullgraph)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    g = model.transformer.h[1].mlp.experts.w1_EDF.grad
    rel = ((g - g_ref).norm() / g_ref.norm()).item()
    print(f"compiled with fullgraph={fullgraph}")
    print(f"w1 grad norms: eager {g_ref.norm().item():.4e}, compiled {g.norm().item():.4e}")
    print(f"compiled loss {loss.item():.6f} vs eager {ref.item():.6f}; w1 grad rel err {rel:.2e}")
    return dict(
        graphs=explain.graph_count,
        graph_breaks=explain.graph_break_count,
        reasons=reasons,
        loss_diff=abs(loss.item() - ref.item()),
        w1_grad_rel_err=rel,
    )


def e2e_names() -> list[str]:
    """The names ``--e2e-models`` accepts (``e2e_variants``' besides dense)."""
    return [name for name, _ in e2e_variants(None)[1:]]


def add_compile_option(ap: ArgumentParser, help_text: str) -> None:
    """``--compile [MODE ...]`` (torch.compile modes, ``COMPILE_MODES``; read with ``compile_modes``)."""
    ap.add_argument(
        "--compile", nargs="*", default=None, choices=COMPILE_MODES, metavar="MODE", help=help_text
    )


def add_rounds_option(ap: ArgumentParser) -> None:
    """``--e2e-rounds N`` (``bench_e2e``'s ``rounds``; unset: None, its default 3, so that a caller can tell it was
    given)."""
    ap.add_argument(
        "--e2e-rounds",
        type=positive_int,
        default=None,
        metavar="N",
        help="with e2e rows: interleaved rounds of 20 steps per model (default 3)",
    )


def add_models_option(ap: ArgumentParser, flag: str, nargs: str, help_text: str) -> None:
    """``flag MODEL ...``: e2e variants by name (``e2e_names``)."""
    ap.add_argument(flag, nargs=nargs, default=None, choices=e2e_names(), metavar="MODEL", help=help_text)


def now() -> str:
    """The current UTC time, ISO 8601 to the second: when a report or its part was written or measured."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def user_error(message: str) -> NoReturn:
    """One ``error:`` line on stderr and exit status 2 (a mistake in the command line, before any GPU work)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return value


def check_json_path(path: str) -> None:
    """Before any GPU work: ``path`` can be written (a writable file, or a new one in a writable folder)."""
    try:
        # replaced: write_json renames a temporary file beside it into place
        check_output_file(path, "--json", "a JSON file", replaced=True)
    except ConfigError as e:
        user_error(str(e))


def write_json(path: str, data) -> None:
    """``data`` as JSON to ``path`` (a link: to its target) through a temporary file beside it, renamed into
    place: a run cut short leaves the file as it was."""
    target = Path(path).resolve()
    # a new file of ours (a random part: a file left by a killed run of the same pid is never in the way), with
    # the umask's permissions (tempfile's are 0600)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = open(tmp, "x")  # noqa: SIM115 (closed below; from here on the file is ours to remove)
    try:
        with f:
            json.dump(data, f, indent=1)
        tmp.replace(target)
    except BaseException:  # e.g. a value JSON cannot hold, or Ctrl-C: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def parse_args(ap: ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``ap.parse_args(argv)``, a mistake being one ``error:`` line (``user_error``)."""
    try:
        return ap.parse_args(argv)
    except ConfigError as e:
        user_error(str(e))


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only E=8, T=8192")
    ap.add_argument("--iters", type=positive_int, default=30)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    add_compile_option(
        ap, "e2e: also measure every model compiled with each torch.compile MODE (none named: 'default')"
    )
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument(
        "--profile-e2e-compile",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="profile the e2e training steps compiled with this torch.compile mode (with the layer profiles)",
    )
    add_models_option(ap, "--e2e-models", "+", 'end-to-end variants besides dense, e.g. "moe top-1 triton"')
    ap.add_argument(
        "--e2e-model",
        choices=sorted(E2E_MODELS),
        default=None,
        help="e2e: the model around the MoE layers (E2E_MODELS: 'scaling' is configs/scaling.yaml's; default gpt2)",
    )
    add_rounds_option(ap)
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    args = parse_args(ap, argv)
    if args.json is not None:
        check_json_path(args.json)
    e2e_options = {"--compile": args.compile, "--e2e-models": args.e2e_models}
    e2e_options |= {"--e2e-model": args.e2e_model, "--e2e-rounds": args.e2e_rounds}
    given = [option for option, value in e2e_options.items() if value is not None]
    if args.skip_e2e and given:
        user_error(f"--skip-e2e measures no e2e rows: drop {' and '.join(given)}, or --skip-e2e")
    if args.skip_profile and args.profile_e2e_compile is not None:
        user_error("--skip-profile runs no profile: drop --profile-e2e-compile, or --skip-profile")
    if not torch.cuda.is_available():
        user_error("bench_moe.py needs a CUDA device (none visible to torch)")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    out = {}
    check_autotuned()  # first: wrong kernels are not timed
    if not args.skip_layer:
        out["layer"] = bench_layer(args.quick, args.iters)
    if not args.skip_profile:
        profile_layer()
        profile_e2e(args.profile_e2e_compile)
    if not args.skip_e2e:
        modes = compile_modes(args.compile)
        given = {"kind": args.e2e_model, "rounds": args.e2e_rounds}  # unset: bench_e2e's defaults
        out["e2e"] = bench_e2e(modes, args.e2e_models, **{k: v for k, v in given.items() if v is not None})
    if not args.skip_compile:
        out["compile"] = check_compile()
    if args.json:
        write_json(args.json, out)
    if "layer" in out:
        cols = ["fwd", "fwd_x", "fwdbwd", "fwdbwd_x", "graph", "graph_x", "mem", "mem_x"]
        print("\n| K | T | E | routing | impl | fwd ms | x dense | fwd+bwd ms | x dense | graph fwd+bwd ms | x dense |"
              " peak MiB | x dense |")  # fmt: skip
        print("|---" * 13 + "|")
        for r in out["layer"]:
            r = dict(r, fwd_x=r.get("fwd_x", 1), fwdbwd_x=r.get("fwdbwd_x", 1), mem_x=r.get("mem_x", 1))
            r["graph_x"] = r.get("graph_x", 1 if r["graph"] is not None else None)
            vals = ["-" if r[c] is None else f"{r[c]:.0f}" if c == "mem" else f"{r[c]:.3f}" if c in
                    ("fwd", "fwdbwd", "graph") else f"{r[c]:.2f}" for c in cols]  # fmt: skip
            print(
                f"| {r['K']} | {r['T']} | {r['E'] or '-'} | {r['routing']} | {r['impl']} | "
                + " | ".join(vals)
                + " |"
            )


if __name__ == "__main__":
    main()

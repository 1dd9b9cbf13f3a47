"""Device time of the triton experts layer against the dense MLP, kernel by kernel: for A/B runs of source trees.

One CUDA device, bf16, GPT-2 expert shape (D=768, F=3072), E=8, T=8192, top-1 and top-2 (``--shape e64`` /
``e128``: bench_peers' fine-grained shapes, E=64 F=768 / E=128 F=384, K=8, T=16384), balanced and Zipf(1.0)
routing (``bench_moe.routing``; ``--routing`` adds two that tell why Zipf costs more, ``routing``; the autotuner
tunes on the first routing measured). Prints one line ``RESULT {json}``: forward+backward ms of the dense MLP on K*T
tokens and of the layer, each captured in a CUDA graph and replayed (median of 40), their ratio, and with
``--kernels`` each kernel's device microseconds in launch order (torch.profiler, eager forward+backward, median
of 6). Compare trees by running it with ``PYTHONPATH=<tree>`` in interleaved rounds (autotune results cached
across processes with ``TRITON_CACHE_AUTOTUNING=1``); it imports nothing else from scripts/, so older trees run too.
``--memory`` instead: peak activation MiB of forward+backward at the GPT-2 shape and bench_peers' fine-grained
shapes, routing uniform over distinct experts (``peak_memory``; the row kernel's partial-sum buffers follow its
configs: the 2026-12-03 figures were taken with ``MOE_TRITON_AUTOTUNE=0``).

    PYTHONPATH=<tree> TRITON_CACHE_AUTOTUNING=1 python scripts/bench_layer_kernels.py [--kernels | --memory]
        [--routing KIND ...] [--shape gpt2|e64|e128]
"""

import json
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

import moe_emergence
from moe_emergence.console import ArgumentParser
from moe_emergence.errors import run_cli
from moe_emergence.experts import get_backend

D, FF, E, T = 768, 3072, 8, 8192
ACT = "gelu_pytorch_tanh"
dev = torch.device("cuda")
bf16 = dict(device="cuda", dtype=torch.bfloat16)


# E, F, the K's, T of each --shape (D=768)
SHAPES = {"gpt2": (E, FF, (1, 2), T), "e64": (64, 768, (8,), 16384), "e128": (128, 384, (8,), 16384)}
ROUTINGS = ("balanced", "zipf", "zipf-aligned", "balanced-unaligned")
DEFAULT_SHAPE, DEFAULT_ROUTINGS = "gpt2", ["balanced", "zipf"]  # without --shape, --routing
ROW_TILE = 128  # rows of the row GEMMs' tiles (BLOCK_M of the configs the autotuner picks at these shapes)


def routing(T, E, K, kind, gen):
    """(indices [T, K], routing weights [T, K] summing to 1 per token) on the CPU, K distinct experts per token.

    ``balanced`` and ``zipf`` are bench_moe's (copied: this script must also run against older trees, whose bench_moe
    differs): exactly T*K/E assignments per expert (a multiple of ``ROW_TILE`` at the benchmark's shapes), and
    Zipf(1.0) over the experts. Two more separate the cost of skew from that of partly filled row tiles (issue 20
    item 3): ``zipf-aligned``, zipf's per-expert counts rounded to multiples of ``ROW_TILE`` (the busiest expert
    takes the remainder): skewed, every tile full; ``balanced-unaligned``, T*K/E -/+ ROW_TILE/2 assignments per
    expert alternately (E even): balanced within ROW_TILE, every expert's last tile half full."""
    if kind == "balanced":
        base = torch.randperm(T, generator=gen) % E
        idx = torch.stack([(base + j * max(1, E // K)) % E for j in range(K)], 1)
    elif kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        idx = torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)
    elif kind == "zipf-aligned":
        counts = torch.bincount(routing(T, E, K, "zipf", gen)[0].flatten(), minlength=E)
        counts = torch.round(counts / ROW_TILE).long() * ROW_TILE
        counts[counts.argmax()] += T * K - counts.sum()
        idx = from_counts(counts, T, K, gen)
    elif kind == "balanced-unaligned" and E % 2 == 0:
        counts = T * K // E + ROW_TILE // 2 * torch.tensor([-1, 1]).repeat(E // 2)
        idx = from_counts(counts, T, K, gen)
    else:
        raise ValueError(f"routing {kind!r} (E={E}): one of {ROUTINGS}, balanced-unaligned for an even E")
    w = torch.rand(T, K, generator=gen)
    return idx, w / w.sum(1, keepdim=True)


def from_counts(counts, T, K, gen):
    """Indices [T, K] with ``counts[e]`` assignments of expert e (each at most T, summing to T*K) and K distinct
    experts per token: the expert-sorted assignments cut into K columns of T (an expert's run of at most T
    assignments meets each token once at most), tokens shuffled."""
    if counts.sum() != T * K or counts.max() > T or counts.min() < 0:
        raise ValueError(f"counts {counts.tolist()}: each in [0, T={T}], summing to T*K={T * K}")
    flat = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return flat.view(K, T).t()[torch.randperm(T, generator=gen)]


def graph_time(fn, iters):
    """Median ms of replaying ``fn`` captured in a CUDA graph (bench_moe's, copied likewise)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def kernels(step, iters=6):
    """(kernel name, median device us) of each kernel ``step`` launches, in launch order."""
    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            ev = json.load(f)["traceEvents"]
    ks = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") == "kernel"), key=lambda e: e["ts"])
    n = len(ks) // iters
    out = []
    for i in range(n):
        durs = [ks[j * n + i]["dur"] for j in range(iters)]
        out.append((ks[i]["name"][:60], round(statistics.median(durs), 1)))
    return out


def peak_memory() -> dict:
    """Peak activation MiB of the layer's forward+backward (peak allocated minus allocated before the second of
    two) at the GPT-2 shape (top-1, top-2) and the fine-grained ones of bench_peers (E=64, F=768 and E=128,
    F=384; K=8, T=16384), each token routed to K distinct experts drawn uniformly."""
    fn, res = get_backend("triton", dev), {}
    for E_, F_, K, T_ in ((E, FF, 1, T), (E, FF, 2, T), (64, 768, 8, 16384), (128, 384, 8, 16384)):
        g = torch.Generator().manual_seed(0)
        idx = torch.stack([torch.randperm(E_, generator=g)[:K] for _ in range(T_)]).cuda()
        w = torch.rand(T_, K, generator=g).cuda()
        w = (w / w.sum(1, keepdim=True)).requires_grad_()
        x = torch.randn(T_, D).to(**bf16).requires_grad_()
        p = [
            torch.randn(E_, D, F_) * 0.02,
            torch.randn(E_, F_),
            torch.randn(E_, F_, D) * 0.02,
            torch.randn(E_, D),
        ]
        p = [t.to(**bf16).requires_grad_() for t in p]
        gy = torch.randn(T_, D).to(**bf16)

        def step(x=x, p=p, idx=idx, w=w, gy=gy):
            torch.autograd.grad(fn(x, *p, idx, w, ACT), [x, *p, w], gy)

        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        res[f"peak MiB E={E_} F={F_} K={K} T={T_}"] = round(
            (torch.cuda.max_memory_allocated() - base) / 2**20, 1
        )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--kernels", action="store_true", help="also each kernel's device time (profiler)")
    mode.add_argument("--memory", action="store_true", help="only the peak activation memory (peak_memory)")
    ap.add_argument(
        "--routing",
        nargs="+",
        choices=ROUTINGS,
        metavar="KIND",
        help=f"default: {' '.join(DEFAULT_ROUTINGS)}",
    )
    ap.add_argument("--shape", choices=SHAPES, help=f"E, F, K, T (SHAPES; default: {DEFAULT_SHAPE})")
    args = ap.parse_args(argv)
    if args.memory and (args.shape is not None or args.routing is not None):
        ap.error("--memory measures its own shapes and routing (peak_memory): drop --shape and --routing")
    if not torch.cuda.is_available():
        ap.error("bench_layer_kernels.py needs a CUDA device (none visible to torch)")
    if args.memory:
        print("RESULT " + json.dumps(peak_memory()))
        return 0
    gen = torch.Generator().manual_seed(0)
    fn = get_backend("triton", dev)
    E, FF, Ks, T = SHAPES[args.shape or DEFAULT_SHAPE]
    res = {"tree": os.path.dirname(moe_emergence.__file__), "shape": f"E={E} F={FF} T={T}"}
    for K in Ks:
        x = torch.randn(K * T, D).to(**bf16).requires_grad_()
        w = [
            torch.randn(D, FF) * 0.02,
            torch.randn(FF) * 0.1,
            torch.randn(FF, D) * 0.02,
            torch.randn(D) * 0.1,
        ]
        w = [t.to(**bf16).requires_grad_() for t in w]
        gy = torch.randn(K * T, D).to(**bf16)

        def dstep(x=x, w=w, gy=gy):
            y = torch.addmm(w[3], F.gelu(torch.addmm(w[1], x, w[0]), approximate="tanh"), w[2])
            torch.autograd.grad(y, [x, *w], gy)

        res[f"dense K={K}"] = graph_time(dstep, 40)
        for kind in dict.fromkeys(args.routing or DEFAULT_ROUTINGS):
            idx, wts = (t.cuda() for t in routing(T, E, K, kind, gen))
            wts.requires_grad_()
            x = torch.randn(T, D).to(**bf16).requires_grad_()
            p = [torch.randn(E, D, FF) * 0.02, torch.randn(E, FF) * 0.1, torch.randn(E, FF, D) * 0.02]
            p = [t.to(**bf16).requires_grad_() for t in p + [torch.randn(E, D) * 0.1]]
            gy = torch.randn(T, D).to(**bf16)

            def step(x=x, p=p, idx=idx, wts=wts, gy=gy):
                torch.autograd.grad(fn(x, *p, idx, wts, ACT), [x, *p, wts], gy)

            key = f"K={K} {kind}"
            res[key] = graph_time(step, 40)
            res[key + " ratio"] = round(res[key] / res[f"dense K={K}"], 3)
            if args.kernels:
                res[key + " kernels"] = kernels(step)
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

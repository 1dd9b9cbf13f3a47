"""Host time of one MoE layer's forward+backward, by part, and of the triton backend's launches (issue 20 item 2).

    python scripts/bench_host.py [--tokens T] [--top-k K ...] [--reps N] [--rounds R] [--json PATH]

Each measurement queues a sleep kernel first, then times the host issuing the work (the GPU is still asleep, so
the host never waits on it: the launch, dispatch and Python cost alone); median of ``--reps``. Every part is
measured in each of ``--rounds`` rounds, the order rotating each round (``bench_moe.interleaved``: the host's speed
drifts by up to 30% within a minute on the H200 machines, docs/benchmarks.md): its ``host_us`` is the median over the
rounds, its ``dense_ratio`` the median of (part / dense of the same round). Shapes (legend:
docs/architecture.md): T tokens, D = 768, F = 3072, E = 8 experts, K in {1, 2}; bf16, as bench_moe's layer rows.

  dense        the dense GPT-2 MLP on K*T tokens, bf16 weights (bench_moe's reference; every ratio is to it)
  dense autocast
               the same MLP as training runs it, and as the wrapper rows run: float32 weights and input under bf16
               autocast (a cast per weight each forward), output cast to float32 for the backward
  triton, grouped_mm, triton graphed
               the experts function alone (routing weights given), the last from its CUDA graphs
               (``train.cuda_graphs``)
  router       ``MoEWrapper.router`` alone (noise on; its maths in float32 whatever the autocast), backward through
               its weights and probabilities
  wrapper, wrapper experts-graphed, wrapper graphed
               the whole ``MoEWrapper`` (triton experts): plain, with its experts from CUDA graphs, and the whole
               layer from CUDA graphs (``train.cuda_graphs``: ``experts``, ``layers``; ``auto`` graphs the whole model)
Then the triton experts with their launches through cached compiled kernels (``kernels.triton_launch``) against
``kernel[grid]``, alternating in ``--rounds`` rounds in this process (each side first in every other round).
JSON: ``{gpu, torch, triton, tokens, top_k, reps, rounds, date, cached_launcher, rows}`` (``date``: UTC, when
written), ``rounds`` the number of rounds; rows ``{K, part, host_us, dense_ratio, round_us}`` (``host_us`` the median of the rounds' ``round_us``; the
launcher rows without ``dense_ratio``); the file is written after each K.
Gradients accumulate into the leaves' ``.grad`` as in gradient accumulation (one add per leaf a call). A
measurement whose sleep ended before the issue did raises RuntimeError (the host waited on the device). Needs a
CUDA device.
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import torch
import triton
from bench_moe import (
    ACT,
    FF,
    D,
    check_json_path,
    dense_mlp,
    interleaved,
    median_ratio,
    now,
    parse_args,
    positive_int,
    user_error,
    write_json,
)

from moe_emergence.config import MoEConfig
from moe_emergence.console import ArgumentParser
from moe_emergence.experts import get_backend
from moe_emergence.kernels import triton_launch
from moe_emergence.kernels.cuda_graph import WARMUP_CALLS, ExpertsGraph, LayerGraph
from moe_emergence.layer import MoEWrapper

E = 8


def host_us(fn, reps: int) -> float:
    """Median microseconds of host time to issue ``fn()`` with the GPU kept busy by a sleep kernel queued first.
    RuntimeError if the sleep had ended before ``fn()`` returned (the host then waited on the device: a sync, or a
    full launch queue), which would make the number device time."""
    for _ in range(WARMUP_CALLS + 1):
        fn()  # warm-up: autotuning; ExpertsGraph warms up and captures inside its first call
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(100_000_000)  # ~50 ms of device time: more than one layer's issue takes
        asleep = torch.cuda.Event()
        asleep.record()  # completes when the sleep ends
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        if asleep.query():
            raise RuntimeError(
                "the GPU's sleep ended before the work was issued: the host waited on the device"
            )
        torch.cuda.synchronize()
    return statistics.median(times)


def layer_parts(T: int, K: int, gen: torch.Generator) -> dict:
    """{part: fn} for one layer's forward+backward (module docstring)."""
    dev, bf = "cuda", torch.bfloat16
    x = (torch.randn(T, D, device=dev, generator=gen) * 0.5).to(bf).requires_grad_()
    p = [torch.randn(E, D, FF, device=dev, generator=gen) * 0.02, torch.zeros(E, FF, device=dev)]
    p += [torch.randn(E, FF, D, device=dev, generator=gen) * 0.02, torch.zeros(E, D, device=dev)]
    p = [t.to(bf).requires_grad_() for t in p]
    probs, idx = torch.randn(T, E, device=dev, generator=gen).softmax(-1).topk(K, -1)
    wts = probs.requires_grad_()
    dy = torch.randn(T, D, device=dev, dtype=bf, generator=gen)
    xd = torch.randn(K * T, D, device=dev, dtype=bf, generator=gen).requires_grad_()
    pd = [t[0].detach().clone().requires_grad_() for t in p]
    dyd = torch.randn(K * T, D, device=dev, dtype=bf, generator=gen)
    graphs = ExpertsGraph()
    # the same MLP as the trainer runs its dense blocks: float32 weights and input under bf16 autocast
    xf, pf = xd.detach().float().requires_grad_(), [t.detach().float().requires_grad_() for t in pd]
    dyf = dyd.float()

    def dense_autocast():
        with torch.autocast("cuda", dtype=bf):
            y = dense_mlp(xf, *pf)
        y.float().backward(dyf)

    parts = {"dense": lambda: dense_mlp(xd, *pd).backward(dyd), "dense autocast": dense_autocast}
    for name in ("triton", "grouped_mm"):
        fn = get_backend(name, torch.device(dev))
        parts[name] = lambda fn=fn: fn(x, *p, idx, wts, ACT).backward(dy)
    triton = get_backend("triton", torch.device(dev))
    parts["triton graphed"] = lambda: graphs(triton, ACT, p, x, idx, wts).backward(dy)
    layer = MoEWrapper(MoEConfig(num_experts=E, top_k=K, backend="triton"), D, FF, activation=ACT).to(dev)
    with torch.no_grad():
        for t in (*layer.experts.parameters(), layer.router.weight):
            t.normal_(std=0.02, generator=gen)
    h = torch.randn(T // 512, 512, D, device=dev, generator=gen, requires_grad=True)

    def router():
        with torch.autocast("cuda", dtype=bf):
            r = layer.router(h.view(-1, D))
        (r.topk_weights.sum() + r.router_probs.sum()).backward()

    def wrapper():
        with torch.autocast("cuda", dtype=bf):
            y, _routing = layer(h)
        y.float().backward(h.detach())

    def graphed(experts_graph: ExpertsGraph | None, layer_graph: LayerGraph | None):
        def run():
            layer.experts.cuda_graph, layer.cuda_graph = experts_graph, layer_graph
            try:
                wrapper()
            finally:
                layer.experts.cuda_graph = layer.cuda_graph = None

        return run

    parts |= {
        "router": router,
        "wrapper": wrapper,
        "wrapper experts-graphed": graphed(ExpertsGraph(), None),
        "wrapper graphed": graphed(None, LayerGraph()),
    }
    return parts


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=positive_int, default=8192, help="T, a multiple of 512")
    ap.add_argument("--reps", type=positive_int, default=25, help="timed repetitions per measurement")
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=4,
        help="rounds of every measurement, the order rotating each round",
    )
    ap.add_argument("--top-k", nargs="+", choices=("1", "2"), default=["1", "2"], help="K values to measure")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parse_args(ap, argv)
    args.top_k = [int(k) for k in dict.fromkeys(args.top_k)]
    if args.tokens % 512:
        user_error(f"--tokens {args.tokens}: a multiple of 512 (the wrapper's input is [T / 512, 512, D])")
    if args.json is not None:
        check_json_path(args.json)
    if not torch.cuda.is_available():
        user_error("bench_host.py needs a CUDA device (none visible to torch)")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, T={args.tokens}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    meta |= dict(tokens=args.tokens, top_k=args.top_k, reps=args.reps, rounds=args.rounds)
    rows = []
    for K in args.top_k:
        rows += measure_top_k(K, layer_parts(args.tokens, K, gen), args.rounds, args.reps)
        if args.json is not None:  # after each K: a later failure keeps what was measured
            write_json(args.json, dict(meta, date=now(), cached_launcher=triton_launch.CACHED, rows=rows))


def measure_top_k(K: int, parts: dict, rounds: int, reps: int) -> list[dict]:
    """The rows of one K: every part in ``rounds`` interleaved rounds, then the launcher comparison."""
    rows = []
    by_part = interleaved(list(parts), rounds, lambda name: host_us(parts[name], reps))
    for name, times in by_part.items():
        ratio = median_ratio(times, by_part["dense"])
        rows.append(dict(K=K, part=name, host_us=statistics.median(times), dense_ratio=ratio, round_us=times))
        print(f"K={K} {name:23s} host {rows[-1]['host_us']:8.1f} us per forward+backward, {ratio:.2f}x dense "
              f"(rounds {', '.join(f'{t:.0f}' for t in times)})", flush=True)  # fmt: skip
    if not triton_launch.CACHED:  # the interpreter, or a Triton whose JITFunction.run differs
        print(
            "the cached launcher is off in this process (kernels/triton_launch.py): no comparison", flush=True
        )
        return rows

    def triton_host_us(label: str) -> float:
        with mock.patch.object(triton_launch, "CACHED", label == "cached launches"):
            return host_us(parts["triton"], reps)

    for label, times in interleaved(["cached launches", "kernel[grid]"], rounds, triton_host_us).items():
        rows.append(dict(K=K, part=f"triton, {label}", host_us=statistics.median(times), round_us=times))
        print(f"K={K} {'triton, ' + label:23s} host {statistics.median(times):8.1f} us "
              f"(rounds {', '.join(f'{t:.0f}' for t in times)})", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

"""``torch.library.opcheck`` of the fast backends' custom ops and ``torch.compile`` of a tiny MoE model using them,
shared by ``test_compile.py``, in-process or in a subprocess.

Run as a script (``python tests/compile_cases.py BACKEND DEVICE [TOP_K ...]``) it prints one JSON object; the Triton
kernels' CPU tests run it with ``TRITON_INTERPRET=1`` so that the variable never reaches the test process.
"""

from __future__ import annotations

import json
import sys

import torch
from kernel_cases import _tiny_model, make_case

from moe_emergence.kernels.routing_meta import routing_meta

ALL_CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _ops(backend: str):
    if backend == "triton":
        from moe_emergence.kernels.triton_experts import triton_experts_bwd as bwd
        from moe_emergence.kernels.triton_experts import triton_experts_fwd as fwd

        return fwd, bwd, ()
    from moe_emergence.kernels.grouped_mm import grouped_mm_experts_bwd as bwd
    from moe_emergence.kernels.grouped_mm import grouped_mm_experts_fwd as fwd

    return fwd, bwd, ("gelu_new",)


def opcheck_ops(backend: str, device: str) -> dict[str, list[str]]:
    """opcheck (schema, fake tensor, autograd registration, AOT dispatch) of the forward and backward op on
    small float32 shapes; ``{op: tests run}`` (raises on a failure)."""
    fwd, bwd, extra = _ops(backend)
    params, indices, dy = make_case("top2", device)  # D=24, F=40: aligned for grouped_mm too
    x, w1, b1, w2, b2, weights = (p.requires_grad_() for p in params)
    meta = routing_meta(indices, w1.shape[0]).tensors()
    results = {}
    if backend == "triton":  # the routing metadata op the backend calls before its forward op
        from moe_emergence.kernels.triton_routing import _routing_op

        routing_args = (indices, weights.detach(), w1.shape[0])
        report = torch.library.opcheck(_routing_op, routing_args, test_utils=ALL_CHECKS)
        results[_routing_op._name] = sorted(k for k, v in report.items() if v == "SUCCESS")
    report = torch.library.opcheck(fwd, (x, w1, b1, w2, b2, weights, *meta, *extra), test_utils=ALL_CHECKS)
    results[fwd._name] = sorted(k for k, v in report.items() if v == "SUCCESS")
    out = fwd(x, w1, b1, w2, b2, weights, *meta, *extra)  # only y is differentiable: autograd would otherwise
    differentiable = [
        t.requires_grad for t in out
    ]  # materialise zero grads as large as the saved activations
    if differentiable != [True] + [False] * (len(out) - 1):
        raise AssertionError(f"{fwd._name}: requires_grad of the outputs {differentiable}, want y's only")
    with torch.no_grad():
        out = fwd(x, w1, b1, w2, b2, weights, *meta, *extra)
    if backend == "triton":
        # saved: x, w1, w2, b2, z, a, weights, meta; the parameters' dtype; which gradients to compute
        saved = (x, w1, w2, b2, *out[1:3], weights, *meta, w1.dtype)
        cases = [(*saved, [True] * 6), (*saved, [True, False, True, True, False, False])]
        # float32 parameters, half-precision x (autocast): the forward casts the weights (two more outputs)
        half = (x.detach().half(), w1, b1, w2, b2, weights, *meta)
        report = torch.library.opcheck(fwd, half, test_utils=ALL_CHECKS[:2])
        results[fwd._name + "/float32 params"] = sorted(k for k, v in report.items() if v == "SUCCESS")
    else:  # saved: x_AD, w1, w2, z, a, o, w_A, weights, meta
        cases = [(out[1], w1, w2, *out[2:], weights, *meta, *extra)]
    for i, args in enumerate(cases):  # the partial-gradient case: schema and fake tensors only (time)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        report = torch.library.opcheck(bwd, (dy, *args), test_utils=ALL_CHECKS if i == 0 else ALL_CHECKS[:2])
        results[bwd._name + ("" if i == 0 else "/partial")] = sorted(
            k for k, v in report.items() if v == "SUCCESS"
        )
    return results


def compare_compiled(
    backend: str,
    device: str,
    top_k: int,
    compile_backend: str = "aot_eager",
    codes: list[str] | None = None,
    mode: str | None = None,
    steps: int = 1,
) -> dict[str, float]:
    """``torch.compile(model, backend=compile_backend, mode=mode, fullgraph=True)`` vs the same model run eagerly
    (float32): relative error of the loss and of every parameter's gradient, plus ``norm:w1`` (the compiled w1
    grad norm). ``codes``: with Inductor, gets the generated code of the forward and backward graphs. ``steps``:
    forward+backward calls of the compiled model (the same batch, gradients zeroed before each), the last one
    compared: ``reduce-overhead`` runs its first call plainly, captures its CUDA graphs at the second and
    replays them from the third."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = _tiny_model(backend, device, top_k)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for run in (model, torch.compile(model, backend=compile_backend, mode=mode, fullgraph=True)):
        model.zero_grad(set_to_none=True)

        def step(run=run) -> torch.Tensor:
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        if codes is not None and run is not model:
            loss, code = run_and_get_code(step)
            codes.extend(code)
        else:
            loss = step()
        for _ in range(steps - 1 if run is not model else 0):
            model.zero_grad(set_to_none=True)
            torch.compiler.cudagraph_mark_step_begin()
            loss = step()
        results.append({"loss": loss.detach()} | {n: p.grad for n, p in model.named_parameters()})
    ref, got = results
    missing = [n for n in ref if ref[n] is None or got[n] is None]
    if missing:
        raise AssertionError(f"no gradient for {missing}")
    errors = {n: ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
    w1 = next(n for n in got if n.endswith("experts.w1_EDF"))
    return errors | {"norm:w1": got[w1].norm().item()}


def main(argv: list[str]) -> None:
    backend, device, *top_ks = argv
    result = {"opcheck": opcheck_ops(backend, device)}
    for k in map(int, top_ks or ["1", "2"]):
        result[f"compile_top{k}"] = compare_compiled(backend, device, k)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Backend-vs-eager comparisons shared by ``test_kernels.py``, in-process or in a subprocess.

Run as a script (``python tests/kernel_cases.py BACKEND DEVICE DTYPE``) it prints one JSON object
{case name: {tensor name: relative error}}; the Triton kernels' CPU tests run it with
``TRITON_INTERPRET=1`` so that the variable never reaches the test process itself.
Relative error = ||backend - reference|| / ||reference|| over the output and every gradient.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch

from moe_emergence.experts import eager_experts, get_backend

# name: (T, D, F, E, K, routing); routing "random" | "empty" (experts 1, 3 unused) | "one" (all on expert 2)
CASES = {
    "top1": (33, 16, 32, 4, 1, "random"),
    "top2": (37, 24, 40, 5, 2, "random"),
    "top3_odd": (29, 17, 23, 5, 3, "random"),
    "top2_empty_experts": (31, 16, 32, 6, 2, "empty"),
    "top1_one_expert": (40, 16, 32, 4, 1, "one"),
}
ALIGNED = [name for name, c in CASES.items() if c[1] % 8 == 0 and c[2] % 8 == 0]
NAMES = ("y", "x", "w1", "b1", "w2", "b2", "weights")


def make_case(name: str | tuple, device: str, seed: int = 0):
    """A case of ``CASES`` by name, or given as its own ``(T, D, F, E, K, routing)`` tuple."""
    T, D, F, E, K, routing = CASES[name] if isinstance(name, str) else name
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w1 = torch.randn(E, D, F, generator=g) / D**0.5
    b1 = torch.randn(E, F, generator=g)
    w2 = torch.randn(E, F, D, generator=g) / F**0.5
    b2 = torch.randn(E, D, generator=g)
    weights = torch.rand(T, K, generator=g)
    pool = {"random": list(range(E)), "empty": [e for e in range(E) if e not in (1, 3)], "one": [2]}[routing]
    rows = [torch.randperm(len(pool), generator=g)[:K] for _ in range(T)]
    indices = torch.tensor(pool)[torch.stack(rows)]
    dy = torch.randn(T, D, generator=g)
    params = [t.to(device) for t in (x, w1, b1, w2, b2, weights)]
    return params, indices.to(device), dy.to(device)


def run_fn(fn, params, indices, dy, dtype):
    leaves = [p.detach().to(dtype, copy=True).requires_grad_() for p in params[:5]]
    leaves.append(params[5].detach().clone().requires_grad_())
    y = fn(*leaves[:5], indices, leaves[5], "gelu_new")
    (y.float() * dy).sum().backward()
    return [y.detach().float()] + [p.grad.float() for p in leaves]


def compare(backend: str, device: str, dtype: torch.dtype, case: str | tuple) -> dict[str, float]:
    """Errors of ``backend`` in ``dtype`` against eager in float32 (the reference) on ``case``."""
    params, indices, dy = make_case(case, device)
    ref = run_fn(eager_experts, params, indices, dy, torch.float32)
    out = run_fn(get_backend(backend, torch.device(device)), params, indices, dy, dtype)
    return {
        n: ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
        for n, o, r in zip(NAMES, out, ref, strict=True)
    }


def compare_autocast(backend: str, device: str, dtype: torch.dtype, case: str = "top2") -> dict[str, float]:
    """float32 parameters (and x) under ``torch.autocast(dtype)``, as mixed-precision training runs the layer:
    ``backend``'s output and gradients against eager float32 without autocast; a gradient not in its
    parameter's dtype (float32) counts as error 1.0."""
    params, indices, dy = make_case(case, device)
    ref = run_fn(eager_experts, params, indices, dy, torch.float32)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    with torch.autocast(device, dtype=dtype):
        y = get_backend(backend, torch.device(device))(*leaves[:5], indices, leaves[5], "gelu_new")
    (y.float() * dy).sum().backward()
    errors = {"y": ((y.float() - ref[0]).norm() / ref[0].norm()).item()}
    for n, p, r in zip(NAMES[1:], leaves, ref[1:], strict=True):
        errors[n] = ((p.grad.float() - r).norm() / r.norm()).item() if p.grad.dtype == p.dtype else 1.0
    return errors


def compare_strided_bias(
    backend: str, device: str, dtype: torch.dtype, case: str = "top2"
) -> dict[str, float]:
    """As ``compare``, with b1 and b2 given as strided views (column stride E: ``[D, E]`` storage transposed)."""
    params, indices, dy = make_case(case, device)
    params[2], params[4] = (b.t().contiguous().t() for b in (params[2], params[4]))
    assert params[4].stride(1) != 1
    ref = run_fn(eager_experts, params, indices, dy, torch.float32)
    out = run_fn(get_backend(backend, torch.device(device)), params, indices, dy, dtype)
    return {
        n: ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
        for n, o, r in zip(NAMES, out, ref, strict=True)
    }


def compare_row_dots_after_autotuning(device: str) -> dict[str, float]:
    """Triton's dZ GEMM autotuned over two configs of different BLOCK_N (the wider one winning, as a fake
    benchmark says): the routing weights' gradient sums only the column-block partials of the config that ran,
    not what the trials of the other left in its buffer. Interpreter only (the GPU tunes for real)."""
    from moe_emergence.kernels import triton_kernels as tk

    shapes = [(16, 16, 16, 1, 1, False), (16, 32, 16, 1, 1, False)]  # F=40: 3 column blocks of 16, 2 of 32
    trials = []

    def fake_bench(kernel_call, quantiles):  # runs the trial (as do_bench does); later configs "faster"
        kernel_call()
        trials.append(1)
        return [10.0 - len(trials)] * 3

    with forced_configs(tk._rows_kernel, tk.tile_configs(shapes, tk.ROWS_PRE_HOOK, tk.ROWS_FLAGS)):
        tk._rows_kernel.__dict__["do_bench"] = fake_bench
        try:
            errors = compare("triton", device, torch.float32, "top2")
        finally:
            del tk._rows_kernel.__dict__["do_bench"]
    if not trials:
        raise AssertionError("the row GEMM was not autotuned: the case tests nothing")
    return errors


def compare_frozen(
    backend: str, device: str, case: str = "top2", trainable: tuple = (0, 2, 4)
) -> dict[str, float]:
    """float32 errors of the gradients of the ``trainable`` inputs (indices into x, w1, b1, w2, b2, weights) when
    the others are frozen. The default, x, b1 and b2: the backward skips the weight GEMMs but still sums the
    bias gradients; (5,), the routing weights alone: the dZ GEMM still runs for their gradient."""
    params, indices, dy = make_case(case, device)
    grads = []
    frozen = [i for i in range(6) if i not in trainable]
    for name in ("eager", backend):
        leaves = [p.detach().clone().requires_grad_(i in trainable) for i, p in enumerate(params)]
        y = get_backend(name, torch.device(device))(*leaves[:5], indices, leaves[5], "gelu_new")
        (y * dy).sum().backward()
        grads.append([leaves[i].grad for i in trainable] + [leaves[i].grad for i in frozen])
    (ref, got), names = grads, [NAMES[1 + i] for i in trainable]
    if any(g is not None for g in got[len(trainable) :]):
        raise AssertionError(f"{backend}: frozen tensors got gradients")
    return {n: ((o - r).norm() / r.norm()).item() for n, o, r in zip(names, got, ref, strict=False)}


def eager_errors(device: str, dtype: torch.dtype, case: str | tuple) -> dict[str, float]:
    """Errors of eager itself in ``dtype``: the scale of rounding a backend is compared with."""
    return compare("eager", device, dtype, case)


def _tiny_model(backend: str, device: str, top_k: int):
    from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM

    moe = dict(num_experts=4, top_k=top_k, layers=[1], noise_std=0.0, backend=backend)
    cfg = GPT2MoEConfig(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, moe=moe,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(cfg)
    # explicit expert init: on main, GPT2MoEForCausalLM(config) leaves the stacked expert weights
    # uninitialised (NaN seen with transformers 5.23); reported to the lead
    with torch.no_grad():
        for layer in model.moe_layers().values():
            for p in layer.experts.parameters():
                p.normal_(std=0.05)
    return model.to(device).train()


def compare_model(backend: str, device: str, top_k: int, checkpointing: bool) -> dict[str, float]:
    """Loss and every parameter gradient of the tiny MoE model with ``backend`` vs eager (float32)."""
    grads = []
    for name in ("eager", backend):
        model = _tiny_model(name, device, top_k)
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({"loss": out.loss.detach()} | {n: p.grad for n, p in model.named_parameters()})
    ref, got = grads
    missing = [n for n in ref if got[n] is None or ref[n] is None]
    if missing:
        raise AssertionError(f"no gradient for {missing}")
    return {n: ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}


def compare_tma(device: str, dtype: torch.dtype, case: str = "top2") -> dict[str, float]:
    """The triton row GEMMs reading W and the sorted input rows through TMA descriptors (the up GEMM also writing
    z and a by TMA stores) against plain pointer loads and stores: the four calls of a forward+backward (with dZ's
    bias-gradient column sums and routing-weight row dots, and the up GEMM's z) on ``case``, about a quarter of
    its routing weights 0 (dead rows). ``*_guard``: 1.0 where a call wrote to the NaN-filled rows after its
    outputs' A rows or (rows in sorted order) to the dead rows (a store not bounded at each expert's last row),
    else 0.0."""
    from moe_emergence.kernels import triton_kernels as tk
    from moe_emergence.kernels.routing_meta import routing_meta

    (x, w1, b1, w2, b2, _), indices, _ = make_case(case, device)
    x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(indices.shape, generator=g)
    weights[torch.rand(indices.shape, generator=g) < 0.25] = 0.0
    weights = weights.to(device)
    meta = routing_meta(indices, w1.shape[0], weights)
    (A,), (D, F), live = meta.order_A.shape, w1.shape[1:], int(meta.offsets_E1[-1])
    assert 0 < live < A, "the case needs live and dead rows"
    a, do, z = (torch.randn(A, n, generator=g).to(device, dtype) for n in (F, D, F))
    if not all(tk._tma_ok(t) for t in (w1, w2, a, do)):
        raise AssertionError(f"{case} {dtype}: sizes a TMA descriptor cannot address; pick another case")
    calls = {  # name: (input, weight view, output columns, launch keywords)
        "up": (x, w1, F, dict(bias=b1, gather=True, epilogue=tk.EPI_GELU)),
        "down": (a, w2, D, dict(bias=b2)),
        "dZ": (do, w2.transpose(1, 2), F, dict(aux=z, epilogue=tk.EPI_GELU_BWD, bias_grad=True)),
        "dX": (a, w1.transpose(1, 2), D, dict(scatter=True)),
    }
    errors = {}
    for name, (inp, w, n, kw) in calls.items():
        outs, sorted_rows, writes_z = [], not kw.get("scatter"), kw.get("epilogue") == tk.EPI_GELU
        for tma in (True, False):
            bufs = [torch.full((A + 5, n), float("nan"), device=device, dtype=dtype) for _ in range(2)]
            out, aux = (buf[:A] for buf in bufs)  # out and z, NaN-filled rows after them (the guard)
            dots = torch.zeros(A, device=device) if name == "dZ" else None
            extra = {"row_dots": (weights, dots)} if dots is not None else {}
            db = tk.launch_rows(inp, w, out, meta, **{"aux": aux, **kw, **extra}, tma=tma)
            rows = slice(0, live) if sorted_rows else slice(0, A)  # unwritten dead rows stay NaN
            named = {"": out[rows], "_db": db, "_dots": dots, "_z": aux[:live] if writes_z else None}
            outs.append({k: v.float() for k, v in named.items() if v is not None})
            written = [buf[A:] for buf in bufs] + ([out[live:]] if sorted_rows else [])
            written += [aux[live:]] if writes_z else []
            wrote_past = any(not t.isnan().all() for t in written)
            errors[f"{name}_guard"] = max(errors.get(f"{name}_guard", 0.0), float(wrote_past))
        for k, ref in outs[1].items():
            errors[name + k] = ((outs[0][k] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return errors


def compare_poisoned_dz(device: str, dtype: torch.dtype) -> dict[str, float]:
    """The dZ GEMM (GELU', db1 sums, routing-weight row dots) with NaN in the dead rows of dO and z (they are
    ``torch.empty`` in the layer) and inf in the first row of expert 2 (read by expert 1's last tile, whose rows run
    past its end), one tile per program and persistent, TMA loads on and off: relative errors of the live rows'
    dZ and dots (the poisoned row left out) against float64, and 1.0 where a dead slot's dot is not 0 or a dead
    row of dZ was written, else 0.0."""
    from transformers.activations import ACT2FN

    from moe_emergence.kernels import triton_kernels as tk
    from moe_emergence.kernels.routing_meta import routing_meta

    g = torch.Generator().manual_seed(0)
    T, D, F, E, K = 37, 24, 23, 4, 2
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    w[torch.rand(T, K, generator=g) < 0.25] = 0.0
    meta = routing_meta(idx.to(device), E, w.to(device))
    A, off = T * K, meta.offsets_E1.tolist()
    live = [r for r in range(off[E]) if r != off[2]]
    w2 = (torch.randn(E, F, D, generator=g) / F**0.5).to(device, dtype)
    do, z = torch.randn(A, D, generator=g), torch.randn(A, F, generator=g) * 2
    do[off[E] :], z[off[E] :] = float("nan"), float("nan")
    do[off[2]] = float("inf")
    do, z = do.to(device, dtype), z.to(device, dtype)
    acc = torch.einsum("ad,afd->af", do.double(), w2.double()[meta.expert_A.long().clamp_max(E - 1)])
    zz = z.double().requires_grad_()
    gelu = ACT2FN["gelu_new"](zz)  # the eager backend's activation, its derivative by autograd
    (gelu_grad,) = torch.autograd.grad(gelu.sum(), zz)
    ref_dz = acc * gelu_grad
    ref_dots = (acc * gelu.detach()).sum(1) / w.to(device).view(-1)[meta.order_A].double()
    errors: dict[str, float] = {}
    for persistent in (False, True):
        shapes = [(*shape[:5], persistent) for shape in tk._tuned(tk.ROWS_SHAPES, (False,))]
        for tma in (True, False):
            out = torch.full((A, F), float("nan"), device=device, dtype=dtype)
            dots = torch.zeros(A, device=device)
            with forced_configs(tk._rows_kernel, tk.tile_configs(shapes, tk.ROWS_PRE_HOOK, tk.ROWS_FLAGS)):
                tk.launch_rows(do, w2.transpose(1, 2), out, meta, aux=z, epilogue=tk.EPI_GELU_BWD, bias_grad=True,
                               row_dots=(w.to(device), dots), tma=tma)  # fmt: skip
            name = f"{'persistent' if persistent else 'tiles'}_{'tma' if tma else 'pointer'}"
            got_dots = dots[meta.order_A[live]].double()
            errors[f"{name}_dots"] = ((got_dots - ref_dots[live]).norm() / ref_dots[live].norm()).item()
            errors[f"{name}_dz"] = ((out[live].double() - ref_dz[live]).norm() / ref_dz[live].norm()).item()
            dead = meta.order_A[off[E] :]
            errors[f"{name}_dead"] = float(bool((dots[dead] != 0).any()) or not out[off[E] :].isnan().all())
    return errors


@contextlib.contextmanager
def forced_configs(jit, configs: list):
    """The autotuned Triton kernel ``jit`` restricted to ``configs`` (its tuning cache emptied) inside the block."""
    saved = jit.configs, jit.cache
    jit.configs, jit.cache = configs, {}
    try:
        yield
    finally:
        jit.configs, jit.cache = saved


def compare_persistent(device: str, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """The triton backend with its row GEMMs run persistent (a few programs looping over all tiles) against
    eager float32, on every case: {case: {tensor: error}}."""
    from moe_emergence.kernels import triton_kernels as tk

    shapes = [(*shape[:5], True) for shape in tk._tuned(tk.ROWS_SHAPES, (False,))]
    configs = tk.tile_configs(shapes, tk.ROWS_PRE_HOOK, tk.ROWS_FLAGS)
    with forced_configs(tk._rows_kernel, configs):
        return {case: compare("triton", device, dtype, case) for case in CASES}


def compare_routing(device: str) -> dict[str, float]:
    """``triton_routing_meta`` against the torch ``routing_meta``: 1.0 for each (T, K, E) whose four tensors or
    expert-id dtype differ, else 0.0; several chunks, empty experts, E = 2^n - 1 and 2^n, one expert, T = 0; each
    without weights and with weights of which about a third are 0 (dead rows), a case with all of them 0."""
    from moe_emergence.kernels.routing_meta import routing_meta
    from moe_emergence.kernels.triton_routing import triton_routing_meta

    g = torch.Generator().manual_seed(3)
    out = {}
    # the last: past the kernels' tiles, so torch's sort
    for T, K, E in [
        (37, 2, 5),
        (700, 2, 8),
        (1500, 1, 16),
        (33, 3, 15),
        (300, 2, 64),
        (5, 1, 1),
        (0, 2, 4),
        (20, 1, 3000),
    ]:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K)
        idx = idx.long().to(device)
        if E > 4:
            idx = torch.where(idx == 1, E - 1, idx)  # expert 1 gets nothing (a token may now repeat one)
        weights = torch.rand(idx.shape, generator=g).to(device)
        weights = weights.masked_fill(weights < 0.3, 0.0)
        for label, w in (("", None), ("_zeros", weights), ("_all_zero", torch.zeros_like(weights))):
            ref, got = routing_meta(idx, E, w), triton_routing_meta(idx, E, w)
            same = ref.expert_A.dtype == got.expert_A.dtype and all(
                torch.equal(r, t) for r, t in zip(ref.tensors(), got.tensors(), strict=True)
            )
            out[f"T{T}_K{K}_E{E}{label}"] = 0.0 if same else 1.0
    return out


def compare_segment_sums(device: str) -> dict[str, float]:
    """``triton_rowwise.segment_sums`` against per-expert sums of the row-block partials in torch (float64):
    relative error per (T, K, E, block rows); experts of up to ~130 blocks (several of the kernel's chunks of 16
    blocks under the interpreter, 64 on the GPU; the last one partly past the expert), an empty expert, one expert
    (indices need not be distinct per token here: only the per-expert counts matter)."""
    from moe_emergence.kernels.routing_meta import routing_meta
    from moe_emergence.kernels.triton_rowwise import segment_sums

    g = torch.Generator().manual_seed(4)
    out = {}
    for T, K, E, block_m, N in [
        (700, 2, 3, 16, 40),
        (2000, 1, 4, 4, 33),
        (300, 3, 7, 16, 8),
        (50, 1, 1, 8, 24),
    ]:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if E > 4:
            idx = torch.where(idx == 1, E - 1, idx)  # expert 1 gets nothing
        meta = routing_meta(idx.to(device), E)
        counts = torch.bincount(idx.flatten(), minlength=E).tolist()
        blocks = [-(-c // block_m) for c in counts]
        part = torch.randn(sum(blocks) + 5, N, generator=g)  # rows past the experts' blocks: not summed
        ends = torch.tensor(blocks).cumsum(0).tolist()
        ref = torch.stack([part[end - n : end].double().sum(0) for n, end in zip(blocks, ends, strict=True)])
        got = segment_sums(part.to(device), meta, block_m, torch.float32).double().cpu()
        out[f"T{T}_K{K}_E{E}_M{block_m}"] = float((got - ref).norm() / ref.norm())
    return out


# zero-weight isolation (``experts`` docstring): name: (T, D, F, E, K); expert 1 is poisoned and gets only
# weight-0 assignments, tokens 0 and 5 (and every token routed to expert 1) have all their weights 0
ISOLATION_CASES = {
    "top1": (33, 16, 32, 4, 1),
    "top2": (37, 24, 40, 5, 2),
    "top1_odd": (31, 17, 23, 3, 1),
    "top2_odd": (29, 17, 23, 5, 2),
    "top3_odd": (27, 9, 13, 6, 3),
    "top2_all_dead": (19, 16, 24, 3, 2),  # every weight 0: y and every gradient 0
}
ISOLATION_ALIGNED = [name for name, c in ISOLATION_CASES.items() if c[1] % 8 == 0 and c[2] % 8 == 0]
# what is non-finite: a bias of expert 1 (b1 makes its hidden activation inf), or x rows 0 and 5 (inf, nan)
POISONS = ("b1_inf", "b2_inf", "b2_nan", "x_inf_nan")
DEAD_TOKENS = (0, 5)


def make_isolation_case(name: str, device: str, seed: int = 0):
    """``(finite params, poisoned params, indices, dy)``: random experts, expert 1 only with weight-0 assignments,
    tokens ``DEAD_TOKENS`` with every weight 0, and about a fifth of the other assignments with weight 0 too (on
    finite experts); the poisoned params differ from the finite ones only where the poison is (parametrised
    by ``name = "<case>/<poison>"``)."""
    case, poison = name.split("/")
    T, D, F, E, K = ISOLATION_CASES[case]
    params, indices, dy = make_case((T, D, F, E, K, "random"), "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    weights = params[5]
    weights[torch.rand(T, K, generator=g) < 0.2] = 0.0
    weights[indices == 1] = 0.0
    weights[list(DEAD_TOKENS)] = 0.0
    if case.endswith("all_dead"):
        weights.zero_()
    poisoned = [p.clone() for p in params]
    x, b1, b2 = poisoned[0], poisoned[2], poisoned[4]
    if poison == "b1_inf":
        b1[1, ::2] = float("inf")
    elif poison == "b2_inf":
        b2[1, 0] = float("inf")
    elif poison == "b2_nan":
        b2[1] = float("nan")
    else:
        x[DEAD_TOKENS[0]] = float("inf")
        x[DEAD_TOKENS[1], ::2] = float("nan")
    to = [t.to(device) for t in (*params, *poisoned, indices, dy)]
    return to[:6], to[6:12], to[12], to[13]


def compare_isolation(backend: str, device: str, dtype: torch.dtype, name: str) -> dict[str, float]:
    """``backend`` on a poisoned case (``make_isolation_case``) against eager float32 on the finite case (the
    assignments of weight 0 are not computed, so the poison must change nothing): relative errors of y and every
    gradient, inf where the backend's tensor is not finite."""
    finite, poisoned, indices, dy = make_isolation_case(name, device)
    ref = run_fn(eager_experts, finite, indices, dy, torch.float32)
    out = run_fn(get_backend(backend, torch.device(device)), poisoned, indices, dy, dtype)
    errors = {}
    for n, o, r in zip(NAMES, out, ref, strict=True):
        finite_out = bool(torch.isfinite(o).all())
        errors[n] = ((o - r).norm() / r.norm().clamp_min(1e-30)).item() if finite_out else float("inf")
    return errors


ISOLATION_KEYS = [f"isolation/{case}/{poison}" for case in ISOLATION_CASES for poison in POISONS]
ISOLATION_PERSISTENT_KEYS = [f"isolation_persistent/top2_odd/{poison}" for poison in ("b2_nan", "x_inf_nan")]


def isolation_results(backend: str, device: str, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """``compare_isolation`` on every case and poison the backend takes (grouped_mm: the aligned cases), and (triton)
    the persistent row GEMMs on one case: {"isolation/<case>/<poison>": errors}."""
    cases = ISOLATION_ALIGNED if backend == "grouped_mm" else list(ISOLATION_CASES)
    out = {
        f"isolation/{case}/{poison}": compare_isolation(backend, device, dtype, f"{case}/{poison}")
        for case in cases
        for poison in POISONS
    }
    if backend == "triton":
        from moe_emergence.kernels import triton_kernels as tk

        shapes = [(*shape[:5], True) for shape in tk._tuned(tk.ROWS_SHAPES, (False,))]
        with forced_configs(tk._rows_kernel, tk.tile_configs(shapes, tk.ROWS_PRE_HOOK, tk.ROWS_FLAGS)):
            for key in ISOLATION_PERSISTENT_KEYS:
                out[key] = compare_isolation(backend, device, dtype, key.split("/", 1)[1])
    return out


def main(argv: list[str]) -> None:
    backend, device, dtype_name = argv
    dtype = getattr(torch, dtype_name)
    result = {case: compare(backend, device, dtype, case) for case in CASES}
    if backend == "triton":
        result["tma_vs_pointer"] = compare_tma(device, dtype)
        result["poisoned_dz"] = compare_poisoned_dz(device, dtype)
        result["routing"] = compare_routing(device)
        for case, errors in compare_persistent(device, dtype).items():
            result[f"persistent_{case}"] = errors
    if dtype != torch.float32:  # float32 parameters under autocast in this dtype
        result["top2_autocast"] = compare_autocast(backend, device, dtype)
    result["top2_strided_bias"] = compare_strided_bias(backend, device, dtype)
    if dtype == torch.float32:
        result.update(isolation_results(backend, device, dtype))
        result["top2_frozen_weights"] = compare_frozen(backend, device)
        if backend == "triton":  # float32 partials whatever the dtype: run once
            result["segment_sums"] = compare_segment_sums(device)
        result["top2_only_routing_weights"] = compare_frozen(backend, device, trainable=(5,))
        if backend == "triton" and device == "cpu":
            result["top2_row_dots_after_autotuning"] = compare_row_dots_after_autotuning(device)
        for k in (1, 2):
            for ckpt in (False, True):
                result[f"model_top{k}_ckpt{int(ckpt)}"] = compare_model(backend, device, k, ckpt)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

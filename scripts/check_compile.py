#!/usr/bin/env python
"""torch.compile of a GPT2MoEForCausalLM with each fast backend: graphs, graph breaks (reason and where), whether
it compiles with ``fullgraph=True``, and loss and gradients of the compiled model against the same model run
eagerly (bf16 autocast). The fast backends are ``torch.library`` custom ops: expected 1 graph, 0 breaks.

    python scripts/check_compile.py [--backends triton grouped_mm] [--top-k 2] [--compile-backend inductor]
        [--device cuda]
"""

from __future__ import annotations

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moe_emergence import MoEConfig, upcycle
from moe_emergence.console import ArgumentParser
from moe_emergence.errors import run_cli


def build(backend: str, top_k: int, device: str):
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=256,
        n_head=4,
        vocab_size=512,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    dense = GPT2LMHeadModel(cfg)
    moe = MoEConfig(
        num_experts=4,
        top_k=top_k,
        layers=[1],
        init="noise",
        init_noise_std=0.5,
        noise_std=0.0,
        backend=backend,
    )
    return upcycle(dense, moe).to(device).train()


def grads(run, model, ids):
    """Loss and gradients of ``model``'s parameters when the forward is ``run`` (the model or its compiled form)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        out = run(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), grads


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--backends", nargs="+", default=["triton", "grouped_mm"])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager)")
    ap.add_argument("--device", default="cuda", help="cpu: grouped_mm (and triton under TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(1)).to(args.device)
    for backend in args.backends:
        model = build(backend, args.top_k, args.device)
        torch._dynamo.reset()
        with torch.autocast(args.device, dtype=torch.bfloat16):
            explain = torch._dynamo.explain(model)(ids, labels=ids)
        reasons = sorted(
            {
                f"{str(b.reason).splitlines()[0][:120]} | at "
                + (str(b.user_stack[-1]).replace(chr(10), " ")[:160] if b.user_stack else "?")
                for b in explain.break_reasons
            }
        )
        loss_e, g_e = grads(model, model, ids)
        torch._dynamo.reset()
        # one graph: compile with fullgraph=True (raises at any break), else allow the breaks explain listed
        fullgraph = explain.graph_break_count == 0
        loss_c, g_c = grads(
            torch.compile(model, fullgraph=fullgraph, backend=args.compile_backend), model, ids
        )
        worst_name, worst = max(
            ((n, ((g_c[n] - g_e[n]).norm() / g_e[n].norm().clamp_min(1e-12)).item()) for n in g_e),
            key=lambda t: t[1],
        )
        zero = [n for n in g_e if g_e[n].norm() > 0 and g_c[n].norm() == 0]
        print(
            f"{backend}: graphs {explain.graph_count}, breaks {explain.graph_break_count}, compiled with "
            f"fullgraph={fullgraph}; "
            f"loss eager {loss_e.item():.6f} compiled {loss_c.item():.6f}; worst relative grad diff {worst:.2e} "
            f"({worst_name}); zero compiled grads: {zero or 'none'}"
        )
        for r in reasons:
            print(f"   break: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

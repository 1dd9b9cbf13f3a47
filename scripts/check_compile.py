#!/usr/bin/env python
"""torch.compile of a GPT2MoEForCausalLM with each fast backend: graph breaks, and loss and gradients of the
compiled model against the same model run eagerly.

    python scripts/check_compile.py [--backends triton grouped_mm] [--top-k 2]
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moe_emergence import MoEConfig, upcycle


def build(backend: str, top_k: int):
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
    return upcycle(dense, moe).cuda().train()


def grads(run, model, ids):
    """Loss and gradients of ``model``'s parameters when the forward is ``run`` (the model or its compiled form)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", nargs="+", default=["triton", "grouped_mm"])
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(1)).cuda()
    for backend in args.backends:
        model = build(backend, args.top_k)
        explain = torch._dynamo.explain(model)(ids, labels=ids)
        reasons = sorted({str(b.reason).splitlines()[0][:120] for b in explain.break_reasons})
        loss_e, g_e = grads(model, model, ids)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        loss_c, g_c = grads(compiled, model, ids)
        worst = max(((g_c[n] - g_e[n]).norm() / g_e[n].norm().clamp_min(1e-12)).item() for n in g_e)
        zero = [n for n in g_e if g_e[n].norm() > 0 and g_c[n].norm() == 0]
        print(
            f"{backend}: graphs {explain.graph_count}, breaks {explain.graph_break_count}; loss eager "
            f"{loss_e.item():.6f} compiled {loss_c.item():.6f}; worst relative grad diff {worst:.2e}; "
            f"zero compiled grads: {zero or 'none'}"
        )
        for r in reasons:
            print(f"   break: {r}")


if __name__ == "__main__":
    main()

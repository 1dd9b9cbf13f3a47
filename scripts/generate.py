"""Sample text from a trained checkpoint, optionally showing which expert each token went to.

python scripts/generate.py runs/quickstart/final --prompt "def add(a, b):" [--show-experts]

User mistakes (a missing or unloadable checkpoint, --show-experts on a dense one) print one ``error:``
line and exit with status 2.
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_emergence  # noqa: F401  (registers gpt2_moe with AutoModelForCausalLM)
from moe_emergence import GPT2MoEForCausalLM
from moe_emergence.console import quiet_libraries
from moe_emergence.errors import ConfigError, as_user_error, run_cli


def _main(argv=None) -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a final/ folder (or any save_pretrained GPT-2 / GPT-2 MoE folder)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--show-experts", action="store_true", help="print each token's top-1 expert per MoE layer"
    )
    args = p.parse_args(argv)
    with as_user_error(f"checkpoint {args.checkpoint!r}"):
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    if args.show_experts and not isinstance(model, GPT2MoEForCausalLM):
        raise ConfigError(f"--show-experts needs an MoE checkpoint; {args.checkpoint!r} is dense")
    if isinstance(model, GPT2MoEForCausalLM):
        with as_user_error(f"checkpoint {args.checkpoint!r}", ValueError):
            model.check_can_generate()
    torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt")
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            temperature=args.temperature if sample else None,
            top_k=args.top_k if sample else None,
            pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    if args.show_experts:
        with torch.no_grad():
            routers = model(out).router_outputs
        routes = {i: r.topk_indices[:, 0].tolist() for i, r in routers.items()}
        layers = sorted(routes)
        print("\n" + "token".ljust(20) + " ".join(f"L{i}".rjust(4) for i in layers))
        for t, tok in enumerate(out[0].tolist()):
            text = repr(tokenizer.decode([tok]))[:18]
            print(text.ljust(20) + " ".join(str(routes[i][t]).rjust(4) for i in layers))
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

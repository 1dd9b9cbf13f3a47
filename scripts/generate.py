"""Sample text from a trained checkpoint, optionally showing which expert each token went to.

python scripts/generate.py runs/quickstart/final --prompt "def add(a, b):" [--prompt "Once upon" ...] [--show-experts]

Several ``--prompt`` flags generate in one left-padded batch; each continuation is what that prompt
generates alone with greedy decoding (``--temperature 0``) or beam search (``--num-beams``); sampled
continuations depend on the batch through the random stream. User mistakes (a missing or unloadable
checkpoint, --show-experts on a dense one) print one ``error:`` line and exit with status 2.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_emergence  # noqa: F401  (registers gpt2_moe with AutoModelForCausalLM)
from moe_emergence import GPT2MoEForCausalLM
from moe_emergence.console import ArgumentParser, quiet_libraries
from moe_emergence.errors import ConfigError, as_user_error, run_cli


def _parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a final/ folder (or any save_pretrained GPT-2 / GPT-2 MoE folder)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--show-experts", action="store_true", help="print each token's top-1 expert per MoE layer"
    )
    return p


def _check(args) -> None:
    for flag, value, low in (
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--num-beams", args.num_beams, 1),
        ("--top-k", args.top_k, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag}={value} is invalid: an integer >= {low}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature={args.temperature} is invalid: a number >= 0 (0 = greedy)")
    if any(not p for p in args.prompt):
        raise ConfigError("--prompt is empty: each prompt needs at least one character")


def _show_experts(model, tokenizer, sequences, mask) -> None:
    with torch.no_grad():
        routers = model(sequences, attention_mask=mask).router_outputs
    S = sequences.shape[1]
    layers = sorted(routers)
    for b, row in enumerate(sequences.tolist()):
        print(f"\n[{b}] " + "token".ljust(16) + " ".join(f"L{i}".rjust(4) for i in layers))
        for s, tok in enumerate(row):
            if not mask[b, s]:
                continue
            text = repr(tokenizer.decode([tok]))[:18]
            experts = (str(int(routers[i].topk_indices[b * S + s, 0])).rjust(4) for i in layers)
            print(text.ljust(20) + " ".join(experts))


def _main(argv=None) -> int:
    quiet_libraries()
    args = _parser().parse_args(argv)
    _check(args)
    with as_user_error(f"checkpoint {args.checkpoint!r}"):
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    if args.show_experts and not isinstance(model, GPT2MoEForCausalLM):
        raise ConfigError(f"--show-experts needs an MoE checkpoint; {args.checkpoint!r} is dense")
    if isinstance(model, GPT2MoEForCausalLM):
        with as_user_error(f"checkpoint {args.checkpoint!r}", ValueError):
            model.check_can_generate()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    sample = args.temperature > 0 and args.num_beams == 1
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            num_beams=args.num_beams,
            temperature=args.temperature if sample else None,
            top_k=args.top_k if sample else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    P = batch["input_ids"].shape[1]
    new_mask = torch.ones_like(out[:, P:])  # generated tokens are real (eos padding after an end included)
    mask = torch.cat([batch["attention_mask"], new_mask], dim=1)
    for b, row in enumerate(out):
        text = tokenizer.decode(row[mask[b].bool()], skip_special_tokens=True)
        print(text if len(args.prompt) == 1 else f"[{b}] {text}")
    if args.show_experts:
        _show_experts(model, tokenizer, out, mask)
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

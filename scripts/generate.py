"""Sample text from a trained checkpoint, optionally showing which expert each token went to.

python scripts/generate.py runs/quickstart/final --prompt "def add(a, b):" [--prompt "Once upon" ...] [--show-experts]

Several ``--prompt`` flags generate in one left-padded batch; each continuation is what that prompt
generates alone with greedy decoding (``--temperature 0``) or beam search (``--num-beams``), except with a
capacity factor (``capacity_factor``: the rows of one forward share each expert's capacity, as in Switch
Transformers); sampled continuations depend on the batch through the random stream. User mistakes (a
missing folder, one without a model or tokenizer, a prompt plus ``--max-new-tokens`` longer than the model's
positions, --show-experts on a dense checkpoint) print one ``error:`` line and exit with status 2.
"""

import json
import math
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_emergence  # noqa: F401  (registers gpt2_moe with AutoModelForCausalLM)
from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM
from moe_emergence.console import ArgumentParser, quiet_libraries
from moe_emergence.errors import ConfigError, as_user_error, run_cli

MIN_TEMPERATURE = 1e-6


def _parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a final/ folder (or any save_pretrained GPT-2 / GPT-2 MoE folder)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default 0.8); 0 = greedy"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default 50)")
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
        if value is not None and value < low:
            raise ConfigError(f"{flag}={value} is invalid: an integer >= {low}")
    t = args.temperature
    if t is not None and not (t == 0 or (math.isfinite(t) and t >= MIN_TEMPERATURE)):
        raise ConfigError(
            f"--temperature={t} is invalid: 0 (greedy) or a finite number >= {MIN_TEMPERATURE} "
            "(smaller ones overflow the scaled logits)"
        )
    if t == 0 and args.top_k is not None:
        raise ConfigError("--top-k is for sampling; --temperature 0 is greedy decoding")
    if args.num_beams > 1 and (args.temperature is not None or args.top_k is not None):
        raise ConfigError(
            "--temperature and --top-k are for sampling; beam search (--num-beams > 1) is deterministic"
        )
    if any(not p for p in args.prompt):
        raise ConfigError("--prompt is empty: each prompt needs at least one character")
    folder = Path(args.checkpoint)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint {args.checkpoint!r}: no such folder")
    if not (folder / "config.json").is_file():
        hint = ""
        if (folder / "final").is_dir():
            hint = " (a run folder: its model is in final/)"
        elif re.fullmatch(r"step_\d+", folder.name):
            hint = (
                " (a training checkpoint: continue it with train.py --resume; generate from the run's final/)"
            )
        raise ConfigError(f"checkpoint {args.checkpoint!r} holds no model (config.json){hint}")
    if args.show_experts and _model_type(folder) != GPT2MoEConfig.model_type:
        raise ConfigError(f"--show-experts needs an MoE checkpoint; {args.checkpoint!r} is dense")
    has_vocab = (folder / "tokenizer.json").is_file() or all(
        (folder / f).is_file() for f in ("vocab.json", "merges.txt")
    )
    if not (has_vocab and (folder / "tokenizer_config.json").is_file()):
        raise ConfigError(
            f"checkpoint {args.checkpoint!r} holds no complete tokenizer (tokenizer_config.json and "
            "tokenizer.json or vocab.json + merges.txt): save one beside the model with "
            "tokenizer.save_pretrained, or use a run's final/ folder"
        )


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: loading the model reports it


def _check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "n_positions", None)
    if limit is not None and prompt_len >= limit:
        raise ConfigError(
            f"--prompt is too long: {prompt_len} tokens, and the model has {limit} positions "
            "(the prompt and at least one new token must fit)"
        )
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ConfigError(
            f"--max-new-tokens={max_new_tokens} is too many: the longest prompt has {prompt_len} tokens and the "
            f"model has {limit} positions, so at most {max(limit - prompt_len, 0)} new tokens fit"
        )


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
    _check_length(model, batch["input_ids"].shape[1], args.max_new_tokens)
    temperature = 0.8 if args.temperature is None else args.temperature
    sample = temperature > 0 and args.num_beams == 1
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            num_beams=args.num_beams,
            temperature=temperature if sample else None,
            top_k=(50 if args.top_k is None else args.top_k) if sample else None,
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

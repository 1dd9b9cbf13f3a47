"""TEMPORARY stand-in for ``moe_emergence.data`` (the Data issue, branch ``data``), written from the API
contract so the trainer can be tested before the data package lands on main. ``conftest.py`` installs it
as ``moe_emergence.data`` ONLY when the real package is missing; delete it once ``data`` is merged.

It builds a tiny synthetic three-domain corpus (code/math/prose-like text), trains a byte-level BPE and
packs blocks with the contract's columns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset


@dataclass
class SourceConfig:
    type: str = "synthetic"
    num_docs: int = 40


@dataclass
class DataConfig:
    domains: dict[str, SourceConfig] = field(
        default_factory=lambda: {k: SourceConfig() for k in ("code", "math", "prose")}
    )
    seq_len: int = 32
    seed: int = 0
    eval_fraction: float = 0.2
    vocab_size: int = 300

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")


@dataclass
class Corpus:
    train: Dataset
    eval: Dataset
    domains: list[str]
    tokenizer: object
    stats: dict


_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "ran",
    "over",
    "hill",
    "river",
    "light",
    "night",
    "king",
    "queen",
    "sea",
    "ship",
    "old",
    "young",
]


def _doc(domain: str, rng: random.Random) -> str:
    if domain == "code":
        return "\n".join(
            f"def f{rng.randint(0, 9)}(x):\n    return x + {rng.randint(0, 99)}" for _ in range(4)
        )
    if domain == "math":
        return " ".join(f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = ?" for _ in range(6))
    return " ".join(rng.choice(_WORDS) for _ in range(30)) + "."


def build_corpus(
    cfg: DataConfig, tokenizer=None, max_positions: int | None = None, tokenizer_dir=None
) -> Corpus:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if max_positions is not None and cfg.seq_len > max_positions:
        raise ValueError(f"data.seq_len={cfg.seq_len} exceeds the model's {max_positions} positions")
    rng = random.Random(cfg.seed)
    domains = list(cfg.domains)
    docs = {d: [_doc(d, rng) for _ in range(cfg.domains[d].num_docs)] for d in domains}
    if tokenizer is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator([t for ds in docs.values() for t in ds], trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
        )
        if tokenizer_dir is not None:
            tokenizer.save_pretrained(Path(tokenizer_dir))
    L = cfg.seq_len
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for d_id, d in enumerate(domains):
        n_eval = max(1, int(len(docs[d]) * cfg.eval_fraction))
        for split, texts in (("eval", docs[d][:n_eval]), ("train", docs[d][n_eval:])):
            ids = [i for t in texts for i in tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]]
            for s in range(0, len(ids), L):
                chunk = ids[s : s + L]
                n = len(chunk)
                splits[split].append(
                    {
                        "input_ids": chunk + [tokenizer.pad_token_id] * (L - n),
                        "attention_mask": [1] * n + [0] * (L - n),
                        "domain_ids": [d_id] * n + [-1] * (L - n),
                    }
                )
    rng.shuffle(splits["train"])
    return Corpus(
        train=Dataset.from_list(splits["train"]),
        eval=Dataset.from_list(splits["eval"]),
        domains=domains,
        tokenizer=tokenizer,
        stats={"blocks": {k: len(v) for k, v in splits.items()}},
    )


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([r["attention_mask"] for r in rows], dtype=torch.long)
    domain_ids = torch.tensor([r["domain_ids"] for r in rows], dtype=torch.long)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "domain_ids": domain_ids,
    }

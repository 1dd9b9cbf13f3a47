"""Tokenizers: a byte-level BPE trained on the train split, or a checkpoint's tokenizer made ready.

Either way the result is a ``PreTrainedTokenizerFast`` with an EOS token (appended to every
document) and a pad token (used for padded block positions, which the attention mask hides).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on ``texts``; ids 0 and 1 are EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Check a given tokenizer has EOS; give it pad = EOS if it has no pad token (the GPT-2 convention)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos_token; documents are joined with EOS, so one is required"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser) and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"eos={tokenizer.eos_token_id} pad={tokenizer.pad_token_id}".encode())
    return h.hexdigest()[:16]


def encode_documents(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens; the packer appends EOS)."""
    if not docs:
        return []
    return tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]

"""Three-domain data pipeline: sources -> document split -> tokenizer -> pack (with domain ids) -> mix.

``build_corpus(DataConfig)`` returns a ``Corpus`` of packed ``seq_len`` blocks with a domain id per token;
``collate_blocks`` turns its rows into the trainer's tensors. Not imported by ``moe_emergence`` itself.
"""

from moe_emergence.data.config import (
    DataConfig,
    SourceConfig,
    default_offline_config,
    local_study_config,
)
from moe_emergence.data.corpus import Corpus, build_corpus, collate_blocks, load_corpus
from moe_emergence.data.mathgen import MathProblem, generate_problems
from moe_emergence.data.rows import block_rows, rows_of
from moe_emergence.data.sources import load_documents, split_text
from moe_emergence.data.tokenizer import train_bpe_tokenizer

__all__ = [
    "Corpus",
    "DataConfig",
    "MathProblem",
    "SourceConfig",
    "block_rows",
    "build_corpus",
    "collate_blocks",
    "default_offline_config",
    "generate_problems",
    "load_corpus",
    "load_documents",
    "local_study_config",
    "rows_of",
    "split_text",
    "train_bpe_tokenizer",
]

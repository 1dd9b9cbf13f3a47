import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _data_fixtures import small_config
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moe_emergence.data import block_rows, build_corpus, collate_blocks, load_corpus, load_documents, rows_of
from moe_emergence.data import corpus as corpus_mod
from moe_emergence.data.corpus import SPLITS
from moe_emergence.data.pipeline import mix_targets, split_documents


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    cfg = small_config(tmp)
    return cfg, build_corpus(cfg, tokenizer_dir=tmp / "run" / "tokenizer"), tmp / "run" / "tokenizer"


def split_streams(cfg, eos: str) -> dict[str, tuple[str, str, str]]:
    """Per domain, the train, val and eval documents joined by EOS exactly as the packer sees them."""
    out = {}
    for name, src in cfg.domains.items():
        docs = load_documents(name, src, cfg.seed, Path(cfg.root_dir))
        split = split_documents(
            docs, cfg.eval_fraction, cfg.min_eval_docs, cfg.seed, name, val_fraction=cfg.val_fraction
        )
        out[name] = tuple(eos.join(part) + eos for part in split)
    return out


def runs(row):
    """(domain id, token ids) runs of one block, padding dropped."""
    ids, dom, mask = (np.asarray(row[k]) for k in ("input_ids", "domain_ids", "attention_mask"))
    ids, dom = ids[mask == 1], dom[mask == 1]
    cuts = np.flatnonzero(np.diff(dom)) + 1
    return [(int(d[0]), i.tolist()) for d, i in zip(np.split(dom, cuts), np.split(ids, cuts), strict=True)]


def test_blocks_shape_and_padding(built):
    cfg, corpus, _ = built
    assert corpus.domains == ["code", "math", "prose"]
    assert set(corpus.train.column_names) == {"input_ids", "attention_mask", "domain_ids"}
    assert len(corpus.val) > 0 and corpus.stats["total"]["val_blocks"] == len(corpus.val)
    for ds in (corpus.train, corpus.val, corpus.eval):
        ids, mask, dom = (np.asarray(ds[c]) for c in ("input_ids", "attention_mask", "domain_ids"))
        assert ids.shape[1] == cfg.seq_len and ids.shape == mask.shape == dom.shape
        assert set(np.unique(mask)) <= {0, 1} and ((dom == -1) == (mask == 0)).all()
        assert (ids[mask == 0] == corpus.tokenizer.pad_token_id).all()
    assert corpus.tokenizer.eos_token_id is not None and corpus.tokenizer.pad_token_id is not None
    assert len(corpus.tokenizer) == cfg.vocab_size


def test_every_token_domain_id_is_right(built):
    cfg, corpus, _ = built
    tok = corpus.tokenizer
    streams = split_streams(cfg, tok.eos_token)
    for split, ds in enumerate((corpus.train, corpus.val, corpus.eval)):
        for row in ds:
            (domain, ids), *rest = runs(row)
            assert not rest, "without cross_domains a block holds one domain"
            text = tok.decode(ids)
            assert text in streams[corpus.domains[domain]][split], (corpus.domains[domain], text)


def test_cross_domains_labels_each_token(tmp_path):
    cfg = small_config(tmp_path, cross_domains=True, mixing="natural", cache_dir=None)
    corpus = build_corpus(cfg)
    streams = split_streams(cfg, corpus.tokenizer.eos_token)
    mixed = 0
    for row in corpus.train:
        block_runs = runs(row)
        mixed += len({d for d, _ in block_runs}) > 1
        for domain, ids in block_runs:
            # documents are interleaved across domains, so check each document piece of the run
            for piece in corpus.tokenizer.decode(ids).split(corpus.tokenizer.eos_token):
                assert piece in streams[corpus.domains[domain]][0], (corpus.domains[domain], piece)
    assert mixed > 0


def test_document_split_has_no_overlap(built):
    cfg, corpus, _ = built
    tok = corpus.tokenizer
    prose = corpus.domains.index("prose")

    def markers(ds):
        return {
            m
            for row in ds
            for d, ids in runs(row)
            if d == prose
            for m in re.findall(r"Record \d{4}", tok.decode(ids))
        }

    train, val, eval_ = markers(corpus.train), markers(corpus.val), markers(corpus.eval)
    assert len(eval_) >= 10 and len(val) >= 5 and len(train) >= 30
    assert not train & eval_ and not train & val and not val & eval_  # whole documents, no leakage


def test_val_split_is_disjoint_deterministic_and_leaves_eval_alone(built):
    cfg, _, _ = built
    docs = load_documents("math", cfg.domains["math"], cfg.seed, Path(cfg.root_dir))
    n = len(docs)

    def split(seed=0, val=0.1):
        return split_documents(docs, 0.2, 1, seed, "math", val_fraction=val)

    tr, va, ev = split()
    assert len(ev) == round(0.2 * n) and len(va) == round(0.1 * n) and len(tr) == n - len(ev) - len(va)
    assert not set(tr) & set(ev) and not set(tr) & set(va) and not set(va) & set(ev)
    assert sorted(tr + va + ev) == sorted(docs)
    assert split() == split() and split().val != split(seed=1).val and split().eval != split(seed=1).eval
    no_val = split(val=0.0)
    assert no_val.val == [] and no_val.eval == ev and no_val.train == va + tr  # val comes out of train
    assert split(val=0.3).eval == ev and split(val=1e-6).val == va[:1]  # at least one val document
    with pytest.raises(ValueError, match=r"data.domains.math: only 3 documents.*2 for eval and 1 for val"):
        split_documents(docs[:3], 0.5, 1, 0, "math", val_fraction=0.3)


def test_token_balanced_train_and_unbalanced_eval(built):
    cfg, corpus, _ = built
    train = corpus.stats["train"]
    tokens = [train[d]["tokens"] for d in corpus.domains]
    assert max(tokens) - min(tokens) <= cfg.seq_len and min(tokens) == min(
        corpus.stats["available_train_tokens"].values()
    )
    blocks = [train[d]["blocks"] for d in corpus.domains]
    assert max(blocks) - min(blocks) <= 1
    dom = np.asarray(corpus.train["domain_ids"])
    assert [int((dom == i).sum()) for i in range(3)] == tokens
    ev = np.asarray(corpus.eval["domain_ids"])
    assert [int((ev == i).sum()) for i in range(3)] == [
        corpus.stats["eval"][d]["tokens"] for d in corpus.domains
    ]
    assert len(set(corpus.stats["eval"][d]["tokens"] for d in corpus.domains)) == 3, "eval is not rebalanced"


def test_weighted_and_natural_mixing(tmp_path):
    assert mix_targets({"a": 1000, "b": 300}, "balanced", {}) == {"a": 300, "b": 300}
    assert mix_targets({"a": 1000, "b": 300}, "weighted", {"a": 3.0, "b": 1.0}) == {"a": 900, "b": 300}
    assert mix_targets({"a": 1000, "b": 300}, "weighted", {"a": 1.0, "b": 9.0}) == {"a": 33, "b": 300}
    assert mix_targets({"a": 1000, "b": 300}, "natural", {}) == {"a": 1000, "b": 300}
    w = {"code": 2.0, "math": 1.0, "prose": 1.0}
    corpus = build_corpus(small_config(tmp_path, mixing="weighted", weights=w, cache_dir=None))
    t = {d: corpus.stats["train"][d]["tokens"] for d in corpus.domains}
    assert abs(t["code"] - 2 * t["math"]) <= 2 and abs(t["math"] - t["prose"]) <= 1


def test_determinism_and_seed(tmp_path):
    a = build_corpus(small_config(tmp_path, cache_dir=None))
    b = build_corpus(small_config(tmp_path, cache_dir=None))
    c = build_corpus(small_config(tmp_path, cache_dir=None, seed=1))
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["input_ids"] == b.eval["input_ids"]
    assert a.val["input_ids"] == b.val["input_ids"] != c.val["input_ids"]
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.train["input_ids"][:20] != c.train["input_ids"][:20]


def test_cache_hit_does_no_tokenising(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    first = build_corpus(cfg)
    assert not first.cache_hit and first.path is not None and (first.path / "stats.json").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]

    def fail(*args, **kwargs):
        raise AssertionError("tokenising on a cache hit")

    monkeypatch.setattr(corpus_mod, "encode_documents", fail)
    monkeypatch.setattr(corpus_mod, "train_bpe_tokenizer", fail)
    second = build_corpus(cfg)
    assert second.cache_hit and second.fingerprint == first.fingerprint
    assert second.train["input_ids"] == first.train["input_ids"] and second.stats == first.stats
    assert second.tokenizer.encode("def f(x): return 2") == first.tokenizer.encode("def f(x): return 2")
    with pytest.raises(AssertionError, match="tokenising"):
        build_corpus(small_config(tmp_path, seq_len=16))  # another fingerprint: must tokenise


def test_fingerprint_covers_source_text(tmp_path):
    cfg = small_config(tmp_path, cache_dir=None)
    fp = build_corpus(cfg).fingerprint
    lines = (tmp_path / "prose.jsonl").read_text().splitlines()
    (tmp_path / "prose.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert build_corpus(cfg).fingerprint != fp


def test_saved_corpus_round_trips_and_an_old_one_without_val_is_refused(built, tmp_path):
    _, corpus, _ = built
    out = corpus.save(tmp_path / "saved")
    again = load_corpus(out)
    assert [again.split(n)["input_ids"] for n in SPLITS] == [corpus.split(n)["input_ids"] for n in SPLITS]
    shutil.rmtree(out / "val")  # what format v1 wrote
    with pytest.raises(ValueError, match=r"older version \(no val/ split\); prepare the corpus again"):
        load_corpus(out)


def test_an_empty_val_split_saves_and_loads_from_the_cache(tmp_path):
    """``data.val_fraction: 0`` (runs from before the val split): the empty val/ split is written as one
    shard, so the cache hit and a prepared folder load back (0 shards could not be read)."""
    cfg = small_config(tmp_path, val_fraction=0.0)
    first = build_corpus(cfg)
    again = build_corpus(cfg)  # the cache hit
    assert len(first.val) == len(again.val) == 0 and again.fingerprint == first.fingerprint
    assert again.eval["input_ids"] == first.eval["input_ids"] and len(again.train) == len(first.train)
    saved = load_corpus(first.save(tmp_path / "prepared"))
    assert len(saved.val) == 0 and saved.val.features == first.train.features


def test_given_tokenizer_and_saved_tokenizer(built, tmp_path):
    cfg, corpus, tokenizer_dir = built
    saved = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert saved.encode("x = [1, 2]") == corpus.tokenizer.encode("x = [1, 2]")
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=corpus.tokenizer.backend_tokenizer, eos_token="<|endoftext|>"
    )
    assert no_pad.pad_token is None
    other = build_corpus(small_config(tmp_path, cache_dir=None), tokenizer=no_pad)
    assert other.tokenizer.pad_token_id == other.tokenizer.eos_token_id
    assert other.fingerprint != corpus.fingerprint


def test_documents_start_blocks_without_cross_documents(tmp_path):
    corpus = build_corpus(small_config(tmp_path, cross_documents=False, cache_dir=None))
    eos = corpus.tokenizer.eos_token_id
    for row in corpus.train.select(range(60)):
        ids = [t for t, m in zip(row["input_ids"], row["attention_mask"], strict=True) if m]
        assert eos not in ids[:-1], "an EOS (end of document) only ends a block"


def test_collate_blocks(built):
    _, corpus, _ = built
    rows = [corpus.eval[i] for i in range(len(corpus.eval))][-4:]
    batch = collate_blocks(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "domain_ids"}
    assert all(t.dtype == torch.long and t.shape == (4, 32) for t in batch.values())
    pad = batch["attention_mask"] == 0
    assert pad.any(), "the last eval block of a domain is padded"
    assert (batch["labels"][pad] == -100).all() and (batch["labels"][~pad] == batch["input_ids"][~pad]).all()
    assert (batch["domain_ids"][pad] == -1).all() and (batch["domain_ids"][~pad] >= 0).all()
    loader = torch.utils.data.DataLoader(corpus.train, batch_size=8, collate_fn=collate_blocks)
    assert next(iter(loader))["input_ids"].shape == (8, 32)
    assert collate_blocks(corpus.eval[:3])["input_ids"].shape == (3, 32)
    idx = list(range(len(corpus.eval)))[-4:]  # numpy columns and the trainer's rows_of give the same tensors
    columns = collate_blocks(corpus.eval.with_format("numpy")[idx])
    assert all(torch.equal(columns[k], batch[k]) and columns[k].dtype == torch.long for k in batch)
    as_arrays = collate_blocks([corpus.eval.with_format("numpy")[i] for i in idx])  # rows of numpy arrays
    assert all(torch.equal(as_arrays[k], batch[k]) for k in batch)
    ragged = [dict(r) for r in rows[:2]]
    ragged[1]["input_ids"] = ragged[1]["input_ids"][:-1]
    with pytest.raises(ValueError, match="'input_ids' has rows of lengths \\[31, 32\\]"):
        collate_blocks(ragged)
    for bad, pattern in (
        (corpus.eval[0], r"'input_ids' has shape \(32,\), not \[B, S\] \(one row"),
        ([{**r, "input_ids": [0.5] * 32} for r in rows[:2]], "'input_ids' holds float64, not integers"),
        ([{k: v for k, v in r.items() if k != "domain_ids"} for r in rows[:2]], r"no \['domain_ids'\]"),
        ([{**r, "attention_mask": [2] * 32} for r in rows[:2]], "values other than 0 and 1"),
    ):
        with pytest.raises(ValueError, match=pattern):
            collate_blocks(bad)
    assert torch.equal(
        collate_blocks(r for r in rows)["input_ids"], batch["input_ids"]
    )  # a generator of rows
    with pytest.raises(ValueError, match="different shapes"):
        collate_blocks(
            {
                "input_ids": np.zeros((3, 6), int),
                "attention_mask": np.ones((1, 6), int),
                "domain_ids": np.zeros((3, 6), int),
            }
        )


def test_rows_of_reads_the_block_columns_as_the_numpy_format_does(built):
    """The trainer's ``rows_of`` (arrow format, ``block_rows``) gives the numpy format's rows, in any order and
    through ``collate_blocks`` the same tensors; columns beyond the blocks' are left out; a missing block column,
    another format and rows that are not whole lists of integers of one length are refused, naming the column."""
    corpus = built[1]
    for split, idx in ((corpus.eval, [len(corpus.eval) - 1, 0, 2, 0]), (corpus.train, [5, 1, 3])):
        taken = rows_of(block_rows(split), idx)
        numpy_rows = split.with_format("numpy")[idx]
        assert set(taken) == {"input_ids", "attention_mask", "domain_ids"}
        assert all(v.shape == (len(idx), 32) and v.flags.writeable for v in taken.values())
        assert all(np.array_equal(v, numpy_rows[k]) for k, v in taken.items())
        expected = collate_blocks(numpy_rows)
        assert all(torch.equal(v, expected[k]) for k, v in collate_blocks(taken).items())
    assert all(v.shape == (0, 0) for v in rows_of(block_rows(corpus.eval), []).values())
    extra = corpus.eval.add_column("n_tokens", [0] * len(corpus.eval))  # a user's corpus with more columns
    extra = extra.add_column("ragged", [[1] * (i % 3) for i in range(len(extra))])
    assert set(rows_of(block_rows(extra), [0, 1])) == {"input_ids", "attention_mask", "domain_ids"}
    with pytest.raises(ValueError, match=r"no \['domain_ids'\] column"):
        block_rows(corpus.eval.remove_columns("domain_ids"))
    with pytest.raises(TypeError, match="arrow format"):
        rows_of(corpus.eval.with_format("numpy"), [0])
    for values, message in (
        ([[1, 2], [3]], "rows of lengths 1 to 2"),
        ([[1, 2], None], "1 of the 2 rows missing"),
        ([[1, None], [3, 4]], r"1 missing \(null\) values"),
        ([[[1], [2]], [[3], [4]]], "not of integers"),
        ([[0.5, 1.0], [2.0, 3.0]], "not of integers"),
        (["ab", "cd"], "not rows of token ids"),
        ([1, 2], "not rows of token ids"),
    ):
        data = datasets.Dataset.from_dict({"input_ids": values}).with_format("arrow")
        with pytest.raises(ValueError, match=f"column 'input_ids'.*{message}"):
            rows_of(data, [0, 1])

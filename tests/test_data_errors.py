"""Bad input: a clear ValueError naming domain, source and value, and nothing left in the cache."""

import json

import pytest
from _data_fixtures import small_config

from moe_emergence.data import SourceConfig, build_corpus
from moe_emergence.data import corpus as corpus_mod


def with_domain(tmp_path, name, src, **kw):
    cfg = small_config(tmp_path, **kw)
    cfg.domains[name] = src
    return cfg


def assert_cache_empty(tmp_path):
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_glob_with_no_match(tmp_path):
    cfg = with_domain(tmp_path, "prose", SourceConfig(type="files", paths=["books/*.txt"]))
    with pytest.raises(
        ValueError, match=r"data\.domains\.prose \(type='files'\).*'books/\*\.txt' matches no file"
    ):
        build_corpus(cfg)
    assert_cache_empty(tmp_path)


def test_missing_file_and_unsupported_suffix(tmp_path):
    cfg = with_domain(tmp_path, "math", SourceConfig(type="files", paths=["gsm8k.jsonl"]))
    with pytest.raises(ValueError, match=r"domains\.math.*'gsm8k\.jsonl' matches no file"):
        build_corpus(cfg)
    (tmp_path / "notes.csv").write_text("a,b\n")
    cfg = with_domain(tmp_path, "math", SourceConfig(type="files", paths=["notes.csv"]))
    with pytest.raises(ValueError, match=r"domains\.math.*unsupported suffix '\.csv'"):
        build_corpus(cfg)
    assert_cache_empty(tmp_path)


def test_missing_record_field(tmp_path):
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    src = SourceConfig(type="files", paths=["gsm.jsonl"], template="{question}\n{answer}")
    with pytest.raises(
        ValueError, match=r"domains\.math \(type='files'\).*gsm\.jsonl line 1.*field 'answer'"
    ):
        build_corpus(with_domain(tmp_path, "math", src))
    src = SourceConfig(type="files", paths=["gsm.jsonl"], text_field="text")
    with pytest.raises(ValueError, match=r"text_field='text' is missing.*\['question', 'solution'\]"):
        build_corpus(with_domain(tmp_path, "math", src))
    assert_cache_empty(tmp_path)


def test_domain_empty_after_filtering(tmp_path):
    src = SourceConfig(type="mathgen", num_problems=20, min_chars=5000)
    with pytest.raises(
        ValueError, match=r"domains\.math \(type='mathgen'\).*'math' is empty after filtering.*min_chars=5000"
    ):
        build_corpus(with_domain(tmp_path, "math", src))
    assert_cache_empty(tmp_path)


def test_too_few_documents_to_split(tmp_path):
    src = SourceConfig(type="stdlib", paths=["colorsys.py"])
    with pytest.raises(ValueError, match=r"domains\.code: only 1 documents"):
        build_corpus(with_domain(tmp_path, "code", src))


def test_seq_len_larger_than_context(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len=32 is larger than the model's context n_positions=16"):
        build_corpus(small_config(tmp_path), max_positions=16)
    assert_cache_empty(tmp_path)


def test_hub_dataset_that_cannot_load(tmp_path):
    (tmp_path / "hubset").mkdir()
    (tmp_path / "hubset" / "train.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    src = SourceConfig(type="hub", name="hubset", split="test")
    with pytest.raises(ValueError, match=r"domains\.prose \(type='hub'\).*name='hubset' split='test'"):
        build_corpus(with_domain(tmp_path, "prose", src))


def test_failed_write_leaves_nothing_in_cache(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corpus_mod.Dataset, "save_to_disk", broken_save)
    with pytest.raises(
        ValueError, match=r"data\.cache_dir=.*cannot write the prepared corpus to .*: disk full"
    ):
        build_corpus(small_config(tmp_path))
    assert_cache_empty(tmp_path)


def test_save_refuses_non_empty_folder(tmp_path):
    corpus = build_corpus(small_config(tmp_path, cache_dir=None))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        corpus.save(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_emergence.data import SourceConfig, load_documents, split_text
from moe_emergence.data.sources import stdlib_files

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
NOVEL = "CHAPTER I. Down\n\nAlice was tired.\n\nShe sat.\n\nCHAPTER II. Pool\n\nCurious!\n\n\nShe grew.\n"


def test_split_text_modes():
    assert split_text(NOVEL, "none", 10, r"^CHAPTER.*$") == [NOVEL.strip()]
    chapters = split_text(NOVEL, "chapters", 10, r"^CHAPTER.*$")
    assert [c.splitlines()[0] for c in chapters] == ["CHAPTER I. Down", "CHAPTER II. Pool"]
    paras = split_text(NOVEL, "paragraphs", 20, r"^CHAPTER.*$")
    assert all(len(p) >= 20 for p in paras[:-1])
    assert "".join(p.replace("\n", "") for p in paras) == NOVEL.replace("\n", "")
    assert paras == split_text(NOVEL, "paragraphs", 20, r"^CHAPTER.*$")


def test_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text(NOVEL)
    (tmp_path / "books" / "b.txt").write_text("One.\n\nTwo.\n")
    src = SourceConfig(
        type="files", paths=["books/*.txt"], split_mode="chapters", chapter_pattern=r"^CHAPTER.*$"
    )
    docs = load_documents("prose", src, 0, tmp_path)
    assert docs[:2] == split_text(NOVEL, "chapters", 1, r"^CHAPTER.*$") and docs[2] == "One.\n\nTwo."

    rows = [
        {"question": f"Q{i}?", "answer": f"It is <<2*{i}={2 * i}>>{2 * i}.\n#### {2 * i}"} for i in range(5)
    ]
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceConfig(
        type="files", paths=["gsm.jsonl"], template="{question}\n{answer}", strip_annotations=True
    )
    docs = load_documents("math", src, 0, tmp_path)
    assert docs[3] == "Q3?\nIt is 6.\n#### 6"

    pq.write_table(pa.table({"content": ["def f():\n    return 1", "x = 2"]}), tmp_path / "code.parquet")
    src = SourceConfig(type="files", paths=[str(tmp_path / "code.parquet")], text_field="content")
    assert load_documents("code", src, 0, Path("/")) == ["def f():\n    return 1", "x = 2"]


def test_filters_budget_and_dedup(tmp_path):
    texts = ["short", "a" * 50, "b" * 60, "a" * 50, "c" * 70, "d" * 80, "e" * 500]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    base = dict(type="files", paths=["t.jsonl"], min_chars=10, max_chars=100)
    assert load_documents("x", SourceConfig(**base), 0, tmp_path) == ["a" * 50, "b" * 60, "c" * 70, "d" * 80]
    assert load_documents("x", SourceConfig(**base, max_docs=2), 0, tmp_path) == ["a" * 50, "b" * 60]
    assert load_documents("x", SourceConfig(**base, max_total_chars=185), 0, tmp_path) == [
        "a" * 50,
        "b" * 60,
        "c" * 70,
    ]


def test_stdlib_is_real_python_and_seeded():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)
    src = SourceConfig(type="stdlib", max_docs=4, max_chars=20_000)
    a = load_documents("code", src, 0, Path.cwd())
    assert len(a) == 4 and all(isinstance(ast.parse(d), ast.Module) for d in a)
    assert a == load_documents("code", src, 0, Path.cwd())
    assert a != load_documents("code", src, 1, Path.cwd())
    only_json = load_documents("code", SourceConfig(type="stdlib", paths=["json/*.py"]), 0, Path.cwd())
    assert len(only_json) == len(stdlib_files(["json/*.py"])) and any(
        "JSONDecodeError" in d for d in only_json
    )


def test_pydoc_and_mathgen_sources():
    prose = load_documents(
        "prose", SourceConfig(type="pydoc", target_chars=1500, min_chars=200), 0, Path.cwd()
    )
    assert len(prose) > 100 and any("statement" in d for d in prose)
    assert sum(len(d) for d in prose) > 300_000
    math = load_documents("math", SourceConfig(type="mathgen", num_problems=40), 5, Path.cwd())
    assert 35 <= len(math) <= 40 and all(d.startswith("Question: ") and "\nAnswer: " in d for d in math)


def test_hub_source_from_local_folders(tmp_path):
    import datasets

    folder = tmp_path / "hubset"
    folder.mkdir()
    rows = [{"text": f"document number {i} " * (1 + i % 4), "label": i} for i in range(30)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for streaming in (False, True):
        src = SourceConfig(
            type="hub", name="hubset", split="train", streaming=streaming, min_chars=40, max_docs=5
        )
        docs = load_documents("prose", src, 0, tmp_path)
        assert len(docs) == 5 and all(len(d) >= 40 for d in docs)
    src = SourceConfig(type="hub", name="json", paths=["hubset/train.jsonl"], template="[{label}] {text}")
    docs = load_documents("prose", src, 0, tmp_path)
    assert len(docs) == 30 and docs[2] == "[2] " + rows[2]["text"].strip()

    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved")
    )
    src = SourceConfig(type="hub", name=str(tmp_path / "saved"), split="validation", max_total_chars=200)
    docs = load_documents("prose", src, 0, Path("/"))
    assert 1 <= len(docs) < 30 and sum(map(len, docs)) <= 200


@pytest.mark.skipif(not (SHARED / "math" / "gsm8k_train.jsonl").exists(), reason="../shared/data not present")
def test_shared_gsm8k_and_novels():
    root = Path(__file__).resolve().parents[1]
    src = SourceConfig(
        type="files",
        paths=["../shared/data/math/gsm8k_train.jsonl"],
        template="{question}\n{answer}",
        strip_annotations=True,
        max_docs=200,
    )
    docs = load_documents("math", src, 0, root)
    assert len(docs) == 200 and not any("<<" in d for d in docs) and all("#### " in d for d in docs)
    src = SourceConfig(type="files", paths=["../shared/data/prose/pg11.txt"], target_chars=3000)
    novel = load_documents("prose", src, 0, root)
    assert 30 < len(novel) < 100 and all(len(d) >= 3000 for d in novel[:-1])

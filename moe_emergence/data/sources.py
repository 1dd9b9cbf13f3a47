"""Document sources: each turns one domain's SourceConfig into a list of document strings.

``load_documents(domain, source, seed, root)`` dispatches on ``source.type`` (hub, files, stdlib,
mathgen, pydoc), renders records, splits long texts, then applies the length filters and the
document / character budget. Every error names the domain, the source type and the offending value.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moe_emergence.data.config import DataConfig, SourceConfig
from moe_emergence.data.gutenberg import strip_gutenberg

STDLIB_EXCLUDE = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


def _where(domain: str, src: SourceConfig) -> str:
    return f"data.domains.{domain} (type={src.type!r})"


def resolve_path(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def split_text(text: str, mode: str, target_chars: int, chapter_pattern: str) -> list[str]:
    """Cut a long text into documents, deterministically.

    ``none``: the whole text. ``paragraphs``: blank-line paragraphs grouped in order until a group
    reaches ``target_chars``. ``chapters``: a new document starts at every line matching
    ``chapter_pattern`` (text before the first heading is a document of its own).
    """
    text = text.strip()
    if mode == "none":
        return [text] if text else []
    if mode == "chapters":
        starts = [m.start() for m in re.finditer(chapter_pattern, text, flags=re.MULTILINE)]
        bounds = [0, *[s for s in starts if s > 0], len(text)]
        pieces = [text[a:b].strip() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [p for p in pieces if p]
    if mode == "paragraphs":
        docs, group, size = [], [], 0
        for para in re.split(r"\n[ \t]*\n", text):
            para = para.strip()
            if not para:
                continue
            group.append(para)
            size += len(para)
            if size >= target_chars:
                docs.append("\n\n".join(group))
                group, size = [], 0
        if group:
            docs.append("\n\n".join(group))
        return docs
    raise ValueError(f"split_mode={mode!r} is invalid: one of none, paragraphs, chapters")


def render_record(record: dict[str, Any], src: SourceConfig, where: str) -> str:
    """A record's text: ``src.template`` formatted with the record's fields, or ``record[src.text_field]``."""
    if src.template is not None:
        try:
            text = src.template.format_map(record)
        except KeyError as e:
            raise ValueError(
                f"{where}: template {src.template!r} needs field {e.args[0]!r}, missing from the record "
                f"(fields: {sorted(record)})"
            ) from None
        except (ValueError, TypeError) as e:  # a format spec that does not fit the field's value
            raise ValueError(f"{where}: template {src.template!r} does not fit the record: {e}") from e
    else:
        if src.text_field not in record:
            raise ValueError(
                f"{where}: text_field={src.text_field!r} is missing from the record (fields: {sorted(record)})"
            )
        text = record[src.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {src.text_field!r} holds {type(text).__name__}, not text")
    return ANNOTATION_RE.sub("", text) if src.strip_annotations else text


def source_files(domain: str, src: SourceConfig, root: Path) -> list[Path]:
    """The files a ``files`` source reads, in order; ``ValueError`` when a ``paths`` entry matches none or
    a file has an unsupported suffix."""
    where = _where(domain, src)
    files: list[Path] = []
    for pattern in src.paths:
        full = resolve_path(pattern, root)
        matches = sorted(Path(m) for m in glob.glob(str(full), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise ValueError(f"{where}: paths entry {pattern!r} matches no file (looked for {full})")
        for m in matches:
            if m.suffix not in FILE_SUFFIXES:
                raise ValueError(
                    f"{where}: file {m} has unsupported suffix {m.suffix!r}; allowed: {FILE_SUFFIXES}"
                )
            if m not in files:
                files.append(m)
    return files


def check_source_files(cfg: DataConfig) -> None:
    """Before anything is prepared or written: every ``files`` source's paths match files of a supported
    suffix, and every ``stdlib`` source's paths match modules (their contents are checked when read)."""
    root = Path(cfg.root_dir).expanduser() if cfg.root_dir else Path.cwd()
    for name, src in cfg.domains.items():
        if src.type == "files":
            source_files(name, src, root)
        elif src.type == "stdlib" and src.paths and not stdlib_files(src.paths):
            raise ValueError(f"{_where(name, src)}: paths={src.paths!r} match no standard-library .py file")


def _files_docs(domain: str, src: SourceConfig, root: Path) -> Iterator[str]:
    where = _where(domain, src)
    for path in source_files(domain, src, root):
        if path.suffix == ".txt":
            text = _read_text(path, where)
            if src.strip_gutenberg:
                text = strip_gutenberg(text, f"{where} {path}")
            yield from split_text(text, src.split_mode, src.target_chars, src.chapter_pattern)
        elif path.suffix == ".jsonl":
            yield from _jsonl_docs(path, src, where)
        else:
            yield from _parquet_docs(path, src, where)


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path}: {e.strerror or e}") from e


def _jsonl_docs(path: Path, src: SourceConfig, where: str) -> Iterator[str]:
    """One record per non-blank line; a line that is not a JSON object is an error naming file and line."""
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                at = f"{where} {path} line {i}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{at}: expected a JSON object (a record), got {type(record).__name__}")
                yield render_record(record, src, at)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e


def _parquet_docs(path: Path, src: SourceConfig, where: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{where}: {path} is not a readable parquet file ({e})") from e
    for i, record in enumerate(records):
        yield render_record(record, src, f"{where} {path} row {i}")


def _hub_docs(domain: str, src: SourceConfig, root: Path) -> Iterator[str]:
    import datasets

    where = _where(domain, src)
    local = resolve_path(src.name, root)
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        else:
            data_files = [str(resolve_path(p, root)) for p in src.paths] or None
            path = str(local) if local.exists() else src.name
            ds = datasets.load_dataset(
                path,
                src.subset,
                split=src.split,
                streaming=src.streaming,
                revision=src.revision,
                data_files=data_files,
            )
    except (FileNotFoundError, ConnectionError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: could not load dataset name={src.name!r} split={src.split!r}: {e}") from e
    for i, record in enumerate(ds):
        yield render_record(record, src, f"{where} {src.name} record {i}")


def stdlib_files(patterns: list[str] | None = None) -> list[Path]:
    """Sorted ``.py`` files of the running interpreter's standard library, outside test folders.

    ``patterns`` are globs relative to the stdlib folder; None or empty means every module.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[Path] = set()
    if patterns:
        for pattern in patterns:
            found.update(p for p in root.glob(pattern) if p.suffix == ".py" and p.is_file())
    else:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDE]
            found.update(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(p for p in found if not STDLIB_EXCLUDE.intersection(p.relative_to(root).parts))


def _stdlib_docs(domain: str, src: SourceConfig, seed: int) -> Iterator[str]:
    files = stdlib_files(src.paths)
    if not files:
        raise ValueError(f"{_where(domain, src)}: paths={src.paths!r} match no standard-library .py file")
    random.Random(f"stdlib-{seed}").shuffle(files)
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a filter like min_chars: the few non-UTF-8 modules are not code text we can use


def _pydoc_docs(src: SourceConfig) -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield from split_text(topics[key], src.split_mode, src.target_chars, src.chapter_pattern)


def _mathgen_docs(src: SourceConfig, seed: int) -> Iterator[str]:
    from moe_emergence.data.mathgen import generate_problems

    for problem in generate_problems(src.num_problems, seed, src.templates or None):
        yield problem.text


def raw_documents(domain: str, src: SourceConfig, seed: int, root: Path) -> Iterator[str]:
    """Every document of the source, before filters and budget (lazy)."""
    if src.type == "files":
        return _files_docs(domain, src, root)
    if src.type == "hub":
        return _hub_docs(domain, src, root)
    if src.type == "stdlib":
        return _stdlib_docs(domain, src, seed)
    if src.type == "pydoc":
        return _pydoc_docs(src)
    if src.type == "mathgen":
        return _mathgen_docs(src, seed)
    raise ValueError(f"{_where(domain, src)}: unknown source type {src.type!r}")


def apply_budget(domain: str, src: SourceConfig, docs: Iterable[str]) -> list[str]:
    """Length filters, exact de-duplication, then the document and character budget, in source order."""
    out: list[str] = []
    seen: set[str] = set()
    total = scanned = 0
    for doc in docs:
        scanned += 1
        doc = doc.strip()
        if len(doc) < max(src.min_chars, 1) or (src.max_chars is not None and len(doc) > src.max_chars):
            continue
        if doc in seen:
            continue
        if src.max_total_chars is not None and total + len(doc) > src.max_total_chars and out:
            break
        seen.add(doc)
        out.append(doc)
        total += len(doc)
        if src.max_docs is not None and len(out) >= src.max_docs:
            break
    if not out:
        raise ValueError(
            f"{_where(domain, src)}: domain {domain!r} is empty after filtering ({scanned} documents read, "
            f"min_chars={src.min_chars}, max_chars={src.max_chars}, max_docs={src.max_docs}, "
            f"max_total_chars={src.max_total_chars})"
        )
    return out


def load_documents(domain: str, src: SourceConfig, seed: int, root: Path) -> list[str]:
    """The documents of one domain: loaded, filtered, de-duplicated and budgeted, in a deterministic order."""
    return apply_budget(domain, src, raw_documents(domain, src, seed, root))

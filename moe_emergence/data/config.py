"""DataConfig and SourceConfig: what goes into the three-domain corpus, validated on construction.

Both are plain dataclasses whose fields are only str, int, float, bool, None-unions, list[str],
dict[str, float] and dict[str, SourceConfig]; ``from_dict``, YAML files and ``key=value`` overrides go
through the package's one loader (``moe_emergence.config_loader``: unknown keys with the closest valid key,
types). The classes check only their own values (ranges, allowed strings) and raise ``ValueError`` naming
the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any

from moe_emergence.config_loader import build, closest, to_dict

SOURCE_TYPES = ("hub", "files", "stdlib", "mathgen", "pydoc")
SPLIT_MODES = ("none", "paragraphs", "chapters")
# the SourceConfig fields each source type reads (beside SOURCE_COMMON); the others do not apply to it
SOURCE_COMMON = ("type", "min_chars", "max_chars", "max_docs", "max_total_chars")
_RECORDS = ("text_field", "template", "strip_annotations")
_LONG_TEXT = ("split_mode", "target_chars", "chapter_pattern")
SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "hub": ("name", "subset", "split", "revision", "streaming", "paths", *_RECORDS),
    "files": ("paths", *_RECORDS, *_LONG_TEXT, "strip_gutenberg"),
    "stdlib": ("paths",),
    "mathgen": ("num_problems", "templates"),
    "pydoc": _LONG_TEXT,
}


def source_fields(source_type: str) -> tuple[str, ...]:
    """The ``SourceConfig`` fields a source of this type reads (all of them for an unknown type)."""
    if source_type not in SOURCE_FIELDS:
        return tuple(f.name for f in dataclasses.fields(SourceConfig))
    return SOURCE_COMMON + SOURCE_FIELDS[source_type]


def without_inapplicable(data: dict[str, Any]) -> dict[str, Any]:
    """A ``data:`` mapping with each domain's keys limited to those its source type reads (how a config
    saved with every field compares with one saved with only the applicable ones)."""
    domains = data.get("domains")
    if not isinstance(domains, dict):
        return data
    kept = {
        name: {k: v for k, v in src.items() if k in source_fields(src.get("type"))}
        if isinstance(src, dict)
        else src
        for name, src in domains.items()
    }
    return {**data, "domains": kept}


# Keys added to the data: block after run folders were first saved, with the value that reproduces the data
# such a run was trained on: a saved config without the key predates it (``saved_data_block``).
ADDED_DATA_KEYS = {"val_fraction": 0.0}
ADDED_SOURCE_KEYS = {"files": {"strip_gutenberg": False}}


def saved_data_block(data: dict[str, Any]) -> dict[str, Any]:
    """A ``data:`` mapping read back from a run folder's ``config.yaml``, with each key added since then that
    it lacks set to the value it had in effect when it was saved (``ADDED_DATA_KEYS``: no val split;
    ``ADDED_SOURCE_KEYS``: Gutenberg text not stripped), so the run's own corpus is rebuilt, not today's
    default one. Keys it holds are kept as they are."""
    out = {**ADDED_DATA_KEYS, **data}
    domains = out.get("domains")
    if isinstance(domains, dict):
        out["domains"] = {
            name: {**ADDED_SOURCE_KEYS.get(src.get("type"), {}), **src} if isinstance(src, dict) else src
            for name, src in domains.items()
        }
    return out


MIXING_MODES = ("balanced", "weighted", "natural")
DEFAULT_CACHE_DIR = "~/.cache/moe_emergence/data"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite real number (NaN and infinities are never meaningful settings here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_SEED = 2**32 - 1  # numpy's seed range (the block order uses numpy)


def _template_problem(template: str) -> str | None:
    """Why ``template`` cannot be ``str.format_map``-ed with a record's fields, or None when it can."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"not a valid format string ({e})"
    bad = [f for f in fields if not f or not f.isidentifier()]
    if bad:
        return f"fields must be record field names such as {{question}}, got {bad}"
    return None


@dataclass
class SourceConfig:
    """Where one domain's documents come from, and which of them to keep.

    type: one of ``SOURCE_TYPES``:
        ``hub``: ``datasets.load_dataset(name, subset, split=, streaming=, revision=)``; ``name`` may be a
            hub id, a local dataset folder, a ``save_to_disk`` folder or a builder (``json``, ``parquet``,
            ``text``) with ``paths`` as its data files.
        ``files``: local ``.txt`` / ``.jsonl`` / ``.parquet`` files matched by the globs in ``paths``.
        ``stdlib``: ``.py`` files of the running interpreter's standard library (``paths`` are globs
            relative to it; empty = every module outside test folders).
        ``mathgen``: ``num_problems`` school maths problems with checked worked solutions.
        ``pydoc``: the English reference prose that ships with CPython (``pydoc_data.topics``).
    Records (hub, .jsonl, .parquet): ``template`` (``str.format`` over the record's fields, e.g.
        ``"{question}\\n{answer}"``) or else ``text_field``.
    Long texts (.txt files, pydoc topics): ``split_mode`` ``none`` (one document per file),
        ``paragraphs`` (blank-line paragraphs grouped to about ``target_chars``) or ``chapters``
        (cut before lines matching ``chapter_pattern``, a regex).
    strip_annotations: remove GSM8K ``<<a*b=c>>`` calculator annotations.
    strip_gutenberg (``files`` only, ``.txt`` files): keep only the book between the Project Gutenberg
        START and END marker lines (``data.gutenberg``); a file with neither marker is read unchanged, one
        with only one of them is an error.
    Filters and budget: documents shorter than ``min_chars`` or longer than ``max_chars`` are dropped;
        at most ``max_docs`` documents and ``max_total_chars`` characters are kept (None = no limit).
    """

    type: str = ""
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    template: str | None = None
    split_mode: str = "paragraphs"
    target_chars: int = 2000
    chapter_pattern: str = r"^\s*(CHAPTER|Chapter|BOOK|Book|PART|Part)\b.*$"
    strip_annotations: bool = False
    strip_gutenberg: bool = True
    num_problems: int = 2000
    templates: list[str] = field(default_factory=list)
    min_chars: int = 1
    max_chars: int | None = None
    max_docs: int | None = None
    max_total_chars: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(
            f"SourceConfig.{name}={getattr(self, name)!r} (type={self.type!r}) is invalid: {allowed}"
        )

    def validate(self) -> None:
        if self.type not in SOURCE_TYPES:
            near = closest(self.type, SOURCE_TYPES)
            hint = f" (did you mean {near!r}?)" if near else ""
            self._fail("type", f"unknown source type{hint}; allowed: {SOURCE_TYPES}")
        if self.type == "hub" and not self.name:
            self._fail("name", "a hub source needs a dataset name, local folder or builder")
        if self.type == "files" and not self.paths:
            self._fail("paths", "a files source needs at least one path or glob")
        for name in ("paths", "templates"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                self._fail(name, "a list of strings")
        if self.split_mode not in SPLIT_MODES:
            self._fail("split_mode", f"one of {SPLIT_MODES}")
        for name in ("target_chars", "num_problems"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                self._fail(name, "an integer >= 1")
        if not _is_int(self.min_chars) or self.min_chars < 0:
            self._fail("min_chars", "an integer >= 0")
        for name in ("max_chars", "max_docs", "max_total_chars"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                self._fail(name, "null (no limit) or an integer >= 1")
        self._validate_text_options()
        self._validate_applicable()
        if self.max_chars is not None and self.max_chars < self.min_chars:
            self._fail("max_chars", f"must be >= min_chars={self.min_chars}")
        for name in ("streaming", "strip_annotations", "strip_gutenberg"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "true or false")
        if self.type == "mathgen" and self.templates:
            from moe_emergence.data.mathgen import TEMPLATES

            bad = [t for t in self.templates if t not in TEMPLATES]
            if bad:
                self._fail("templates", f"unknown templates {bad}; allowed: {sorted(TEMPLATES)}")

    def _validate_applicable(self) -> None:
        """A field this source type does not read must keep its default (a set value would be ignored)."""
        applicable = source_fields(self.type)
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name not in applicable and getattr(self, f.name) != default:
                users = [t for t, names in SOURCE_FIELDS.items() if f.name in names]
                self._fail(f.name, f"it does not apply to a {self.type!r} source (only to {users})")

    def serialized_fields(self) -> tuple[str, ...]:
        """What ``to_dict`` (and the saved config.yaml) holds: the fields this source type reads."""
        return source_fields(self.type)

    def _validate_text_options(self) -> None:
        if self.template is not None:
            problem = _template_problem(self.template) if isinstance(self.template, str) else "a string"
            if problem:
                self._fail("template", problem)
        try:
            re.compile(self.chapter_pattern)
        except (re.error, TypeError) as e:
            self._fail("chapter_pattern", f"a regular expression ({e})")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> SourceConfig:
        """Build from a plain mapping found at the dotted key ``where`` (e.g. ``data.domains.math``); raises
        ``ConfigError`` (a ``ValueError``) naming the key: unknown (with the closest valid one), wrong type
        or invalid value."""
        return build(cls, d, where)


@dataclass
class DataConfig:
    """The corpus: one source per domain, split, tokenised, packed into ``seq_len`` blocks and mixed.

    domains: domain name -> SourceConfig; a domain's id is its position in this mapping.
    seq_len: tokens per block (must fit the model's context, checked by ``build_corpus``).
    seed: drives the train/val/eval document split, mathgen, stdlib sampling and the train block order
        (and the eval subset the trainer reads when ``eval.max_blocks`` is set).
    eval_fraction: fraction of each domain's documents held out for eval (at least ``min_eval_docs``): the
        test split, read for the final tables only (``eval.final_split``, ``scripts/analyze.py``).
    val_fraction: fraction of each domain's documents held out for validation (at least 1 when > 0; 0 =
        no val split), taken from what would otherwise be train; the trainer's periodic eval reads it.
    mixing: ``balanced`` (equal train tokens per domain), ``weighted`` (train tokens in proportion to
        ``weights``, one entry per domain) or ``natural`` (every train token). Eval is never rebalanced.
    cross_documents: blocks run on over document boundaries (documents joined by EOS); if false each
        document starts a new block and its last block is padded.
    cross_domains: documents of all domains are interleaved into one stream, so blocks mix domains
        (``domain_ids`` still labels every token). Off by default: no block silently crosses domains.
    vocab_size / tokenizer_train_chars: the byte-level BPE trained when no tokenizer is given, on at
        most this many train characters (split equally over domains).
    cache_dir: where prepared corpora are cached by fingerprint (None = no cache).
    root_dir: base folder of relative paths in sources (None = the current working directory).
    """

    domains: dict[str, SourceConfig] = field(default_factory=dict)
    seq_len: int = 128
    seed: int = 0
    eval_fraction: float = 0.1
    min_eval_docs: int = 1
    val_fraction: float = 0.1
    mixing: str = "balanced"
    weights: dict[str, float] = field(default_factory=dict)
    cross_documents: bool = True
    cross_domains: bool = False
    vocab_size: int = 8192
    tokenizer_train_chars: int = 3_000_000
    cache_dir: str | None = DEFAULT_CACHE_DIR
    root_dir: str | None = None

    def __post_init__(self) -> None:
        self.domains = {
            k: SourceConfig.from_dict(v, where=f"data.domains.{k}") if isinstance(v, dict) else v
            for k, v in (self.domains or {}).items()
        }
        self.validate()

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"DataConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

    def validate(self) -> None:
        if not isinstance(self.domains, dict) or not self.domains:
            self._fail("domains", "a non-empty mapping of domain name -> source")
        for name, src in self.domains.items():
            if not isinstance(name, str) or not name:
                self._fail("domains", f"domain names must be non-empty strings, got {name!r}")
            if not isinstance(src, SourceConfig):
                self._fail("domains", f"domain {name!r} must be a SourceConfig or mapping, got {src!r}")
        for name, low in (
            ("seq_len", 2),
            ("min_eval_docs", 1),
            ("vocab_size", 300),
            ("tokenizer_train_chars", 1),
        ):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                self._fail(name, f"an integer >= {low}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            self._fail("seed", f"an integer in [0, {MAX_SEED}]")
        if not _is_num(self.eval_fraction) or not 0.0 <= self.eval_fraction < 1.0:
            self._fail("eval_fraction", "a number in [0, 1)")
        if not _is_num(self.val_fraction) or not 0.0 <= self.val_fraction < 1.0 - self.eval_fraction:
            self._fail(
                "val_fraction", f"a number in [0, 1 - eval_fraction) = [0, {1.0 - self.eval_fraction:g})"
            )
        if self.mixing not in MIXING_MODES:
            self._fail("mixing", f"one of {MIXING_MODES}")
        if not isinstance(self.weights, dict):
            self._fail("weights", "a mapping of domain name -> weight")
        if self.mixing == "weighted":
            if set(self.weights) != set(self.domains):
                self._fail("weights", f"mixing=weighted needs one weight per domain {list(self.domains)}")
            if not all(_is_num(w) and w > 0 for w in self.weights.values()):
                self._fail("weights", "every weight must be a finite number > 0")
        elif self.weights:
            self._fail("weights", f"weights are only used with mixing=weighted (mixing={self.mixing!r})")
        for name in ("cross_documents", "cross_domains"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "true or false")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a plain mapping (the ``data:`` block of a YAML config); raises ``ConfigError`` (a
        ``ValueError``) naming the dotted key (``data.domains.math.num_problems``): unknown (with the closest
        valid one), wrong type or invalid value."""
        return build(cls, d, "data")


def default_offline_config(**overrides: Any) -> DataConfig:
    """The built-in offline corpus: code = stdlib, math = mathgen, prose = pydoc. No network, no files.

    Sized to prepare in seconds (a few hundred thousand characters per domain); keyword arguments
    replace top-level DataConfig fields.
    """
    domains = {
        "code": SourceConfig(type="stdlib", min_chars=200, max_chars=40_000, max_total_chars=900_000),
        "math": SourceConfig(type="mathgen", num_problems=3000),
        "prose": SourceConfig(type="pydoc", split_mode="paragraphs", target_chars=1500, min_chars=200),
    }
    kwargs: dict[str, Any] = {"domains": domains, "seq_len": 128, "vocab_size": 4096}
    kwargs.update(overrides)
    return DataConfig(**kwargs)


def local_study_config(shared_dir: str = "../shared/data", **overrides: Any) -> DataConfig:
    """The local study corpus: code = stdlib, math = GSM8K, prose = Gutenberg novels from ``shared_dir``."""
    domains = {
        "code": SourceConfig(type="stdlib", min_chars=200, max_chars=60_000, max_total_chars=4_000_000),
        "math": SourceConfig(
            type="files",
            paths=[f"{shared_dir}/math/gsm8k_train.jsonl"],
            template="Question: {question}\nAnswer: {answer}",
            strip_annotations=True,
        ),
        "prose": SourceConfig(
            type="files",
            paths=[f"{shared_dir}/prose/*.txt"],
            split_mode="paragraphs",
            target_chars=3000,
            min_chars=200,
        ),
    }
    kwargs: dict[str, Any] = {"domains": domains, "seq_len": 256, "vocab_size": 8192}
    kwargs.update(overrides)
    return DataConfig(**kwargs)

"""Project Gutenberg headers, footers and licence text never reach the documents of a ``files`` source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_emergence.data import DataConfig, SourceConfig, load_documents
from moe_emergence.data.corpus import corpus_fingerprint
from moe_emergence.data.gutenberg import strip_gutenberg
from moe_emergence.data.pipeline import DocSplit

SHARED_PROSE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "prose"
BOOK = (
    "CHAPTER I.\n\nAlice was beginning to get very tired of sitting by her sister on the bank.\n\n"
    "So she was considering in her own mind whether the pleasure of making a daisy-chain would be worth it.\n"
)
HEADER = (
    "\ufeffThe Project Gutenberg eBook of Alice's Adventures in Wonderland\n\n"
    "This ebook is for the use of anyone anywhere in the United States and most other parts of the world "
    "at no cost and with almost no restrictions whatsoever.\n\nTitle: Alice's Adventures in Wonderland\n\n"
    "Release date: June 27, 2008 [eBook #11]\n\n"
)
LICENCE = (
    "\n\nUpdated editions will replace the previous one--the old editions will be renamed.\n\n"
    "*** START: FULL LICENSE ***\n\nTHE FULL PROJECT GUTENBERG LICENSE\n"
    "PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK\n\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg(TM) electronic works\n"
)
# (start line, end lines) of the marker styles of the last decades
STYLES = {
    "modern": (
        "*** START OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***",
        "*** END OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***",
    ),
    "this": (
        "*** START OF THIS PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***",
        "End of Project Gutenberg's Alice's Adventures in Wonderland, by Lewis Carroll\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***",
    ),
    "small-print": (
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*",
        "End of the Project Gutenberg Etext of Alice's Adventures in Wonderland",
    ),
    "no-space": (
        "***START OF THE PROJECT GUTENBERG EBOOK ALICE***",
        "***END OF THE PROJECT GUTENBERG EBOOK ALICE***",
    ),
}
BOILERPLATE = ("gutenberg", "license", "ebook", "release date", "small print")


def wrap(book: str, style: str = "modern") -> str:
    start, end = STYLES[style]
    return f"{HEADER}{start}\n\n\n{book}\n\n\n{end}{LICENCE}"


@pytest.mark.parametrize("style", sorted(STYLES))
def test_strip_keeps_exactly_the_book(style):
    assert strip_gutenberg(wrap(BOOK, style)).strip() == BOOK.strip()


def test_files_source_drops_header_footer_and_licence_by_default(tmp_path):
    (tmp_path / "pg11.txt").write_text(wrap(BOOK))
    docs = load_documents("prose", SourceConfig(type="files", paths=["pg11.txt"]), 0, tmp_path)
    text = "\n\n".join(docs)
    assert docs and text == BOOK.strip()  # paragraphs of 2000 chars: the whole book is one document
    assert not any(word in text.lower() for word in BOILERPLATE)

    kept = load_documents(
        "prose", SourceConfig(type="files", paths=["pg11.txt"], strip_gutenberg=False), 0, tmp_path
    )
    kept_text = "\n\n".join(kept).lower()
    assert (
        all(word in kept_text for word in BOILERPLATE[:3]) and "full project gutenberg license" in kept_text
    )


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (f"{HEADER}{STYLES['modern'][0]}\n{BOOK}{LICENCE}", "START marker on line 9"),
        (f"{BOOK}\n{STYLES['modern'][1]}{LICENCE}", "END marker on line 7"),
        (f"{STYLES['modern'][1]}\n{BOOK}\n{STYLES['modern'][0]}\n", "START marker on line 8"),  # END first
    ],
)
def test_one_marker_alone_is_an_error_naming_file_and_line(tmp_path, text, found):
    (tmp_path / "book.txt").write_text(text)
    src = SourceConfig(type="files", paths=["book.txt"])
    with pytest.raises(ValueError, match=found) as err:
        load_documents("prose", src, 0, tmp_path)
    assert str(tmp_path / "book.txt") in str(err.value) and "strip_gutenberg: false" in str(err.value)
    src = SourceConfig(type="files", paths=["book.txt"], strip_gutenberg=False)
    assert load_documents("prose", src, 0, tmp_path)  # read as it is when asked to


def test_text_without_markers_is_unchanged_and_jsonl_is_never_touched(tmp_path):
    assert strip_gutenberg(BOOK) == BOOK
    (tmp_path / "r.jsonl").write_text(
        json.dumps({"text": STYLES["modern"][0]}) + "\n"
    )  # a record that only quotes a marker: records are not books
    assert load_documents("x", SourceConfig(type="files", paths=["r.jsonl"]), 0, tmp_path) == [
        STYLES["modern"][0]
    ]


def test_strip_gutenberg_is_part_of_the_cache_key():
    splits = {"prose": DocSplit(["a b c"], ["d e f"], ["g h"])}

    def fingerprint(strip: bool) -> str:
        src = SourceConfig(type="files", paths=["x.txt"], strip_gutenberg=strip)
        return corpus_fingerprint(DataConfig(domains={"prose": src}), splits, "tok")

    assert fingerprint(True) != fingerprint(False)
    with pytest.raises(ValueError, match=r"strip_gutenberg.*does not apply to a 'mathgen' source"):
        SourceConfig(type="mathgen", strip_gutenberg=False)


SHARED_BOOKS = sorted(SHARED_PROSE.glob("pg*.txt")) if SHARED_PROSE.is_dir() else []


@pytest.mark.skipif(not SHARED_BOOKS, reason="../shared/data/prose not present")
def test_shared_novels_lose_a_gutenberg_header_and_footer():
    """The shared novels come with their boilerplate already removed (../shared/data/README.md): stripping
    leaves them as they are, and the same novel wrapped in any marker style gives back exactly its text."""
    for path in SHARED_BOOKS:
        text = path.read_text(encoding="utf-8")
        assert strip_gutenberg(text, str(path)) == text, path
        assert "gutenberg" not in text.lower(), path
        for style in STYLES:
            assert strip_gutenberg(wrap(text, style)).strip() == text.strip(), (path, style)

"""Project Gutenberg boilerplate: cut the header before the book and the footer and licence after it.

A Gutenberg ``.txt`` file carries a header (title, credits, licence note) ending at a START marker line
and a footer (the full licence) starting at an END marker line. Recognised marker lines (case-insensitive,
leading spaces allowed):

    START: ``*** START OF THE PROJECT GUTENBERG EBOOK ...``, ``*** START OF THIS PROJECT GUTENBERG EBOOK ...``
           (also ``ETEXT``, ``E-BOOK``, no space after ``***``), and the 1990s ``*END*THE SMALL PRINT! ...``
           line that closes the old licence header.
    END:   ``*** END OF THE PROJECT GUTENBERG EBOOK ...``, ``*** END OF THIS PROJECT GUTENBERG EBOOK ...``
           (same variants), and ``End of [the] Project Gutenberg['s] ...``, which older files put just
           before their ``*** END`` line.

``strip_gutenberg`` keeps only the text between the first START line and the first END line after it
(both lines removed). A text with neither marker is returned unchanged (ordinary text, or a Gutenberg
file whose boilerplate was already removed). A text with only one of them is an error, never a guess: the
missing half may be a marker variant this module does not know, and its licence text would otherwise reach
the corpus unnoticed.
"""

from __future__ import annotations

import re

START_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG\b|\*END\*THE SMALL PRINT\b).*$",
    re.IGNORECASE | re.MULTILINE,
)
END_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG\b|End of (?:the )?Project Gutenberg\b).*$",
    re.IGNORECASE | re.MULTILINE,
)
KEEP_AS_IS = "fix the file, or set strip_gutenberg: false to read it as it is"


def _line_no(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def strip_gutenberg(text: str, where: str = "text") -> str:
    """The book between the Project Gutenberg START and END marker lines (module docstring), or ``text``
    unchanged when it has neither marker. Raises ``ValueError`` naming ``where``, the marker found and its
    line when only one of them is there (or the END line comes before the START line)."""
    start = START_RE.search(text)
    end = END_RE.search(text, start.end()) if start else END_RE.search(text)
    if start is None and end is None:
        return text
    if start is None:
        raise ValueError(
            f"{where}: Project Gutenberg END marker on line {_line_no(text, end.start())} "
            f"({end.group(0).strip()!r}) but no START marker before it, so the header cannot be found; "
            f"{KEEP_AS_IS}"
        )
    if end is None:
        raise ValueError(
            f"{where}: Project Gutenberg START marker on line {_line_no(text, start.start())} "
            f"({start.group(0).strip()!r}) but no END marker after it, so the licence text after the book "
            f"cannot be found; {KEEP_AS_IS}"
        )
    return text[start.end() : end.start()]

"""Books: boilerplate removal (Project Gutenberg header and licence, tables of contents), a
minimum length and a minimum share of letters.

The books reader already cuts the Project Gutenberg header and footer at the "*** START OF" /
"*** END OF" markers; this step does it too (for books that come from other readers, e.g.
JSONL dumps) and also removes a table of contents and licence paragraphs left in the text.
"""
from __future__ import annotations

import dataclasses
import re

from data_pipeline.steps import Step, register, require

_START_RE = re.compile(r"^\*{3} ?START OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*\n", re.I | re.M)
_END_RE = re.compile(r"^(?:\*{3} ?END OF (?:THE |THIS )?PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)", re.I | re.M)
_TOC_HEADING_RE = re.compile(r"^[ \t]*(?:table of contents|contents)[ \t.:]*$", re.I | re.M)
_LICENCE_RE = re.compile(
    r"project gutenberg(?:-tm)? licen[cs]e|this ebook is for the use of anyone anywhere"
    r"|www\.gutenberg\.org|all rights reserved|creative commons|licensed under",
    re.I,
)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (the text itself if absent)."""
    m = _START_RE.search(text)
    if m:
        text = text[m.end():]
    m = _END_RE.search(text)
    if m:
        text = text[: m.start()]
    return text


def strip_table_of_contents(text: str, max_entry_chars: int = 80) -> str:
    """Removes a "Contents" heading and the block of short lines after it.

    The block ends at the first paragraph (blank-line separated) whose lines are long prose,
    i.e. where a paragraph has a line longer than `max_entry_chars`; all of a table of contents'
    entries ("CHAPTER I. The Beginning ...... 1") are shorter.
    """
    m = _TOC_HEADING_RE.search(text)
    if not m or m.start() > len(text) // 3:  # a table of contents is at the front
        return text
    rest = text[m.end():]
    paragraphs = re.split(r"(\n[ \t]*\n)", rest)
    cut = 0
    entries = 0
    for i in range(0, len(paragraphs), 2):
        lines = [line for line in paragraphs[i].split("\n") if line.strip()]
        if lines and any(len(line.strip()) > max_entry_chars for line in lines):
            break
        entries += len(lines)
        cut = i + 2
    if entries < 2:  # a lone "Contents" line is not a table
        return text
    return text[: m.start()] + "".join(paragraphs[cut:])


@register
@dataclasses.dataclass(frozen=True)
class Books(Step):
    """Strips boilerplate, then drops books that are too short or not mostly letters.

    Reasons: too_short (fewer than `min_words` whitespace-separated words after stripping),
    alpha_ratio (fewer than `min_alpha_ratio` of the non-space characters are letters).
    Paragraphs that mention a licence or Project Gutenberg are removed when
    `remove_licence_paragraphs`.
    """

    name = "books"
    min_words: int = 1000
    min_alpha_ratio: float = 0.7
    strip_gutenberg: bool = True
    remove_table_of_contents: bool = True
    remove_licence_paragraphs: bool = True

    def check(self) -> None:
        require(self.min_words >= 0, f"min_words must be >= 0, got {self.min_words!r}")
        require(0.0 <= self.min_alpha_ratio <= 1.0,
                f"min_alpha_ratio must be a fraction in [0, 1], got {self.min_alpha_ratio!r}")

    def clean(self, text: str) -> str:
        """The book's text without the boilerplate."""
        if self.strip_gutenberg:
            text = strip_gutenberg(text)
        if self.remove_table_of_contents:
            text = strip_table_of_contents(text)
        if self.remove_licence_paragraphs and _LICENCE_RE.search(text):
            parts = re.split(r"\n[ \t]*\n", text)
            text = "\n\n".join(p for p in parts if not _LICENCE_RE.search(p))
        return text.strip()

    def apply(self, doc: dict):
        text = self.clean(doc["text"])
        if len(text.split()) < self.min_words:
            return self.drop("too_short")
        compact = re.sub(r"\s+", "", text)
        letters = sum(1 for c in compact if c.isalpha())
        if not compact or letters / len(compact) < self.min_alpha_ratio:
            return self.drop("alpha_ratio")
        out = dict(doc)
        out["text"] = text
        return out

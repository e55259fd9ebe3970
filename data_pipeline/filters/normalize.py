"""Unicode normalisation of a document's text: NFC, control characters, whitespace.

Invalid UTF-8 is the reader's business (it decodes with repair or sets the record aside);
here the text is already a `str`, and what can still be wrong in it are lone surrogates
(from JSON "\\ud800" escapes), which are replaced by U+FFFD.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata

from data_pipeline.steps import Step, register, require

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# C0/C1 controls except tab and newline, DEL, and invisible format characters that only get in
# the way (BOM/ZWNBSP, zero-width space, word joiner, soft hyphen). Joiners (U+200C/U+200D) stay:
# scripts and emoji need them.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u2060\ufeff]")
_NEWLINES_RE = re.compile("\r\n?|[\x85\u2028\u2029]")
_SPACES_RE = re.compile("[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_UNICODE_SPACES_RE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_RE = re.compile("[ \t]+$", re.MULTILINE)


@register
@dataclasses.dataclass(frozen=True)
class Normalize(Step):
    """Text in, normalised text out; drops ("normalize:empty") a document left empty.

    In order: lone surrogates -> U+FFFD; CR LF, CR, NEL, U+2028/9 -> LF; control and invisible
    format characters removed; Unicode `form` (NFC); Unicode spaces -> ' '; runs of spaces and
    tabs inside a line -> one space (`collapse_spaces`; leading indentation kept); trailing
    spaces removed; more than `max_newlines` newlines in a row cut to that many; the text
    stripped of blank lines at both ends.
    """

    name = "normalize"
    form: str = "NFC"
    collapse_spaces: bool = True
    max_newlines: int = 2  # 0: leave runs of newlines alone
    drop_empty: bool = True

    def check(self) -> None:
        require(self.form in ("NFC", "NFKC", "NFD", "NFKD"),
                f"form must be one of NFC, NFKC, NFD, NFKD, got {self.form!r}")
        require(self.max_newlines >= 0, f"max_newlines must be >= 0, got {self.max_newlines!r}")

    def normalize(self, text: str) -> str:
        """The normalised text."""
        text = _SURROGATE_RE.sub("\ufffd", text)
        text = _NEWLINES_RE.sub("\n", text)
        text = _CONTROL_RE.sub("", text)
        if not unicodedata.is_normalized(self.form, text):
            text = unicodedata.normalize(self.form, text)
        if self.collapse_spaces:
            # Runs after the first non-space character of a line: indentation is kept.
            text = re.sub(r"(?<=\S)[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+", _one_space, text)
        text = _UNICODE_SPACES_RE.sub(" ", text)
        text = _TRAILING_RE.sub("", text)
        if self.max_newlines:
            text = re.sub("\n{%d,}" % (self.max_newlines + 1), "\n" * self.max_newlines, text)
        return text.strip("\n")

    def apply(self, doc: dict):
        text = self.normalize(doc["text"])
        if self.drop_empty and not text.strip():
            return self.drop("empty")
        if text == doc["text"]:
            return doc
        out = dict(doc)
        out["text"] = text
        return out


def _one_space(m: re.Match) -> str:
    return " "

"""C4's clean-up of web pages (Raffel et al. 2020, and tfds' c4_utils), as datatrove's C4QualityFilter.

Line by line (lines stripped): a line is removed when it has a word over `max_word_length`
characters, when it does not end in terminal punctuation (. ? ! " ') or ends in an ellipsis,
when it has fewer than `min_words_per_line` words, when it mentions javascript, or when it has
cookie / terms-of-use / privacy-policy boilerplate. Citation markers ([1], [edit],
[citation needed]) are stripped from lines. The page is dropped when a line that got this far
contains "lorem ipsum" or "{", when the kept lines have fewer than `min_sentences` sentences,
or when the page contains a word of the bad-words list. The kept lines, joined by newlines,
become the document's text.

Sentences are counted like spaCy's sentencizer over spaCy's English tokens (what datatrove
uses): a sentence ends at a '.', '!' or '?' token followed later in the line by a word; '.'
is its own token after a lowercase letter, digit, closing punctuation or two capitals, and
not in abbreviations such as "Mr.", "e.g.", "Jan." or a single letter.
"""
from __future__ import annotations

import dataclasses
import re

from data_pipeline.filters import text as T
from data_pipeline.steps import Step, register, require

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")

_OPENERS = "([{\"'\u201c\u2018\u00ab<"
# A sentence end: the chunk before it (group 1, for the abbreviation check), then a '.' that
# spaCy splits off (after a lowercase letter or digit, closing punctuation or two capitals; not
# part of '..') or a '!' / '?' / CJK full stop, then anything up to the next word.
_SENTENCE_END_RE = re.compile(
    r"(\S*?)(?:(?:(?<=[^\W_A-Z])|(?<=[A-Z][A-Z])|(?<=[%)\]\"'\u2019\u201d]))\.(?![.\w])"
    r"|[!?\u3002\uff01\uff1f\u203c\u203d\u2047\u2048\u2049])\W*?(?=\w)"
)


def count_sentences(line: str) -> int:
    """Sentences in one line, as spaCy's sentencizer would count them (at least 1)."""
    n = 1
    for m in _SENTENCE_END_RE.finditer(line):
        chunk = m.group(1)
        if chunk and m.group(0)[len(chunk)] == "." and (chunk.lstrip(_OPENERS) + ".") in T.ABBREVIATIONS:
            continue
        n += 1
    return n


def _load_bad_words(words: tuple[str, ...], path: str | None) -> re.Pattern | None:
    items = {w.strip().lower() for w in words if w.strip()}
    if path:
        with open(path, encoding="utf-8") as f:
            items.update(line.strip().lower() for line in f if line.strip() and not line.startswith("#"))
    if not items:
        return None
    # C4's rule: a listed word or phrase flanked by non-word characters.
    return re.compile(r"(?:\W|^)(?:{})(?:\W|$)".format("|".join(map(re.escape, sorted(items)))))


@register
@dataclasses.dataclass(frozen=True)
class C4(Step):
    """Removes lines and drops pages by C4's rules (see the module docstring). Changes `text`.

    Reasons: lorem_ipsum, curly_bracket, too_few_sentences, bad_words.
    `bad_words` (a list) and `bad_words_file` (one word or phrase per line, '#' comments) are
    empty by default: C4 used the LDNOOBW English list, which is not shipped here.
    """

    name = "c4"
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_sentences: int = 5  # -1: off
    min_words_per_line: int = 3  # -1: off
    max_word_length: int = 1000  # -1: off
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    bad_words: tuple[str, ...] = ()
    bad_words_file: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bad_words", tuple(self.bad_words))

    def check(self) -> None:
        for f in ("min_sentences", "min_words_per_line"):
            require(getattr(self, f) >= -1, f"{f} must be >= 0 (or -1 for off), got {getattr(self, f)!r}")
        require(self.max_word_length == -1 or self.max_word_length >= 1,
                f"max_word_length must be >= 1 (or -1 for off), got {self.max_word_length!r}")
        if self.bad_words_file is not None:
            try:
                _load_bad_words((), self.bad_words_file)
            except OSError as e:
                require(False, f"bad_words_file: cannot read {self.bad_words_file!r}: {e.strerror}")

    @property
    def _bad_words_re(self) -> re.Pattern | None:
        # Built once per step object (on first use, so a step object stays cheap to make).
        try:
            return self.__dict__["_bw"]
        except KeyError:
            pattern = _load_bad_words(self.bad_words, self.bad_words_file)
            object.__setattr__(self, "_bw", pattern)
            return pattern

    def apply(self, doc: dict):
        max_len = self.max_word_length
        kept: list[str] = []
        n_sentences = 0
        for line in doc["text"].splitlines():
            line = line.strip()
            words = line.split()
            if max_len != -1 and len(line) > max_len and any(len(w) > max_len for w in words):
                continue
            if self.remove_citations and "[" in line:
                line = CITATION_RE.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                return self.drop("lorem_ipsum")
            if self.filter_javascript and "javascript" in low:
                continue
            if self.filter_curly_bracket and "{" in line:
                return self.drop("curly_bracket")
            if self.filter_policy and any(p in low for p in POLICY_SUBSTRINGS):
                continue
            if self.min_sentences != -1:
                n_sentences += count_sentences(line)
            kept.append(line)
        if n_sentences < self.min_sentences:
            return self.drop("too_few_sentences")
        text = "\n".join(kept).strip()
        bad = self._bad_words_re
        if bad is not None and bad.search(text.lower()):
            return self.drop("bad_words")
        out = dict(doc)
        out["text"] = text
        return out

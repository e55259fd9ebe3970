"""FineWeb's extra quality rules (Penedo et al. 2024), as datatrove's FineWebQualityFilter.

Lines are the text split on newlines, blank ones left out.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from data_pipeline.filters import text as T
from data_pipeline.steps import Filter, register, require


@register
@dataclasses.dataclass(frozen=True)
class FineWeb(Filter):
    """Drops a document when, in order (reasons):
    line_punct_ratio: fewer than `min_line_punct_ratio` of lines end in terminal punctuation;
    short_line_ratio: more than `max_short_line_ratio` of lines are `short_line_length` chars or shorter;
    char_dup_ratio: more than `max_char_dup_ratio` of the characters (newlines not counted) are in
      lines that repeat an earlier line;
    list_ratio: more than `max_newline_ratio` newlines per word.
    """

    name = "fineweb"
    min_line_punct_ratio: float = 0.12
    line_punct_exclude_zero: bool = False  # keep documents where no line ends in punctuation
    max_short_line_ratio: float = 0.67
    short_line_length: int = 30
    max_char_dup_ratio: float = 0.01
    max_newline_ratio: float = 0.3
    stop_chars: str = T.TERMINAL_PUNCTUATION  # characters that count as terminal punctuation

    def check(self) -> None:
        for f in ("min_line_punct_ratio", "max_short_line_ratio", "max_char_dup_ratio"):
            v = getattr(self, f)
            require(0.0 <= v <= 1.0, f"{f} must be a fraction in [0, 1], got {v!r}")
        require(self.short_line_length >= 0, f"short_line_length must be >= 0, got {self.short_line_length!r}")
        require(self.max_newline_ratio >= 0, f"max_newline_ratio must be >= 0, got {self.max_newline_ratio!r}")
        require(isinstance(self.stop_chars, str) and self.stop_chars != "",
                f"stop_chars must be a non-empty string of characters, got {self.stop_chars!r}")

    def reason(self, doc: dict) -> str | None:
        text = doc["text"]
        v = T.view(text)
        lines = v.nonempty_lines
        if not lines:
            return "empty"
        n = len(lines)
        stops = T.TERMINAL_PUNCTUATION_TUPLE if self.stop_chars is T.TERMINAL_PUNCTUATION else tuple(self.stop_chars)
        ratio = sum(1 for line in lines if line.endswith(stops)) / n
        if ratio < self.min_line_punct_ratio and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        short = self.short_line_length
        if sum(1 for line in lines if len(line) <= short) / n > self.max_short_line_ratio:
            return "short_line_ratio"
        counts = Counter(lines)
        if len(counts) < n:
            dup_chars = sum(len(k) * (c - 1) for k, c in counts.items() if c > 1)
            if dup_chars / (len(text) - text.count("\n")) > self.max_char_dup_ratio:
                return "char_dup_ratio"
        words = v.words
        if not words or text.count("\n") / len(words) > self.max_newline_ratio:
            return "list_ratio"
        return None

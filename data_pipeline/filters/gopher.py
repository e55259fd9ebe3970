"""Gopher's quality and repetition rules (Rae et al. 2021, "Scaling Language Models", Table A1).

Both filters reproduce datatrove's definitions (GopherQualityFilter, GopherRepetitionFilter)
rule by rule and in the same order, with the published thresholds as defaults; words come
from `text.split_words` (a regex close to spaCy's English tokenizer, which datatrove uses).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from itertools import accumulate

from data_pipeline.filters import text as T
from data_pipeline.steps import Filter, register, require

_SYMBOL_LINE_RE = re.compile(f"^[{re.escape(T.PUNCTUATION)}]+$", re.MULTILINE)
_ALPHA_LINE_RE = re.compile(r"[^\W\d_].*")  # from a token's first letter to its end
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def _ratio(name: str, value: float) -> None:
    require(0.0 <= value <= 1.0, f"{name} must be a fraction in [0, 1], got {value!r}")


@register
@dataclasses.dataclass(frozen=True)
class GopherQuality(Filter):
    """Drops documents that fail one of Gopher's quality rules. Reasons, in order:
    too_few_words, too_many_words, short_mean_word, long_mean_word, hash_ratio, ellipsis_ratio,
    bullet_lines, ellipsis_lines, alpha_words, stop_words.

    Words are counted as in datatrove: the word count is of non-symbol words (tokens with a
    character outside the punctuation set); ratios per word divide by all tokens.
    """

    name = "gopher_quality"
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_hash_ratio: float = 0.1  # '#' per word
    max_ellipsis_ratio: float = 0.1  # '...' or '…' per word
    max_bullet_lines_ratio: float = 0.9  # lines starting with '•' or '-'
    max_ellipsis_lines_ratio: float = 0.3  # lines ending with '...' or '…'
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # distinct stop words present
    stop_words: tuple[str, ...] = STOP_WORDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_words", tuple(self.stop_words))
        object.__setattr__(self, "_stop_set", frozenset(self.stop_words))

    def check(self) -> None:
        require(self.min_words >= 0, f"min_words must be >= 0, got {self.min_words!r}")
        require(self.max_words >= self.min_words,
                f"max_words must be >= min_words ({self.min_words}), got {self.max_words!r}")
        require(self.min_mean_word_length >= 0,
                f"min_mean_word_length must be >= 0, got {self.min_mean_word_length!r}")
        require(self.max_mean_word_length >= self.min_mean_word_length,
                f"max_mean_word_length must be >= min_mean_word_length, got {self.max_mean_word_length!r}")
        for f in ("max_hash_ratio", "max_ellipsis_ratio"):
            require(getattr(self, f) >= 0, f"{f} must be >= 0, got {getattr(self, f)!r}")
        for f in ("max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio"):
            _ratio(f, getattr(self, f))
        require(0 <= self.min_stop_words <= len(self._stop_set),
                f"min_stop_words must be in [0, {len(self._stop_set)}] (the number of stop_words), "
                f"got {self.min_stop_words!r}")

    def reason(self, doc: dict) -> str | None:
        text = doc["text"]
        words = T.view(text).words
        n_words = len(words)
        if n_words == 0:
            return "too_few_words"
        # Counted over the tokens joined one per line, with regexes instead of a Python loop
        # per word: symbol tokens are the lines made only of punctuation.
        joined = "\n".join(words)
        symbols = _SYMBOL_LINE_RE.findall(joined)
        n = n_words - len(symbols)
        non_symbol_chars = len(joined) - (n_words - 1) - sum(map(len, symbols))
        if n < self.min_words:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"
        if n:
            mean = non_symbol_chars / n
            if mean < self.min_mean_word_length:
                return "short_mean_word"
            if mean > self.max_mean_word_length:
                return "long_mean_word"
        if text.count("#") / n_words > self.max_hash_ratio:
            return "hash_ratio"
        if (text.count("...") + text.count("\u2026")) / n_words > self.max_ellipsis_ratio:
            return "ellipsis_ratio"
        lines = T.view(text).lines
        if lines:
            bullets = sum(1 for s in lines if s.lstrip().startswith(("\u2022", "-")))
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return "bullet_lines"
            ellipses = sum(1 for s in lines if s.rstrip().endswith(("...", "\u2026")))
            if ellipses / len(lines) > self.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
        alpha = len(_ALPHA_LINE_RE.findall(joined))  # tokens with a letter
        if alpha / n_words < self.min_alpha_words_ratio:
            return "alpha_words"
        if self.min_stop_words and len(self._stop_set.intersection(words)) < self.min_stop_words:
            return "stop_words"
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them): every occurrence after the first counts."""
    counts = Counter(items)
    dup_items = len(items) - len(counts)
    if not dup_items:
        return 0, 0
    return dup_items, sum(len(k) * (c - 1) for k, c in counts.items() if c > 1)


def _ngrams(words: list[str], n: int):
    return zip(*[words[i:] for i in range(n)])


@register
@dataclasses.dataclass(frozen=True)
class GopherRepetition(Filter):
    """Drops documents with too much repeated content. Fractions are of the text's characters
    unless said. Reasons: empty, dup_para_frac, dup_para_char_frac, dup_line_frac,
    dup_line_char_frac, top_{n}_gram, duplicated_{n}_grams.

    Paragraphs are the stripped text split on 2+ newlines, lines the text split on newlines.
    Top n-gram: characters of the most frequent word n-gram (words joined by spaces) times its
    count. Duplicated n-grams: a left-to-right scan that counts the characters of every n-gram
    seen before and then jumps past it (datatrove's `find_all_duplicate`).
    """

    name = "gopher_repetition"
    max_dup_line_frac: float = 0.30  # by count
    max_dup_para_frac: float = 0.30  # by count
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    # (n, max fraction) for the most frequent n-gram and for duplicated n-grams
    top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngrams: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __post_init__(self) -> None:
        for f in ("top_ngrams", "dup_ngrams"):
            try:
                pairs = tuple((int(n), float(frac)) for n, frac in getattr(self, f))
            except (TypeError, ValueError):
                continue  # check() names it
            object.__setattr__(self, f, pairs)

    def check(self) -> None:
        for f in ("max_dup_line_frac", "max_dup_para_frac", "max_dup_line_char_frac", "max_dup_para_char_frac"):
            _ratio(f, getattr(self, f))
        for f in ("top_ngrams", "dup_ngrams"):
            pairs = getattr(self, f)
            require(all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], int) for p in pairs),
                    f"{f} must be a list of [n, max_fraction] pairs, got {pairs!r}")
            for n, frac in pairs:
                require(n >= 1, f"{f}: n must be >= 1, got {n!r}")
                _ratio(f"{f} (n={n})", frac)

    def reason(self, doc: dict) -> str | None:
        text = doc["text"]
        if not text:
            return "empty"
        n_chars = len(text)
        paras = T.paragraphs(text)
        dup, dup_chars = _duplicates(paras)
        if dup / len(paras) > self.max_dup_para_frac:
            return "dup_para_frac"
        if dup_chars / n_chars > self.max_dup_para_char_frac:
            return "dup_para_char_frac"
        lines = T.newline_lines(text)
        dup, dup_chars = _duplicates(lines)
        if dup / len(lines) > self.max_dup_line_frac:
            return "dup_line_frac"
        if dup_chars / n_chars > self.max_dup_line_char_frac:
            return "dup_line_char_frac"

        words = T.view(text).words
        for n, frac in self.top_ngrams:
            if len(words) < n:
                continue
            counts = Counter(_ngrams(words, n))
            # max() keeps the first of equal counts, like Counter.most_common(1).
            gram, count = max(counts.items(), key=_second)
            if (sum(map(len, gram)) + n - 1) * count / n_chars > frac:
                return f"top_{n}_gram"

        if self.dup_ngrams:
            cum = [0, *accumulate(map(len, words))]  # cum[i] = characters in words[:i]
            for n, frac in self.dup_ngrams:
                if _duplicated_ngram_chars(words, n, cum) / n_chars > frac:
                    return f"duplicated_{n}_grams"
        return None


def _second(item):
    return item[1]


def _duplicated_ngram_chars(words: list[str], n: int, cum: list[int]) -> int:
    """Characters in repeated word n-grams (words concatenated), datatrove's greedy scan.

    The scan visits positions left to right; an n-gram seen before adds its characters and
    makes the scan jump n positions (the skipped n-grams are not recorded). Only n-grams that
    occur more than once can ever be "seen before", so the scan visits just those positions.
    """
    if len(words) < n:
        return 0
    grams = list(_ngrams(words, n))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0
    seen: set = set()
    total, next_pos = 0, 0
    for pos, gram in enumerate(grams):
        if pos < next_pos or counts[gram] == 1:
            continue
        if gram in seen:
            total += cum[pos + n] - cum[pos]
            next_pos = pos + n
        else:
            seen.add(gram)
    return total

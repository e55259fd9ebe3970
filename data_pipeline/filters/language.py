"""Language identification with py3langid (its model ships inside the package; nothing is downloaded).

Scores are py3langid's normalised probabilities (`norm_probs=True`): a softmax over its 97
languages with a temperature of sqrt(text bytes), so they are calibrated across lengths and are
lower than fastText's for the same text: on English web text most documents score above 0.9,
short or mixed ones less. The threshold `min_score` is on that scale.
"""
from __future__ import annotations

import dataclasses

from data_pipeline.steps import Step, register, require

_IDENTIFIER = None


def identifier():
    """py3langid's LanguageIdentifier with normalised probabilities (loaded once per process)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def classify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text`."""
    lang, score = identifier().classify(text)
    return lang, float(score)


@register
@dataclasses.dataclass(frozen=True)
class Language(Step):
    """Stores `language` and `language_score` on the document; drops it ("language:<code>" or
    "language:low_score") unless the language is in `languages` (empty: any) with a score of at
    least `min_score`. `max_chars` > 0 classifies only the text's first characters (faster on
    long documents; py3langid's cost is linear in the length).
    """

    name = "language"
    languages: tuple[str, ...] = ("en",)
    min_score: float = 0.65
    max_chars: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.languages, str):
            object.__setattr__(self, "languages", (self.languages,))
        object.__setattr__(self, "languages", tuple(self.languages))

    def check(self) -> None:
        require(0.0 <= self.min_score <= 1.0, f"min_score must be a probability in [0, 1], got {self.min_score!r}")
        require(self.max_chars >= 0, f"max_chars must be >= 0, got {self.max_chars!r}")
        known = set(identifier().labels)
        unknown = [code for code in self.languages if code not in known]
        require(not unknown, f"languages: unknown code(s) {unknown}; py3langid knows {', '.join(sorted(known))}")

    def apply(self, doc: dict):
        text = doc["text"]
        lang, score = classify(text[: self.max_chars] if self.max_chars else text)
        doc = dict(doc)
        doc["language"] = lang
        doc["language_score"] = round(score, 4)
        if self.languages and lang not in self.languages:
            return self.drop(lang)
        if score < self.min_score:
            return self.drop("low_score")
        return doc

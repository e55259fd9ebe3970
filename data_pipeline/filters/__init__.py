"""Per-document cleaning steps: normalisation, language id, Gopher, C4, FineWeb, books, code, PII.

Importing this package registers the steps (names as in YAML): normalize, language,
gopher_quality, gopher_repetition, c4, fineweb, books, code, pii. Word, line and paragraph
splitting shared by the filters lives in `text`.
"""
from data_pipeline.filters import books, c4, code, fineweb, gopher, language, normalize, pii  # noqa: F401

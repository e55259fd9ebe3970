"""Cleaning steps of data_pipeline/filters: each rule on both sides of its threshold, golden
values on real-looking paragraphs, bad thresholds, language id, PII, code and book rules."""
from __future__ import annotations

import pytest

from data_pipeline.filters import text as T
from data_pipeline.filters.books import Books, strip_gutenberg, strip_table_of_contents
from data_pipeline.filters.c4 import C4, count_sentences
from data_pipeline.filters.code import Code
from data_pipeline.filters.fineweb import FineWeb
from data_pipeline.filters.gopher import GopherQuality, GopherRepetition, _duplicated_ngram_chars
from data_pipeline.filters.language import Language
from data_pipeline.filters.normalize import Normalize
from data_pipeline.filters.pii import PII
from data_pipeline.steps import Drop, StepError, build_step


def doc(text: str, **kw) -> dict:
    return {"id": "d", "text": text, "source": "test", **kw}


def verdict(step, text: str, **kw):
    out = step.apply(doc(text, **kw))
    return out.reason if isinstance(out, Drop) else "keep"


PROSE = (
    "The history of the river valley is long and varied. Farmers settled there with their "
    "families, and the town that grew around the mill became a market for the whole region. "
    "Over the years the bridge was rebuilt three times, each time wider than before, to carry "
    "the trade that came with the railway. Today the old mill is a museum, and visitors walk "
    "along the water to see the locks that once controlled the flow of goods to the sea."
)
PARAGRAPHS = [
    "The history of the river valley is long and varied, and it begins with the farmers who came first.",
    "Farmers settled there with their families, and the town that grew around the mill became a market.",
    "Over the years the bridge was rebuilt three times, each time wider than before, to carry the trade.",
    "Today the old mill is a museum, and visitors walk along the water to see the locks and the boats.",
    "In winter the river freezes over and children skate on it while their parents watch from the bank.",
    "The town council meets every month to decide how to keep the valley as beautiful as it is today.",
]


# --- word splitting: spaCy's English tokenizer (what datatrove counts with) ----------------------

@pytest.mark.parametrize("text,words", [
    ("Hello, world!", ["Hello", ",", "world", "!"]),
    ("Don't stop; it's John's.", ["Do", "n't", "stop", ";", "it", "'s", "John", "'s", "."]),
    ("well-known e-mail 3-4 gcc-12", ["well", "-", "known", "e", "-", "mail", "3", "-", "4", "gcc-12"]),
    ("Mr. Smith, e.g. the U.S. and USA.", ["Mr.", "Smith", ",", "e.g.", "the", "U.S.", "and", "USA", "."]),
    ("1,000 and 3.14 (approx.)", ["1,000", "and", "3.14", "(", "approx", ".", ")"]),
    ("see https://example.com/a?b=1 or a@b.com", ["see", "https://example.com/a?b=1", "or", "a@b.com"]),
    ("foo(self): a/b 1/2 x=y", ["foo(self", "):", "a", "/", "b", "1/2", "x", "=", "y"]),
    ("I cannot go... wait", ["I", "can", "not", "go", "...", "wait"]),
])
def test_split_words_matches_spacy_shapes(text, words):
    assert T.split_words(text) == words


def test_view_reuses_splits_of_the_same_text_only():
    a = "one two three"
    va = T.view(a)
    assert T.view(a) is va  # the same string object: reused
    b = "".join(["one two ", "three"])
    assert b == a and b is not a  # equal text, another object (a step may have built it)
    vb = T.view(b)
    assert vb is not va  # identity, not equality, is the key: split again
    assert vb.text is b and vb.words == ["one", "two", "three"]


# --- Gopher quality ------------------------------------------------------------------------------

def _words_doc(n: int) -> str:
    base = PROSE.split()
    return " ".join((base * (n // len(base) + 1))[:n]) + "."


@pytest.mark.parametrize("n,expected", [(49, "gopher_quality:too_few_words"), (50, "keep")])
def test_gopher_min_words(n, expected):
    # 'The' counts as a word; 'the', 'and', 'of' ... are among the first 50 words.
    assert verdict(GopherQuality(), _words_doc(n)) == expected


def test_gopher_max_words():
    assert verdict(GopherQuality(max_words=60), _words_doc(61)) == "gopher_quality:too_many_words"
    assert verdict(GopherQuality(max_words=60), _words_doc(60)) == "keep"


@pytest.mark.parametrize("word,expected", [
    ("ab", "gopher_quality:short_mean_word"),  # mean length 2 < 3
    ("abc", "keep"),  # 3 is the limit, inclusive
    ("abcdefghij", "keep"),  # 10
    ("abcdefghijk", "gopher_quality:long_mean_word"),  # 11 > 10
])
def test_gopher_mean_word_length(word, expected):
    text = " ".join([word] * 100)
    step = GopherQuality(min_stop_words=0)
    assert verdict(step, text) == expected


@pytest.mark.parametrize("hashes,expected", [(11, "keep"), (12, "gopher_quality:hash_ratio")])
def test_gopher_hash_ratio(hashes, expected):
    # 100 words plus h '#' tokens: h / (100 + h) is 0.099 for 11 and 0.107 for 12 (limit 0.1)
    text = " ".join(["the", "and"] + ["word"] * 98) + " #" * hashes
    assert verdict(GopherQuality(), text) == expected


@pytest.mark.parametrize("k,expected", [(11, "keep"), (12, "gopher_quality:ellipsis_ratio")])  # 0.098 / 0.106
def test_gopher_ellipsis_ratio(k, expected):
    text = " ".join(["the", "and"] + ["word"] * 98) + " ..." * k + " end"  # 101 + k tokens
    assert verdict(GopherQuality(), text) == expected


@pytest.mark.parametrize("bullets,expected", [(9, "keep"), (10, "gopher_quality:bullet_lines")])
def test_gopher_bullet_lines(bullets, expected):
    lines = ["- the and word word word word word word"] * bullets + ["the and word word word word word word"] * (10 - bullets)
    assert verdict(GopherQuality(min_words=10), "\n".join(lines)) == expected


@pytest.mark.parametrize("ell,expected", [(3, "keep"), (4, "gopher_quality:ellipsis_lines")])
def test_gopher_ellipsis_lines(ell, expected):
    lines = ["the and word word word word word word\u2026"] * ell + ["the and word word word word word word."] * (10 - ell)
    assert verdict(GopherQuality(min_words=10, max_ellipsis_ratio=1.0), "\n".join(lines)) == expected


@pytest.mark.parametrize("numbers,expected", [(20, "keep"), (21, "gopher_quality:alpha_words")])
def test_gopher_alpha_words(numbers, expected):
    text = " ".join(["the", "and"] + ["word"] * (78) + ["12345"] * numbers)  # 80 alpha of 80+n
    assert verdict(GopherQuality(), text) == expected


@pytest.mark.parametrize("stops,expected", [(["the"], "gopher_quality:stop_words"), (["the", "of"], "keep")])
def test_gopher_stop_words(stops, expected):
    text = " ".join(stops + ["river"] * 60)
    assert verdict(GopherQuality(), text) == expected


def test_gopher_quality_golden_on_prose():
    step = GopherQuality()
    assert verdict(step, PROSE) == "keep"
    words = T.split_words(PROSE)  # the same 89 tokens as spaCy's English tokenizer
    assert len(words) == 89 and words.count(",") == 4 and words.count(".") == 4


# --- Gopher repetition ---------------------------------------------------------------------------

def test_gopher_repetition_keeps_prose():
    assert verdict(GopherRepetition(), "\n\n".join(PARAGRAPHS)) == "keep"


def test_dup_para_frac_both_sides():
    # 10 paragraphs, 3 of them repeats: 0.3 is not > 0.3; 4 repeats is.
    uniq = [f"paragraph number {i} talks about something else entirely, {w}" for i, w in enumerate("abcdefghij")]
    step = GopherRepetition(max_dup_para_char_frac=1, max_dup_line_char_frac=1, max_dup_line_frac=1,
                            top_ngrams=(), dup_ngrams=())
    three = uniq[:7] + [uniq[0]] * 3
    four = uniq[:6] + [uniq[0]] * 4
    assert verdict(step, "\n\n".join(three)) == "keep"
    assert verdict(step, "\n\n".join(four)) == "gopher_repetition:dup_para_frac"


def test_dup_line_char_frac_both_sides():
    step = GopherRepetition(max_dup_para_frac=1, max_dup_para_char_frac=1, max_dup_line_frac=1,
                            top_ngrams=(), dup_ngrams=())
    unique = "\n".join(PARAGRAPHS)
    rep = PARAGRAPHS[0]
    # repeated line characters / all characters; limit 0.2
    low = unique + "\n" + rep
    assert len(rep) / len(low) <= 0.2
    assert verdict(step, low) == "keep"
    high = unique + "\n" + rep + "\n" + rep
    assert 2 * len(rep) / len(high) > 0.2
    assert verdict(step, high) == "gopher_repetition:dup_line_char_frac"


def test_top_2_gram_both_sides():
    step = GopherRepetition(top_ngrams=((2, 0.2),), dup_ngrams=())
    base = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
    text_ok = base + " " + " ".join(["xx yy"] * 3)
    text_bad = base + " " + " ".join(["xx yy"] * 8)
    assert verdict(step, text_ok) == "keep"
    assert verdict(step, text_bad) == "gopher_repetition:top_2_gram"


def test_duplicated_ngram_chars_matches_datatrove_scan():
    # datatrove's find_all_duplicate, written out: the greedy scan with jumps.
    def reference(words, n):
        seen, total, i = set(), 0, 0
        while i < len(words) - n + 1:
            g = "".join(words[i:i + n])
            if g in seen:
                total += len(g)
                i += n
            else:
                seen.add(g)
                i += 1
        return total

    words = ("a b c d e f a b c d e f g a b c d e f a b c h i j a b c d e".split()) * 2
    from itertools import accumulate
    cum = [0, *accumulate(map(len, words))]
    for n in range(2, 8):
        assert _duplicated_ngram_chars(words, n, cum) == reference(words, n)


def test_dup_5_grams_drops_copied_sentences():
    sentence = "the cat sat on the mat near the door of the house"
    text = " ".join(PARAGRAPHS) + " " + " ".join([sentence] * 6)
    assert verdict(GopherRepetition(), text).startswith("gopher_repetition:")
    assert verdict(GopherRepetition(), " ".join(PARAGRAPHS)) == "keep"


# --- C4 ------------------------------------------------------------------------------------------

def test_c4_golden_page():
    page = "\n".join([
        "Home | About | Contact",
        "The river valley has a long history of farming [1] and trade.",
        "Please enable JavaScript to view this page.",
        "This site uses cookies to improve your experience.",
        "Farmers settled there with their families [citation needed].",
        "The town grew around the mill and became a market.",
        "Read more...",
        "Today the old mill is a museum. Visitors walk along the water [edit].",
        "Click",
    ])
    out = C4().apply(doc(page))
    assert out["text"] == "\n".join([
        "The river valley has a long history of farming  and trade.",
        "Farmers settled there with their families .",
        "The town grew around the mill and became a market.",
        "Today the old mill is a museum. Visitors walk along the water .",
    ])


@pytest.mark.parametrize("n,expected", [(4, "c4:too_few_sentences"), (5, "keep")])
def test_c4_min_sentences(n, expected):
    text = "\n".join([f"This is sentence number {i} here." for i in range(n)])
    assert verdict(C4(), text) == expected


@pytest.mark.parametrize("line,kept", [
    ("two words.", False),  # < 3 words
    ("three words here.", True),
    ("no terminal punctuation here", False),
    ("ends with an ellipsis...", False),
    ('a quoted line here."', True),
    ("x" * 1001 + " is long.", False),
    ("x" * 1000 + " is fine.", True),
])
def test_c4_line_rules(line, kept):
    filler = "\n".join(f"Filler sentence number {i} here." for i in range(5))
    out = C4().apply(doc(filler + "\n" + line))
    assert isinstance(out, dict)
    assert (line in out["text"].split("\n")) == kept


@pytest.mark.parametrize("extra,reason", [
    ("Lorem ipsum dolor sit amet.", "c4:lorem_ipsum"),
    ("The function f() { return 1; } is short.", "c4:curly_bracket"),
])
def test_c4_page_drops(extra, reason):
    filler = "\n".join(f"Filler sentence number {i} here." for i in range(5))
    assert verdict(C4(), filler + "\n" + extra) == reason


def test_c4_bad_words_configurable(tmp_path):
    filler = "\n".join(f"Filler sentence number {i} about badword here." for i in range(5))
    assert verdict(C4(), filler) == "keep"  # empty list by default
    assert verdict(C4(bad_words=("badword",)), filler) == "c4:bad_words"
    f = tmp_path / "bad.txt"
    f.write_text("# comment\nbadword\n")
    assert verdict(build_step({"step": "c4", "bad_words_file": str(f)}), filler) == "c4:bad_words"
    assert verdict(C4(bad_words=("badwor",)), filler) == "keep"  # whole words only


@pytest.mark.parametrize("line,n", [
    ("One sentence here.", 1),
    ("First one. Second one! Third one?", 3),
    ("Mr. Smith met Dr. Jones, e.g. at noon.", 1),
    ("It costs 3.50 dollars. That is cheap.", 2),
    ("He said \"stop.\" Then he left.", 2),
    ("Wait... what", 1),
])
def test_count_sentences_like_spacy(line, n):
    assert count_sentences(line) == n


# --- FineWeb -------------------------------------------------------------------------------------

def _fw_lines(punct: int, total: int) -> str:
    return "\n".join(
        [f"This line number {i} ends with a full stop and is long enough." for i in range(punct)]
        + [f"This line number {i} has no final punctuation and is long" for i in range(total - punct)]
    )


@pytest.mark.parametrize("punct,expected", [(11, "fineweb:line_punct_ratio"), (12, "keep")])
def test_fineweb_line_punct(punct, expected):
    assert verdict(FineWeb(), _fw_lines(punct, 100)) == expected


@pytest.mark.parametrize("short,expected", [(67, "keep"), (68, "fineweb:short_line_ratio")])
def test_fineweb_short_lines(short, expected):
    long_lines = [f"A long line number {i} that ends with a full stop, surely." for i in range(100 - short)]
    short_lines = [f"Short {i} words here." for i in range(short)]
    text = "\n".join(long_lines + short_lines)
    assert verdict(FineWeb(max_newline_ratio=1.0), text) == expected


def test_fineweb_char_dup_both_sides():
    lines = [f"Line {i} is a unique sentence about the valley and the river." for i in range(40)]
    dup = "Dup."
    ok = "\n".join(lines + [dup, dup])  # 4 duplicated chars of ~2500: < 1%
    bad = "\n".join(lines + [lines[0]] * 2)
    assert verdict(FineWeb(), ok) == "keep"
    assert verdict(FineWeb(), bad) == "fineweb:char_dup_ratio"


@pytest.mark.parametrize("words,expected", [(1, "fineweb:list_ratio"), (2, "keep")])
def test_fineweb_newline_ratio(words, expected):
    # 49 newlines over 50 lines of `words` words + "end" + ".": 49/150 = 0.33, 49/200 = 0.245
    lines = [" ".join([f"w{i}x"] * words) + " end." for i in range(50)]
    assert verdict(FineWeb(max_short_line_ratio=1.0), "\n".join(lines)) == expected


# --- bad thresholds ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,param", [
    ({"step": "gopher_quality", "min_alpha_words_ratio": 1.5}, "min_alpha_words_ratio"),
    ({"step": "gopher_quality", "max_words": 10}, "max_words"),
    ({"step": "gopher_repetition", "max_dup_line_frac": -0.1}, "max_dup_line_frac"),
    ({"step": "gopher_repetition", "dup_ngrams": [[5, 2.0]]}, "dup_ngrams"),
    ({"step": "c4", "min_words_per_line": -3}, "min_words_per_line"),
    ({"step": "c4", "bad_words_file": "/nonexistent/bad.txt"}, "bad_words_file"),
    ({"step": "fineweb", "min_line_punct_ratio": 12}, "min_line_punct_ratio"),
    ({"step": "language", "min_score": 1.5}, "min_score"),
    ({"step": "language", "languages": ["xx"]}, "languages"),
    ({"step": "code", "data_min_chars": 9000}, "data_min_chars"),
    ({"step": "books", "min_words": -1}, "min_words"),
    ({"step": "normalize", "form": "NFX"}, "form"),
])
def test_bad_threshold_names_the_parameter(spec, param):
    with pytest.raises(StepError, match=param):
        build_step(spec, where="web.yaml: steps[0]")


def test_unknown_parameter_is_rejected_with_hint():
    with pytest.raises(StepError, match="min_words"):
        build_step({"step": "gopher_quality", "min_word": 3})


# --- normalize, language -------------------------------------------------------------------------

def test_normalize():
    raw = "Cafe\u0301\u00a0\u00a0bar\r\n\r\n\r\n\r\n  indented  x \x00\ufeff\nend \ud800"
    out = Normalize().apply(doc(raw))
    assert out["text"] == "Caf\u00e9 bar\n\n  indented x\nend \ufffd"
    assert verdict(Normalize(), " \n\x00 ") == "normalize:empty"


@pytest.mark.parametrize("text,lang", [
    ("The quick brown fox jumps over the lazy dog and runs away into the forest.", "en"),
    ("Le renard brun rapide saute par-dessus le chien paresseux dans la forêt.", "fr"),
    ("Der schnelle braune Fuchs springt über den faulen Hund in den Wald.", "de"),
    ("Быстрая коричневая лиса прыгает через ленивую собаку.", "ru"),
])
def test_language_id(text, lang):
    out = Language(languages=(), min_score=0.0).apply(doc(text))
    assert out["language"] == lang and 0.5 < out["language_score"] <= 1.0
    assert verdict(Language(languages=("en",)), text) == ("keep" if lang == "en" else f"language:{lang}")


def test_language_min_score():
    text = "The quick brown fox jumps over the lazy dog."
    score = Language(languages=(), min_score=0).apply(doc(text))["language_score"]
    assert verdict(Language(min_score=score - 0.01), text) == "keep"
    assert verdict(Language(min_score=min(1.0, score + 0.01)), text) == "language:low_score"


# --- PII -----------------------------------------------------------------------------------------

def test_pii_placeholders_and_counts():
    text = ("Write to jane.doe@example.com or j@mail.example.org, call +1 (555) 123-4567 or "
            "020 7946 0958; servers 8.8.8.8 and 2001:4860:4860::8888; local 192.168.1.1 and ::1. "
            "Version 3.11, date 2024-01-31, time 12:30:45, path std::io, id 1234567.")
    out = PII().apply(doc(text))
    assert out["pii_redactions"] == {"email": 2, "ip": 2, "phone": 2}
    assert out["text"] == (
        "Write to <EMAIL> or <EMAIL>, call <PHONE_NUMBER> or "
        "<PHONE_NUMBER>; servers <IP_ADDRESS> and <IP_ADDRESS>; local 192.168.1.1 and ::1. "
        "Version 3.11, date 2024-01-31, time 12:30:45, path std::io, id 1234567.")
    custom = PII(email_placeholder="[e]", keep_private_ips=False, phones=False).apply(doc(text))
    assert custom["pii_redactions"] == {"email": 2, "ip": 4, "phone": 0}
    assert "[e]" in custom["text"] and "192.168.1.1" not in custom["text"]


# --- code ----------------------------------------------------------------------------------------

PY = "import os\n\n\ndef main():\n    print(os.getcwd())\n    return 0\n"


@pytest.mark.parametrize("text,path,expected", [
    (PY, "src/main.py", "keep"),
    (PY, "src/main.exe", "code:extension"),
    ("x = 1\n" + "y = '" + "a" * 1000 + "'\n", "a.py", "code:long_line"),
    ("\n".join(["z = '" + "a" * 120 + "'"] * 5), "a.py", "code:mean_line_length"),
    ("\n".join(["#### ---- ====== ++++"] * 5), "a.py", "code:alnum_fraction"),
    ("# This file is automatically generated. Do not edit.\n" + PY, "a.py", "code:autogenerated"),
    ("\n" * 5 + "# auto-generated below the first five lines\n" + PY, "a.py", "keep"),
    ('{"a": 1}', "data.json", "code:data_size"),
    ('{\n  "key": "' + "v" * 60 + '",\n  "other": "' + "w" * 60 + '"\n}\n', "data.json", "keep"),
    ("k: " + "v" * 5001, "conf.yaml", "code:data_size"),
])
def test_code_rules(text, path, expected):
    assert verdict(Code(), text, path=path) == expected


def test_code_language_field_and_extension_field():
    assert verdict(Code(), '{"a": 1}', extension=".json") == "code:data_size"
    assert verdict(Code(), "short: 1", path="x.txt", language="yaml", ) == "code:extension"
    assert verdict(Code(extensions=()), "short: 1", path="x.txt", language="yaml") == "code:data_size"


# --- books ---------------------------------------------------------------------------------------

BOOK = """The Project Gutenberg eBook of A Tale

This ebook is for the use of anyone anywhere in the United States and most other parts.

*** START OF THE PROJECT GUTENBERG EBOOK A TALE ***

A TALE

CONTENTS

CHAPTER I. The Valley
CHAPTER II. The Mill
CHAPTER III. The River

CHAPTER I. The Valley

{body}

*** END OF THE PROJECT GUTENBERG EBOOK A TALE ***

Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works
"""


def test_books_strip_boilerplate_and_keep():
    body = "\n\n".join([PROSE] * 20)
    out = Books().apply(doc(BOOK.format(body=body)))
    assert isinstance(out, dict)
    text = out["text"]
    # (the chapter heading right after the table goes with it: it looks like one more entry)
    assert text.startswith("A TALE\n\nThe history")
    assert "CONTENTS" not in text and "CHAPTER II" not in text
    assert "Gutenberg" not in text and "START OF" not in text and "END OF" not in text
    assert text.endswith("flow of goods to the sea.")


def test_books_too_short_and_alpha_ratio():
    assert verdict(Books(), BOOK.format(body=PROSE)) == "books:too_short"
    numbers = "\n".join(" ".join(str(i * j) for j in range(20)) for i in range(100))
    assert verdict(Books(min_words=100), numbers) == "books:alpha_ratio"
    assert verdict(Books(min_words=100, min_alpha_ratio=0.0), numbers) == "keep"


def test_gutenberg_and_toc_helpers_leave_other_text_alone():
    assert strip_gutenberg(PROSE) == PROSE
    assert strip_table_of_contents(PROSE) == PROSE

"""Text splitting shared by the filters: words, lines, paragraphs, computed once per text.

Words follow the shape of spaCy's English tokenizer (what datatrove's filters count with):
whitespace-separated chunks with punctuation split off as its own tokens, contractions split
("don't" -> "do", "n't"; "it's" -> "it", "'s"), hyphens and slashes between letters split,
while URLs, e-mail addresses and numbers like 3.14 or 1,000 stay whole. It is one precompiled
regex (no per-character Python), which is what makes the filters fast; it is an approximation
of spaCy, close enough that keep/drop decisions agree on >= 99% of documents
(bench/clean_throughput.py measures it).

Filters of one chain usually look at the same text one after the other, so `view(text)`
keeps the last text's splits (keyed by object identity, so a changed text is split again).
"""
from __future__ import annotations

import re

# Characters that make a token a "symbol" (Gopher's non-symbol words); the same set as
# datatrove's PUNCTUATION_SET: ASCII/CJK punctuation, C0/C1 controls, plus TERMINAL_PUNCTUATION.
_PUNCTUATION = (
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a\u201e';\u2019{|"
    "\u2236\u00b4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\u00ab\u3009,><\u300b)?\uff09\u3002\u2026@_.\"}\u25ba\u00bb"
    + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))
)
# Unicode sentence terminators (as in datatrove's TERMINAL_PUNCTUATION): a line "ends in
# terminal punctuation" when its last character is one of these.
TERMINAL_PUNCTUATION: str = '!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98\U0001bc9f\U0001da88'
PUNCTUATION: str = "".join(sorted(set(_PUNCTUATION) | set(TERMINAL_PUNCTUATION)))
TERMINAL_PUNCTUATION_TUPLE: tuple[str, ...] = tuple(TERMINAL_PUNCTUATION)

# --- Words: spaCy's English tokenizer rules -------------------------------------------------
# spaCy splits on whitespace, then peels prefixes (opening punctuation, quotes, currency) off the
# front of each chunk and suffixes (closing punctuation, quotes, "'s", a period after a lowercase
# letter or digit or two capitals) off the end, and splits a few infixes (hyphens and / : < > =
# between letters, "..." anywhere); some chunks are exceptions ("e.g.", "Mr.", "cannot").
# `split_words` splits on whitespace with str.split, keeps all-alphanumeric chunks (most of
# them) as they are, and runs one regex over each other distinct chunk, with a cache: chunks
# repeat ("it.", "however,"), so most of the regex work is done once per process.
# In the regex a prefix is a prefix character at the start of the chunk or after another
# prefix; the core runs until an infix or a run of suffixes that reaches the chunk's end.
_PUNCT = r"\u2026,:;!?\u00bf\u061f\u00a1()\[\]{}<>_#*&\u3002\uff1f\uff01\uff0c\u3001\uff1b\uff1a\uff5e\u00b7\u0964\u060c\u06d4\u061b\u066a"
_QUOTES = "'\"\u201d\u201c`\u2018\u00b4\u2019\u201a,\u201e\u00bb\u00ab\u300c\u300d\u300e\u300f\uff08\uff09\u3014\u3015\u3010\u3011\u300a\u300b\u3008\u3009\u27e6\u27e7"
_CURRENCY = "$\u00a3\u20ac\u00a5\u0e3f\u20a0-\u20bf\ufdfc"
_ICONS = (  # Unicode category So (other symbols) but the degree sign: always a token of its own
    "\u00a6\u00a9\u00ae\u0482\u058d-\u058e\u060e-\u060f\u06de\u06e9\u06fd-\u06fe\u07f6\u09fa"
    "\u0b70\u0bf3-\u0bf8\u0bfa\u0c7f\u0d4f\u0d79\u0f01-\u0f03\u0f13\u0f15-\u0f17\u0f1a-\u0f1f"
    "\u0f34\u0f36\u0f38\u0fbe-\u0fc5\u0fc7-\u0fcc\u0fce-\u0fcf\u0fd5-\u0fd8\u109e-\u109f"
    "\u1390-\u1399\u166d\u1940\u19de-\u19ff\u1b61-\u1b6a\u1b74-\u1b7c\u2100-\u2101"
    "\u2103-\u2106\u2108-\u2109\u2114\u2116-\u2117\u211e-\u2123\u2125\u2127\u2129\u212e"
    "\u213a-\u213b\u214a\u214c-\u214d\u214f\u218a-\u218b\u2195-\u2199\u219c-\u219f"
    "\u21a1-\u21a2\u21a4-\u21a5\u21a7-\u21ad\u21af-\u21cd\u21d0-\u21d1\u21d3\u21d5-\u21f3"
    "\u2300-\u2307\u230c-\u231f\u2322-\u2328\u232b-\u237b\u237d-\u239a\u23b4-\u23db"
    "\u23e2-\u2426\u2440-\u244a\u249c-\u24e9\u2500-\u25b6\u25b8-\u25c0\u25c2-\u25f7"
    "\u2600-\u266e\u2670-\u2767\u2794-\u27bf\u2800-\u28ff\u2b00-\u2b2f\u2b45-\u2b46"
    "\u2b4d-\u2b73\u2b76-\u2b95\u2b97-\u2bff\u2ce5-\u2cea\u2e50-\u2e51\u2e80-\u2e99"
    "\u2e9b-\u2ef3\u2f00-\u2fd5\u2ff0-\u2ffb\u3004\u3012-\u3013\u3020\u3036-\u3037"
    "\u303e-\u303f\u3190-\u3191\u3196-\u319f\u31c0-\u31e3\u3200-\u321e\u322a-\u3247\u3250"
    "\u3260-\u327f\u328a-\u32b0\u32c0-\u33ff\u4dc0-\u4dff\ua490-\ua4c6\ua828-\ua82b"
    "\ua836-\ua837\ua839\uaa77-\uaa79\ufd40-\ufd4f\ufdcf\ufdfd-\ufdff\uffe4\uffe8"
    "\uffed-\uffee\ufffc-\ufffd\U00010137-\U0001013f\U00010179-\U00010189"
    "\U0001018c-\U0001018e\U00010190-\U0001019c\U000101a0\U000101d0-\U000101fc"
    "\U00010877-\U00010878\U00010ac8\U0001173f\U00011fd5-\U00011fdc\U00011fe1-\U00011ff1"
    "\U00016b3c-\U00016b3f\U00016b45\U0001bc9c\U0001cf50-\U0001cfc3\U0001d000-\U0001d0f5"
    "\U0001d100-\U0001d126\U0001d129-\U0001d164\U0001d16a-\U0001d16c\U0001d183-\U0001d184"
    "\U0001d18c-\U0001d1a9\U0001d1ae-\U0001d1ea\U0001d200-\U0001d241\U0001d245"
    "\U0001d300-\U0001d356\U0001d800-\U0001d9ff\U0001da37-\U0001da3a\U0001da6d-\U0001da74"
    "\U0001da76-\U0001da83\U0001da85-\U0001da86\U0001e14f\U0001ecac\U0001ed2e"
    "\U0001f000-\U0001f02b\U0001f030-\U0001f093\U0001f0a0-\U0001f0ae\U0001f0b1-\U0001f0bf"
    "\U0001f0c1-\U0001f0cf\U0001f0d1-\U0001f0f5\U0001f10d-\U0001f1ad\U0001f1e6-\U0001f202"
    "\U0001f210-\U0001f23b\U0001f240-\U0001f248\U0001f250-\U0001f251\U0001f260-\U0001f265"
    "\U0001f300-\U0001f3fa\U0001f400-\U0001f6d7\U0001f6dd-\U0001f6ec\U0001f6f0-\U0001f6fc"
    "\U0001f700-\U0001f773\U0001f780-\U0001f7d8\U0001f7e0-\U0001f7eb\U0001f7f0"
    "\U0001f800-\U0001f80b\U0001f810-\U0001f847\U0001f850-\U0001f859\U0001f860-\U0001f887"
    "\U0001f890-\U0001f8ad\U0001f8b0-\U0001f8b1\U0001f900-\U0001fa53\U0001fa60-\U0001fa6d"
    "\U0001fa70-\U0001fa74\U0001fa78-\U0001fa7c\U0001fa80-\U0001fa86\U0001fa90-\U0001faac"
    "\U0001fab0-\U0001faba\U0001fac0-\U0001fac5\U0001fad0-\U0001fad9\U0001fae0-\U0001fae7"
    "\U0001faf0-\U0001faf6\U0001fb00-\U0001fb92\U0001fb94-\U0001fbca"
)
_PREFIX = f"[\u00a7%=\u2014\u2013{_PUNCT}{_QUOTES}{_CURRENCY}]|\\+(?![0-9])|\\.\\.+"
_LOWER = "a-z\u00df-\u00f6\u00f8-\u00ff"
_UPPER = "A-Z\u00c0-\u00d6\u00d8-\u00de"
_ALPHA = "[^\\W\\d_]"
_SUFFIX = (
    f"[\u2014\u2013{_PUNCT}{_QUOTES}]|\\.\\.+|['\u2019][sS]"
    f"|(?<=[0-9{_LOWER}%\u00b2+\\-{_PUNCT}{_QUOTES}])\\.|(?<=[{_UPPER}][{_UPPER}])\\."
    f"|(?<=[0-9])(?:[%+{_CURRENCY}])"
)
_INFIX = (
    r"\.\.+|\u2026"
    r"|(?<=[0-9])[+\-*^](?=[0-9-])"
    f"|(?<=[{_LOWER}])\\.(?=[{_UPPER}])"
    f"|(?<={_ALPHA}),(?={_ALPHA})"
    f"|(?<=[^\\W_])(?:---|--|-|\u2013|\u2014|~)(?={_ALPHA})"
    f"|(?<=[^\\W_])[:<>=/](?={_ALPHA})"
)
# spaCy's English exceptions that end in a period (the period stays on the word).
ABBREVIATIONS = frozenset((
    "Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. Calif. Co. Colo. Conn. Corp. D.C. Dec. Del. Dr. "
    "E.G. E.g. Feb. Fla. Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul. Jun. Kan. "
    "Kans. Ky. La. Ltd. Mar. Mass. Md. Messrs. Mich. Minn. Miss. Mo. Mont. Mr. Mrs. Ms. Mt. N.C. "
    "N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. Ph.D. Prof. Rep. Rev. S.C. "
    "Sen. Sep. Sept. St. Tenn. Va. Wash. Wis. a. a.m. b. c. co. d. e. e.g. f. g. h. i. i.e. j. "
    "k. l. m. n. o. p. p.m. q. r. s. t. u. v. v.s. vs. w. x. y. z. \u00b0C. \u00b0F. \u00b0K. "
    "\u00b0c. \u00b0f. \u00b0k. \u00e4. \u00f6. \u00fc."
).split())
_ABBREV = "|".join(re.escape(a) for a in sorted(ABBREVIATIONS, key=len, reverse=True))
_CLITIC = r"['\u2019](?:[sSdDmM]|re|ve|ll)\b"
_END = f"(?:{_SUFFIX})+$"
_AFTER_PREFIX = f"(?:^|(?<=[{_PUNCT}{_QUOTES}]))"
_CHUNK_RE = re.compile(
    r"(?:https?|ftp)://.*[^.,;:!?)\]'\"\u2019]"  # URLs stay whole
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # e-mail addresses
    f"|{_AFTER_PREFIX}(?:{_ABBREV})(?=(?:{_SUFFIX})*$)"  # "Mr." "e.g."
    # a chunk that looks like a host name (spaCy's url_match): hyphens inside stay
    f"|{_AFTER_PREFIX}(?:[^\\W_][\\w-]*\\.)+[^\\W\\d_]{{2,63}}(?=(?:{_SUFFIX})*$)"
    f"|(?:^|(?<=[\u00a7%=\u2014\u2013{_PUNCT}{_QUOTES}{_CURRENCY}]))(?:{_PREFIX})"  # prefixes
    r"|[^\W_]+?(?=n['\u2019]t\b)|n['\u2019]t\b"  # "do" "n't"
    f"|(?<=[^\\W_]){_CLITIC}"  # 's 're 've 'll 'd 'm
    f"|[{_ICONS}]"  # symbols: prefix, suffix and infix alike
    r"|\):$"  # spaCy keeps the emoticon "):" (as in "f(x):") whole
    f"|(?:(?!{_END}|{_INFIX}|{_CLITIC})[^{_ICONS}])+"  # the core of a chunk
    f"|{_INFIX}|{_SUFFIX}"
)
# spaCy's English exceptions without an apostrophe that it splits ("cannot" -> "can" "not").
SPECIALS: dict[str, tuple[str, ...]] = {
    k: tuple(v.split("|")) for k, v in (item.split("=") for item in (
        "Aint=Ai|nt Arent=Are|nt Cannot=Can|not Cant=Ca|nt Cantve=Ca|nt|ve Couldnt=Could|nt "
        "Couldntve=Could|nt|ve Couldve=Could|ve Darent=Dare|nt Didnt=Did|nt Didntve=Did|nt|ve "
        "Doesnt=Does|nt Doesntve=Does|nt|ve Dont=Do|nt Dontve=Do|nt|ve Gonna=Gon|na Gotta=Got|ta "
        "Hadnt=Had|nt Hadntve=Had|nt|ve Hasnt=Has|nt Havent=Have|nt Hed=He|d Hedve=He|d|ve "
        "Hellve=He|ll|ve Hes=He|s Howd=How|d Howdve=How|d|ve Howll=How|ll Howllve=How|ll|ve "
        "Howre=How|re Hows=How|s Howve=How|ve Id=I|d Idve=I|d|ve Illve=I|ll|ve Im=I|m Ima=I|m|a "
        "Isnt=Is|nt Itd=It|d Itdve=It|d|ve Itll=It|ll Itllve=It|ll|ve Ive=I|ve Maynt=May|nt "
        "Mayntve=May|nt|ve Mightnt=Might|nt Mightntve=Might|nt|ve Mightve=Might|ve Mustnt=Must|nt "
        "Mustntve=Must|nt|ve Mustve=Must|ve Neednt=Need|nt Needntve=Need|nt|ve Notve=Not|ve "
        "Oughtnt=Ought|nt Oughtntve=Ought|nt|ve Shant=Sha|nt Shantve=Sha|nt|ve Shedve=She|d|ve "
        "Shellve=She|ll|ve Shes=She|s Shouldnt=Should|nt Shouldntve=Should|nt|ve Shouldve=Should|ve "
        "Thatd=That|d Thatdve=That|d|ve Thatll=That|ll Thatllve=That|ll|ve Thats=That|s "
        "Thered=There|d Theredve=There|d|ve Therell=There|ll Therellve=There|ll|ve Therere=There|re "
        "Theres=There|s Thereve=There|ve Thesed=These|d Thesedve=These|d|ve Thesell=These|ll "
        "Thesellve=These|ll|ve Thesere=These|re Theseve=These|ve Theyd=They|d Theydve=They|d|ve "
        "Theyll=They|ll Theyllve=They|ll|ve Theyre=They|re Theyve=They|ve Thisd=This|d "
        "Thisdve=This|d|ve Thisll=This|ll Thisllve=This|ll|ve Thiss=This|s Thosed=Those|d "
        "Thosedve=Those|d|ve Thosell=Those|ll Thosellve=Those|ll|ve Thosere=Those|re "
        "Thoseve=Those|ve Wasnt=Was|nt Wed=We|d Wedve=We|d|ve Wellve=We|ll|ve Werent=Were|nt "
        "Weve=We|ve Whatd=What|d Whatdve=What|d|ve Whatll=What|ll Whatllve=What|ll|ve Whatre=What|re "
        "Whats=What|s Whatve=What|ve Whend=When|d Whendve=When|d|ve Whenll=When|ll "
        "Whenllve=When|ll|ve Whenre=When|re Whens=When|s Whenve=When|ve Whered=Where|d "
        "Wheredve=Where|d|ve Wherell=Where|ll Wherellve=Where|ll|ve Wherere=Where|re Wheres=Where|s "
        "Whereve=Where|ve Whod=Who|d Whodve=Who|d|ve Wholl=Who|ll Whollve=Who|ll|ve Whos=Who|s "
        "Whove=Who|ve Whyd=Why|d Whydve=Why|d|ve Whyll=Why|ll Whyllve=Why|ll|ve Whyre=Why|re "
        "Whys=Why|s Whyve=Why|ve Wont=Wo|nt Wontve=Wo|nt|ve Wouldnt=Would|nt Wouldntve=Would|nt|ve "
        "Wouldve=Would|ve Youd=You|d Youdve=You|d|ve Youll=You|ll Youllve=You|ll|ve Youre=You|re "
        "Youve=You|ve aint=ai|nt arent=are|nt cannot=can|not cant=ca|nt cantve=ca|nt|ve "
        "couldnt=could|nt couldntve=could|nt|ve couldve=could|ve darent=dare|nt didnt=did|nt "
        "didntve=did|nt|ve doesnt=does|nt doesntve=does|nt|ve dont=do|nt dontve=do|nt|ve "
        "gonna=gon|na gotta=got|ta hadnt=had|nt hadntve=had|nt|ve hasnt=has|nt havent=have|nt "
        "hed=he|d hedve=he|d|ve hellve=he|ll|ve hes=he|s howd=how|d howdve=how|d|ve howll=how|ll "
        "howllve=how|ll|ve howre=how|re hows=how|s howve=how|ve id=i|d idve=i|d|ve illve=i|ll|ve "
        "im=i|m ima=i|m|a isnt=is|nt itd=it|d itdve=it|d|ve itll=it|ll itllve=it|ll|ve ive=i|ve "
        "maynt=may|nt mayntve=may|nt|ve mightnt=might|nt mightntve=might|nt|ve mightve=might|ve "
        "mustnt=must|nt mustntve=must|nt|ve mustve=must|ve neednt=need|nt needntve=need|nt|ve "
        "notve=not|ve oughtnt=ought|nt oughtntve=ought|nt|ve shant=sha|nt shantve=sha|nt|ve "
        "shedve=she|d|ve shellve=she|ll|ve shes=she|s shouldnt=should|nt shouldntve=should|nt|ve "
        "shouldve=should|ve thatd=that|d thatdve=that|d|ve thatll=that|ll thatllve=that|ll|ve "
        "thats=that|s thered=there|d theredve=there|d|ve therell=there|ll therellve=there|ll|ve "
        "therere=there|re theres=there|s thereve=there|ve thesed=these|d thesedve=these|d|ve "
        "thesell=these|ll thesellve=these|ll|ve thesere=these|re theseve=these|ve theyd=they|d "
        "theydve=they|d|ve theyll=they|ll theyllve=they|ll|ve theyre=they|re theyve=they|ve "
        "thisd=this|d thisdve=this|d|ve thisll=this|ll thisllve=this|ll|ve thiss=this|s "
        "thosed=those|d thosedve=those|d|ve thosell=those|ll thosellve=those|ll|ve thosere=those|re "
        "thoseve=those|ve wasnt=was|nt wed=we|d wedve=we|d|ve wellve=we|ll|ve werent=were|nt "
        "weve=we|ve whatd=what|d whatdve=what|d|ve whatll=what|ll whatllve=what|ll|ve whatre=what|re "
        "whats=what|s whatve=what|ve whend=when|d whendve=when|d|ve whenll=when|ll "
        "whenllve=when|ll|ve whenre=when|re whens=when|s whenve=when|ve whered=where|d "
        "wheredve=where|d|ve wherell=where|ll wherellve=where|ll|ve wherere=where|re wheres=where|s "
        "whereve=where|ve whod=who|d whodve=who|d|ve wholl=who|ll whollve=who|ll|ve whos=who|s "
        "whove=who|ve whyd=why|d whydve=why|d|ve whyll=why|ll whyllve=why|ll|ve whyre=why|re "
        "whys=why|s whyve=why|ve wont=wo|nt wontve=wo|nt|ve wouldnt=would|nt wouldntve=would|nt|ve "
        "wouldve=would|ve yall=y|all youd=you|d youdve=you|d|ve youll=you|ll youllve=you|ll|ve "
        "youre=you|re youve=you|ve "
    ).split())
}
_CACHE: dict[str, list[str]] = {}
_CACHE_MAX = 500_000
_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")


def split_words(text: str) -> list[str]:
    """Word tokens of `text` (punctuation tokens included), in order."""
    out: list[str] = []
    append, extend = out.append, out.extend
    cache, specials = _CACHE, SPECIALS
    for chunk in text.split():
        if chunk.isalnum():
            if chunk in specials:
                extend(specials[chunk])
            else:
                append(chunk)
            continue
        tokens = cache.get(chunk)
        if tokens is None:
            tokens = _split_chunk(chunk)
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[chunk] = tokens
        extend(tokens)
    return out


def _split_chunk(chunk: str) -> list[str]:
    tokens = _CHUNK_RE.findall(chunk)
    if any(t in SPECIALS for t in tokens):
        tokens = [p for t in tokens for p in SPECIALS.get(t, (t,))]
    return tokens


class TextView:
    """Splits of one text, each computed on first use and kept."""

    __slots__ = ("text", "_words", "_splitlines", "_nl_lines")

    def __init__(self, text: str):
        self.text = text
        self._words: list[str] | None = None
        self._splitlines: list[str] | None = None
        self._nl_lines: list[str] | None = None

    @property
    def words(self) -> list[str]:
        """`split_words(text)`."""
        if self._words is None:
            self._words = split_words(self.text)
        return self._words

    @property
    def lines(self) -> list[str]:
        """`text.splitlines()` (any line boundary, empty lines kept)."""
        if self._splitlines is None:
            self._splitlines = self.text.splitlines()
        return self._splitlines

    @property
    def nonempty_lines(self) -> list[str]:
        """Lines split on newlines that are not blank (FineWeb's lines)."""
        if self._nl_lines is None:
            self._nl_lines = [line for line in self.text.split("\n") if line and not line.isspace()]
        return self._nl_lines


_last: TextView | None = None


def view(text: str) -> TextView:
    """The TextView of `text`, reused when the previous call saw the same string object."""
    global _last
    last = _last
    if last is not None and last.text is text:
        return last
    _last = last = TextView(text)
    return last


def paragraphs(text: str) -> list[str]:
    """Paragraphs: the stripped text split on runs of two or more newlines."""
    return _PARAGRAPH_RE.split(text.strip())


def newline_lines(text: str) -> list[str]:
    """Lines: the text split on runs of newlines (Gopher repetition's lines)."""
    return _LINES_RE.split(text)

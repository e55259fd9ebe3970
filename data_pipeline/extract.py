"""`html_extract`: the main text of an HTML page (WARC response records), with resiliparse.

The WARC reader puts a response's decoded HTML in the document's ``html`` field and leaves
``text`` empty; this step parses it, applies resiliparse's main-content heuristics (navigation,
headers, footers, sidebars dropped) keeping paragraph breaks, and writes ``text`` (and ``title``).
Documents without ``html`` (WET records, JSONL dumps) pass through unchanged, so the step can
head any web chain.
"""
from __future__ import annotations

import dataclasses

from data_pipeline.steps import Drop, Step, register, require


@register
@dataclasses.dataclass(frozen=True)
class HtmlExtract(Step):
    """html -> text. Drops "html_extract:empty" when no text is left (or fewer than `min_chars`)."""

    name = "html_extract"
    main_content: bool = True  # resiliparse's boilerplate removal; False: all visible text
    list_bullets: bool = True
    alt_texts: bool = False
    links: bool = False
    min_chars: int = 1
    keep_html: bool = False  # keep the `html` field on the document (large)

    def check(self) -> None:
        require(self.min_chars >= 0, f"min_chars must be >= 0, got {self.min_chars}")

    def apply(self, doc: dict) -> dict | Drop:
        html = doc.get("html")
        if not isinstance(html, str):
            return doc
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        tree = HTMLTree.parse(html)
        text = extract_plain_text(tree, preserve_formatting=True, main_content=self.main_content,
                                  list_bullets=self.list_bullets, alt_texts=self.alt_texts, links=self.links)
        out = dict(doc)
        if not self.keep_html:
            del out["html"]
        title = tree.title
        if title:
            out["title"] = title.strip()
        out["text"] = text.strip()
        if len(out["text"]) < max(self.min_chars, 1):
            return self.drop("empty")
        return out

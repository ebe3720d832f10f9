"""Remove documents containing words from a bad-words list (C4's approach, Raffel et al. 2020).

C4 removed every page containing any word of the LDNOOBW English list. We ship a short list of our
own (llmctl/resources/badwords_en.txt) and accept any list file, one word or phrase per line.
Matching is on whole words, case-insensitive: single words by set lookup on the document's word
tokens, phrases by one regular expression, so the cost does not grow with the list's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .base import Doc, Filter, FilterParams
from .url import read_list_file


@dataclass
class BadWordsParams(FilterParams):
    """``path``: a list file; None uses the shipped English list."""

    path: str | None = None


def default_list_text() -> str:
    return resources.files("llmctl.resources").joinpath("badwords_en.txt").read_text(encoding="utf-8")


class BadWordsFilter(Filter):
    family = "badwords"
    Params = BadWordsParams

    def __init__(self, params: BadWordsParams):
        super().__init__(params)
        self._words: frozenset[str] = frozenset()
        self._phrases: re.Pattern[str] | None = None
        self._loaded = False

    def check(self) -> None:
        if self.params.path:
            entries = read_list_file(Path(self.params.path), "bad-words list")
        else:
            entries = [s.strip() for s in default_list_text().splitlines() if s.strip() and not s.startswith("#")]
        entries = [e.lower() for e in entries]
        self._words = frozenset(e for e in entries if re.fullmatch(r"\w+", e))
        phrases = sorted((e for e in entries if e not in self._words), key=len, reverse=True)
        if phrases:
            alt = "|".join(r"\s+".join(map(re.escape, ph.split())) for ph in phrases)
            self._phrases = re.compile(rf"(?<!\w)(?:{alt})(?!\w)")
        self._loaded = True

    def apply(self, doc: Doc) -> str | None:
        if not self._loaded:
            self.check()
        if self._words:
            if not self._words.isdisjoint(map(str.lower, doc.words)):
                return "bad_word"
        if self._phrases is not None and self._phrases.search(doc.text.lower()):
            return "bad_word"
        return None

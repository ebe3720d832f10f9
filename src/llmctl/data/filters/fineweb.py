"""FineWeb's own quality rules (Penedo et al. 2024; datatrove ``FineWebQualityFilter`` defaults).

Remove a document when too few lines end in sentence punctuation, when most lines are short, when
many characters sit in duplicated lines, or when it has many newlines per word (lists, menus).
Thresholds as docs/REFERENCE.md; blank lines are ignored for the line rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Doc, Filter, FilterParams, sentence_terminals
from .gopher import _duplicates


@dataclass
class FineWebParams(FilterParams):
    """FineWeb thresholds (datatrove defaults, as used to build FineWeb)."""

    min_line_punct_ratio: float | None = 0.12
    #: do not apply the punctuation rule to documents with no punctuated line at all
    line_punct_exclude_zero: bool = False
    max_short_line_ratio: float | None = 0.67
    short_line_length: int = 30
    max_dup_line_char_ratio: float | None = 0.01
    max_newline_word_ratio: float | None = 0.3


class FineWebFilter(Filter):
    family = "fineweb"
    Params = FineWebParams

    def __init__(self, params: FineWebParams):
        super().__init__(params)
        self._stops = sentence_terminals()

    def apply(self, doc: Doc) -> str | None:
        p = self.params
        text = doc.text
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return "empty"
        n = len(lines)
        if p.min_line_punct_ratio is not None:
            stops = self._stops
            ratio = sum(1 for ln in lines if ln[-1] in stops) / n
            if ratio < p.min_line_punct_ratio and not (ratio == 0 and p.line_punct_exclude_zero):
                return "line_punct_ratio"
        if p.max_short_line_ratio is not None:
            short = p.short_line_length
            if sum(1 for ln in lines if len(ln) <= short) / n > p.max_short_line_ratio:
                return "short_line_ratio"
        if p.max_dup_line_char_ratio is not None:
            chars = len(text) - text.count("\n")
            if chars and _duplicates(lines)[1] / chars > p.max_dup_line_char_ratio:
                return "dup_line_char_ratio"
        if p.max_newline_word_ratio is not None:
            words = doc.words
            if not words or text.count("\n") / len(words) > p.max_newline_word_ratio:
                return "newline_word_ratio"
        return None

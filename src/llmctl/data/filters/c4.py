"""C4's line cleaning and document rules (Raffel et al. 2020, §2.2; TFDS ``c4_utils.clean_page``).

Line by line, in C4's order: drop a line with a word over ``max_word_length`` characters, strip
citation marks, (optionally) drop a line without terminal punctuation, drop a line with fewer than
``min_words_per_line`` words, drop the document at "lorem ipsum", drop a "javascript" line, drop
the document at "{", drop a cookie/terms/privacy boilerplate line; then drop the document if the
kept lines hold fewer than ``min_sentences`` sentences. The document's text becomes the kept lines.
The document-level checks look at the lines that survive the line rules before them, as C4 does.

C4 required terminal punctuation on every line; FineWeb switched that off, and so does our default
(``require_terminal_punct = false``); see docs/REFERENCE.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .base import Doc, Filter, FilterParams, count_sentences

#: boilerplate phrases of C4's policy rule (TFDS c4_utils)
POLICY_PHRASES = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
#: line endings C4 accepts as terminal punctuation (TFDS c4_utils); "..." does not count
END_MARKS = (".", "?", "!", '"')
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)


@dataclass
class C4Params(FilterParams):
    """C4 rules; defaults from C4 (TFDS) with FineWeb's choice of no terminal-punctuation rule."""

    max_word_length: int | None = 1000
    remove_citations: bool = True
    require_terminal_punct: bool = False
    min_words_per_line: int | None = 3
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    policy_phrases: list[str] = field(default_factory=lambda: list(POLICY_PHRASES))
    min_sentences: int | None = 5


class C4Filter(Filter):
    family = "c4"
    Params = C4Params

    def __init__(self, params: C4Params):
        super().__init__(params)
        phrases = [p.lower() for p in params.policy_phrases]
        self._policy = re.compile("|".join(map(re.escape, phrases))) if phrases else None

    def apply(self, doc: Doc) -> str | None:
        p = self.params
        c = self.counters
        kept: list[str] = []
        sentences = 0
        count = p.min_sentences is not None
        for raw in doc.lines:
            line = raw.strip()
            words = line.split()
            if p.max_word_length is not None and len(line) > p.max_word_length and any(
                len(w) > p.max_word_length for w in words
            ):
                c["lines_long_word"] += 1
                continue
            if p.remove_citations and "[" in line:
                line = _CITATION.sub("", line)
            if p.require_terminal_punct and (not line.endswith(END_MARKS) or line.endswith("...")):
                c["lines_no_terminal_punct"] += 1
                continue
            if p.min_words_per_line is not None and len(words) < p.min_words_per_line:
                c["lines_few_words"] += 1
                continue
            low = line.lower()
            if p.filter_lorem_ipsum and "lorem ipsum" in low:
                return "lorem_ipsum"
            if p.filter_javascript and "javascript" in low:
                c["lines_javascript"] += 1
                continue
            if p.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if p.filter_policy and self._policy is not None and self._policy.search(low):
                c["lines_policy"] += 1
                continue
            if count:
                sentences += count_sentences(line)
            kept.append(line)
        if count and sentences < p.min_sentences:
            return "few_sentences"
        c["lines_kept"] += len(kept)
        doc.text = "\n".join(kept).strip()
        return None

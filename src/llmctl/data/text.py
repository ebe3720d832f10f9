"""Text normalisation for comparing documents, as FineWeb does before hashing.

Two texts that differ only in case, punctuation, accents, digits or spacing normalise to the same
string: lowercase, diacritics stripped (NFKD, combining marks dropped), punctuation and symbols
replaced by spaces, every run of digits replaced by ``0``, whitespace collapsed to one space.
Dedup hashes the result (exact duplicates), shingles it into word n-grams (MinHash) and compares
lines with it (boilerplate); other stages may reuse it for any "same text?" question.

Plain ASCII text, the common case, takes a fast path through one ``str.translate`` table.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable

_DIGIT_RUN = re.compile(r"0+")

# ASCII: punctuation and symbols → space, digits → "0" (runs collapse afterwards), control
# characters → space (as the Unicode path does, so ASCII and non-ASCII text normalise alike).
_ASCII_TABLE = {ord(c): " " for c in string.punctuation}
_ASCII_TABLE.update({ord(c): "0" for c in string.digits})
_ASCII_TABLE.update({cp: " " for cp in [*range(32), 127]})
# the same, keeping newlines: for normalising a whole document line by line in one pass
_ASCII_LINES = {**_ASCII_TABLE, ord("\n"): "\n"}


class _UnicodeTable(dict):
    """A ``str.translate`` table computed lazily per code point from its Unicode category."""

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat == "Mn":  # combining mark left by NFKD: the diacritic itself
            v: str | None = ""
        elif cat[0] in "PS":  # punctuation, symbols
            v = " "
        elif cat == "Nd":
            v = "0"
        elif cat[0] in "ZC":  # separators, control characters (tabs, newlines, …)
            v = " "
        else:
            v = ch
        self[cp] = v
        return v


_UNICODE_TABLE = _UnicodeTable(_ASCII_TABLE)
_UNICODE_LINES = _UnicodeTable(_ASCII_LINES)


def normalize(text: str) -> str:
    """Lowercase, strip diacritics, punctuation/symbols → space, digit runs → "0", one space."""
    if text.isascii():
        s = text.lower().translate(_ASCII_TABLE)
    else:
        s = unicodedata.normalize("NFKD", text).lower().translate(_UNICODE_TABLE)
    if "0" in s:
        s = _DIGIT_RUN.sub("0", s)
    return " ".join(s.split())


def normalize_lines(text: str) -> list[str]:
    """``[normalize(line) for line in text.split("\\n")]``, computed for the whole text at once.

    Case folding, accents, punctuation and digits are done by one ``translate`` over the document
    (newlines kept), then each line's whitespace is collapsed: the per-line function-call overhead
    of ``normalize`` goes away, which matters on pages of hundreds of short lines.
    """
    if text.isascii():
        s = text.lower().translate(_ASCII_LINES)
    else:
        s = unicodedata.normalize("NFKD", text).lower().translate(_UNICODE_LINES)
    if "0" in s:
        s = _DIGIT_RUN.sub("0", s)
    return [" ".join(line.split()) for line in s.split("\n")]


def words(text: str) -> list[str]:
    """The words of the normalised text."""
    return normalize(text).split()


def normalized_lines(text: str) -> list[str]:
    """Each line of ``text`` normalised (empty strings for lines that hold nothing comparable)."""
    return [normalize(line) for line in text.split("\n")]


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is one shingle of all its words (none if empty)."""
    if not tokens:
        return []
    if len(tokens) < n:
        return [tuple(tokens)]
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word n-gram shingles of the normalised text (words joined by one space)."""
    return {" ".join(g) for g in ngrams(words(text), n)}


def jaccard(a: Iterable, b: Iterable) -> float:
    """Jaccard similarity |A ∩ B| / |A ∪ B| of two sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)

"""Gopher's quality and repetition rules (Rae et al. 2021, "Scaling Language Models", Table A1).

Defaults are the ones datatrove ships and FineWeb used (see docs/REFERENCE.md, "Heuristic
filters"). Every rule is a parameter; setting it to None switches the rule off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .base import Doc, Filter, FilterParams, is_symbol

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass
class GopherQualityParams(FilterParams):
    """Gopher quality thresholds (Rae et al. 2021, Table A1; datatrove defaults)."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3.0
    max_avg_word_length: float | None = 10.0
    #: ("#" + "..." + "…") per word, as REFERENCE.md states it; see ``symbols_combined``
    max_symbol_word_ratio: float | None = 0.1
    #: True: one ratio over "#", "..." and "…" together (REFERENCE.md); False: "#" and ellipses
    #: each on their own against the threshold (datatrove's code)
    symbols_combined: bool = True
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))
    bullets: list[str] = field(default_factory=lambda: ["•", "-"])


class GopherQualityFilter(Filter):
    """Remove a document unless all of Gopher's quality rules hold.

    Words are the tokens of base.words_of (spaCy's English rules); "words" for the count and the mean length leave
    out symbol-only tokens, the ratios divide by all tokens (as datatrove does). The stop-word rule
    counts distinct stop words present (lower case, as datatrove).
    """

    family = "gopher_quality"
    Params = GopherQualityParams

    def __init__(self, params: GopherQualityParams):
        super().__init__(params)
        self._stop = frozenset(params.stop_words)
        self._bullets = tuple(params.bullets)

    def apply(self, doc: Doc) -> str | None:
        p = self.params
        text = doc.text
        words = doc.words
        n_words = len(words)
        lengths = [len(w) for w in words if w.isalnum() or not is_symbol(w)]
        n_real = len(lengths)
        if p.min_doc_words is not None and n_real < p.min_doc_words:
            return "short_doc"
        if p.max_doc_words is not None and n_real > p.max_doc_words:
            return "long_doc"
        if n_real == 0:
            return "short_doc"
        mean_len = sum(lengths) / n_real
        if p.min_avg_word_length is not None and mean_len < p.min_avg_word_length:
            return "short_words"
        if p.max_avg_word_length is not None and mean_len > p.max_avg_word_length:
            return "long_words"
        if p.max_symbol_word_ratio is not None:
            hashes = text.count("#")
            ellipses = text.count("...") + text.count("…")
            if p.symbols_combined:
                if (hashes + ellipses) / n_words > p.max_symbol_word_ratio:
                    return "symbols"
            elif hashes / n_words > p.max_symbol_word_ratio or ellipses / n_words > p.max_symbol_word_ratio:
                return "symbols"
        lines = doc.lines
        if lines and p.max_bullet_lines_ratio is not None:
            bullets = sum(1 for s in lines if s.lstrip().startswith(self._bullets))
            if bullets / len(lines) > p.max_bullet_lines_ratio:
                return "bullet_lines"
        if lines and p.max_ellipsis_lines_ratio is not None:
            ell = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
            if ell / len(lines) > p.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
        if p.min_alpha_words_ratio is not None:
            alpha = sum(1 for w in words if w.isalpha() or _ALPHA.search(w) is not None)
            if alpha / n_words < p.min_alpha_words_ratio:
                return "non_alpha_words"
        if p.min_stop_words is not None and len(self._stop.intersection(words)) < p.min_stop_words:
            return "few_stop_words"
        return None


_ALPHA = re.compile(r"[^\W\d_]")


@dataclass
class GopherRepetitionParams(FilterParams):
    """Gopher repetition thresholds (Rae et al. 2021, Table A1; datatrove defaults)."""

    dup_line_frac: float | None = 0.30
    dup_para_frac: float | None = 0.30
    dup_line_char_frac: float | None = 0.20
    dup_para_char_frac: float | None = 0.20
    #: most frequent n-gram: characters covered / characters, for n = 2, 3, 4
    top_2_gram: float | None = 0.20
    top_3_gram: float | None = 0.18
    top_4_gram: float | None = 0.16
    #: duplicated n-grams: characters covered / characters, for n = 5 … 10
    dup_5_gram: float | None = 0.15
    dup_6_gram: float | None = 0.14
    dup_7_gram: float | None = 0.13
    dup_8_gram: float | None = 0.12
    dup_9_gram: float | None = 0.11
    dup_10_gram: float | None = 0.10


_PARA_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, characters in them), first occurrences not counted."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit key per n-gram of word ids (polynomial rolling combination; collisions ≈ 2^-64)."""
    m = len(ids) - n + 1
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            key = key * _MIX + ids[j : j + m]
    return key


class GopherRepetitionFilter(Filter):
    """Remove documents dominated by repeated lines, paragraphs or n-grams.

    Paragraphs split on blank lines, lines on newlines; n-grams are over word tokens. "Top n-gram"
    is the characters of the most frequent n-gram times its count (n = 2…4); "duplicated n-grams"
    sums the characters of n-grams seen before, skipping past each repeat (n = 5…10). The n-gram
    statistics run on integer word ids with numpy; the skip-ahead count falls back to a loop only
    for documents that have a repeated 5-gram at all (a repeated 6…10-gram implies one).
    """

    family = "gopher_repetition"
    Params = GopherRepetitionParams

    def apply(self, doc: Doc) -> str | None:
        p = self.params
        text = doc.text
        if not text:
            return "empty"
        n_chars = len(text)
        paragraphs = _PARA_SPLIT.split(text.strip())
        dup, chars = _duplicates(paragraphs)
        if p.dup_para_frac is not None and dup / len(paragraphs) > p.dup_para_frac:
            return "dup_para_frac"
        if p.dup_para_char_frac is not None and chars / n_chars > p.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        dup, chars = _duplicates(lines)
        if p.dup_line_frac is not None and dup / len(lines) > p.dup_line_frac:
            return "dup_line_frac"
        if p.dup_line_char_frac is not None and chars / n_chars > p.dup_line_char_frac:
            return "dup_line_char_frac"

        words = doc.words
        if len(words) < 2:
            return None
        vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
        # no early exit when no word repeats: the top-n-gram rules still apply (a short text's one
        # 2-gram can cover > 20% of it), only the duplicate-n-gram rules are moot then
        ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
        lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        csum = np.concatenate(([0], np.cumsum(lens)))

        for n in (2, 3, 4):
            thr = getattr(p, f"top_{n}_gram")
            if thr is None or len(words) < n:
                continue
            keys = _ngram_keys(ids, n)
            _, first, counts = np.unique(keys, return_index=True, return_counts=True)
            top = counts.max()
            # ties: the n-gram that appeared first (what Counter.most_common picks)
            pos = int(first[counts == top].min())
            covered = (int(csum[pos + n] - csum[pos]) + n - 1) * int(top)
            if covered / n_chars > thr:
                return f"top_{n}_gram"

        for n in range(5, 11):
            thr = getattr(p, f"dup_{n}_gram")
            if thr is None or len(words) < n:
                continue
            keys = _ngram_keys(ids, n)
            _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            repeated = np.flatnonzero(counts[inverse] > 1)
            if len(repeated) == 0:
                break  # no repeated n-gram, hence none for larger n either
            chars = (csum[n:] - csum[:-n])[repeated]
            covered = _skip_duplicate_chars(keys[repeated].tolist(), repeated.tolist(), chars.tolist(), n)
            if covered / n_chars > thr:
                return f"dup_{n}_gram"
        return None


def _skip_duplicate_chars(keys: list[int], positions: list[int], chars: list[int], n: int) -> int:
    """Characters of n-grams already seen, jumping n words past each repeat (Gopher's count).

    Only n-grams that occur more than once can ever be "seen before", so the walk visits just
    those positions (in order); an n-gram inside a jump is neither counted nor remembered.
    """
    seen: set[int] = set()
    total, resume = 0, 0
    for k, pos, c in zip(keys, positions, chars, strict=True):
        if pos < resume:
            continue
        if k in seen:
            total += c
            resume = pos + n
        else:
            seen.add(k)
    return total


__all__ = [
    "GopherQualityFilter",
    "GopherQualityParams",
    "GopherRepetitionFilter",
    "GopherRepetitionParams",
    "STOP_WORDS",
]

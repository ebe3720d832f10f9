"""What every filter shares: the document view, the word tokeniser and the Filter interface.

A filter sees one :class:`Doc` at a time and answers with ``None`` (keep) or a short reason string
(remove). A filter may rewrite ``doc.text`` (C4 line cleaning, PII redaction) or set metadata
columns (``quality_score``, ``domain``); later filters in the chain then see the new text.

Word tokenisation is one compiled regular expression, not a linguistic tokeniser: that is where
most of the speed over datatrove (which runs spaCy on every document) comes from. The regex is
written to split roughly as spaCy's English tokeniser does where the heuristics are sensitive to it:
punctuation marks are tokens of their own (so they count in the "words" denominators of the Gopher
and FineWeb ratios), contractions split as "do" + "n't", "it" + "'s", acronyms such as "U.S." and
numbers such as "3.5" or "1,000" stay whole, a letter with its period ("A.", as in a list of
choices) is one token, URLs stay whole.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar

from ...errors import UsageError

_TOKEN_RE = re.compile(
    r"""
      https?://[^\s<>"']+ | www\.[^\s<>"']+          # URLs stay one token
    | (?:[^\W\d_]\.)+(?!\w)                           # initials and acronyms: A., U.S., e.g.
    | \d+(?:[.,:]\d+)+                                # 3.5, 1,000, 10:30
    | _                                               # underscores alone, one per token
    | \w+(?:(?:['’]|\.(?=[^\W_A-Z])|[()\[\]{}*+^~|@#$%&\\])\w+)*   # words; marks glued inside a word
                                                      # stay (d.name, f(x)), as spaCy only splits
                                                      # prefixes, suffixes and a few infixes
    | \.{2,} | -{2,}                                  # "..." and "--" are one token each
    | [^\w\s]                                         # any other mark is a token of its own
    """,
    re.VERBOSE,
)
_findall = _TOKEN_RE.findall
#: heads after which spaCy's English exceptions split "'d", "'ll", "'re", "'ve", "'m"
_CLITIC_HEADS = frozenset(
    "i you he she it we they that there who what where when how why this here let y'all".split()
)
_CLITICS = ("d", "ll", "re", "ve", "m")


def _split_clitics(tokens: list[str]) -> list[str]:
    """spaCy-style contractions: "don't" → "do" "n't" and "it's" → "it" "'s" always; "'d",
    "'ll", "'re", "'ve", "'m" only after pronouns ("we'll", but "banish'd" stays whole)."""
    out: list[str] = []
    for t in tokens:
        if "'" in t or "’" in t:
            low = t.lower()
            cut = max(t.rfind("'"), t.rfind("’"))
            tail = low[cut + 1 :]
            if len(t) > 3 and tail == "t" and low[cut - 1] == "n" and cut >= 2:
                out += [t[: cut - 1], t[cut - 1 :]]
                continue
            if cut > 0 and (tail == "s" or (tail in _CLITICS and low[:cut] in _CLITIC_HEADS)):
                out += [t[:cut], t[cut:]]
                continue
        out.append(t)
    return out


def words_of(text: str) -> list[str]:
    """Split text into word and punctuation tokens (see the module docstring)."""
    toks = _findall(text)
    if "'" in text or "’" in text:
        toks = _split_clitics(toks)
    return toks


_HAS_ALNUM = re.compile(r"[^\W_]")


def is_symbol(token: str) -> bool:
    """True for a token with no letter or digit in it (punctuation, symbols)."""
    return not token.isalnum() and _HAS_ALNUM.search(token) is None


@lru_cache(maxsize=1)
def sentence_terminals() -> frozenset[str]:
    """Unicode Sentence_Terminal characters, shipped in llmctl/resources/sentence_terminal.txt."""
    text = resources.files("llmctl.resources").joinpath("sentence_terminal.txt").read_text(encoding="utf-8")
    return frozenset(line for line in text.split("\n") if line and not line.startswith("#"))


@lru_cache(maxsize=1)
def _sentence_end_re() -> re.Pattern[str]:
    """A single sentence-terminal mark that stands as its own token and has a word after it."""
    marks = "".join(re.escape(c) for c in sorted(sentence_terminals()))
    return re.compile(rf"(?<!\.)(?!\.\.)[{marks}]+(?!\w)(?=[^\w]*\w)")


def count_sentences(line: str) -> int:
    """Sentences in one line, counted as spaCy's rule-based sentencizer splits them.

    A new sentence starts at the first word after sentence-terminal marks (".", "!", "?" and
    their Unicode relatives) that stand as tokens: "3.5" and "..." end nothing, "?!" ends one
    sentence.
    """
    if not line.strip():
        return 0
    return 1 + len(_sentence_end_re().findall(line))


class Doc:
    """One document on its way through the chain, with cached views of its current text."""

    __slots__ = ("id", "url", "_text", "meta", "_words", "_lines")

    def __init__(self, id: str, url: str | None, text: str, meta: dict[str, Any] | None = None):
        self.id = id
        self.url = url or ""
        self._text = text or ""
        self.meta: dict[str, Any] = meta if meta is not None else {}
        self._words: list[str] | None = None
        self._lines: list[str] | None = None

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = value
            self._words = None
            self._lines = None

    @property
    def words(self) -> list[str]:
        """Word and punctuation tokens of the current text (computed once per text)."""
        if self._words is None:
            self._words = words_of(self._text)
        return self._words

    @property
    def lines(self) -> list[str]:
        """``text.splitlines()`` of the current text (computed once per text)."""
        if self._lines is None:
            self._lines = self._text.splitlines()
        return self._lines


@dataclass
class FilterParams:
    """Base for a filter's parameters: every field is settable from TOML or ``--set``.

    A threshold set to ``None`` (``off`` on the command line, ``disable = [...]`` in TOML) switches
    that rule off.
    """

    def update(self, family: str, values: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        for key, value in values.items():
            k = key.replace("-", "_")
            if k == "disable":
                for rule in value if isinstance(value, list) else [value]:
                    r = str(rule).replace("-", "_")
                    if r not in known:
                        raise UsageError(f"filter {family}: disable: unknown rule '{rule}'; known: {', '.join(known)}")
                    setattr(self, r, None)
                continue
            if k not in known:
                raise UsageError(f"filter {family}: unknown parameter '{key}'; known: {', '.join(known)}")
            setattr(self, k, _coerce(family, k, value, getattr(self, k), known[k].type))


def _coerce(family: str, key: str, value: Any, current: Any, annotation: Any) -> Any:
    """Turn a TOML or command-line value into the parameter's type (``off`` → None)."""
    if isinstance(value, str) and value.strip().lower() in ("off", "none", "null", "disable"):
        return None
    ann = str(annotation)
    try:
        if isinstance(value, str):
            if "list" in ann or "tuple" in ann:
                return [v.strip() for v in value.split(",") if v.strip()]
            if "bool" in ann:
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on"):
                    raise ValueError(value)
                return low in ("true", "1", "yes", "on")
            if "int" in ann and "float" not in ann:
                return int(value)
            if "float" in ann:
                return float(value)
            return value
        if "bool" in ann and not isinstance(value, bool):
            raise ValueError(value)
        if "float" in ann and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    except ValueError:
        raise UsageError(f"filter {family}: {key} = {value!r}: not a valid {ann}; fix the value") from None


class Filter:
    """A step of the chain. Subclasses set ``family`` and ``Params`` and implement :meth:`apply`.

    ``counters`` collects the filter's own statistics beyond removals (lines dropped, redactions
    per kind, …); they are summed across shards and workers into the manifest.
    """

    family: ClassVar[str] = "filter"
    Params: ClassVar[type[FilterParams]] = FilterParams
    #: columns this filter needs in the input docs
    needs_columns: ClassVar[tuple[str, ...]] = ()
    #: columns this filter adds to the output docs (name → Arrow type name)
    adds_columns: ClassVar[dict[str, str]] = {}

    def __init__(self, params: FilterParams):
        self.params = params
        self.counters: Counter = Counter()

    def check(self) -> None:
        """Validate files and settings before any work starts (raise UsageError)."""

    def apply(self, doc: Doc) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def apply_batch(self, docs: list[Doc]) -> list[str | None]:
        """Decide a whole batch; filters that vectorise (the classifiers) override this."""
        return [self.apply(d) for d in docs]

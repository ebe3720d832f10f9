"""What every filter shares: the document view, the word tokeniser and the Filter interface.

A filter sees one :class:`Doc` at a time and answers with ``None`` (keep) or a short reason string
(remove). A filter may rewrite ``doc.text`` (C4 line cleaning, PII redaction) or set metadata
columns (``quality_score``, ``domain``); later filters in the chain then see the new text.

Word tokenisation follows the *rules* of spaCy's English tokeniser (which datatrove runs on every
document) without spaCy: text is split on whitespace; a chunk that is all letters/digits is a word
(the fast path, most chunks); any other chunk loses prefixes (opening brackets and quotes, most
punctuation, currency signs, "...") and suffixes (closing marks, "'s", a period after a lower-case
letter, digit or two capitals, units after a number) one at a time, then splits at infixes
(hyphens and "/" ":" "<" ">" "=" only between letters, "," between letters, "." between a
lower-case and an upper-case letter, arithmetic signs between digits, ellipses). Marks glued inside
a chunk otherwise stay: "e^-2", "woman,--", "tonk-", "f(x", "2a00::200e" are one token each, as
in spaCy. A small table of English exceptions (abbreviations such as "Mr." and "e.g.", "cannot" →
"can" "not", "gonna" → "gon" "na", "'em", emoticons) and the contraction split ("do" "n't", "we"
"'ll") complete it. These tokens feed the "words" counts and ratios of the Gopher and FineWeb rules.
"""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar

from ...errors import UsageError

# -- the tokeniser's character classes and rules (see the module docstring) -----------------------
_LOWER = "a-zß-öø-ÿα-ωа-яё"
_UPPER = "A-ZÀ-ÖØ-ÞΑ-ΩА-ЯЁ"
_QUOTES = re.escape("'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧")
_PUNCT = re.escape("…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪")
_CURRENCY = re.escape("$£€¥฿₽﷼") + "\u20a0-\u20bf"
#: symbols that stand alone (most of Unicode's "Symbol, other" blocks: arrows, boxes, dingbats, emoji)
_ICONS = ("\u00a6\u00a9\u00ae\u00b0\u2100-\u214f\u2190-\u21ff\u2300-\u23ff\u2440-\u24ff\u2500-\u27bf"
          "\u2800-\u28ff\u2b00-\u2bff\U0001f000-\U0001faff")
_UNITS = ("km|km²|km³|m|m²|m³|dm|cm|cm²|mm|mm²|µm|nm|ha|yd|in|ft|kg|g|mg|µg|t|lb|oz|m/s|km/h|kmh|mph|"
          "hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%")
_PREFIX = re.compile(rf"[§%=—–{_PUNCT}{_QUOTES}{_CURRENCY}{_ICONS}]|\+(?![0-9])|\.\.+|US\$|[CA]\$").match
_SUFFIX = re.compile(
    rf"(?:[{_PUNCT}{_QUOTES}{_ICONS}—–]|\.\.+|['’][sS]|(?<=[0-9])\+|(?<=°[FfCcKk])\.|(?<=[0-9])(?:US\$|[CA]\$"
    rf"|[{_CURRENCY}])|(?<=[0-9])(?:{_UNITS}|[ap]m)|(?<=[0-9{_LOWER}%²\-+{_PUNCT}{_QUOTES}])\.|(?<=[{_UPPER}][{_UPPER}])\.)$"
).search
_INFIX = re.compile(
    rf"\.\.+|…|[{_ICONS}]|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[{_LOWER}{_QUOTES}])\.(?=[{_UPPER}{_QUOTES}])"
    r"|(?<=[^\W\d_]),(?=[^\W\d_])|(?<=[^\W_])(?:---|--|——|[-–—~])(?=[^\W\d_])|(?<=[^\W_])[:<>=/](?=[^\W\d_])"
).finditer
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"']+$", re.IGNORECASE).match


def _exceptions() -> dict[str, list[str]]:
    """English exceptions: chunks kept whole or split in a fixed way before any affix rule."""
    keep = (
        # titles, companies, months, U.S. states, Latin abbreviations: the period stays on the word
        "Mr. Mrs. Ms. Messrs. Dr. Prof. St. Jr. Mt. Gen. Gov. Sen. Rep. Rev. Adm. Inc. Ltd. Co. Corp. "
        "Bros. vs. v. e.g. i.e. a.m. p.m. Ph.D. Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. "
        "Dec. Ala. Ariz. Ark. Calif. Colo. Conn. Del. Fla. Ga. Ill. Ind. Kan. Ky. La. Md. Mass. Mich. "
        "Minn. Miss. Mo. Neb. Nev. Okla. Ore. Pa. Tenn. Va. Wash. Wis. "
        # elided words and emoticons that are one token
        "'em 'Em 'cos 'Cos 'cause 'Cause 'bout 'nuff ma'am o'clock y'know "
        "'' :) :( :-) :-( ;) ;-) :D :-D :P :-P :p :/ :'( =) =( (: ): :] <3 </3 ^_^ o.O :1"
    ).split()
    out = {w: [w] for w in keep}
    out.update({f"{c}.": [f"{c}."] for c in "abcdefghijklmnopqrstuvwxyz"})  # list items: "a."
    for word, parts in (("cannot", ("can", "not")), ("gonna", ("gon", "na")), ("gotta", ("got", "ta")),
                        ("y'all", ("y'", "all"))):
        out[word] = list(parts)
        out[word.capitalize()] = [parts[0].capitalize(), *parts[1:]]
    return out


_SPECIAL = _exceptions()
#: an exception that the affix rules may have cut into pieces ("(x):" holds the emoticon "):")
_HAS_SPECIAL = re.compile("|".join(re.escape(w) for w in sorted(_SPECIAL, key=len, reverse=True)
                                   if not w.isalnum())).search
# fast paths of words_of: a word with one mark before or after it that the rules always cut off
_CUT_AFTER = frozenset(",;:!?)]}\"”’'»…")
_CUT_BEFORE = frozenset("\"“‘'([{«")
_PERIOD_AFTER = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_CAPS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _merge_specials(toks: list[str]) -> list[str]:
    """Rejoin neighbours that spell an exception ("(x):" → "(" "x" "):"), longest first."""
    out: list[str] = []
    i, n = 0, len(toks)
    while i < n:
        for j in range(min(n, i + 4), i + 1, -1):
            joined = "".join(toks[i:j])
            if joined in _SPECIAL:
                out += _SPECIAL[joined]
                i = j
                break
        else:
            out.append(toks[i])
            i += 1
    return out


def _split_chunk(chunk: str, out: list[str]) -> None:
    """Tokens of one whitespace-free chunk: exceptions, then prefixes/suffixes, then infixes;
    exceptions made of several pieces (emoticons, "Mr.") are joined again at the end."""
    toks: list[str] = []
    _split_affixes(chunk, toks)
    if len(toks) > 1 and _HAS_SPECIAL(chunk):
        toks = _merge_specials(toks)
    out += toks


def _split_affixes(s: str, out: list[str]) -> None:
    sp = _SPECIAL
    suffixes: list[str] = []
    while s and s not in sp:
        m = _PREFIX(s)
        pre = m.end() if m else 0
        rest = s[pre:]
        m = _SUFFIX(rest) if rest else None
        suf = len(rest) - m.start() if m else 0
        if pre and s[pre:] in sp:
            out.append(s[:pre])
            s = s[pre:]
            break
        if suf and s[:-suf] in sp:
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if not pre and not suf:
            break
        if pre:
            out.append(s[:pre])
        if suf:
            suffixes.append(s[len(s) - suf :])
        s = s[pre : len(s) - suf]
    if s:
        if s in sp:
            out += sp[s]
        elif _URL(s):
            out.append(s)
        else:
            start = 0
            for m in _INFIX(s):
                a, b = m.span()
                if a == 0:
                    continue
                if a > start:
                    _add_word(s[start:a], out)
                out.append(s[a:b])
                start = b
            _add_word(s[start:] if start else s, out)
    if suffixes:
        out += reversed(suffixes)


#: heads after which spaCy's English exceptions split "'d", "'ll", "'re", "'ve", "'m"
_CLITIC_HEADS = frozenset(
    "i you he she it we they that there who what where when how why this here let y'all".split()
)
_CLITICS = ("d", "ll", "re", "ve", "m")
#: modal verbs that also lose "'ve" ("could've" → "could" "'ve")
_VE_HEADS = frozenset("could should would might must".split())


def _add_word(t: str, out: list[str]) -> None:
    """Append a core token, split as spaCy's contractions: "don't" → "do" "n't" always; "'d",
    "'ll", "'re", "'ve", "'m" only after pronouns ("we'll", but "banish'd" stays whole)."""
    if "'" in t or "’" in t:
        low = t.lower()
        cut = max(t.rfind("'"), t.rfind("’"))
        tail = low[cut + 1 :]
        if len(t) > 3 and tail == "t" and low[cut - 1] == "n" and cut >= 2 and t[cut + 1] == "t":
            out += [t[: cut - 1], t[cut - 1 :]]
            return
        if cut > 0 and tail in _CLITICS and (low[:cut] in _CLITIC_HEADS or (tail == "ve" and low[:cut] in _VE_HEADS)):
            out += [t[:cut], t[cut:]]
            return
    out.append(t)


#: tokens of chunks that took the rules path ("said,\"", "don't"): such chunks repeat across documents
_CHUNK_CACHE: dict[str, list[str]] = {}
_CACHE_SIZE = 1 << 17


def words_of(text: str) -> list[str]:
    """Split text into word and punctuation tokens (see the module docstring)."""
    out: list[str] = []
    append = out.append
    sp = _SPECIAL
    cache = _CHUNK_CACHE
    for c in text.split():
        if c.isalnum():
            if c not in sp and not (c[0].isdigit() and c[-1].isalpha()):  # "cannot", "5km" → "5" "km"
                append(c)
                continue
        elif len(c) > 1 and c not in sp:
            # the commonest other shapes, cut exactly as _split_chunk would: "word," "word." "(word"
            last = c[-1]
            head = c[:-1]
            if head.isalnum() and head not in sp and not (head[0].isdigit() and head[-1].isalpha()):
                h = head[-1]
                if last in _CUT_AFTER or (
                    last == "." and (h in _PERIOD_AFTER or (h in _CAPS and len(head) > 1 and head[-2] in _CAPS))
                ):
                    append(head)
                    append(last)
                    continue
            elif c[0] in _CUT_BEFORE:
                tail = c[1:]
                if tail.isalnum() and tail not in sp and not (tail[0].isdigit() and tail[-1].isalpha()):
                    append(c[0])
                    append(tail)
                    continue
        toks = cache.get(c)
        if toks is None:
            toks = []
            _split_chunk(c, toks)
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[c] = toks
        out += toks
    return out


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
    """A run of sentence-terminal marks that stands as its own token (not "3.5", not "...")."""
    marks = "".join(re.escape(c) for c in sorted(sentence_terminals()))
    return re.compile(rf"(?<!\.)(?!\.\.)[{marks}]+(?!\w)")


#: English abbreviations whose period does not end a sentence (titles, companies, months, US
#: states), as English tokenizers keep "Mr." or "Jan." one token; dotted initials ("U.S.", "e.g.",
#: "p.m.", "J.B.", a lone "J.") are matched by ``_INITIALS``. Case matters: "Etc." and "No." end one.
_ABBREVIATIONS = frozenset(
    "Mr Mrs Ms Dr Prof Jr St Mt Rev Gen Gov Sen Rep Adm Messrs Inc Co Ltd Corp Bros vs Ph.D "
    "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec "
    "Ala Ariz Ark Calif Colo Conn Del Fla Ga Ill Ind Kan Kans Ky La Md Mass Mich Minn Miss Mo Mont "
    "Neb Nev Okla Ore Pa Tenn Va Wash Wis".split()
)
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")
_TOKEN_BEFORE = re.compile(r"\S+$")
_OPENERS = "\"'([{“‘«"


def _is_abbreviation(line: str, period_at: int) -> bool:
    m = _TOKEN_BEFORE.search(line, 0, period_at)
    token = m.group().lstrip(_OPENERS) if m else ""
    return token in _ABBREVIATIONS or _INITIALS.fullmatch(token) is not None


def _token_follows(line: str, end: int) -> bool:
    """Whether a token other than punctuation (closing quotes and brackets) comes after ``end``."""
    return any(not ch.isspace() and not unicodedata.category(ch).startswith("P") for ch in line[end:])


def count_sentences(line: str) -> int:
    """Sentences in one line, counted as spaCy's rule-based sentencizer splits English text.

    A new sentence starts at the first token after sentence-terminal marks (".", "!", "?" and
    their Unicode relatives) that stand as tokens, skipping punctuation such as closing quotes and
    brackets: "3.5" and "..." end nothing, "?!" ends one sentence, and the period of an
    abbreviation ("Mr.", "Jan.", "U.S.", "e.g.", "J.") none.
    """
    if not line.strip():
        return 0
    n = 1
    for m in _sentence_end_re().finditer(line):
        if m.group() == "." and _is_abbreviation(line, m.start()):
            continue
        if "." not in m.group() and not _mark_ends_token(line, m.end()):
            continue  # "vec![1, 2]", "a!b": a "!" or "?" inside a token ends nothing
        n += _token_follows(line, m.end())
    return n


def _mark_ends_token(line: str, end: int) -> bool:
    nxt = line[end : end + 1]
    return not nxt or nxt.isspace() or nxt in "\"'" or unicodedata.category(nxt) in ("Pe", "Pf")


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


class Filter(ABC):
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

    def check(self) -> None:  # noqa: B027 - optional hook; most filters need no check
        """Validate files and settings before any work starts (raise UsageError)."""

    @abstractmethod
    def apply(self, doc: Doc) -> str | None:
        """The reason to remove ``doc`` (e.g. ``"short_doc"``), or None to keep it; may edit its text."""

    def apply_batch(self, docs: list[Doc]) -> list[str | None]:
        """Decide a whole batch; filters that vectorise (the classifiers) override this."""
        return [self.apply(d) for d in docs]

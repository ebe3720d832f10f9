"""The filter families of ``llmctl filter``, one module each, and the chain registry."""

from __future__ import annotations

from .badwords import BadWordsFilter
from .base import Doc, Filter, FilterParams, words_of
from .c4 import C4Filter
from .domains import DomainFilter
from .fineweb import FineWebFilter
from .gopher import GopherQualityFilter, GopherRepetitionFilter
from .language import LanguageFilter
from .pii import PiiFilter
from .quality import QualityFilter
from .url import UrlFilter

#: every filter family, by the name used in --chain and in TOML tables
REGISTRY: dict[str, type[Filter]] = {
    cls.family: cls
    for cls in (
        UrlFilter,
        LanguageFilter,
        GopherRepetitionFilter,
        GopherQualityFilter,
        C4Filter,
        FineWebFilter,
        BadWordsFilter,
        QualityFilter,
        PiiFilter,
        DomainFilter,
    )
}

#: FineWeb's order for the heuristics (repetition before quality, then C4, then its own rules),
#: the model score on clean text, redaction of what is kept, and the domain label last
DEFAULT_CHAIN = [
    "url",
    "language",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
    "badwords",
    "quality",
    "pii",
    "domains",
]

__all__ = ["DEFAULT_CHAIN", "REGISTRY", "Doc", "Filter", "FilterParams", "words_of"]

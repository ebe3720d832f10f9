"""Keep documents in the chosen languages, above a language-ID score (extract's columns).

The extract stage writes ``language`` (py3langid's code: ISO 639-1 where one exists, else ISO 639-3 or zxx) and ``language_score``
(its probability). FineWeb keeps English with score ≥ 0.65; that is our default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import UsageError
from .base import Doc, Filter, FilterParams


@dataclass
class LanguageParams(FilterParams):
    """Languages to keep and the minimum language score (FineWeb: en, 0.65)."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float | None = 0.65


class LanguageFilter(Filter):
    family = "language"
    Params = LanguageParams
    needs_columns = ("language", "language_score")

    def __init__(self, params: LanguageParams):
        super().__init__(params)
        self._keep = frozenset(x.lower() for x in params.languages)

    def check(self) -> None:
        s = self.params.min_score
        if s is not None and not 0.0 <= s <= 1.0:
            raise UsageError(f"language min_score={s}: a language score is a probability; give a value in [0, 1]")

    def apply(self, doc: Doc) -> str | None:
        lang = (doc.meta.get("language") or "").lower()
        if self._keep and lang not in self._keep:
            return "other_language"
        score = doc.meta.get("language_score")
        if self.params.min_score is not None and (score is None or score < self.params.min_score):
            return "low_language_score"
        return None

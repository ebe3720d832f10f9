"""Offline language identification with py3langid (the model ships inside the package).

Scores are normalised probabilities (``norm_probs=True``), so ``language_score`` is comparable
across documents and a later filter can threshold it the way FineWeb thresholds fastText's
score. Only the first ``max_chars`` characters are scored: enough to decide, and it keeps the cost
per document bounded and the result independent of how long the page is.
"""

from __future__ import annotations

_IDENTIFIER = None

#: characters scored per document
MAX_CHARS = 20_000


def identifier():
    """The py3langid identifier, loaded once per process (about half a second)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect(text: str, max_chars: int = MAX_CHARS) -> tuple[str, float]:
    """(language code, probability) of the text's language; ('und', 0.0) for text without words.

    Codes are the model's labels: ISO 639-1 where one exists, else ISO 639-3 (``wuu`` Wu Chinese,
    ``pcm`` Nigerian Pidgin) or ``zxx`` (no linguistic content)."""
    sample = text[:max_chars]
    if not any(ch.isalpha() for ch in sample):
        return "und", 0.0
    lang, score = identifier().classify(sample)
    return str(lang), round(float(score), 6)

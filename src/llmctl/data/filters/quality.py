"""Model-based quality filtering: score every document, keep the high scorers.

The lecture's recipe (and DCLM's): train a classifier to tell reference-quality text from random
crawl, then keep documents it scores high. ``quality_score`` is the classifier's probability of
the positive class; a document is kept when its score is at least ``threshold``. With
``top_percent`` the stage instead keeps the top P % of the *input* corpus: a first pass scores every
input document and sets the threshold at the (100 − P)-th percentile (DCLM keeps a top fraction).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from .base import Doc, Filter, FilterParams
from .classifier import Classifier


@dataclass
class QualityParams(FilterParams):
    model: str | None = None
    threshold: float = 0.5
    top_percent: float | None = None
    #: the class whose probability is the score; None = the model's positive class
    positive_class: str | None = None


class QualityFilter(Filter):
    family = "quality"
    Params = QualityParams
    adds_columns = {"quality_score": "float64"}

    def __init__(self, params: QualityParams):
        super().__init__(params)
        self.model: Classifier | None = None
        self.col = 1

    def check(self) -> None:
        p = self.params
        if not p.model:
            raise UsageError("the quality filter needs a model: pass --quality-model DIR (from llmctl filter train-quality)")
        if p.top_percent is not None and not 0 < p.top_percent <= 100:
            raise UsageError(f"quality top_percent={p.top_percent}: must be in (0, 100]")
        self.model = Classifier.load(p.model)
        classes = self.model.classes
        if p.positive_class is not None:
            if p.positive_class not in classes:
                raise UsageError(f"quality positive_class '{p.positive_class}' is not one of the model's classes {classes}")
            self.col = classes.index(p.positive_class)
        else:
            self.col = classes.index("positive") if "positive" in classes else len(classes) - 1

    def score(self, texts: list[str]):
        if self.model is None:
            self.check()
        return self.model.predict_proba(texts)[:, self.col]

    def apply_batch(self, docs: list[Doc]) -> list[str | None]:
        if not docs:
            return []
        scores = self.score([d.text for d in docs])
        thr = self.params.threshold
        out: list[str | None] = []
        for d, s in zip(docs, scores, strict=True):
            d.meta["quality_score"] = float(s)
            out.append(None if s >= thr else "low_score")
        return out

    def apply(self, doc: Doc) -> str | None:
        return self.apply_batch([doc])[0]

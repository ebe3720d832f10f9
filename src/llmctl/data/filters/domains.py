"""Label each document with a domain (``domain`` column) for the mixture report and for sampling.

Rules on the URL come first (file order, first match wins; see resources/domain_rules.txt for
the format); a document no rule matches gets the optional classifier's label (a model from
``llmctl filter train-domain``) when its probability reaches ``min_model_prob``, else the default
label. This filter never removes a document; the stage reports the mixture (docs and characters
per domain) of what it keeps, which tokenize later samples by domain weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..urls import host_of
from .base import Doc, Filter, FilterParams
from .classifier import Classifier
from .url import read_list_file


@dataclass
class DomainParams(FilterParams):
    rules: str | None = None
    model: str | None = None
    default: str = "web"
    min_model_prob: float = 0.0


def parse_rules(lines: list[str], where: str) -> list[tuple[str, str, str]]:
    """[(kind, pattern, label)] with kind in {"domain", "prefix", "suffix"}."""
    rules = []
    for ln in lines:
        parts = ln.split()
        if len(parts) != 2:
            raise UsageError(f"{where}: rule line {ln!r} must be 'PATTERN LABEL'; fix the rules file")
        pat, label = parts[0].lower(), parts[1]
        if pat.startswith("."):
            rules.append(("suffix", pat, label))
        elif "/" in pat:
            rules.append(("prefix", pat.rstrip("/"), label))
        else:
            rules.append(("domain", pat[4:] if pat.startswith("www.") else pat, label))
    return rules


class DomainFilter(Filter):
    family = "domains"
    Params = DomainParams
    adds_columns = {"domain": "string"}

    def __init__(self, params: DomainParams):
        super().__init__(params)
        self.rules: list[tuple[str, str, str]] | None = None
        self.model: Classifier | None = None

    def check(self) -> None:
        p = self.params
        if p.rules:
            lines = read_list_file(Path(p.rules), "domain rules file")
            self.rules = parse_rules(lines, p.rules)
        else:
            text = resources.files("llmctl.resources").joinpath("domain_rules.txt").read_text(encoding="utf-8")
            lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
            self.rules = parse_rules(lines, "domain_rules.txt")
        if p.model:
            self.model = Classifier.load(p.model)

    def by_rules(self, url: str) -> str | None:
        if self.rules is None:
            self.check()
        host = host_of(url) if url else ""
        if host.startswith("www."):
            host = host[4:]
        if not host:
            return None
        hostpath = None
        for kind, pat, label in self.rules:
            if kind == "domain":
                if host == pat or host.endswith("." + pat):
                    return label
            elif kind == "suffix":
                if host.endswith(pat):
                    return label
            else:
                if hostpath is None:
                    rest = url.split("://", 1)[-1]
                    hostpath = host + "/" + rest.split("/", 1)[1] if "/" in rest else host
                    hostpath = hostpath.lower()
                if hostpath == pat or hostpath.startswith(pat + "/") or hostpath.startswith(pat + "?"):
                    return label
        return None

    def apply_batch(self, docs: list[Doc]) -> list[str | None]:
        labels = [self.by_rules(d.url) for d in docs]
        todo = [i for i, lab in enumerate(labels) if lab is None]
        if todo and self.model is not None:
            prob = self.model.predict_proba([docs[i].text for i in todo])
            best = prob.argmax(axis=1)
            conf = prob[np.arange(len(todo)), best]
            for j, i in enumerate(todo):
                if conf[j] >= self.params.min_model_prob:
                    labels[i] = self.model.classes[int(best[j])]
                    self.counters["by_model"] += 1
        for d, lab in zip(docs, labels, strict=True):
            d.meta["domain"] = lab or self.params.default
        self.counters["by_rules"] += len(docs) - len(todo)
        return [None] * len(docs)

    def apply(self, doc: Doc) -> str | None:
        return self.apply_batch([doc])[0]

"""The quality classifier separates real text from shuffled-word text on held-out documents."""

from __future__ import annotations

import random

import numpy as np

from llmctl.data.filters.classifier import Classifier, roc_auc, train


def chunks(text: str, words: int = 80) -> list[str]:
    w = text.split()
    return [" ".join(w[i : i + words]) for i in range(0, len(w) - words, words)]


def test_roc_auc_definition():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


def test_quality_classifier_real_vs_shuffled(shared_data, tmp_path):
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = chunks(text)[:1200]
    rng = random.Random(0)
    rng.shuffle(docs)
    train_real, test_real = docs[:400], docs[400:600]
    pool = " ".join(docs[600:1200]).split()

    def shuffled(n: int) -> list[str]:
        out = []
        for _ in range(n):
            out.append(" ".join(rng.sample(pool, 80)))
        return out

    train_fake, test_fake = shuffled(400), shuffled(200)
    model, metrics = train({"negative": train_fake, "positive": train_real}, n_features=1 << 18, seed=0)
    assert metrics["heldout_auc"] > 0.95, metrics
    # documents never seen in training or the internal hold-out
    p = model.predict_proba(test_real + test_fake)[:, 1]
    y = np.array([1] * len(test_real) + [0] * len(test_fake))
    assert roc_auc(y, p) > 0.95
    assert (p[:200] > 0.5).mean() > 0.85 and (p[200:] < 0.5).mean() > 0.85
    # saved and loaded: same scores
    model.save(tmp_path / "model.npz")
    again = Classifier.load(tmp_path)
    assert np.allclose(again.predict_proba(test_real[:5]), model.predict_proba(test_real[:5]), atol=1e-6)

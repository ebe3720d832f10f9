"""A small CPU text classifier: hashed word uni+bigram features and logistic regression.

The model-based filters (quality, domains) use it. It follows the DCLM/fastText recipe in spirit
(bag of word uni- and bigrams, a linear model) without fastText: features are hashed into
``n_features`` buckets with a stable hash (CRC-32, so scores do not depend on the process), counts
are log-scaled and each row L2-normalised; weights are fitted by L-BFGS (scipy) on the mean
log-loss plus an L2 penalty. Two classes use a sigmoid, more use a softmax.

Saved as an artifact directory: ``model.npz`` (weights, bias, classes, settings) + manifest.json.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import UsageError

if TYPE_CHECKING:  # scipy is imported where it is used: it costs seconds per process to import
    import scipy.sparse as sp

_WORD = re.compile(r"\w+")
_BIGRAM_MUL = np.uint64(0x100000001B3)


class Featurizer:
    """Text → sparse hashed feature rows (CSR, float32)."""

    def __init__(self, n_features: int = 1 << 20, bigrams: bool = True):
        if n_features & (n_features - 1):
            raise UsageError(f"n_features={n_features}: must be a power of two, e.g. 1048576")
        self.n_features = n_features
        self.bigrams = bigrams
        self._cache: dict[str, int] = {}

    def _hash(self, tok: str) -> int:
        h = self._cache.get(tok)
        if h is None:
            h = zlib.crc32(tok.encode("utf-8", "surrogatepass"))
            if len(self._cache) < 2_000_000:
                self._cache[tok] = h
        return h

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        import scipy.sparse as sp

        mask = np.uint64(self.n_features - 1)
        indptr = [0]
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for text in texts:
            toks = _WORD.findall(text.lower())
            if not toks:
                indptr.append(indptr[-1])
                continue
            h = np.fromiter(map(self._hash, toks), dtype=np.uint64, count=len(toks))
            feats = h & mask
            if self.bigrams and len(h) > 1:
                with np.errstate(over="ignore"):
                    bi = ((h[:-1] * _BIGRAM_MUL) ^ (h[1:] + np.uint64(0x9E3779B9))) & mask
                feats = np.concatenate((feats, bi))
            u, counts = np.unique(feats, return_counts=True)
            v = np.log1p(counts.astype(np.float32))
            v /= np.sqrt((v * v).sum())
            cols.append(u.astype(np.int32))
            vals.append(v)
            indptr.append(indptr[-1] + len(u))
        data = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        idx = np.concatenate(cols) if cols else np.zeros(0, np.int32)
        return sp.csr_matrix((data, idx, np.asarray(indptr, dtype=np.int64)), shape=(len(texts), self.n_features))


@dataclass
class Classifier:
    """Linear model over hashed features; ``classes[i]`` names output i."""

    weights: np.ndarray  # (n_features,) for two classes, (n_features, K) for K > 2
    bias: np.ndarray
    classes: list[str]
    n_features: int
    bigrams: bool = True

    @property
    def featurizer(self) -> Featurizer:
        f = getattr(self, "_feat", None)
        if f is None:
            f = Featurizer(self.n_features, self.bigrams)
            self._feat = f
        return f

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(n, K) class probabilities."""
        X = self.featurizer.transform(texts)
        if len(self.classes) == 2:
            z = X @ self.weights + self.bias[0]
            p1 = 1.0 / (1.0 + np.exp(-z))
            return np.stack([1 - p1, p1], axis=1)
        z = X @ self.weights + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(
                f,
                weights=self.weights.astype(np.float32),
                bias=self.bias.astype(np.float32),
                classes=np.array(self.classes),
                n_features=np.int64(self.n_features),
                bigrams=np.bool_(self.bigrams),
            )

    @classmethod
    def load(cls, model_dir: Path) -> Classifier:
        model_dir = Path(model_dir)
        f = model_dir / "model.npz" if model_dir.is_dir() else model_dir
        if not f.is_file():
            raise UsageError(f"{model_dir}: no classifier model (model.npz); train one with llmctl filter train-quality")
        try:
            z = np.load(f, allow_pickle=False)
            return cls(
                weights=z["weights"],
                bias=z["bias"],
                classes=[str(c) for c in z["classes"]],
                n_features=int(z["n_features"]),
                bigrams=bool(z["bigrams"]),
            )
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{f}: not a readable llmctl classifier ({e}); retrain it") from e


def fit(X: sp.csr_matrix, y: np.ndarray, n_classes: int, l2: float = 1e-4, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """L2-regularised logistic (2 classes) or softmax regression by L-BFGS; returns (W, b)."""
    import scipy.optimize
    from threadpoolctl import threadpool_limits

    # L-BFGS works on vectors (BLAS level 1): extra BLAS threads only spin and contend, which made
    # training 4-5x slower on a busy 2-core machine
    with threadpool_limits(1, user_api="blas"):
        return _fit(X, y, n_classes, l2, max_iter, scipy.optimize)


def _fit(X: sp.csr_matrix, y: np.ndarray, n_classes: int, l2: float, max_iter: int, opt) -> tuple[np.ndarray, np.ndarray]:
    n, d = X.shape
    Xt = X.T.tocsr()
    if n_classes == 2:
        yf = y.astype(np.float64)

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:d], theta[d]
            z = X @ w + b
            # log(1 + e^z) - y z, computed stably
            ll = np.logaddexp(0.0, z) - yf * z
            p = 1.0 / (1.0 + np.exp(-z))
            g = p - yf
            grad = np.empty(d + 1)
            grad[:d] = Xt @ g / n + l2 * w
            grad[d] = g.mean()
            return ll.mean() + 0.5 * l2 * float(w @ w), grad

        res = opt.minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                                      options={"maxiter": max_iter})
        return res.x[:d].astype(np.float32), np.array([res.x[d]], dtype=np.float32)

    K = n_classes
    Y = np.zeros((n, K))
    Y[np.arange(n), y] = 1.0

    def loss_k(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[: d * K].reshape(d, K)
        b = theta[d * K :]
        Z = X @ W + b
        Z -= Z.max(axis=1, keepdims=True)
        logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
        P = np.exp(logp)
        G = (P - Y) / n
        gW = Xt @ G + l2 * W
        return -(Y * logp).sum() / n + 0.5 * l2 * float((W * W).sum()), np.concatenate([gW.ravel(), G.sum(axis=0)])

    res = opt.minimize(loss_k, np.zeros(d * K + K), jac=True, method="L-BFGS-B",
                                  options={"maxiter": max_iter})
    return res.x[: d * K].reshape(d, K).astype(np.float32), res.x[d * K :].astype(np.float32)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties)."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(score)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(
    texts_by_class: dict[str, list[str]],
    *,
    n_features: int = 1 << 20,
    bigrams: bool = True,
    l2: float = 1e-4,
    holdout: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> tuple[Classifier, dict[str, float]]:
    """Fit on a random (1 − holdout) part, report held-out accuracy and AUC, refit on everything.

    The saved model is the one fitted on all documents; the reported metrics come from the model
    that never saw the held-out part.
    """
    classes = list(texts_by_class)
    if len(classes) < 2:
        raise UsageError("a classifier needs at least two classes of documents")
    texts: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        if not texts_by_class[c]:
            raise UsageError(f"class '{c}' has no documents; check its input")
        texts += texts_by_class[c]
        labels += [k] * len(texts_by_class[c])
    y = np.asarray(labels)
    feat = Featurizer(n_features, bigrams)
    X = feat.transform(texts)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(round(len(y) * holdout)) if holdout > 0 else 0
    metrics: dict[str, float] = {"docs": len(y), **{f"docs_{c}": len(texts_by_class[c]) for c in classes}}
    if n_test >= 2 and len(y) - n_test >= 2:
        test, trn = perm[:n_test], perm[n_test:]
        W, b = fit(X[trn], y[trn], len(classes), l2=l2, max_iter=max_iter)
        held = Classifier(W, b, classes, n_features, bigrams)
        Xt = X[test]
        if len(classes) == 2:
            p1 = 1 / (1 + np.exp(-(Xt @ W + b[0])))
            prob = np.stack([1 - p1, p1], axis=1)
        else:
            Z = Xt @ W + b
            prob = np.exp(Z - Z.max(axis=1, keepdims=True))
            prob /= prob.sum(axis=1, keepdims=True)
        metrics["heldout_docs"] = int(n_test)
        metrics["heldout_accuracy"] = float((prob.argmax(axis=1) == y[test]).mean())
        aucs = [roc_auc(y[test] == k, prob[:, k]) for k in range(len(classes))]
        metrics["heldout_auc"] = aucs[1] if len(classes) == 2 else float(np.nanmean(aucs))
        del held
    W, b = fit(X, y, len(classes), l2=l2, max_iter=max_iter)
    return Classifier(W, b, classes, n_features, bigrams), metrics

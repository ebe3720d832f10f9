"""MinHash signatures of many documents at once, in datasketch's 64-bit permutation family.

datasketch's ``MinHash.update`` hashes one shingle per Python call; at ~500 shingles × 112
permutations per web page that is the slow part of near-duplicate detection. Here all shingles of a
batch of documents are hashed to 64-bit integers in numpy and pushed through the *same*
permutations datasketch uses for ``scheme="affine64"`` (MurmurHash3 fmix64 pre-mix, then
``a·h + b mod 2^64`` with the ``(a, b)`` drawn from ``MinHash(seed=…)``), with one ``minimum.reduceat``
per batch. The result equals ``MinHash(num_perm, seed, scheme="affine64",
hashfunc=shingle_hash).update_batch(shingles)`` value for value (tested), so the signatures can be
handed to datasketch's ``MinHashLSH`` as ordinary ``MinHash`` objects.

A shingle's hash is a polynomial over 64-bit hashes of its words (blake2b of the UTF-8 word, cached
per process), so each word is hashed once and an n-gram costs a few vector operations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasketch import MinHash

SCHEME = "affine64"
U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_M = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for the polynomial combination of word hashes
_FMIX = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
#: shingles hashed per numpy step (≈ this × num_perm × 8 bytes of scratch memory: ~3.7 MB at 112,
#: which stays in cache; 4× larger chunks ran ~3× slower)
CHUNK_SHINGLES = 4096


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (the pre-mix datasketch applies before its permutations)."""
    s, m1, m2 = _FMIX
    h = h ^ (h >> s)
    h = h * m1
    h = h ^ (h >> s)
    h = h * m2
    return h ^ (h >> s)


def word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class ShingleHasher:
    """Hashes word n-grams to uint64 through a per-process cache of word hashes."""

    def __init__(self, n: int, max_cache: int = 2_000_000) -> None:
        self.n = n
        self.max_cache = max_cache
        self._cache: dict[str, int] = {}
        # multipliers M^(n-1-j) for the word at offset j of the shingle
        self._pow = [np.uint64(1)] * n
        for j in range(n - 2, -1, -1):
            self._pow[j] = np.uint64((int(self._pow[j + 1]) * int(_M)) & 0xFFFFFFFFFFFFFFFF)

    def word_hashes(self, tokens: Sequence[str]) -> np.ndarray:
        cache = self._cache
        try:
            return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))
        except KeyError:
            if len(cache) > self.max_cache:
                cache.clear()
            for w in set(tokens).difference(cache):
                cache[w] = word_hash(w)
            return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))

    def batch_hashes(self, w: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of many documents from their concatenated word hashes ``w``.

        ``lengths[i]`` is document i's word count. Returns (hashes of all shingles, document by
        document, shingles per document); equal to ``hashes`` of each document's words.
        """
        n = self.n
        lengths = np.asarray(lengths, dtype=np.int64)
        counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
        if len(w) == 0:
            return np.zeros(0, dtype=np.uint64), counts
        k = max(len(w) - n + 1, 0)
        full = np.zeros(k, dtype=np.uint64)
        if k:
            full += w[0:k] * self._pow[0]
            for j in range(1, n):
                full += w[j : j + k] * self._pow[j]
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        long_docs = lengths >= n
        # shingle positions: for a long document, starts .. starts + count - 1 in the full array
        idx = np.repeat(starts[long_docs] - np.cumsum(counts[long_docs]) + counts[long_docs], counts[long_docs])
        idx += np.arange(len(idx), dtype=np.int64)
        out = np.empty(int(counts.sum()), dtype=np.uint64)
        out_start = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(counts[:-1], out=out_start[1:])
        pos_long = np.repeat(out_start[long_docs] - np.cumsum(counts[long_docs]) + counts[long_docs],
                             counts[long_docs]) + np.arange(len(idx), dtype=np.int64)
        out[pos_long] = full[idx]
        for i in np.flatnonzero((lengths > 0) & ~long_docs):  # short documents: one shingle each
            out[out_start[i]] = self.hashes_short(w[starts[i] : starts[i] + lengths[i]])
        return out, counts

    @staticmethod
    def hashes_short(w: np.ndarray) -> int:
        h = 0
        for x in w.tolist():
            h = (h * int(_M) + x) & 0xFFFFFFFFFFFFFFFF
        return h

    def hashes(self, tokens: Sequence[str]) -> np.ndarray:
        """Hashes of all word n-grams (one hash of all words when fewer than n; none when empty)."""
        w = self.word_hashes(tokens)
        n = self.n
        if len(w) == 0:
            return w
        if len(w) < n:  # a short text is one shingle of all its words
            return np.array([self.hashes_short(w)], dtype=np.uint64)
        k = len(w) - n + 1
        h = w[0:k] * self._pow[0]
        for j in range(1, n):
            h += w[j : j + k] * self._pow[j]
        return h

    def hash_of(self, shingle: tuple[str, ...] | list[str]) -> int:
        """The hash of one shingle (for datasketch's per-shingle ``hashfunc`` in tests)."""
        return int(self.hashes(list(shingle))[0])


def permutations(num_perm: int, seed: int) -> np.ndarray:
    """datasketch's (a, b) parameters for ``MinHash(num_perm, seed, scheme="affine64")``.

    Drawn here from ``numpy.random.RandomState(seed)`` as that scheme specifies (odd multipliers
    ``a``, offsets ``b`` uniform over 64 bits; equality with datasketch is tested), so the in-memory
    path never imports datasketch, whose import pulls in scipy (~1 s of every process start).
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = gen.randint(0, 1 << 64, num_perm, dtype=np.uint64)
    return np.array([a, b])


class Signer:
    """Computes MinHash signatures (rows of uint64) for batches of documents."""

    def __init__(self, num_perm: int, seed: int, ngram: int) -> None:
        self.num_perm = num_perm
        self.seed = seed
        self.perm = permutations(num_perm, seed)
        self.a = self.perm[0][None, :]
        self.b = self.perm[1][None, :]
        self.a_col = np.ascontiguousarray(self.perm[0][:, None])
        self.b_col = np.ascontiguousarray(self.perm[1][:, None])
        self.shingler = ShingleHasher(ngram)

    def signatures(self, token_lists: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures [docs × num_perm] uint64, has_signature [docs] bool).

        A document with no words has no shingles: its row stays at the empty value (all ones) and
        ``has_signature`` is False, so it never joins a near-duplicate cluster.
        """
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        w = self.shingler.word_hashes([x for t in token_lists for x in t])
        return self.signatures_of_words(w, lengths)

    def signatures_of_words(self, w: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``signatures`` from the documents' concatenated word hashes and their word counts."""
        hv, counts = self.shingler.batch_hashes(w, lengths)
        return self.signatures_of_shingles(hv, counts)

    def signatures_of_shingles(self, hv: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``signatures`` from all shingle hashes, document by document, and shingles per document."""
        n_docs = len(counts)
        sig = np.full((n_docs, self.num_perm), U64_MAX, dtype=np.uint64)
        has = counts > 0
        hv = fmix64(hv)
        ends = np.cumsum(counts)
        start = 0
        while start < n_docs:
            # take documents until the chunk holds ~CHUNK_SHINGLES shingles (at least one doc)
            base = ends[start] - counts[start]
            stop = max(int(np.searchsorted(ends, base + CHUNK_SHINGLES, side="right")), start + 1)
            idx = np.flatnonzero(has[start:stop]) + start
            if len(idx):
                lo, hi = base, ends[stop - 1]
                # permutations × shingles: each row contiguous, a chunk small enough to stay in cache
                phv = self.a_col * hv[None, lo:hi]
                phv += self.b_col
                offsets = ends[idx] - counts[idx] - lo
                sig[idx] = np.minimum.reduceat(phv, offsets, axis=1).T
            start = stop
        return sig, has

    def minhash(self, row: np.ndarray) -> MinHash:
        """A datasketch MinHash holding one signature row (for MinHashLSH)."""
        from datasketch import MinHash

        return MinHash(seed=self.seed, hashvalues=row, permutations=self.perm, scheme=SCHEME)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal MinHash values: the estimated Jaccard similarity of each pair."""
    return np.mean(sig_a == sig_b, axis=-1)

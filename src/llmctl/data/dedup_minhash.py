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

import numpy as np
from datasketch import MinHash

SCHEME = "affine64"
U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_M = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for the polynomial combination of word hashes
_FMIX = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
#: shingles hashed per numpy step (≈ this × num_perm × 8 bytes of scratch memory)
CHUNK_SHINGLES = 16384


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
            hv = [cache[w] for w in tokens]
        except KeyError:
            if len(cache) > self.max_cache:
                cache.clear()
            for w in tokens:
                if w not in cache:
                    cache[w] = word_hash(w)
            hv = [cache[w] for w in tokens]
        return np.array(hv, dtype=np.uint64)

    def hashes(self, tokens: Sequence[str]) -> np.ndarray:
        """Hashes of all word n-grams (one hash of all words when fewer than n; none when empty)."""
        w = self.word_hashes(tokens)
        n = self.n
        if len(w) == 0:
            return w
        if len(w) < n:  # a short text is one shingle of all its words
            h = 0
            for x in w.tolist():
                h = (h * int(_M) + x) & 0xFFFFFFFFFFFFFFFF
            return np.array([h], dtype=np.uint64)
        k = len(w) - n + 1
        h = w[0:k] * self._pow[0]
        for j in range(1, n):
            h += w[j : j + k] * self._pow[j]
        return h

    def hash_of(self, shingle: tuple[str, ...] | list[str]) -> int:
        """The hash of one shingle (for datasketch's per-shingle ``hashfunc`` in tests)."""
        return int(self.hashes(list(shingle))[0])


def permutations(num_perm: int, seed: int) -> np.ndarray:
    """datasketch's (a, b) parameters for ``MinHash(num_perm, seed, scheme="affine64")``."""
    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


class Signer:
    """Computes MinHash signatures (rows of uint64) for batches of documents."""

    def __init__(self, num_perm: int, seed: int, ngram: int) -> None:
        self.num_perm = num_perm
        self.seed = seed
        self.perm = permutations(num_perm, seed)
        self.a = self.perm[0][None, :]
        self.b = self.perm[1][None, :]
        self.shingler = ShingleHasher(ngram)

    def signatures(self, token_lists: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures [docs × num_perm] uint64, has_signature [docs] bool).

        A document with no words has no shingles: its row stays at the empty value (all ones) and
        ``has_signature`` is False, so it never joins a near-duplicate cluster.
        """
        n_docs = len(token_lists)
        sig = np.full((n_docs, self.num_perm), U64_MAX, dtype=np.uint64)
        per_doc = [self.shingler.hashes(t) for t in token_lists]
        counts = np.fromiter((len(h) for h in per_doc), dtype=np.int64, count=n_docs)
        has = counts > 0
        start = 0
        while start < n_docs:
            # take documents until the chunk holds ~CHUNK_SHINGLES shingles (at least one doc)
            stop, total = start, 0
            while stop < n_docs and (total == 0 or total + counts[stop] <= CHUNK_SHINGLES):
                total += counts[stop]
                stop += 1
            idx = [i for i in range(start, stop) if counts[i] > 0]
            if idx:
                hv = fmix64(np.concatenate([per_doc[i] for i in idx]))
                phv = hv[:, None] * self.a
                phv += self.b
                offsets = np.zeros(len(idx), dtype=np.int64)
                np.cumsum(counts[idx][:-1], out=offsets[1:])
                sig[idx] = np.minimum.reduceat(phv, offsets, axis=0)
            start = stop
        return sig, has

    def minhash(self, row: np.ndarray) -> MinHash:
        """A datasketch MinHash holding one signature row (for MinHashLSH)."""
        return MinHash(seed=self.seed, hashvalues=row, permutations=self.perm, scheme=SCHEME)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal MinHash values: the estimated Jaccard similarity of each pair."""
    return np.mean(sig_a == sig_b, axis=-1)

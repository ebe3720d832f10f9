"""The banded LSH index and clustering its buckets.

Two forms with the same buckets: in memory, one uint64 hash per (document, band) in numpy arrays,
grouped by sorting and confirmed on the band values (``band_hashes``, ``memory_buckets``: ~112 bytes
per document at 14 bands); shared across workers and machines, datasketch's ``MinHashLSH`` with its
Redis storage (``make_lsh``, ``band_buckets``). A test checks that both give identical buckets.

Keys are 8-byte big-endian global document positions ``shard << 32 | row``, so every worker and
every machine of a job array names a document the same way and no pickles cross the network.
Candidate pairs come from scanning the buckets that hold more than one key (each band's table),
not from per-document queries: one pass over the index, pipelined when it lives in Redis, gives
every task the same global set of candidates and therefore the same clusters.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from ..errors import UsageError
from .dedup_minhash import fmix64

if TYPE_CHECKING:
    from datasketch import MinHashLSH

_KEY = struct.Struct(">Q")
#: buckets larger than this are verified as a star around their first member, not all pairs
ALL_PAIRS_MAX = 32


def doc_key(shard: int, row: int) -> int:
    return (shard << 32) | row


def split_key(key: int) -> tuple[int, int]:
    return key >> 32, key & 0xFFFFFFFF


def key_bytes(key: int) -> bytes:
    return _KEY.pack(key)


def key_int(b: bytes) -> int:
    return _KEY.unpack(b)[0]


def parse_redis_url(url: str) -> dict:
    """``redis://HOST:PORT/DB`` (DB optional) → redis.Redis keyword arguments."""
    u = urlparse(url)
    if u.scheme != "redis" or not u.hostname:
        raise UsageError(f"--lsh-storage {url!r}: expected 'memory' or redis://HOST:PORT (optionally /DB)")
    try:
        port = u.port or 6379
        db = int(u.path.strip("/") or 0)
    except ValueError:
        raise UsageError(f"--lsh-storage {url!r}: bad port or database number; e.g. redis://127.0.0.1:6379/0") from None
    cfg = {"host": u.hostname, "port": port, "db": db}
    if u.password:
        cfg["password"] = u.password
    return cfg


def check_redis(url: str, timeout: float = 3.0):
    """Connect and PING, or raise a one-line UsageError; returns the client."""
    import redis

    cfg = parse_redis_url(url)
    client = redis.Redis(**cfg, socket_connect_timeout=timeout, socket_timeout=max(timeout, 30.0))
    try:
        client.ping()
    except redis.RedisError as e:
        reason = str(e).split("\n")[0].rstrip(".")
        raise UsageError(
            f"--lsh-storage {url}: cannot reach Redis ({reason}); start redis-server there or drop --lsh-storage"
        ) from None
    return client


def storage_config(url: str | None, basename: str) -> dict | None:
    if not url or url == "memory":
        return None
    return {"type": "redis", "basename": basename.encode(), "redis": parse_redis_url(url)}


def make_lsh(num_perm: int, bands: int, rows: int, storage: dict | None) -> MinHashLSH:
    from datasketch import MinHashLSH  # imported only where used: it pulls in scipy

    return MinHashLSH(num_perm=num_perm, params=(bands, rows), storage_config=storage, prepickle=False)


def band_buckets(lsh: MinHashLSH, redis_client=None, batch: int = 10000) -> Iterator[list[int]]:
    """Every bucket of every band that holds two or more keys, as a sorted list of int keys."""
    for table in lsh.hashtables:
        if redis_client is None:
            for h in table.keys():
                members = table.get(h)
                if len(members) > 1:
                    yield sorted(key_int(m) for m in members)
            continue
        names = table.keys()
        for i in range(0, len(names), batch):
            chunk = names[i : i + batch]
            pipe = redis_client.pipeline(transaction=False)
            for h in chunk:
                pipe.scard(table.redis_key(h))
            multi = [h for h, c in zip(chunk, pipe.execute(), strict=True) if c > 1]
            if multi:
                for members in table.getmany(*multi):
                    yield sorted(key_int(m) for m in members)


_BAND_M = np.uint64(0x9E3779B97F4A7C15)


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per (document, band): a hash of the band's ``rows`` MinHash values.

    The compact in-memory form of the banded index (8 bytes per band instead of datasketch's
    Python bytes keys and sets); buckets are then checked value by value, so they equal
    datasketch's exactly (see ``memory_buckets``).
    """
    v = np.ascontiguousarray(sig[:, : bands * rows]).reshape(len(sig), bands, rows)
    h = np.zeros((len(sig), bands), dtype=np.uint64)
    for j in range(rows):
        h = fmix64(h * _BAND_M + v[:, :, j])
    return h


def memory_buckets(keys: np.ndarray, hashes: np.ndarray, band_values) -> Iterator[list[int]]:
    """Every bucket of every band holding ≥ 2 keys, as sorted int keys: the in-memory index.

    ``keys`` [n] int64 document keys, ``hashes`` [n × bands] from ``band_hashes``, and
    ``band_values(positions, band)`` → the band's MinHash values of those documents. Documents share
    a bucket when their band values are equal, exactly as in datasketch's ``MinHashLSH`` (whose
    bucket key is the band's values): equal hashes are confirmed on the values themselves, so a hash
    collision never merges two buckets.
    """
    for b in range(hashes.shape[1] if hashes.ndim == 2 else 0):
        order = np.argsort(hashes[:, b], kind="stable")
        hb = hashes[order, b]
        if len(hb) < 2:
            continue
        same = hb[1:] == hb[:-1]
        if not same.any():
            continue
        # runs of equal hashes: starts where a run begins, ends one past it
        edge = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
        for lo, hi in zip(edge[::2].tolist(), (edge[1::2] + 1).tolist(), strict=True):
            pos = order[lo:hi]
            vals = band_values(pos, b)
            groups: dict[bytes, list[int]] = {}
            for p, row in zip(pos.tolist(), vals, strict=True):
                groups.setdefault(row.tobytes(), []).append(int(keys[p]))
            for members in groups.values():
                if len(members) > 1:
                    yield sorted(members)


def stored_signatures(lsh: MinHashLSH, keys: list[int]) -> np.ndarray:
    """The first bands × rows MinHash values of each key, read back from the index's key table.

    datasketch stores, per key, each band's values as byte-swapped bytes; concatenating the bands
    recovers the signature, so candidates can be verified without a second copy of the signatures.
    """
    out = np.empty((len(keys), lsh.b * lsh.r), dtype=np.uint64)
    for start in range(0, len(keys), 10000):
        part = keys[start : start + 10000]
        rows = lsh.keys.getmany(*[key_bytes(k) for k in part])
        for j, bands in enumerate(rows):
            if len(bands) < lsh.b:
                raise ValueError(f"document key {part[j]} is missing from the LSH index")
            out[start + j] = np.frombuffer(b"".join(bands[: lsh.b]), dtype=">u8").astype(np.uint64)
    return out


class UnionFind:
    """Disjoint sets over int keys; each set's representative is its smallest key."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            nxt = parent.get(x, x)
            parent[x] = root
            x = nxt
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def clusters(self) -> dict[int, list[int]]:
        """representative (smallest key) → sorted members, for every set of two or more keys."""
        out: dict[int, list[int]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        for root, members in out.items():
            if root not in members:
                members.append(root)
            members.sort()
        return {r: m for r, m in out.items() if len(m) > 1}


def candidate_pairs(buckets: Iterable[list[int]], active: set[int] | None = None) -> set[tuple[int, int]]:
    """Pairs (a < b) to check: all pairs of a small bucket, a star around the first of a big one."""
    pairs: set[tuple[int, int]] = set()
    for members in buckets:
        if active is not None:
            members = [m for m in members if m in active]
        if len(members) < 2:
            continue
        if len(members) <= ALL_PAIRS_MAX:
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    pairs.add((a, b))
        else:
            first = members[0]
            for b in members[1:]:
                pairs.add((first, b))
    return pairs

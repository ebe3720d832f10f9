"""``llmctl dedup``: exact, near-duplicate (MinHash LSH) and boilerplate-line deduplication.

Three phases, each resumable at shard granularity inside the StageRun work directory:

1. **sign** (parallel over input shards, ``--workers`` processes): per document, a 128-bit hash of
   the normalised text (exact), a MinHash signature over word n-grams of it (near), and a hash of
   each normalised line, in order (boilerplate), all from one normalisation pass and one array of
   word hashes per batch. Written as ``sig/sig-K.npy`` (uint64 signatures) and ``sig/meta-K.npz``;
   with ``--lsh-storage redis://…`` the worker also inserts its signatures into the shared Redis
   index (datasketch) and publishes the per-shard hashes there.
2. **plan** (one process): exact groups (survivor: the first document in (shard, row) order), then
   LSH candidate pairs among the exact survivors — every bucket of every band holding ≥ 2 keys, from
   compact numpy band hashes in memory or from the Redis index —
   optionally verified by estimated Jaccard ≥ ``jaccard_threshold``, then connected components by
   union-find; the survivor of a cluster is its first document in (shard, row) order. Finally the
   document frequency of every normalised line over the remaining documents; lines in at least
   ``line_min_docs`` documents and at least ``line_min_frac`` of them are boilerplate.
3. **write** (parallel): each input shard K becomes ``docs-K.parquet`` without the duplicates and
   without boilerplate lines (found from phase 1's line hashes, nothing normalised twice); documents
   left with no text are dropped (reason ``boilerplate``). By default (``line_scope="edges"``) only
   the boilerplate lines of a document's leading and trailing runs go (headers, navigation,
   footers, cookie notices): frequent lines in the middle are content as often as not (``fn main()
   {`` in 547 pages of a programming book, ``} else {``), and cutting them breaks code and lists.
   ``line_scope="all"`` removes them wherever they are.

Survivors depend only on the documents' global positions, never on the number of workers or on
the order in which workers finish.

``--shard I/N`` takes input shards K with K mod N = I. With the in-memory index a task dedups its
part on its own (duplicates across parts are not found). With a Redis index every task inserts its
part into one shared index (keyed by a run id that all tasks derive from the same parameters and
inputs), waits until every shard of the input is in it, then computes the same global plan and
writes its own shards: together the N outputs equal one global run's.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import (
    MANIFEST,
    input_record,
    open_with_rejected,
    params_fingerprint,
    read_manifest,
    write_json_atomic,
)
from ..console import progress
from ..errors import StageError, UsageError
from . import dedup_lsh as L
from .dedup_minhash import _M, Signer, fmix64
from .docs import BASE_COLUMNS, check_columns, list_shards, shard_filename, write_table
from .text import normalize_lines

STAGE = "dedup"
REJECTED_STAGE = "dedup-rejected"
LINE_SCOPES = ("edges", "all")
METHODS = ("exact", "near", "lines")
KEEP, EXACT, NEAR = 0, 1, 2
REASONS = {EXACT: "exact", NEAR: "near"}
READ_ROWS = 2048


@dataclass
class DedupConfig:
    inputs: list[Path]
    out: Path
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    ngram: int = 5
    seed: int = 1
    jaccard_threshold: float = 0.75
    line_min_docs: int = 10
    line_min_frac: float = 0.0
    line_scope: str = "edges"  # remove boilerplate lines only at a document's start and end, or "all"
    lsh_storage: str = "memory"
    run_id: str | None = None
    wait_timeout: float = 3600.0
    keep_rejected: Path | None = None
    workers: int = 1
    shard: str = "0/1"
    force: bool = False

    def params(self) -> dict[str, Any]:
        p = asdict(self)
        p.pop("inputs")
        p.pop("force")
        p["out"] = str(self.out)
        p["keep_rejected"] = str(self.keep_rejected) if self.keep_rejected else None
        return p


def _validate(cfg: DedupConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise UsageError(f"--methods {','.join(cfg.methods)}: choose one or more of {','.join(METHODS)}")
    if cfg.num_perm < 2 or cfg.bands < 2 or cfg.rows < 1:
        raise UsageError("--num-perm ≥ 2, --bands ≥ 2 and --rows ≥ 1 are required")
    if cfg.bands * cfg.rows > cfg.num_perm:
        raise UsageError(
            f"--bands {cfg.bands} × --rows {cfg.rows} = {cfg.bands * cfg.rows} exceeds --num-perm {cfg.num_perm}; "
            "raise --num-perm or lower bands/rows"
        )
    if cfg.ngram < 1:
        raise UsageError("--ngram must be ≥ 1")
    if not 0.0 <= cfg.jaccard_threshold <= 1.0:
        raise UsageError(f"--jaccard-threshold {cfg.jaccard_threshold}: must be within 0…1 (0 turns verification off)")
    if not 0.0 <= cfg.line_min_frac <= 1.0:
        raise UsageError(f"--line-min-frac {cfg.line_min_frac}: must be within 0…1")
    if cfg.line_scope not in LINE_SCOPES:
        raise UsageError(f"--line-scope {cfg.line_scope!r}: choose one of {', '.join(LINE_SCOPES)}")
    if cfg.line_min_docs < 2:
        raise UsageError("--line-min-docs must be ≥ 2 (a line in one document is not repeated)")
    if cfg.workers < 1:
        raise UsageError("--workers must be ≥ 1")
    if cfg.keep_rejected is not None:
        _check_rejected_dir(Path(cfg.keep_rejected), Path(cfg.out), [Path(p) for p in cfg.inputs])


def _check_rejected_dir(rej: Path, out: Path, inputs: list[Path]) -> None:
    """--keep-rejected is a directory of its own: not --out, not inside an input (a later run would
    read the rejected docs back in), not another kind of artifact (a dedup-rejected artifact is
    this stage's own: ``StageRun`` refuses one of a run with other options), and holding nothing
    but rejected shards."""
    r = rej.resolve()
    if r == out.resolve():
        raise UsageError("--keep-rejected must be a different directory from --out")
    for p in inputs:
        home = p.resolve() if p.is_dir() else p.resolve().parent
        if r.is_relative_to(home) or home.is_relative_to(r):  # either inside the other (or the same)
            raise UsageError(f"--keep-rejected {rej}: overlaps the input {p}; choose a separate directory")
    if r.is_dir():
        if (r / MANIFEST).is_file():
            if read_manifest(r).get("stage") != REJECTED_STAGE:
                raise UsageError(f"--keep-rejected {rej}: is an llmctl artifact; choose a new or empty directory")
        other = [c.name for c in r.iterdir()
                 if c.name != MANIFEST and not (c.name.startswith("rejected-") and c.suffix == ".parquet")]
        if other:
            raise UsageError(f"--keep-rejected {rej}: holds other files ({', '.join(sorted(other)[:3])}); choose a new or empty directory")


def _scan_inputs(inputs: list[Path]) -> tuple[list[Path], list[int]]:
    """All input shards in order and their row counts; checks columns before any work starts."""
    if not inputs:
        raise UsageError("no DOCS given; pass a docs artifact directory or Parquet files")
    shards: list[Path] = []
    for p in inputs:
        shards.extend(list_shards(Path(p)))
    rows = []
    for s in shards:
        try:
            pf = pq.ParquetFile(s)
        except (OSError, pa.ArrowInvalid) as e:
            raise UsageError(f"{s}: not a readable Parquet file ({e}); rerun the stage that wrote it") from None
        check_columns(pf.schema_arrow, s, BASE_COLUMNS)
        rows.append(pf.metadata.num_rows)
    if sum(rows) == 0:
        raise UsageError(f"{', '.join(map(str, inputs))}: holds no documents; nothing to deduplicate")
    return shards, rows


# ---------------------------------------------------------------------------------------------
# phase 1: signatures
# ---------------------------------------------------------------------------------------------
_SIGNERS: dict[tuple[int, int, int], Signer] = {}


def _signer(num_perm: int, seed: int, ngram: int) -> Signer:
    key = (num_perm, seed, ngram)
    if key not in _SIGNERS:
        _SIGNERS[key] = Signer(num_perm, seed, ngram)
    return _SIGNERS[key]


_LINE_MIX = np.uint64(0xD6E8FEB86659FD93)


def _line_hashes(w: np.ndarray, words_per_line: np.ndarray) -> np.ndarray:
    """One uint64 per line from the word hashes of its normalised words (0 for a line with none).

    A polynomial over the words' 64-bit hashes (as for shingles), mixed with the line's word count
    and finalised with fmix64: computed for every line of a batch in a few vector operations, from
    the word hashes the MinHash step needs anyway. Equal normalised lines get equal hashes in every
    process and on every machine.
    """
    out = np.zeros(len(words_per_line), dtype=np.uint64)
    nonempty = np.flatnonzero(words_per_line)
    if len(w) == 0 or len(nonempty) == 0:
        return out
    wpl = words_per_line[nonempty]
    ends = np.cumsum(wpl)
    starts = ends - wpl
    # position of each word counted from its line's end: weight M ** (words after it in the line)
    from_end = np.repeat(ends, wpl) - 1 - np.arange(len(w), dtype=np.int64)
    pw = _powers(int(wpl.max()))
    h = np.add.reduceat(w * pw[from_end], starts)
    h = fmix64(h ^ (wpl.astype(np.uint64) * _LINE_MIX))
    h[h == 0] = 1  # 0 marks a line with no words
    out[nonempty] = h
    return out


_POW = np.ones(1, dtype=np.uint64)


def _powers(need: int) -> np.ndarray:
    """M ** i mod 2**64 for i < need (cached, grown on demand)."""
    global _POW
    if len(_POW) < need:
        p = np.full(max(need, 2 * len(_POW)), _M, dtype=np.uint64)
        p[0] = 1
        _POW = np.cumprod(p)
    return _POW[:need]


def _redis_shard_key(basename: str, k: int) -> str:
    return f"{basename}:shard:{k:05d}"


def sign_shard(task: dict) -> dict:
    """Phase 1 for one input shard (runs in a worker process)."""
    path, k = Path(task["path"]), task["k"]
    signer = _signer(task["num_perm"], task["seed"], task["ngram"])
    want_lines = task["lines"]
    ids: list[str] = []
    exact = []
    sigs = []
    has_parts = []
    has_text = []
    seq_parts = []  # per line of every document, in order: its hash (0 = nothing comparable)
    lines_per_doc: list[int] = []
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=READ_ROWS, columns=["id", "text"]):
        ids.extend(str(x) for x in batch.column("id").to_pylist())
        tokens: list[str] = []
        n_words = []
        words_per_line: list[int] = []
        for t in batch.column("text").to_pylist():
            nlines = normalize_lines(t or "")
            norm = " ".join(x for x in nlines if x)
            exact.append(hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest())
            has_text.append(bool(norm))
            toks = norm.split()
            tokens.extend(toks)
            n_words.append(len(toks))
            if want_lines:
                words_per_line.extend(x.count(" ") + 1 if x else 0 for x in nlines)
                lines_per_doc.append(len(nlines))
        w = signer.shingler.word_hashes(tokens)
        sig, has = signer.signatures_of_words(w, np.array(n_words, dtype=np.int64))
        sigs.append(sig)
        has_parts.append(has)
        if want_lines:
            seq_parts.append(_line_hashes(w, np.array(words_per_line, dtype=np.int64)))
    n = len(ids)
    sig = np.concatenate(sigs) if sigs else np.zeros((0, signer.num_perm), dtype=np.uint64)
    has = np.concatenate(has_parts) if has_parts else np.zeros(0, dtype=bool)
    exact_arr = np.frombuffer(b"".join(exact), dtype=np.uint64).reshape(n, 2) if n else np.zeros((0, 2), np.uint64)
    if want_lines:
        seq = np.concatenate(seq_parts) if seq_parts else np.zeros(0, dtype=np.uint64)
        seq_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lines_per_doc, out=seq_off[1:])
        lines, line_off = _distinct_per_doc(seq, seq_off)
    else:
        seq, seq_off = np.zeros(0, dtype=np.uint64), np.zeros(n + 1, dtype=np.int64)
        lines, line_off = seq, seq_off
    meta = {
        "exact": exact_arr,
        "has_sig": has,
        "has_text": np.array(has_text, dtype=bool),
        "ids": np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1"),
        "lines": lines,
        "line_off": line_off,
        "line_seq": seq,
        "line_seq_off": seq_off,
    }
    with open(task["sig_partial"], "wb") as f:
        np.save(f, sig)
    with open(task["meta_partial"], "wb") as f:
        np.savez(f, **meta)
    if task["storage"] is not None:
        _publish_to_redis(task, k, sig, meta)
    return {"k": k, "docs": n}


def _distinct_per_doc(seq: np.ndarray, seq_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's distinct non-empty line hashes (sorted), concatenated, and their offsets."""
    n = len(seq_off) - 1
    doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(seq_off))
    keep = seq != 0
    doc, h = doc[keep], seq[keep]
    order = np.lexsort((h, doc))
    doc, h = doc[order], h[order]
    first = np.ones(len(h), dtype=bool)
    first[1:] = (h[1:] != h[:-1]) | (doc[1:] != doc[:-1])
    doc, h = doc[first], h[first]
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(doc, minlength=n), out=off[1:])
    return h, off


def _publish_to_redis(task: dict, k: int, sig: np.ndarray, meta: dict) -> None:
    """Insert this shard's signatures into the shared index, then publish its per-document hashes."""
    import redis

    signer = _signer(task["num_perm"], task["seed"], task["ngram"])
    lsh = L.make_lsh(task["num_perm"], task["bands"], task["rows"], task["storage"])
    exact_first = _exact_first_in_shard(meta["exact"], meta["has_text"]) if task["exact"] else None
    with lsh.insertion_session(buffer_size=20000) as session:
        for row in np.flatnonzero(meta["has_sig"]):
            if exact_first is not None and not exact_first[row]:
                continue  # a copy of an earlier document of this shard: never a survivor
            session.insert(L.key_bytes(L.doc_key(k, int(row))), signer.minhash(sig[row]), check_duplication=False)
    client = redis.Redis(**task["storage"]["redis"])
    # what the global plan needs; the per-line sequence stays local (only this task writes shard k)
    fields = {name: _to_bytes(arr) for name, arr in meta.items() if not name.startswith("line_seq")}
    fields["n"] = str(len(meta["has_sig"]))
    client.hset(_redis_shard_key(task["basename"], k), mapping=fields)


def _exact_first_in_shard(exact: np.ndarray, has_text: np.ndarray) -> np.ndarray:
    first = np.zeros(len(exact), dtype=bool)
    if len(exact):
        _, idx = np.unique(exact, axis=0, return_index=True)
        first[idx] = True
    return first | ~has_text


def _to_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype.kind == "U":
        return "\n".join(arr.tolist()).encode("utf-8")
    return arr.tobytes()


def _meta_from_redis(fields: dict[bytes, bytes], num_perm: int) -> dict:
    n = int(fields[b"n"])
    ids = fields[b"ids"].decode("utf-8").split("\n") if n else []
    return {
        "exact": np.frombuffer(fields[b"exact"], dtype=np.uint64).reshape(n, 2),
        "has_sig": np.frombuffer(fields[b"has_sig"], dtype=bool),
        "has_text": np.frombuffer(fields[b"has_text"], dtype=bool),
        "ids": np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1"),
        "lines": np.frombuffer(fields[b"lines"], dtype=np.uint64),
        "line_off": np.frombuffer(fields[b"line_off"], dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------
# phase 2: the plan
# ---------------------------------------------------------------------------------------------
def _histogram(sizes: list[int]) -> dict[str, int]:
    bins = [(2, 2), (3, 3), (4, 5), (6, 10), (11, 100), (101, None)]
    out = {}
    for lo, hi in bins:
        label = str(lo) if hi == lo else (f"{lo}-{hi}" if hi else f">{lo - 1}")
        out[label] = sum(1 for s in sizes if s >= lo and (hi is None or s <= hi))
    return out


def _plan(cfg: DedupConfig, shard_ids: list[int], metas: dict[int, dict], sig_paths: dict[int, Path],
          lsh_storage: dict | None, redis_client) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray],
                                                          np.ndarray, dict[str, Any]]:
    """Decide every document's fate: reason code per doc, the key of its survivor, boilerplate lines."""
    stats: dict[str, Any] = {}
    reason = {k: np.zeros(len(metas[k]["has_sig"]), dtype=np.int8) for k in shard_ids}
    dup_of = {k: np.full(len(metas[k]["has_sig"]), -1, dtype=np.int64) for k in shard_ids}

    # exact: survivor = first document in (shard, row) order among identical normalised texts
    t0 = time.time()
    if "exact" in cfg.methods:
        keys = np.concatenate([
            (np.int64(k) << 32) + np.flatnonzero(metas[k]["has_text"]).astype(np.int64) for k in shard_ids
        ])
        hashes = np.concatenate([metas[k]["exact"][metas[k]["has_text"]] for k in shard_ids])
        if len(keys):
            _, first, inverse, counts = np.unique(hashes, axis=0, return_index=True, return_inverse=True,
                                                  return_counts=True)
            inverse = inverse.reshape(-1)
            survivor = keys[first][inverse]
            dups = np.flatnonzero(survivor != keys)
            for i in dups:
                s, r = L.split_key(int(keys[i]))
                reason[s][r] = EXACT
                dup_of[s][r] = survivor[i]
            sizes = counts[counts > 1].tolist()
        else:
            sizes = []
        stats["exact_clusters"] = len(sizes)
        stats["exact_cluster_sizes"] = _histogram(sizes)
    stats["seconds_exact"] = round(time.time() - t0, 3)

    # near: LSH buckets → candidate pairs → verification → union-find
    t0 = time.time()
    if "near" in cfg.methods:
        active: set[int] = set()
        for k in shard_ids:
            ok = metas[k]["has_sig"] & (reason[k] == KEEP)
            active.update(int(x) for x in (np.int64(k) << 32) + np.flatnonzero(ok).astype(np.int64))
        if lsh_storage is None:  # in-memory index: band hashes (uint64) of the signature files
            lsh = None
            mms = {k: np.load(sig_paths[k], mmap_mode="r") for k in shard_ids}
            key_parts, hash_parts = [], []
            for k in shard_ids:
                ok = np.flatnonzero(metas[k]["has_sig"] & (reason[k] == KEEP))
                key_parts.append((np.int64(k) << 32) + ok.astype(np.int64))
                hash_parts.append(L.band_hashes(np.asarray(mms[k][ok]), cfg.bands, cfg.rows))
            keys_arr = np.concatenate(key_parts) if key_parts else np.zeros(0, dtype=np.int64)
            hashes = np.concatenate(hash_parts) if hash_parts else np.zeros((0, cfg.bands), dtype=np.uint64)
            r = cfg.rows

            def band_values(pos: np.ndarray, b: int) -> list[np.ndarray]:
                out = []
                for key in keys_arr[pos].tolist():
                    s, row = L.split_key(key)
                    out.append(np.asarray(mms[s][row, b * r : (b + 1) * r]))
                return out

            buckets = L.memory_buckets(keys_arr, hashes, band_values)
        else:
            lsh = L.make_lsh(cfg.num_perm, cfg.bands, cfg.rows, lsh_storage)
            buckets = L.band_buckets(lsh, redis_client)
        pairs = sorted(L.candidate_pairs(buckets, active))
        stats["candidate_pairs"] = len(pairs)
        if pairs and cfg.jaccard_threshold > 0:
            sim = _pair_similarity(pairs, lsh, sig_paths, cfg)
            kept = [p for p, s in zip(pairs, sim.tolist(), strict=True) if s >= cfg.jaccard_threshold]
        else:
            kept = pairs
        stats["verified_pairs"] = len(kept)
        uf = L.UnionFind()
        for a, b in kept:
            uf.union(a, b)
        clusters = uf.clusters()
        for root, members in clusters.items():
            for m in members[1:]:
                s, r = L.split_key(m)
                reason[s][r] = NEAR
                dup_of[s][r] = root
        # an exact copy names its group's survivor, which the near step may have removed in turn:
        # point it at the document kept in their place instead (a near cluster's root is kept)
        for k in shard_ids:
            for r in np.flatnonzero(reason[k] == EXACT).tolist():
                s, r2 = L.split_key(int(dup_of[k][r]))
                if reason[s][r2] == NEAR:
                    dup_of[k][r] = dup_of[s][r2]
        sizes = [len(m) for m in clusters.values()]
        stats["near_clusters"] = len(sizes)
        stats["near_cluster_sizes"] = _histogram(sizes)
        stats["near_largest_cluster"] = max(sizes, default=0)
    stats["seconds_near"] = round(time.time() - t0, 3)

    # boilerplate lines: document frequency over the documents that are still in
    t0 = time.time()
    boiler = np.zeros(0, dtype=np.uint64)
    if "lines" in cfg.methods:
        parts = []
        n_docs = 0
        for k in shard_ids:
            m = metas[k]
            keep_rows = np.flatnonzero(reason[k] == KEEP)
            n_docs += len(keep_rows)
            off = m["line_off"]
            if len(keep_rows) == len(off) - 1:
                parts.append(m["lines"])
            else:
                parts.extend(m["lines"][off[r] : off[r + 1]] for r in keep_rows)
        allh = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        uniq, counts = np.unique(allh, return_counts=True)
        need = max(cfg.line_min_docs, math.ceil(cfg.line_min_frac * n_docs))
        boiler = uniq[counts >= need]
        stats["boilerplate_min_docs"] = need
        stats["boilerplate_distinct_lines"] = len(boiler)
    stats["seconds_lines_count"] = round(time.time() - t0, 3)
    return reason, dup_of, boiler, stats


def edge_runs(boiler: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    """The boilerplate lines of a document's leading and trailing runs: lines from the start (and
    back from the end) up to its first (last) non-empty line that is not boilerplate."""
    keep_from = np.flatnonzero(nonempty & ~boiler)
    if len(keep_from) == 0:
        return boiler.copy()  # nothing but boilerplate and blank lines: all of it is edge
    out = boiler.copy()
    out[keep_from[0] : keep_from[-1] + 1] = False
    return out


def _pair_similarity(pairs: list[tuple[int, int]], lsh, sig_paths: dict[int, Path], cfg: DedupConfig) -> np.ndarray:
    """Estimated Jaccard of each candidate pair over the first bands × rows MinHash values."""
    width = cfg.bands * cfg.rows
    keys = sorted({k for p in pairs for k in p})
    pos = {k: i for i, k in enumerate(keys)}
    if sig_paths and all(L.split_key(k)[0] in sig_paths for k in keys):
        sigs = np.empty((len(keys), width), dtype=np.uint64)
        by_shard: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_shard.setdefault(L.split_key(k)[0], []).append(i)
        for s, idx in by_shard.items():
            mm = np.load(sig_paths[s], mmap_mode="r")
            rows = [L.split_key(keys[i])[1] for i in idx]
            sigs[idx] = mm[rows, :width]
    else:  # other machines' documents: read the signatures back from the shared index
        sigs = L.stored_signatures(lsh, keys)
    a = np.array([pos[p[0]] for p in pairs])
    b = np.array([pos[p[1]] for p in pairs])
    out = np.empty(len(pairs))
    for i in range(0, len(pairs), 65536):
        out[i : i + 65536] = np.mean(sigs[a[i : i + 65536]] == sigs[b[i : i + 65536]], axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# phase 3: write
# ---------------------------------------------------------------------------------------------
def write_shard(task: dict) -> dict:
    """Phase 3 for one input shard: drop duplicates, strip boilerplate lines, write docs + rejected.

    Boilerplate lines are found from the per-line hashes phase 1 kept (``line_seq``), so no text is
    normalised again; only documents holding such a line are split and rejoined.
    """
    plan = np.load(task["plan"])
    reason, dup_of_id = plan["reason"], plan["dup_of_id"]
    table = pq.read_table(task["path"])
    texts = table.column("text").to_pylist()
    boiler_doc = np.zeros(len(texts), dtype=bool)
    if task["boiler"]:
        boiler = np.load(task["boiler"])
        meta = np.load(task["meta"])
        seq, seq_off = meta["line_seq"], meta["line_seq_off"]
        is_boiler = np.isin(seq, boiler) if len(boiler) else np.zeros(len(seq), dtype=bool)
        if len(seq):
            boiler_doc = np.add.reduceat(is_boiler.astype(np.int64), seq_off[:-1]) > 0
        nonempty = seq != 0
    keep_idx, rej_idx, rej_reason, rej_dup = [], [], [], []
    new_texts: list[str] = []
    lines_removed = chars_removed = 0
    for i, t in enumerate(texts):
        code = int(reason[i])
        if code != KEEP:
            rej_idx.append(i)
            rej_reason.append(REASONS[code])
            rej_dup.append(str(dup_of_id[i]))
            continue
        t = t or ""
        if boiler_doc[i]:
            lo, hi = seq_off[i], seq_off[i + 1]
            drop_arr = is_boiler[lo:hi] if task["line_scope"] == "all" else edge_runs(is_boiler[lo:hi], nonempty[lo:hi])
            drop = drop_arr.tolist()
            lines = t.split("\n")
            kept = [line for line, d in zip(lines, drop, strict=True) if not d]
            removed = len(lines) - len(kept)
            lines_removed += removed
            chars_removed += sum(len(line) + 1 for line, d in zip(lines, drop, strict=True) if d)
            if not (nonempty[lo:hi] & ~drop_arr).any():
                rej_idx.append(i)
                rej_reason.append("boilerplate")
                rej_dup.append(None)
                continue
            t = "\n".join(kept).strip("\n")
        keep_idx.append(i)
        new_texts.append(t)
    col = table.schema.get_field_index("text")
    out = table.take(pa.array(keep_idx, pa.int64()))
    out = out.set_column(col, table.schema.field(col), pa.array(new_texts, table.schema.field(col).type))
    write_table(out, Path(task["out_partial"]))
    if task["rejected"] is not None:  # one shard per input shard, empty too (it marks the shard done)
        rej = table.take(pa.array(rej_idx, pa.int64()))
        rej = rej.append_column("reason", pa.array(rej_reason, pa.string()))
        rej = rej.append_column("duplicate_of", pa.array(rej_dup, pa.string()))
        write_table(rej, Path(task["rejected"]))
    counts = Counter(rej_reason)
    return {
        "k": task["k"],
        "docs_in": len(texts),
        "docs_out": len(keep_idx),
        "exact": counts.get("exact", 0),
        "near": counts.get("near", 0),
        "boilerplate": counts.get("boilerplate", 0),
        "lines_removed": lines_removed,
        "chars_removed_by_lines": chars_removed,
    }


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _pool(workers: int) -> ProcessPoolExecutor | None:
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None


def _map(pool, fn, tasks: list[dict], on_done) -> None:
    if pool is None:
        for t in tasks:
            on_done(t, fn(t))
        return
    futures = {pool.submit(fn, t): t for t in tasks}
    for fut in as_completed(futures):
        on_done(futures[fut], fut.result())


def run(cfg: DedupConfig) -> dict[str, Any]:
    """Run the dedup stage; returns the manifest (the old one if the run was already complete)."""
    _validate(cfg)
    part, n_parts = _parse_shard(cfg.shard)
    shards, rows = _scan_inputs([Path(p) for p in cfg.inputs])
    redis_client = L.check_redis(cfg.lsh_storage) if cfg.lsh_storage not in ("", "memory") else None
    params = cfg.params()
    # all tasks of one job array (and all workers) share this id; other runs get other ids
    shared = {k: v for k, v in params.items() if k not in ("out", "workers", "shard", "keep_rejected", "wait_timeout")}
    # inputs to fingerprint: an artifact by its manifest, a plain folder of Parquet files file by file
    fp_inputs = [Path(p) for p in cfg.inputs if (Path(p) / MANIFEST).is_file() or Path(p).is_file()]
    fp_inputs += [s for s in shards if not any(s.is_relative_to(Path(p)) for p in fp_inputs)]
    run_id = cfg.run_id or params_fingerprint(shared, [input_record(p) for p in fp_inputs])[:16]
    basename = f"llmctl-dedup:{run_id}"
    storage = L.storage_config(cfg.lsh_storage, basename) if redis_client is not None else None
    mine = [k for k in range(len(shards)) if k % n_parts == part]

    # the rejected documents are an artifact of their own (manifest, atomic publish), so another
    # run's are never overwritten unasked, and its counts say which run they came from
    rejected = Path(cfg.keep_rejected) if cfg.keep_rejected is not None else None
    run_, rej_run = open_with_rejected(cfg.out, STAGE, rejected, REJECTED_STAGE, params, fp_inputs, cfg.force)
    if run_.done:
        return {**run_.manifest, "already_complete": True}
    t_start = time.time()
    pool = _pool(min(cfg.workers, max(1, len(mine))))
    try:
        # phase 1 ------------------------------------------------------------------------------
        sig_paths = {k: run_.path(f"sig/sig-{k:05d}.npy") for k in mine}
        todo = []
        for k in mine:
            meta_name = f"sig/meta-{k:05d}.npz"
            if run_.has(meta_name) and (redis_client is None or redis_client.exists(_redis_shard_key(basename, k))):
                continue
            todo.append({
                "path": str(shards[k]), "k": k, "num_perm": cfg.num_perm, "seed": cfg.seed, "ngram": cfg.ngram,
                "bands": cfg.bands, "rows": cfg.rows, "lines": "lines" in cfg.methods,
                "exact": "exact" in cfg.methods, "storage": storage, "basename": basename,
                "sig_partial": str(run_.partial(f"sig/sig-{k:05d}.npy")),
                "meta_partial": str(run_.partial(meta_name)),
            })
        t0 = time.time()
        with progress() as bar:
            task_id = bar.add_task("dedup: signatures", total=sum(rows[t["k"]] for t in todo), unit="docs")

            def signed(task: dict, res: dict) -> None:
                run_.commit(f"sig/sig-{res['k']:05d}.npy")
                run_.commit(f"sig/meta-{res['k']:05d}.npz")
                bar.advance(task_id, res["docs"])

            _map(pool, sign_shard, todo, signed)
        t_sign = time.time() - t0

        # phase 2 ------------------------------------------------------------------------------
        t0 = time.time()
        if redis_client is not None:
            plan_shards = list(range(len(shards)))
            metas = _wait_for_shards(redis_client, basename, plan_shards, cfg)
            local_sigs = {}
        else:
            plan_shards = mine
            metas = {k: _load_meta(run_.path(f"sig/meta-{k:05d}.npz")) for k in mine}
            local_sigs = sig_paths
        reason, dup_of, boiler, plan_stats = _plan(cfg, plan_shards, metas, local_sigs, storage, redis_client)
        boiler_path = run_.partial("plan/boilerplate.npy")
        with open(boiler_path, "wb") as f:
            np.save(f, boiler)
        run_.commit("plan/boilerplate.npy")
        for k in mine:
            ids_of = {}
            for key in set(dup_of[k][dup_of[k] >= 0].tolist()):
                s, r = L.split_key(key)
                ids_of[key] = str(metas[s]["ids"][r])
            dup_ids = np.array([ids_of.get(int(x), "") for x in dup_of[k]], dtype=str)
            with open(run_.partial(f"plan/plan-{k:05d}.npz"), "wb") as f:
                np.savez(f, reason=reason[k], dup_of_id=dup_ids)
            run_.commit(f"plan/plan-{k:05d}.npz")
        t_plan = time.time() - t0

        # phase 3 ------------------------------------------------------------------------------
        t0 = time.time()
        per_shard: dict[int, dict] = {}
        todo = []
        for k in mine:
            name, stats_name = shard_filename(k), f"parts/stats-{k:05d}.json"
            rej_name = shard_filename(k, "rejected")
            if run_.has(name) and run_.has(stats_name) and (rej_run is None or rej_run.has(rej_name)):
                per_shard[k] = json.loads(run_.path(stats_name).read_text())
                continue
            todo.append({
                "path": str(shards[k]), "k": k, "plan": str(run_.path(f"plan/plan-{k:05d}.npz")),
                "boiler": str(run_.path("plan/boilerplate.npy")) if "lines" in cfg.methods else None,
                "line_scope": cfg.line_scope,
                "meta": str(run_.path(f"sig/meta-{k:05d}.npz")),
                "out_partial": str(run_.partial(name)),
                "rejected": str(rej_run.partial(rej_name)) if rej_run is not None else None,
            })
        with progress() as bar:
            task_id = bar.add_task("dedup: writing", total=sum(rows[t["k"]] for t in todo), unit="docs")

            def written(task: dict, res: dict) -> None:
                k = res["k"]
                write_json_atomic(run_.partial(f"parts/stats-{k:05d}.json"), res)
                run_.commit(shard_filename(k))
                if rej_run is not None:
                    rej_run.commit(shard_filename(k, "rejected"))
                run_.commit(f"parts/stats-{k:05d}.json")
                per_shard[k] = res
                bar.advance(task_id, res["docs_in"])

            _map(pool, write_shard, todo, written)
        t_write = time.time() - t0
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    totals = Counter()
    for res in per_shard.values():
        totals.update({k: v for k, v in res.items() if k != "k"})
    wall = time.time() - t_start
    stats: dict[str, Any] = {
        "docs_in": totals["docs_in"],
        "docs_out": totals["docs_out"],
        "removed": {"exact": totals["exact"], "near": totals["near"], "boilerplate": totals["boilerplate"]},
        "lines_removed": totals["lines_removed"],
        "chars_removed_by_lines": totals["chars_removed_by_lines"],
        "shards": len(mine),
        **plan_stats,
        "seconds_signatures": round(t_sign, 3),
        "seconds_plan": round(t_plan, 3),
        "seconds_write": round(t_write, 3),
        "docs_per_second": round(totals["docs_in"] / wall, 1) if wall > 0 else None,
    }
    for tmp_dir in ("sig", "plan", "parts"):
        shutil.rmtree(run_.path(tmp_dir), ignore_errors=True)
    files = [shard_filename(k) for k in mine]
    extra = {}
    if rej_run is not None:
        rej_run.finish({"docs": totals["docs_in"] - totals["docs_out"], "removed": stats["removed"]},
                       files=[shard_filename(k, "rejected") for k in mine], rejected_from=str(Path(cfg.out).absolute()))
        extra["rejected"] = str(Path(cfg.keep_rejected).absolute())
    return run_.finish(stats, files=files, run_id=run_id, lsh_basename=basename if storage else None,
                       input_shards=[str(s) for s in shards], **extra)


def _load_meta(path: Path) -> dict:
    """What the plan needs of a shard's phase-1 metadata (not the per-line sequence: phase 3 reads it)."""
    with np.load(path) as f:
        return {name: f[name] for name in f.files if not name.startswith("line_seq")}


def _parse_shard(spec: str) -> tuple[int, int]:
    from ..cli.common import parse_shard

    return parse_shard(spec)


def _wait_for_shards(client, basename: str, shard_ids: list[int], cfg: DedupConfig) -> dict[int, dict]:
    """Barrier of a job array: wait until every shard of the input is in the shared index."""
    deadline = time.time() + cfg.wait_timeout
    while True:
        pipe = client.pipeline(transaction=False)
        for k in shard_ids:
            pipe.exists(_redis_shard_key(basename, k))
        present = pipe.execute()
        missing = [k for k, p in zip(shard_ids, present, strict=True) if not p]
        if not missing:
            break
        if time.time() > deadline:
            raise StageError(
                f"waited {cfg.wait_timeout:.0f}s for {len(missing)} input shard(s) (e.g. {missing[0]}) to reach the "
                f"shared index {basename}; start the other --shard tasks or raise --wait-timeout"
            )
        time.sleep(0.25)
    metas = {}
    for k in shard_ids:
        metas[k] = _meta_from_redis(client.hgetall(_redis_shard_key(basename, k)), cfg.num_perm)
    return metas

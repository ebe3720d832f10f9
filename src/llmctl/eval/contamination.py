"""Test-set contamination: n-gram overlap between task items and a training artifact.

Texts are normalised to lower-case words (runs of letters and digits, other characters dropped),
as in GPT-3's and lm-eval's decontamination; an item is contaminated when any of its n-grams
(13 by default) occurs in the training data. An item shorter than n words is checked as one
gram of all its words. Only the items' n-grams are held in memory; the training data (a docs
artifact or Parquet files, text files, or a tokens artifact, decoded document by document at its
BOS/EOS separators) is streamed once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..artifacts import a_stage, read_manifest
from ..data.docs import DOC_STAGES
from ..errors import UsageError
from ..tokenizer import ENCODE_STAGE

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def item_grams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def iter_training_texts(path: Path) -> Iterator[str]:
    """Documents of a training artifact: tokens (decoded), docs/Parquet, or .txt/.jsonl files."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--contamination {path}: not found; give a docs or tokens artifact")
    stage = read_manifest(path).get("stage") if (path / "manifest.json").is_file() else None
    if stage is not None and stage not in TEXT_STAGES:
        raise UsageError(
            f"--contamination {path}: is {a_stage(stage)}; give the training data: a docs or tokens artifact, "
            "or Parquet, .txt or .jsonl files"
        )
    n = 0
    for text in _texts(path, stage):
        n += 1
        yield text
    if not n:
        raise UsageError(f"--contamination {path}: holds no text to check against; give the training data")


#: artifacts that hold training text: docs (and filter's rejected docs) and tokens
TEXT_STAGES = (*DOC_STAGES, "filter-rejected", ENCODE_STAGE)
TEXT_SUFFIXES = (".parquet", ".txt", ".jsonl")


def _texts(path: Path, stage: str | None) -> Iterator[str]:
    if stage == ENCODE_STAGE:
        yield from _token_texts(path)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    elif path.suffix in TEXT_SUFFIXES:
        files = [path]
    else:
        raise UsageError(f"--contamination {path}: not Parquet, .txt or .jsonl; give the training data in one of those")
    if not files:
        raise UsageError(f"--contamination {path}: no Parquet, .txt or .jsonl files in it")
    import json

    from ..data.docs import iter_tables

    for f in files:
        if f.suffix == ".parquet":
            for t in iter_tables([f], columns=["text"]):
                yield from (x for x in t.column("text").to_pylist() if x)
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        t = json.loads(line).get("text")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(t, str):
                        yield t
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def _token_texts(path: Path, block: int = 1 << 20) -> Iterator[str]:
    from ..tokens import TokenArtifact

    art = TokenArtifact(path)
    tok = art.tokenizer()
    seps = {i for i in (art.bos_id, art.eos_id) if i >= 0}
    for split in art.splits:
        if art.num_tokens(split) == 0:
            continue
        for shard in art.shards(split):
            carry = np.zeros(0, dtype=np.int64)
            for s in range(0, len(shard), block):
                chunk = np.concatenate([carry, np.asarray(shard[s : s + block], dtype=np.int64)])
                cut = np.flatnonzero(np.isin(chunk, list(seps)))
                last = int(cut[-1]) if len(cut) else 0
                done, carry = chunk[:last], chunk[last:]
                yield from _split_docs(tok, done, seps)
            yield from _split_docs(tok, carry, seps)


def _split_docs(tok, ids: np.ndarray, seps: set[int]) -> Iterator[str]:
    if not len(ids):
        return
    cut = np.flatnonzero(np.isin(ids, list(seps)))
    for a, b in zip([0, *(cut + 1)], [*cut, len(ids)], strict=True):
        if b > a:
            yield tok.decode(ids[a:b].tolist())


def find_contaminated(texts: Sequence[str], training: Path, n: int = 13) -> tuple[list[bool], dict[str, int]]:
    """For each item text, whether any of its n-grams occurs in the training data; and stats."""
    if n < 1:
        raise UsageError(f"--ngram {n}: must be ≥ 1")
    grams = [item_grams(t, n) for t in texts]
    owners: dict[tuple[str, ...], list[int]] = {}
    short: dict[int, set[tuple[str, ...]]] = {}  # gram length < n → items
    for i, gs in enumerate(grams):
        for g in gs:
            owners.setdefault(g, []).append(i)
            if len(g) < n:
                short.setdefault(len(g), set()).add(g)
    hit = [False] * len(texts)
    docs = train_words = 0
    lengths = sorted({n, *short})
    for doc in iter_training_texts(training):
        w = words(doc)
        docs += 1
        train_words += len(w)
        for k in lengths:
            want = owners if k == n else short[k]
            for i in range(len(w) - k + 1):
                g = tuple(w[i : i + k])
                if g in want:
                    for j in owners[g]:
                        hit[j] = True
    return hit, {"training_docs": docs, "training_words": train_words, "ngram": n}

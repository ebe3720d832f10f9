"""The tokenizer: sentencepiece BPE training, loading, and parallel encoding into token shards.

Training (``train``) fits a byte-fallback BPE on a bounded, seeded sample of the documents, with
digits split one by one and whitespace kept exactly (identity normalisation, no whitespace
collapsing, whitespace-only pieces allowed for code indentation), so ``decode(encode(x)) == x`` for
every string without U+2581 ``▁`` (sentencepiece's own space symbol: one in the text is encoded as a
space is, so it decodes as a space; the HF tokenizer of an export does the same). sentencepiece's defaults (``nmt_nfkc``, ``remove_extra_whitespaces``) are lossy:
REFERENCE.md measured 3.7% of held-out English lines not round-tripping with them, at almost the
same compression as the lossless setting.

Reserved ids are fixed for every llmctl tokenizer: ``unk=0, bos=1, eos=2, pad=3``, then the chat
role markers ``<|system|>=4, <|user|>=5, <|assistant|>=6, <|end|>=7`` (user-defined symbols, so
chat templates can be written as text; the literal string ``<|user|>`` in a document therefore
encodes to the marker too), then the 256 byte-fallback pieces ``<0x00>…<0xFF>`` (ids
8…263), then the learned merges. No dummy prefix is added: a document's first word is tokenised as
written, and encoding is a pure function of the text.

Encoding (``encode``) writes flat little-endian token files ``train-00000.bin``, ``val-00000.bin``
(uint16 when the vocabulary has at most 65,535 ids, else uint32): each document becomes
``BOS + tokens + EOS`` and the documents follow each other in input order; a shard holds exactly
``shard_tokens`` tokens (the last one fewer), so a document may continue into the next shard —
readers treat a split as one stream (see tokens.py).

Documents come from Parquet docs artifacts (or plain Parquet files), ``.jsonl`` files (a ``text``
field, optional ``id`` and ``domain``) or ``.txt`` files. A ``.txt`` file is split into documents at
blank lines by default (``txt_split="paragraphs"``: a line holding only spaces/tabs counts as
blank), or one document per line (``lines``), or the whole file as one document (``file``: use it
when the exact bytes of a file must be scored, e.g. a held-out tail of a corpus). ``.gz`` variants
of ``.txt``/``.jsonl`` are read too.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import MANIFEST, StageRun, a_stage, read_manifest, write_json_atomic
from .console import console, progress
from .errors import StageError, UsageError

# --- the reserved vocabulary ------------------------------------------------------------------
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
TOKENIZER_FILE = "tokenizer.model"
TRAIN_STAGE = "tokenize-train"
ENCODE_STAGE = "tokenize-encode"
#: the largest vocabulary whose ids are stored as uint16 (the issue's contract)
UINT16_MAX_VOCAB = 65_535
#: training sentences are cut at line boundaries into pieces of at most this many characters
CHUNK_CHARS = 4096
#: the held-out sample for bytes/token never grows beyond this many bytes
MAX_HELDOUT_BYTES = 2_000_000
#: encoding works on blocks of about this much text (the unit of parallelism and of resume)
BLOCK_BYTES = 1 << 20
BLOCK_DOCS = 8192
TXT_SPLITS = ("paragraphs", "lines", "file")

_BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


#: documents longer than this are encoded in pieces cut at word starts (same ids, much faster)
LONG_CHARS = 8192


def _cut_at_words(text: str, n: int = LONG_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``n`` characters, each cut just before a space that follows
    a non-space character. sentencepiece pieces never cross such a word start (a piece holding a
    space is whitespace only), so encoding the pieces gives exactly the ids of the whole text —
    sentencepiece's BPE encoder is several times slower on one long string than on its pieces."""
    out: list[str] = []
    i = 0
    while len(text) - i > n:
        j = text.find(" ", i + n)
        while j != -1 and text[j - 1] == " ":
            j = text.find(" ", j + 1)
        if j == -1:
            break
        out.append(text[i:j])
        i = j
    out.append(text[i:])
    return out


def _sp_encode(sp: Any, texts: list[str], add_bos: bool, add_eos: bool, num_threads: int) -> list[list[int]]:
    """sentencepiece's batch encode, with long texts cut at word starts and their ids rejoined."""
    if all(len(t) <= LONG_CHARS for t in texts):
        return sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
    flat: list[str] = []
    spans: list[tuple[int, int]] = []
    for t in texts:
        pieces = _cut_at_words(t) if len(t) > LONG_CHARS else [t]
        spans.append((len(flat), len(flat) + len(pieces)))
        flat.extend(pieces)
    ids = sp.encode(flat, num_threads=num_threads)
    head, tail = [sp.bos_id()] if add_bos else [], [sp.eos_id()] if add_eos else []
    return [head + list(chain.from_iterable(ids[a:b])) + tail for a, b in spans]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<u4")


def _unit(seed: int, tag: str, key: str) -> float:
    """A deterministic number in [0, 1) from (seed, tag, key): order- and process-independent."""
    h = hashlib.blake2b(f"{seed}\0{tag}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little") / 2.0**64


def file_fingerprint_full(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "spm:" + h.hexdigest()


# --- loading ----------------------------------------------------------------------------------
class Tokenizer:
    """A loaded llmctl tokenizer (a sentencepiece model with the reserved ids above)."""

    def __init__(self, model_file: Path, num_threads: int = -1):
        import sentencepiece as spm

        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path), num_threads=num_threads)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"{self.path}: not a sentencepiece model ({e}); run llmctl tokenize train") from e
        self.vocab_size: int = self.sp.get_piece_size()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.role_ids: dict[str, int] = {}
        for role, piece in ROLE_MARKERS.items():
            i = self.sp.piece_to_id(piece)
            if i != self.unk_id:
                self.role_ids[role] = i
        self.fingerprint = file_fingerprint_full(self.path)

    @property
    def special_ids(self) -> dict[str, int]:
        return {"unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, **self.role_ids}

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode(
        self, text: str | Sequence[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = -1
    ) -> list[int] | list[list[int]]:
        """Token ids of a string, or of each string of a list (batched, multi-threaded)."""
        if isinstance(text, str):
            return _sp_encode(self.sp, [text], add_bos, add_eos, num_threads)[0]
        return _sp_encode(self.sp, list(text), add_bos, add_eos, num_threads)

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> str | list[str]:
        """Text of ids (BOS/EOS/PAD are dropped; role markers are rendered as their text)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """UTF-8 bytes per token over ``texts`` (no BOS/EOS): the compression figure to compare."""
        texts = list(texts)
        n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        n_tok = sum(len(ids) for ids in self.encode(texts))
        return n_bytes / n_tok if n_tok else float("nan")

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"


def tokenizer_file(path: Path | str) -> Path:
    """The tokenizer.model inside an artifact/run directory, or the file itself."""
    path = Path(path)
    if path.is_dir():
        f = path / TOKENIZER_FILE
        if not f.is_file():
            raise UsageError(
                f"{path}: holds no {TOKENIZER_FILE}; pass the output of llmctl tokenize train (or a tokens/run dir)"
            )
        return f
    if path.is_file():
        return path
    raise UsageError(f"{path}: no such tokenizer; run llmctl tokenize train first")


def load_tokenizer(path: Path | str, num_threads: int = -1) -> Tokenizer:
    """Load the tokenizer of a tokenize-train/tokenize-encode artifact, a run dir, or a .model file."""
    return Tokenizer(tokenizer_file(path), num_threads=num_threads)


# --- reading documents ------------------------------------------------------------------------
@dataclass
class DocSource:
    """One input: a Parquet file, a .jsonl file or a .txt file."""

    path: Path
    kind: str  # parquet | jsonl | txt


def resolve_sources(paths: Sequence[Path]) -> tuple[list[DocSource], list[Path]]:
    """Expand DOCS arguments into readable sources, and the inputs to fingerprint for the manifest."""
    from .data.docs import list_shards

    sources: list[DocSource] = []
    inputs: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            shards = list_shards(p)
            sources += [DocSource(s, "parquet") for s in shards]
            inputs += [p] if (p / MANIFEST).is_file() else shards
            continue
        if not p.exists():
            raise UsageError(f"{p}: no such file or docs artifact; check the path")
        name = p.name.lower().removesuffix(".gz")
        if name.endswith(".parquet"):
            kind = "parquet"
        elif name.endswith(".jsonl") or name.endswith(".ndjson"):
            kind = "jsonl"
        elif name.endswith(".txt") or name.endswith(".text"):
            kind = "txt"
        else:
            raise UsageError(
                f"{p}: unknown document file type; pass a docs artifact, .parquet, .jsonl or .txt files"
            )
        sources.append(DocSource(p, kind))
        inputs.append(p)
    if not sources:
        raise UsageError("no documents given; pass a docs artifact, .parquet, .jsonl or .txt files")
    return sources, inputs


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


Doc = tuple[str, str, str]  # (id, text, domain); domain "" when the input has none


def iter_docs(
    sources: Sequence[DocSource],
    txt_split: str = "paragraphs",
    text_field: str = "text",
    bad: dict[str, int] | None = None,
) -> Iterator[Doc]:
    """Every document of the sources in order; bad records are counted in ``bad`` by reason."""
    from .data.docs import iter_tables

    bad = {} if bad is None else bad

    def count(reason: str) -> None:
        bad[reason] = bad.get(reason, 0) + 1

    for src in sources:
        base = src.path.name
        if src.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.ParquetFile(src.path).schema_arrow.names
            except Exception as e:  # pyarrow raises several kinds for a damaged file
                raise UsageError(f"{src.path}: not a readable Parquet file ({e}); rerun the stage that wrote it") from e
            cols = ["id", "text"] + (["domain"] if "domain" in names else [])
            for table in iter_tables([src.path], columns=cols):
                ids = table.column("id").to_pylist()
                texts = table.column("text").to_pylist()
                domains = table.column("domain").to_pylist() if "domain" in cols else [None] * len(ids)
                for i, t, d in zip(ids, texts, domains, strict=True):
                    if not t:
                        count("empty_text")
                        continue
                    yield str(i), t, str(d) if d is not None else ""
        elif src.kind == "jsonl":
            try:
                with _open_text(src.path) as f:
                    for lineno, line in enumerate(f):
                        if not line.strip():
                            continue
                        try:
                            obj = json.loads(line)
                        except ValueError:
                            count("bad_json")
                            continue
                        if not isinstance(obj, dict):
                            count("not_an_object")
                            continue
                        t = obj.get(text_field)
                        if not isinstance(t, str):
                            count(f"no_{text_field}_field")
                            continue
                        if not t:
                            count("empty_text")
                            continue
                        i = obj.get("id")
                        d = obj.get("domain")
                        yield (str(i) if i is not None else f"{base}#{lineno}"), t, (str(d) if d is not None else "")
            except (OSError, EOFError) as e:
                raise UsageError(f"{src.path}: unreadable ({e}); check the file") from e
        else:
            try:
                with _open_text(src.path) as f:
                    if txt_split == "lines":
                        for lineno, line in enumerate(f):
                            t = line.rstrip("\r\n")
                            if t.strip():
                                yield f"{base}#{lineno}", t, ""
                        continue
                    text = f.read()
            except (OSError, EOFError) as e:
                raise UsageError(f"{src.path}: unreadable ({e}); check the file") from e
            if txt_split == "file":
                if text:
                    yield base, text, ""
                else:
                    count("empty_text")
                continue
            for k, para in enumerate(_BLANK_LINES.split(text)):
                para = para.strip("\r\n")
                if para.strip():
                    yield f"{base}#{k}", para, ""


# --- training ---------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    docs: list[str]
    out: str
    vocab_size: int = 8192
    sample_bytes: int = 100_000_000
    heldout_fraction: float = 0.02
    character_coverage: float = 0.9995
    txt_split: str = "paragraphs"
    text_field: str = "text"
    threads: int = 0
    seed: int = 0


def _check_common(txt_split: str, threads: int) -> None:
    if txt_split not in TXT_SPLITS:
        raise UsageError(f"--txt-split {txt_split!r}: choose one of {', '.join(TXT_SPLITS)}")
    if threads < 0:
        raise UsageError(f"--threads {threads}: must be ≥ 0 (0 = all cores)")


def _chunks(text: str) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most CHUNK_CHARS characters (lines kept whole
    where they fit, newlines kept), so sentencepiece sees newlines and indentation in context."""
    if len(text) <= CHUNK_CHARS:
        yield text
        return
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > CHUNK_CHARS:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:CHUNK_CHARS]
            line = line[CHUNK_CHARS:]
        if size + len(line) > CHUNK_CHARS and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


class _BottomK:
    """Keep the items with the smallest keys whose sizes sum to at most ``budget``: a uniform,
    seeded, single-pass sample of a stream of any length in bounded memory."""

    def __init__(self, budget: int):
        self.budget = budget
        self.size = 0
        self.heap: list[tuple[float, int, str]] = []  # (-key, seq, text)
        self.seen = 0

    def offer(self, key: float, text: str) -> None:
        n = len(text.encode("utf-8", "surrogatepass"))
        if self.size + n > self.budget and self.heap and -self.heap[0][0] <= key:
            return
        self.seen += 1
        heapq.heappush(self.heap, (-key, self.seen, text))
        self.size += n
        while self.size > self.budget and self.heap:
            _, _, dropped = heapq.heappop(self.heap)
            self.size -= len(dropped.encode("utf-8", "surrogatepass"))

    def items(self) -> list[str]:
        """The sample in a fixed order (by key), independent of input order ties."""
        return [t for _, _, t in sorted(self.heap, key=lambda x: (-x[0], x[1]))]


def _trainer_options(cfg: TrainConfig, threads: int) -> dict[str, Any]:
    return dict(
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        character_coverage=cfg.character_coverage,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        user_defined_symbols=list(ROLE_MARKERS.values()),
        input_sentence_size=0,  # we sample ourselves, with our seed
        max_sentence_length=4 * CHUNK_CHARS + 16,  # bytes; a chunk is at most CHUNK_CHARS characters
        num_threads=threads,
        hard_vocab_limit=True,
        minloglevel=2,
    )


def train(cfg: TrainConfig, force: bool = False) -> dict[str, Any]:
    """Train a tokenizer on a seeded sample of ``cfg.docs`` and publish it as an artifact."""
    import sentencepiece as spm

    _check_common(cfg.txt_split, cfg.threads)
    if cfg.vocab_size < 300 or cfg.vocab_size > 1 << 22:
        raise UsageError(f"--vocab-size {cfg.vocab_size}: choose between 300 and 4,194,304 (e.g. 8192)")
    if cfg.sample_bytes < 1000:
        raise UsageError(f"--sample-bytes {cfg.sample_bytes}: too small to train on; use e.g. 100000000")
    if not 0 <= cfg.heldout_fraction < 0.5:
        raise UsageError(f"--heldout-fraction {cfg.heldout_fraction}: must be in [0, 0.5)")
    if not 0.9 <= cfg.character_coverage <= 1.0:
        raise UsageError(f"--character-coverage {cfg.character_coverage}: must be in [0.9, 1]")
    sources, inputs = resolve_sources([Path(d) for d in cfg.docs])
    params = {**asdict(cfg), "docs": [str(Path(d).resolve()) for d in cfg.docs]}
    run = StageRun.open(Path(cfg.out), TRAIN_STAGE, params, inputs, force=force)
    if run.done:
        console.print(f"{cfg.out}: already complete (same inputs and options); --force redoes it")
        return run.manifest

    threads = cfg.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    sample = _BottomK(cfg.sample_bytes)
    heldout = _BottomK(MAX_HELDOUT_BYTES)
    bad: dict[str, int] = {}
    n_docs = n_bytes = 0
    with progress() as bar:
        task = bar.add_task("sampling", total=None, unit="docs")
        for doc_id, text, _ in iter_docs(sources, cfg.txt_split, cfg.text_field, bad):
            n_docs += 1
            n_bytes += len(text)
            for k, chunk in enumerate(_chunks(text)):
                u = _unit(cfg.seed, "tok-sample", f"{doc_id}\0{k}")
                if u < cfg.heldout_fraction:
                    heldout.offer(u, chunk)
                else:
                    sample.offer(u, chunk)
            bar.advance(task)
    if not sample.heap:
        run.abandon()
        raise UsageError(f"{', '.join(cfg.docs)}: no text to train on; check the inputs")
    sentences = sample.items()
    t_read = time.perf_counter() - t0

    model = io.BytesIO()
    t1 = time.perf_counter()
    with console.status(f"training BPE (vocab {cfg.vocab_size:,}) on {sample.size / 1e6:,.1f} MB"):
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, **_trainer_options(cfg, threads)
            )
        except RuntimeError as e:
            run.abandon()
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            if "smaller than required_chars" in msg:  # the characters and specials need more ids
                raise UsageError(
                    f"--vocab-size {cfg.vocab_size}: too small for this sample's characters and special tokens ({msg}); raise it"
                ) from e
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise UsageError(
                    f"--vocab-size {cfg.vocab_size}: too large for this sample ({msg}); lower it or give more text"
                ) from e
            raise StageError(f"sentencepiece training failed: {msg}") from e
    train_seconds = time.perf_counter() - t1

    dst = run.partial(TOKENIZER_FILE)
    dst.write_bytes(model.getvalue())
    run.commit(TOKENIZER_FILE)
    tok = Tokenizer(run.path(TOKENIZER_FILE))
    held = heldout.items()
    held_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in held)
    held_tokens = sum(len(x) for x in tok.encode(held)) if held else 0
    roundtrip_ok = sum(tok.decode(ids) == t for ids, t in zip(tok.encode(held), held, strict=True)) if held else 0
    stats = {
        "docs_read": n_docs,
        "chars_read": n_bytes,
        "bad_records": bad,
        "sample_chunks": len(sentences),
        "sample_bytes": sample.size,
        "heldout_chunks": len(held),
        "heldout_bytes": held_bytes,
        "heldout_tokens": held_tokens,
        "bytes_per_token": round(held_bytes / held_tokens, 4) if held_tokens else None,
        "heldout_roundtrip_exact": f"{roundtrip_ok}/{len(held)}",
        "read_seconds": round(t_read, 3),
        "train_seconds": round(train_seconds, 3),
        "threads": threads,
    }
    return run.finish(
        stats,
        vocab_size=tok.vocab_size,
        special_ids=tok.special_ids,
        role_markers=dict(ROLE_MARKERS),
        tokenizer_fingerprint=tok.fingerprint,
        dtype=str(tok.dtype.name),
    )


# --- encoding ---------------------------------------------------------------------------------
@dataclass
class EncodeConfig:
    docs: list[str]
    tokenizer: str
    out: str
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.01
    domain_weights: dict[str, float] = field(default_factory=dict)
    shard_tokens: int = 100_000_000
    workers: int = 1
    threads: int = 0
    txt_split: str = "paragraphs"
    text_field: str = "text"
    seed: int = 0


def _why_no_train(cfg: EncodeConfig, bad: dict[str, int], in_val: int) -> str:
    """The likely cause of an empty train split, naming the option to change."""
    if in_val:
        return f"all {in_val:,} documents are also in --val; give --val other documents"
    missing = bad.get(f"no_{cfg.text_field}_field", 0)
    if missing:
        return f"{missing:,} records have no '{cfg.text_field}' field; set --text-field to the field holding the text"
    if cfg.domain_weights and all(w == 0 for w in cfg.domain_weights.values()):
        return "--domain-weights gives every listed domain weight 0; keep a weight > 0"
    skipped = ", ".join(f"{k} {v:,}" for k, v in bad.items())
    return f"skipped: {skipped}; check the inputs" if skipped else "check the inputs"


def parse_domain_weights(spec: str | None) -> dict[str, float]:
    """'web=1,code=2.5' → {'web': 1.0, 'code': 2.5}."""
    out: dict[str, float] = {}
    if not spec:
        return out
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        try:
            w = float(val)
        except ValueError:
            w = float("nan")
        if not eq or not name.strip() or not np.isfinite(w) or w < 0:
            raise UsageError(f"--domain-weights {spec!r}: expected DOMAIN=WEIGHT pairs with weights ≥ 0, e.g. web=1,code=2.5")
        out[name.strip()] = w
    return out


# worker-process state: the tokenizer is loaded once per process
_W: dict[str, Any] = {}


def _init_worker(model_file: str, threads: int) -> None:
    import sentencepiece as spm

    _W["sp"] = spm.SentencePieceProcessor(model_file=model_file)
    _W["threads"] = threads


def _encode_block(job: dict[str, Any]) -> dict[str, Any]:
    """Encode one block of documents into its train/val part files; return the block's counts.

    Runs in a worker process (or in-process with one worker): the output depends only on the
    block's documents and the settings, never on the number of workers or threads.
    """
    sp = _W["sp"]
    docs: list[Doc] = job["docs"]
    mode: str = job["mode"]  # "hash" (val by hashing ids) or "val" (all val, from --val)
    seed, val_fraction, weights = job["seed"], job["val_fraction"], job["weights"]
    dtype = np.dtype(job["dtype"])
    ids = _sp_encode(sp, [d[1] for d in docs], True, True, _W["threads"])
    out: dict[str, list[list[int]]] = {"train": [], "val": []}
    st: dict[str, Any] = {
        "train": {"docs": 0, "tokens": 0, "bytes": 0, "text_tokens": 0},
        "val": {"docs": 0, "tokens": 0, "bytes": 0, "text_tokens": 0},
        "domains": {},
    }
    for (doc_id, text, domain), toks in zip(docs, ids, strict=True):
        nb = len(text.encode("utf-8", "surrogatepass"))
        if mode == "val" or (mode == "hash" and val_fraction > 0 and _unit(seed, "val", doc_id) < val_fraction):
            split, copies = "val", 1
        else:
            split = "train"
            w = weights.get(domain, 1.0)
            copies = int(w)
            frac = w - copies
            if frac > 0 and _unit(seed, "upsample", doc_id) < frac:
                copies += 1
            d = st["domains"].setdefault(domain, {"docs": 0, "unique_tokens": 0, "tokens": 0, "copies": 0})
            d["docs"] += 1
            d["unique_tokens"] += len(toks)
            d["tokens"] += copies * len(toks)
            d["copies"] += copies
        if copies == 0:
            continue
        s = st[split]
        s["docs"] += copies
        s["tokens"] += copies * len(toks)
        s["text_tokens"] += copies * (len(toks) - 2)
        s["bytes"] += copies * nb
        out[split].extend([toks] * copies)
    for split in ("train", "val"):
        n = st[split]["tokens"]
        arr = np.fromiter(chain.from_iterable(out[split]), dtype=dtype, count=n) if n else np.empty(0, dtype)
        with open(job["parts"][split], "wb") as f:
            f.write(arr.tobytes())
    st["block"] = job["block"]
    return st


def _merge(total: dict[str, Any], st: dict[str, Any]) -> None:
    for split in ("train", "val"):
        for k, v in st[split].items():
            total[split][k] += v
    for dom, d in st["domains"].items():
        t = total["domains"].setdefault(dom, {"docs": 0, "unique_tokens": 0, "tokens": 0, "copies": 0})
        for k, v in d.items():
            t[k] += v


def _blocks(docs: Iterator[Doc]) -> Iterator[list[Doc]]:
    buf: list[Doc] = []
    size = 0
    for d in docs:
        buf.append(d)
        size += len(d[1])
        if size >= BLOCK_BYTES or len(buf) >= BLOCK_DOCS:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _write_shards(run: StageRun, split: str, block_stats: list[dict[str, Any]], dtype: np.dtype, shard_tokens: int) -> list[str]:
    """Cut the split's stream (the block parts in order) into shards of exactly ``shard_tokens``
    tokens (the last one fewer); shards committed by an interrupted run are kept."""
    parts = [(run.path(f"parts/{split}-{st['block']:06d}.bin"), st[split]["tokens"]) for st in block_stats]
    total = sum(n for _, n in parts)
    names: list[str] = []
    offsets = np.cumsum([0] + [n for _, n in parts])
    for k in range((total + shard_tokens - 1) // shard_tokens):
        name = f"{split}-{k:05d}.bin"
        names.append(name)
        if run.has(name):
            continue
        lo, hi = k * shard_tokens, min((k + 1) * shard_tokens, total)
        with open(run.partial(name), "wb") as f:
            for (p, n), off in zip(parts, offsets[:-1], strict=True):
                a, b = max(lo, off), min(hi, off + n)
                if a >= b:
                    continue
                mm = np.memmap(p, dtype=dtype, mode="r", shape=(n,))
                f.write(mm[a - off : b - off].tobytes())
                del mm
        run.commit(name)
    return names


def encode(cfg: EncodeConfig, force: bool = False) -> dict[str, Any]:
    """Encode documents into train/val token shards with the given tokenizer; publish the artifact."""
    _check_common(cfg.txt_split, cfg.threads)
    if cfg.workers < 1:
        raise UsageError(f"--workers {cfg.workers}: must be ≥ 1")
    if not 0 <= cfg.val_fraction < 1:
        raise UsageError(f"--val-fraction {cfg.val_fraction}: must be in [0, 1)")
    if cfg.val and cfg.val_fraction not in (0, EncodeConfig.val_fraction):
        raise UsageError("--val and --val-fraction both given: choose one way to make the val split")
    if cfg.shard_tokens < 1024:
        raise UsageError(f"--shard-tokens {cfg.shard_tokens}: too small; use e.g. 100000000")
    tok_path = tokenizer_file(cfg.tokenizer)
    tok_dir = Path(cfg.tokenizer)
    if tok_dir.is_dir() and (tok_dir / MANIFEST).is_file():
        st = read_manifest(tok_dir).get("stage")
        if st not in (TRAIN_STAGE, ENCODE_STAGE):
            raise UsageError(f"{tok_dir}: is {a_stage(st)}; pass the output of llmctl tokenize train")
    tok = Tokenizer(tok_path)
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise UsageError(f"{tok_path}: the tokenizer has no BOS/EOS ids; train it with llmctl tokenize train")
    sources, inputs = resolve_sources([Path(d) for d in cfg.docs])
    val_sources, val_inputs = resolve_sources([Path(d) for d in cfg.val]) if cfg.val else ([], [])
    val_fraction = 0.0 if cfg.val else cfg.val_fraction
    params = asdict(cfg)
    params.update(
        val_fraction=val_fraction,
        docs=[str(Path(d).resolve()) for d in cfg.docs],
        val=[str(Path(d).resolve()) for d in cfg.val],
        tokenizer=str(Path(cfg.tokenizer).resolve()),
    )
    run = StageRun.open(Path(cfg.out), ENCODE_STAGE, params, [*inputs, *val_inputs, tok_path], force=force)
    if run.done:
        console.print(f"{cfg.out}: already complete (same inputs and options); --force redoes it")
        return run.manifest

    dtype = tok.dtype
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    bad: dict[str, int] = {}
    val_ids: set[str] = set()
    if val_sources:
        val_ids = {d[0] for d in iter_docs(val_sources, cfg.txt_split, cfg.text_field, {})}
    excluded = {"n": 0}

    def train_docs() -> Iterator[Doc]:
        for d in iter_docs(sources, cfg.txt_split, cfg.text_field, bad):
            if d[0] in val_ids:
                excluded["n"] += 1
                continue
            yield d

    def jobs() -> Iterator[dict[str, Any]]:
        streams = [("hash", train_docs())]
        if val_sources:  # exactly the --val documents are val; every other document is train
            streams = [("train", train_docs()), ("val", iter_docs(val_sources, cfg.txt_split, cfg.text_field, bad))]
        b = 0
        for mode, stream in streams:
            for block in _blocks(stream):
                yield {
                    "block": b, "mode": mode, "docs": block, "seed": cfg.seed, "val_fraction": val_fraction,
                    "weights": cfg.domain_weights, "dtype": dtype.str,
                    "parts": {s: str(run.partial(f"parts/{s}-{b:06d}.bin")) for s in ("train", "val")},
                }
                b += 1

    (run.work / "parts").mkdir(exist_ok=True)
    totals: dict[str, Any] = {
        "train": {"docs": 0, "tokens": 0, "bytes": 0, "text_tokens": 0},
        "val": {"docs": 0, "tokens": 0, "bytes": 0, "text_tokens": 0},
        "domains": {},
    }
    block_stats: list[dict[str, Any]] = []
    resumed_blocks = 0
    t0 = time.perf_counter()
    encoded_bytes = 0

    def done(st: dict[str, Any]) -> None:
        b = st["block"]
        for s in ("train", "val"):
            run.commit(f"parts/{s}-{b:06d}.bin")
        write_json_atomic(run.partial(f"parts/block-{b:06d}.json"), st)
        run.commit(f"parts/block-{b:06d}.json")

    pool = None
    if cfg.workers > 1:
        pool = ProcessPoolExecutor(
            cfg.workers, mp_context=get_context("fork" if os.name == "posix" else "spawn"),
            initializer=_init_worker, initargs=(str(tok_path), threads),
        )
        pool.submit(int).result()  # start the workers now, before the progress bar's thread exists
    else:
        _init_worker(str(tok_path), threads)
    try:
        with progress() as bar:
            task = bar.add_task("encoding", total=None, unit="MB")
            inflight: deque[tuple[dict[str, Any], Future | None]] = deque()

            def drain(limit: int) -> None:
                nonlocal encoded_bytes
                while len(inflight) > limit:
                    job, fut = inflight.popleft()
                    st = fut.result() if fut is not None else _encode_block(job)
                    done(st)
                    block_stats.append(st)
                    _merge(totals, st)
                    mb = (st["train"]["bytes"] + st["val"]["bytes"]) / 1e6
                    encoded_bytes += st["train"]["bytes"] + st["val"]["bytes"]
                    bar.advance(task, mb)

            for job in jobs():
                marker = f"parts/block-{job['block']:06d}.json"
                if run.has(marker):
                    st = json.loads(run.path(marker).read_text(encoding="utf-8"))
                    resumed_blocks += 1
                    block_stats.append(st)
                    _merge(totals, st)
                    continue
                fut = pool.submit(_encode_block, job) if pool is not None else None
                inflight.append((job, fut))
                drain(2 * cfg.workers if pool is not None else 0)
            drain(0)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    encode_seconds = time.perf_counter() - t0
    block_stats.sort(key=lambda s: s["block"])

    if totals["train"]["tokens"] == 0:
        run.abandon()
        raise UsageError(f"{', '.join(cfg.docs)}: no documents to encode into the train split ({_why_no_train(cfg, bad, excluded['n'])})")
    files = {s: _write_shards(run, s, block_stats, dtype, cfg.shard_tokens) for s in ("train", "val")}
    shutil.rmtree(run.work / "parts", ignore_errors=True)

    domains = {}
    for dom, d in sorted(totals["domains"].items()):
        domains[dom or "(none)"] = {
            **d,
            "weight": cfg.domain_weights.get(dom, 1.0),
            "effective_epochs": round(d["tokens"] / d["unique_tokens"], 4) if d["unique_tokens"] else 0.0,
        }
    unmatched = sorted(set(cfg.domain_weights) - set(totals["domains"]))
    text_bytes = totals["train"]["bytes"] + totals["val"]["bytes"]
    text_tokens = totals["train"]["text_tokens"] + totals["val"]["text_tokens"]
    splits = {
        s: {
            "docs": totals[s]["docs"],
            "tokens": totals[s]["tokens"],
            "bytes": totals[s]["bytes"],
            "shards": files[s],
        }
        for s in ("train", "val")
    }
    stats = {
        "train_docs": totals["train"]["docs"],
        "val_docs": totals["val"]["docs"],
        "train_tokens": totals["train"]["tokens"],
        "val_tokens": totals["val"]["tokens"],
        "train_bytes": totals["train"]["bytes"],
        "val_bytes": totals["val"]["bytes"],
        "bytes_per_token": round(text_bytes / text_tokens, 4) if text_tokens else None,
        "train_docs_excluded_as_val": excluded["n"],
        "bad_records": bad,
        "domains": domains,
        "domain_weights_unmatched": unmatched,
        "blocks": len(block_stats),
        "blocks_resumed": resumed_blocks,
        "encode_seconds": round(encode_seconds, 3),
        "encode_mb_per_s": round(encoded_bytes / 1e6 / encode_seconds, 3) if encode_seconds > 0 else None,
        "workers": cfg.workers,
        "threads_per_worker": threads,
    }
    shutil.copyfile(tok_path, run.path(TOKENIZER_FILE))
    return run.finish(
        stats,
        dtype=dtype.name,
        vocab_size=tok.vocab_size,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        unk_id=tok.unk_id,
        special_ids=tok.special_ids,
        tokenizer_fingerprint=tok.fingerprint,
        train_tokens=totals["train"]["tokens"],
        val_tokens=totals["val"]["tokens"],
        train_bytes=totals["train"]["bytes"],
        val_bytes=totals["val"]["bytes"],
        bytes_per_token=stats["bytes_per_token"],
        splits=splits,
    )

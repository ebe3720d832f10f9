"""The extract stage: WARC/ARC archives → Parquet documents (main text, title, language).

Work is split in two. The main process reads the archives (``data/warc.py``), frames each
response, drops what needs no HTML parsing (non-200, non-HTML, truncated, oversized) and streams the
rest to worker processes in small batches; at most a few batches per worker are in flight, so
memory stays bounded however large the files are. Workers decode the payload (transfer and content
coding, charset: HTTP header, then ``<meta>``, then detection), run trafilatura and score the
language. Each worker publishes in shared memory when it started its current document; the main
process kills a worker whose document has run past ``timeout`` seconds, counts that document as
``timeout``, starts a replacement and resends the worker's other unfinished documents. A worker
that dies (segfault, OOM) is handled the same way (``worker_crash``).

Output: one shard per ``records_per_shard`` records of each input file, named
``docs-FFFFF-CCCCC.parquet`` (file index, chunk index), so shards never depend on timing or on
which other files were given. Each shard carries its own statistics in the Parquet metadata and is
committed atomically through :class:`~llmctl.artifacts.StageRun`; an interrupted run resumes at
shard granularity and ends with the same shards and counts as an uninterrupted one.

trafilatura settings follow FineWeb's call (``favor_precision=True, include_comments=False``) but
with ``deduplicate=False``: trafilatura's deduplication keeps an LRU cache across calls, so its
output would depend on document order and on how documents are spread over workers (REFERENCE.md).
The configuration is trafilatura's built-in default, so a user's settings file cannot change the
result.
"""

from __future__ import annotations

import codecs
import json
import multiprocessing as mp
import os
import queue
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import StageRun
from ..errors import StageError, UsageError
from . import docs as docs_mod
from .urls import host_of, registered_domain
from .warc import Problem, Record, iter_records, looks_like_html, parse_http_response, parse_warc_date, sniff

STAGE = "extract"
STATS_KEY = b"llmctl.extract.stats"
HTML_TYPES = ("text/html", "application/xhtml+xml")
ARCHIVE_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz")

EXTRA_FIELDS = [
    pa.field("title", pa.string()),
    pa.field("language", pa.string()),
    pa.field("language_score", pa.float64()),
    pa.field("domain", pa.string()),
    pa.field("content_type", pa.string()),
    pa.field("charset", pa.string()),
    pa.field("warc_record_id", pa.string()),
    pa.field("warc_file", pa.string()),
    pa.field("warc_offset", pa.int64()),
]
SCHEMA = docs_mod.schema(EXTRA_FIELDS)


@dataclass
class ExtractConfig:
    inputs: list[str]
    out: str
    workers: int = 1
    timeout: float = 30.0
    records_per_shard: int = 10_000
    max_page_bytes: int = 10 << 20
    batch_size: int = 8
    shard: str = "0/1"
    force: bool = False


# ----------------------------------------------------------------------------------------------
# inputs


def resolve_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Check every input before any work: existing, readable, non-empty WARC/ARC files.

    A directory stands for the archives directly inside it.
    """
    if not paths:
        raise UsageError("no input files; pass one or more .warc/.warc.gz/.arc files")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.name.lower().endswith(ARCHIVE_SUFFIXES))
            if not found:
                raise UsageError(f"{p}: directory holds no .warc/.warc.gz/.arc/.arc.gz files; check the path")
            files.extend(found)
        else:
            files.append(p)
    seen: set[Path] = set()
    for f in files:
        if not f.exists():
            raise UsageError(f"{f}: no such file; check the path")
        if not f.is_file():
            raise UsageError(f"{f}: not a regular file; pass WARC/ARC files or a directory of them")
        key = f.resolve()
        if key in seen:
            raise UsageError(f"{f}: given twice; pass each input once")
        seen.add(key)
        try:
            size = f.stat().st_size
            if size == 0:
                raise UsageError(f"{f}: empty file, not a WARC/ARC archive; remove it from the inputs")
            kind = sniff(f)
        except PermissionError as e:
            raise UsageError(f"{f}: not readable ({e.strerror}); fix its permissions") from e
        except OSError as e:
            raise UsageError(f"{f}: cannot read it ({e.strerror}); check the file") from e
        if kind is None:
            raise UsageError(
                f"{f}: not a WARC or ARC file (no WARC/ or ARC header at its start); pass .warc, .warc.gz or .arc files"
            )
    return files


# ----------------------------------------------------------------------------------------------
# the per-document work (runs in worker processes)

_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([a-zA-Z0-9_:.+-]{1,40})""", re.I)
_CT_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([a-zA-Z0-9_:.+-]{1,40})""", re.I)
#: labels browsers decode with a superset (WHATWG Encoding Standard)
_SUPERSETS = {
    "ascii": "cp1252", "latin_1": "cp1252", "iso8859_1": "cp1252", "cp1252": "cp1252",
    "gb2312": "gb18030", "gbk": "gb18030", "shift_jis": "cp932", "euc_kr": "cp949",
    "iso8859_9": "cp1254", "tis_620": "cp874", "iso8859_11": "cp874", "big5": "big5hkscs",
    "utf_16": "utf_8", "utf_16_le": "utf_8", "utf_16_be": "utf_8",  # a <meta>/header cannot mean UTF-16
}
_BOMS = ((codecs.BOM_UTF8, "utf_8_sig"), (codecs.BOM_UTF16_LE, "utf_16"), (codecs.BOM_UTF16_BE, "utf_16"))
#: the share of U+FFFD a lenient decode may introduce before a page counts as undecodable
MAX_REPLACED = 0.01


def codec_for(label: str | None) -> str | None:
    """A Python codec for a charset label, widened to what browsers use; None if unknown."""
    if not label:
        return None
    try:
        name = codecs.lookup(label.strip().strip("\"'").lower()).name
    except LookupError:
        return None
    name = name.replace("-", "_")
    return _SUPERSETS.get(name, name)


def header_charset(content_type: str) -> str | None:
    m = _CT_CHARSET.search(content_type or "")
    return m.group(1) if m else None


def meta_charset(body: bytes, scan: int = 8192) -> str | None:
    m = _META_CHARSET.search(body, 0, scan)
    return m.group(1).decode("ascii") if m else None


def decode_html(body: bytes, declared: str | None) -> tuple[str, str, str] | None:
    """(text, codec, source) — source is bom, header, meta or detected; None if undecodable.

    Order: a byte-order mark; then bytes that are valid UTF-8 and not all ASCII are UTF-8, whatever
    the labels say (a server's default ISO-8859-1 in front of UTF-8 pages is the common mislabel,
    and text in any other charset is practically never valid UTF-8); then the HTTP header's
    charset, the page's ``<meta>``, then detection (charset-normalizer, which on undeclared Western
    text prefers windows-1252, the web's default, over an equally plausible Baltic or Central
    European code page). A declared charset is used only if the bytes decode under it; if nothing
    decodes cleanly, the first candidate is used with replacement characters when they are rare
    (≤ 1%).
    """
    for bom, codec in _BOMS:
        if body.startswith(bom):
            try:
                return body.decode(codec), codec.removesuffix("_sig"), "bom"
            except UnicodeDecodeError:
                break
    if not body.isascii():
        try:
            return body.decode("utf_8"), "utf_8", "detected"
        except UnicodeDecodeError:
            pass
    candidates: list[tuple[str, str]] = []
    for label, source in ((declared, "header"), (meta_charset(body), "meta")):
        codec = codec_for(label)
        if codec and (codec, source) not in candidates and all(codec != c for c, _ in candidates):
            candidates.append((codec, source))
    for codec, source in candidates:
        try:
            return body.decode(codec), codec, source
        except UnicodeDecodeError:
            if codec == "cp1252":  # bytes cp1252 leaves undefined: ISO-8859-1 maps every byte
                return body.decode("latin_1"), "latin_1", source
    try:
        return body.decode("utf_8"), "utf_8", "detected"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = from_bytes(body)
    best = matches.best()
    if best is not None:
        best = next((m for m in matches if codec_for(m.encoding) == "cp1252" and m.chaos <= best.chaos + 0.1
                     and m.coherence >= best.coherence), best)
    if best is not None and best.encoding:
        codec = codec_for(best.encoding) or best.encoding
        try:
            return body.decode(codec), codec, "detected"
        except (UnicodeDecodeError, LookupError):
            candidates.append((codec, "detected"))
    for codec, source in candidates:
        try:
            text = body.decode(codec, "replace")
        except LookupError:
            continue
        if text.count("\ufffd") <= MAX_REPLACED * max(1, len(text)):
            return text, codec, source
    return None


_WS = re.compile(r"\s+")


def _title_of(tree) -> str | None:
    for el in tree.iter("title"):
        t = _WS.sub(" ", el.text_content() or "").strip()
        if t:
            return t[:1000]
    for el in tree.iter("meta"):
        if (el.get("property") or el.get("name") or "").lower() == "og:title":
            t = _WS.sub(" ", el.get("content") or "").strip()
            if t:
                return t[:1000]
    return None


_TRAF_CONFIG = None


def _trafilatura_config():
    global _TRAF_CONFIG
    if _TRAF_CONFIG is None:
        from trafilatura.settings import DEFAULT_CONFIG

        _TRAF_CONFIG = DEFAULT_CONFIG
    return _TRAF_CONFIG


def extract_text(html: str, url: str | None) -> tuple[str | None, str | None]:
    """(main text, title) of one page with trafilatura's FineWeb-style settings."""
    from trafilatura import extract
    from trafilatura.utils import load_html

    tree = load_html(html)
    if tree is None:
        return None, None
    title = _title_of(tree)
    text = extract(
        tree,
        url=url,
        favor_precision=True,
        include_comments=False,
        deduplicate=False,
        config=_trafilatura_config(),
    )
    return text, title


def process_payload(p: dict[str, Any]) -> tuple[str, dict[str, Any] | str]:
    """One response payload → ("doc", fields) or ("drop", reason). Never raises."""
    from .langid import detect
    from .warc import dechunk, decode_content

    try:
        body = p["body"]
        te = p.get("transfer_encoding", "").lower()
        if "chunked" in te:
            body = dechunk(body) or body
        ce = p.get("content_encoding", "")
        if ce:
            decoded = decode_content(body, ce)
            if decoded is None:
                if not looks_like_html(body):  # a header that lies about an already decoded body is common
                    return "drop", "bad_content_encoding"
            else:
                body = decoded
        if not p.get("mime") and not looks_like_html(body):
            return "drop", "non_html"
        decoded_html = decode_html(body, p.get("charset"))
        if decoded_html is None:
            return "drop", "undecodable"
        html, codec, _source = decoded_html
        text, title = extract_text(html, p.get("url"))
        if not text or not text.strip():
            return "drop", "empty"
        lang, score = detect(text)
        return "doc", {"text": text, "title": title, "language": lang, "language_score": score, "charset": codec}
    except Exception:  # noqa: BLE001 - one bad page must not stop the run
        return "drop", "extract_error"


def warm() -> None:
    """Load the language model and run trafilatura once (its first call imports and builds a lot)."""
    from .langid import identifier

    identifier()
    extract_text("<html><head><title>t</title></head><body><p>A short paragraph to warm up the extractor, "
                 "long enough to be kept.</p></body></html>", "http://example.com/")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_main(tasks, conn, state, main_pid: int) -> None:
    """Worker loop: take batches, publish the start time of each document, send each result."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    warm()
    parent = os.getppid()
    while True:
        try:
            batch = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent or not _alive(main_pid):
                break  # the stage was killed: do not linger as an orphan
            continue
        if batch is None:
            break
        for seq, payload in batch:
            state[0] = seq
            state[1] = time.monotonic()
            result = process_payload(payload)
            state[1] = 0.0
            conn.send((seq, result))
    conn.close()


# ----------------------------------------------------------------------------------------------
# the worker pool with a hard per-document timeout


def _mp_context():
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["llmctl.data.extract_warm"])
        return ctx
    return mp.get_context("spawn")


class _Worker:
    def __init__(self, ctx) -> None:
        self.tasks = ctx.Queue()
        recv, send = ctx.Pipe(duplex=False)
        self.conn = recv
        self.state = ctx.RawArray("d", 2)
        self.proc = ctx.Process(target=_worker_main, args=(self.tasks, send, self.state, os.getpid()), daemon=True)
        self.proc.start()
        send.close()
        self.inflight: dict[int, Any] = {}  # seq → payload, in dispatch order

    def stop(self, kill: bool = False, keep_pipe: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                self.proc.kill()
        self.proc.join(timeout=None if kill else 10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.tasks.cancel_join_thread()
        self.tasks.close()
        if not keep_pipe:
            self.conn.close()


class TimeoutPool:
    """Processes documents in worker processes; any single document is cut off after ``timeout``."""

    def __init__(self, workers: int, timeout: float, batch_size: int) -> None:
        self.ctx = _mp_context()
        self.timeout = timeout
        self.batch_size = batch_size
        self.workers = [_Worker(self.ctx) for _ in range(workers)]
        self.queue: deque[tuple[int, Any]] = deque()  # waiting to be dispatched
        self.restarts = 0
        self._barren = 0  # replacements since the last result: workers that cannot even start

    @property
    def capacity(self) -> int:
        return len(self.workers) * self.batch_size * 3

    def pending(self) -> int:
        return len(self.queue) + sum(len(w.inflight) for w in self.workers)

    def submit(self, seq: int, payload: Any) -> None:
        self.queue.append((seq, payload))

    def _dispatch(self) -> None:
        for w in sorted(self.workers, key=lambda w: len(w.inflight)):
            while self.queue and len(w.inflight) < 2 * self.batch_size:
                batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
                for seq, payload in batch:
                    w.inflight[seq] = payload
                w.tasks.put(batch)

    def _replace(self, w: _Worker, blamed_reason: str, out: list) -> None:
        """Kill ``w``, blame its current document, resend the others to a fresh worker."""
        seq_now, started = int(w.state[0]), w.state[1]
        w.stop(kill=True, keep_pipe=True)
        self._drain(w, out)  # results sent before the kill are still in the pipe
        w.conn.close()
        if started and seq_now in w.inflight:
            w.inflight.pop(seq_now)
            out.append((seq_now, ("drop", blamed_reason)))
            self._barren = 0  # a document was settled: that is progress
        else:
            self._barren += 1
        # documents not yet done go back to the front of the queue, in order
        self.queue.extendleft(reversed(list(w.inflight.items())))
        w.inflight.clear()
        if self._barren > 3 * len(self.workers) + 3:
            raise StageError(
                f"extract: worker processes keep dying (exit code {w.proc.exitcode}) before finishing any "
                "document; check memory limits and rerun with --debug"
            )
        self.workers[self.workers.index(w)] = _Worker(self.ctx)
        self.restarts += 1

    def _drain(self, w: _Worker, out: list) -> None:
        try:
            while w.conn.poll():
                seq, result = w.conn.recv()
                if w.inflight.pop(seq, None) is not None:
                    out.append((seq, result))
                    self._barren = 0
        except (EOFError, OSError, ValueError):
            pass

    def poll(self, wait: float) -> list[tuple[int, tuple[str, Any]]]:
        """Dispatch, wait up to ``wait`` s for results, enforce timeouts; return finished results."""
        self._dispatch()
        out: list = []
        busy = [w for w in self.workers if w.inflight]
        if busy:
            mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=wait)
        now = time.monotonic()
        for w in list(self.workers):
            if w.conn.poll():
                self._drain(w, out)
            if not w.inflight:
                continue
            started = w.state[1]
            if not w.proc.is_alive():
                self._drain(w, out)
                self._replace(w, "worker_crash", out)
            elif started and now - started > self.timeout:
                self._replace(w, "timeout", out)
        return out

    def close(self, kill: bool = False) -> None:
        for w in self.workers:
            w.stop(kill=kill)


# ----------------------------------------------------------------------------------------------
# shards


def shard_name(file_index: int, chunk: int) -> str:
    return f"{docs_mod.SHARD_PREFIX}-{file_index:05d}-{chunk:05d}.parquet"


def _new_stats() -> dict[str, Any]:
    return {"records": 0, "record_types": Counter(), "responses": 0, "docs": 0, "dropped": Counter(),
            "problems": Counter(), "uri_fixed": 0, "text_chars": 0}


def merge_stats(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        if isinstance(v, dict):
            c = into.setdefault(k, Counter())
            for kk, vv in v.items():
                c[kk] = c.get(kk, 0) + vv
        elif isinstance(v, int | float) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v


def _plain(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (dict(sorted(v.items())) if isinstance(v, dict) else v) for k, v in stats.items()}


@dataclass
class _Shard:
    name: str
    file_label: str
    last: bool = False
    closed: bool = False  # the reader has passed its last record
    expected: int = 0  # documents sent to workers
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # position → row
    next_pos: int = 0
    resolved: int = 0
    stats: dict[str, Any] = field(default_factory=_new_stats)

    @property
    def complete(self) -> bool:
        return self.closed and self.resolved == self.expected


def write_shard(run: StageRun, shard: _Shard) -> None:
    rows = [shard.rows[i] for i in sorted(shard.rows)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    meta = {STATS_KEY: json.dumps({"stats": _plain(shard.stats), "last": shard.last,
                                   "file": shard.file_label}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    part = run.partial(shard.name)
    docs_mod.write_table(table, part)
    run.commit(shard.name)


def read_shard_info(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[STATS_KEY])


# ----------------------------------------------------------------------------------------------
# reading: records → work items


def _payload_of(rec: Record, max_bytes: int) -> tuple[str | None, dict[str, Any] | None]:
    """(drop reason, None) or (None, payload for a worker) for a response record."""
    if rec.truncated:
        return "truncated", None
    if rec.oversized:
        return "too_large", None
    http = parse_http_response(rec.block)
    if http is None:
        return "not_http", None
    if http.short():  # the WARC record is whole but the HTTP body it holds was cut in transfer
        return "truncated", None
    if len(http.body) > max_bytes:
        return "too_large", None
    if http.status != 200:
        return "non_200", None
    ctype = http.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].split(",", 1)[0].strip().lower()
    if mime and mime not in HTML_TYPES:
        return "non_html", None
    if len(http.body) == 0:
        return "empty", None
    return None, {
        "url": rec.url,
        "mime": mime,
        "charset": header_charset(ctype),
        "transfer_encoding": http.headers.get("transfer-encoding", ""),
        "content_encoding": http.headers.get("content-encoding", ""),
        "body": http.body,
    }


# ----------------------------------------------------------------------------------------------
# the stage


def _select(files: list[Path], spec: str) -> list[tuple[int, Path]]:
    from ..cli.common import parse_shard

    i, n = parse_shard(spec)
    chosen = [(k, f) for k, f in enumerate(files) if k % n == i]
    if not chosen:
        raise UsageError(f"--shard {spec}: selects none of the {len(files)} input file(s); use N ≤ {len(files)}")
    return chosen


def run(cfg: ExtractConfig, progress=None) -> dict[str, Any]:
    """Extract documents from the archives in ``cfg.inputs`` into the docs artifact ``cfg.out``.

    Returns the manifest; ``manifest["already_done"]`` is True when the artifact was complete.
    """
    if cfg.workers < 1:
        raise UsageError("--workers must be ≥ 1")
    if cfg.timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")
    if cfg.records_per_shard < 1:
        raise UsageError("--records-per-shard must be ≥ 1")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be ≥ 1")
    files = resolve_inputs(cfg.inputs)
    chosen = _select(files, cfg.shard)
    params = asdict(cfg)  # every option; artifacts leaves workers/force out of the run's identity
    params["inputs"] = [str(f) for f in files]
    runner = StageRun.open(Path(cfg.out), STAGE, params, [f for _, f in chosen], force=cfg.force)
    if runner.done:
        return {**runner.manifest, "already_done": True}
    t0 = time.time()
    stats = _extract(runner, cfg, chosen, progress)  # on failure the work dir keeps committed shards
    wall = time.time() - t0
    stats["wall_seconds"] = round(wall, 3)
    stats["docs_per_second"] = round(stats["responses_processed"] / wall, 2) if wall > 0 else 0.0
    manifest = runner.finish(stats)
    return {**manifest, "already_done": False}


def _extract(runner: StageRun, cfg: ExtractConfig, chosen: list[tuple[int, Path]], progress) -> dict[str, Any]:
    total_bytes = sum(f.stat().st_size for _, f in chosen) or 1
    totals: dict[str, Any] = _new_stats()
    per_file: dict[str, dict[str, Any]] = {}
    shards: dict[str, _Shard] = {}
    owner: dict[int, tuple[_Shard, int]] = {}  # seq → (shard, position)
    counters = {"seq": 0, "bytes_done": 0, "resp_read": 0, "resp_done": 0, "resumed_shards": 0, "processed": 0}
    task = progress.add_task("extract", total=None, unit="docs") if progress is not None else None

    def finish_shard(sh: _Shard) -> None:
        write_shard(runner, sh)
        merge_stats(totals, sh.stats)
        merge_stats(per_file.setdefault(sh.file_label, _new_stats()), sh.stats)
        shards.pop(sh.name, None)

    def resolve(seq: int, result: tuple[str, Any]) -> None:
        sh, pos = owner.pop(seq)
        kind, value = result
        if kind == "doc":
            base = sh.rows[pos]
            base.update(value)
            sh.stats["docs"] += 1
            sh.stats["text_chars"] += len(value["text"])
        else:
            sh.rows.pop(pos)
            sh.stats["dropped"][value] += 1
        sh.resolved += 1
        counters["resp_done"] += 1
        counters["processed"] += 1
        if sh.complete:
            finish_shard(sh)

    shown_total = [None]

    def tick() -> None:
        if progress is None:
            return
        # the number of documents is known only once all is read: estimate it from the bytes read.
        # rich restarts its rate estimate whenever the total changes, so move it only on a >10% change
        est = None
        if counters["bytes_done"] > 0:
            est = max(counters["resp_read"], int(counters["resp_read"] * total_bytes / counters["bytes_done"]))
        old = shown_total[0]
        if est is not None and (old is None or abs(est - old) > 0.1 * old or counters["bytes_done"] >= total_bytes):
            if est != old:
                shown_total[0] = est
                progress.update(task, total=est)
        progress.update(task, completed=counters["resp_done"])

    pool = TimeoutPool(cfg.workers, cfg.timeout, cfg.batch_size)
    try:
        items = _read_all(runner, cfg, chosen, counters, per_file, shards, totals)
        exhausted = False
        last_tick = 0.0
        while True:
            while not exhausted and pool.pending() < pool.capacity:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    break
                kind = item[0]
                if kind == "doc":
                    _, sh, pos, payload = item
                    seq = counters["seq"]
                    counters["seq"] += 1
                    owner[seq] = (sh, pos)
                    sh.expected += 1
                    pool.submit(seq, payload)
                elif kind == "close":
                    sh = item[1]
                    sh.closed = True
                    if sh.complete:
                        finish_shard(sh)
                elif kind == "drop":
                    counters["resp_done"] += 1
            if exhausted and pool.pending() == 0:
                break
            for seq, result in pool.poll(0.05):
                resolve(seq, result)
            now = time.monotonic()
            if now - last_tick > 0.2:
                tick()
                last_tick = now
        tick()
    except BaseException:
        pool.close(kill=True)
        raise
    pool.close()
    if shards:  # every shard must have been written; anything left is a bug, not bad data
        raise RuntimeError(f"extract: unfinished shards {sorted(shards)}")
    out = _plain(totals)
    out["files"] = len(chosen)
    out["shards"] = sum(1 for _ in runner.work.glob(f"{docs_mod.SHARD_PREFIX}-*.parquet"))
    out["shards_resumed"] = counters["resumed_shards"]
    out["worker_restarts"] = pool.restarts
    out["responses_processed"] = counters["processed"]
    out["per_file"] = {k: _plain(v) for k, v in per_file.items()}
    return out


def _read_all(runner, cfg, chosen, counters, per_file, shards, totals) -> Iterator[tuple]:
    """Yield ("doc", shard, pos, payload), ("drop", …) and ("close", shard) items in file order."""
    done_bytes = 0
    names = Counter(p.name for _, p in chosen)
    for file_index, path in chosen:
        label = path.name if names[path.name] == 1 else str(path)
        size = path.stat().st_size
        # a file whose last shard and all before it are committed needs no reading at all
        committed = []
        chunk = 0
        while runner.has(shard_name(file_index, chunk)):
            committed.append(read_shard_info(runner.path(shard_name(file_index, chunk))))
            chunk += 1
        if committed and committed[-1]["last"]:
            for info in committed:
                merge_stats(totals, info["stats"])
                merge_stats(per_file.setdefault(label, _new_stats()), info["stats"])
            counters["resumed_shards"] += len(committed)
            done_bytes += size
            counters["bytes_done"] = done_bytes
            continue
        yield from _read_file(runner, cfg, file_index, path, label, counters, per_file, shards, totals, done_bytes)
        done_bytes += size
        counters["bytes_done"] = done_bytes


def _read_file(runner, cfg, file_index, path, label, counters, per_file, shards, totals, done_bytes):
    chunk = -1
    sh: _Shard | None = None
    skipping = False
    n_in_chunk = cfg.records_per_shard

    def open_chunk(c: int) -> tuple[_Shard, bool]:
        name = shard_name(file_index, c)
        if runner.has(name):
            info = read_shard_info(runner.path(name))
            merge_stats(totals, info["stats"])
            merge_stats(per_file.setdefault(label, _new_stats()), info["stats"])
            counters["resumed_shards"] += 1
            return _Shard(name, label), True
        s = _Shard(name, label)
        shards[name] = s
        return s, False

    for item in iter_records(path, max_block=cfg.max_page_bytes + 65536):
        if n_in_chunk >= cfg.records_per_shard:
            if sh is not None and not skipping:
                sh.closed = True
                yield "close", sh
            chunk += 1
            sh, skipping = open_chunk(chunk)
            n_in_chunk = 0
        counters["bytes_done"] = done_bytes + item.offset
        if isinstance(item, Problem):
            if not skipping:
                sh.stats["problems"][item.reason] += 1
            continue
        n_in_chunk += 1
        if skipping:
            continue
        rec = item
        st = sh.stats
        st["records"] += 1
        st["record_types"][rec.rec_type or "unknown"] += 1
        if rec.uri_fixed:
            st["uri_fixed"] += 1
        if rec.rec_type != "response":
            continue
        st["responses"] += 1
        counters["resp_read"] += 1
        reason, payload = _payload_of(rec, cfg.max_page_bytes)
        if reason is not None:
            st["dropped"][reason] += 1
            yield "drop", sh
            continue
        url = rec.url or ""
        ts = parse_warc_date(rec.date)
        row = {
            "id": docs_mod.doc_id(url, rec.date or "", rec.record_id or f"{label}:{rec.index}"),
            "url": url,
            "text": "",
            "timestamp": ts,
            "title": None,
            "language": None,
            "language_score": None,
            "domain": registered_domain(host_of(url)) if url else None,
            "content_type": payload["mime"] or None,
            "charset": None,
            "warc_record_id": rec.record_id,
            "warc_file": label,
            "warc_offset": rec.offset,
        }
        pos = sh.next_pos
        sh.next_pos += 1
        sh.rows[pos] = row
        yield "doc", sh, pos, payload
    # end of file: close the open chunk (an empty file of records still gets one, marked last)
    if sh is None:
        sh, skipping = open_chunk(0)
    sh.last = True
    if not skipping:
        sh.closed = True
        yield "close", sh

"""Where a crawl puts what it fetched: gzip WARC/1.1 shards plus an append-only journal.

Why both: the WARC is the product, the journal is the crawl's memory. Every finished URL (fetched,
refused, failed) gets one journal line, written *after* its WARC records and naming the byte range
they occupy. A rerun after ``kill -9`` replays the journal to rebuild the seen-set and frontier, cuts
the open shard back to the end of the last journalled record (so a record half-written at the kill
is discarded and a fetched-but-unjournalled page is simply fetched again) and drops a torn last
journal line. Shards rotate at a size limit and are committed by an atomic rename; each starts with
a warcinfo record and holds one record per gzip member, the bytes warcio's ``WARCWriter`` would
write (a test compares them).

Off the event loop: ``record()`` only queues. A writer thread takes what is queued in batches,
has the records built, digested and compressed (and the crawler's ``prepare``, its link
extraction, run) by a forked builder process when ``start_builder()`` was called, in the thread
itself otherwise, then writes each batch with one write per file: records first, journal lines
after. The builder dies with the crawl (kill -9 included); if it is lost the thread carries on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import queue
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..artifacts import StageRun
from ..errors import StageError

JOURNAL = "journal.jsonl"
SHARD_PREFIX = "crawl"
SHARD_SUFFIX = ".warc.gz"

#: hop-by-hop and encoding headers whose values no longer describe the payload we store
_RENAMED = {"content-encoding", "transfer-encoding"}


def shard_file(index: int) -> str:
    return f"{SHARD_PREFIX}-{index:05d}{SHARD_SUFFIX}"


def warc_date(ts: float) -> str:
    """WARC/1.1 date with microseconds, e.g. 2026-01-02T03:04:05.123456Z."""
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits at a time: base64.b32encode is a slow loop


def _sha1(*parts: bytes) -> str:
    """'sha1:' + the base32 SHA-1 of the concatenated parts (a WARC digest)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p)
    n = int.from_bytes(h.digest(), "big")
    return "sha1:" + "".join([_B32_PAIRS[(n >> s) & 1023] for s in range(150, -1, -10)])


_EMPTY_SHA1 = _sha1(b"")
GZIP_LEVEL = 6


_random = bytearray()
_random_lock = threading.Lock()


def _record_id() -> str:
    """'<urn:uuid:…>' with a random (version 4) UUID, from urandom read 4 KiB at a time."""
    with _random_lock:
        if not _random:
            _random.extend(os.urandom(4096))
        n = int.from_bytes(_random[-16:], "big")
        del _random[-16:]
    n = (n & ~(0xF000 << 64) | (4 << 76)) & ~(0xC000 << 48) | (0x8000 << 48)  # version 4, RFC 4122 variant
    h = f"{n:032x}"
    return f"<urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}>"


def _warc_head(headers: list[tuple[str, str]]) -> bytes:
    return ("WARC/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("utf-8")


def _http_head(protocol: str, statusline: str, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP message's start line and headers as warcio stores them (ASCII; a header that is
    not is percent-encoded the way warcio does it, by warcio itself)."""
    text = f"{protocol} {statusline}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        from warcio.statusandheaders import StatusAndHeaders

        sh = StatusAndHeaders(statusline, list(headers), protocol=protocol)
        sh.compute_headers_buffer()
        return sh.headers_buff


def _gzip_member(*parts: bytes) -> bytes:
    """One WARC record (header block, content block parts) as one gzip member.

    The deflate window is sized to the record (zlib's default 32 KiB window and 128 KiB hash
    table cost more to set up than a few-KB page costs to compress; a window that holds the
    whole record compresses it exactly as well). One compress call: each releases and retakes
    the GIL, which the event loop thread is waiting for."""
    data = b"".join((*parts, b"\r\n\r\n"))
    wbits = min(15, max(9, (len(data) - 1).bit_length()))
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + wbits, 8 if wbits == 15 else 7)
    out = [c.compress(data)]
    out.append(c.flush())
    return b"".join(out)


@dataclass
class Exchange:
    """One HTTP request and the response to it, as they go into the WARC."""

    url: str
    started: float  # unix time the request was sent
    request_line: str  # 'GET /path HTTP/1.1'
    request_headers: list[tuple[str, str]]
    protocol: str  # 'HTTP/1.1'
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool = False
    ip: str | None = None


def stored_headers(headers: list[tuple[str, str]], body_len: int) -> list[tuple[str, str]]:
    """Response headers describing the payload as stored: decoded and de-chunked.

    The payload is kept after Content-Encoding and Transfer-Encoding were undone, so those headers
    are renamed X-Crawler-* and Content-Length is set to the stored length (the original, if it
    differed, is kept as X-Crawler-Content-Length), as Common Crawl does.
    """
    out: list[tuple[str, str]] = []
    for k, v in headers:
        lk = k.lower()
        if lk in _RENAMED:
            out.append((f"X-Crawler-{k}", v))
        elif lk == "content-length":
            if v.strip() != str(body_len):
                out.append(("X-Crawler-Content-Length", v))
        else:
            out.append((k, v))
    out.append(("Content-Length", str(body_len)))
    return out


def _exchange_members(ex: Exchange, warcinfo_id: str | None) -> tuple[bytes, bytes]:
    """The request and response records of ``ex``, one gzip member each.

    Byte for byte what warcio's WARCWriter writes for the same records (header order and
    spelling, digests, the HTTP header block as warcio encodes it), compressed at zlib level 6
    instead of warcio's 9: a third less CPU for a few percent more bytes."""
    date = warc_date(ex.started)
    resp_id = _record_id()
    common = [("WARC-Date", date), ("WARC-Warcinfo-ID", warcinfo_id)]
    if ex.ip:
        common.append(("WARC-IP-Address", ex.ip))
    method, target = ex.request_line.split(" ", 1)
    req_http = _http_head(method, target, ex.request_headers)
    req = [*common, ("WARC-Concurrent-To", resp_id), ("WARC-Block-Digest", _sha1(req_http)),
           ("WARC-Payload-Digest", _EMPTY_SHA1), ("WARC-Type", "request"),
           ("WARC-Record-ID", _record_id()), ("WARC-Target-URI", ex.url),
           ("Content-Type", "application/http; msgtype=request"), ("Content-Length", str(len(req_http)))]
    body = ex.body
    resp_http = _http_head(ex.protocol, f"{ex.status} {ex.reason}".strip(), stored_headers(ex.headers, len(body)))
    resp = [*common, ("WARC-Record-ID", resp_id), ("WARC-Block-Digest", _sha1(resp_http, body)),
            ("WARC-Payload-Digest", _sha1(body))]
    if ex.truncated:
        resp.append(("WARC-Truncated", "length"))
    resp += [("WARC-Type", "response"), ("WARC-Target-URI", ex.url),
             ("Content-Type", "application/http; msgtype=response"),
             ("Content-Length", str(len(resp_http) + len(body)))]
    return _gzip_member(_warc_head(req), req_http), _gzip_member(_warc_head(resp), resp_http, body)


def _build_batch(work: list[tuple[tuple[Exchange, ...], Callable | None]], warcinfo_id: str | None) -> list[tuple]:
    """(builder process) For each item: (prepare()'s fields, or the exception it raised, or None;
    the gzip members of its exchanges)."""
    out: list[tuple] = []
    for exchanges, prepare in work:
        extra: Any = None
        if prepare is not None:
            try:
                extra = prepare()
            except Exception as e:  # reported for this item only
                out.append((e, []))
                continue
        out.append((extra, [m for ex in exchanges for m in _exchange_members(ex, warcinfo_id)]))
    return out


def _builder_loop(conn: Any) -> None:
    """(builder process) Batches in, (ok, members and fields | the exception) out, until EOF."""
    while True:
        try:
            work, warcinfo_id = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            out: tuple = (True, _build_batch(work, warcinfo_id))
        except Exception as e:
            out = (False, e)
        try:
            data = pickle.dumps(out, pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            data = pickle.dumps((False, RuntimeError(f"builder: {e!r}")))
        conn.send_bytes(data)


def _builder_init() -> None:
    """(builder process) Forget the parent's random bytes (record ids must not repeat) and die
    with the parent, so a kill -9 of the crawl leaves no process behind."""
    _random.clear()
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)


class WarcStore:
    """WARC shards and the journal inside a StageRun's work directory."""

    def __init__(self, run: StageRun, shard_bytes: int, info: dict[str, str]):
        self.run = run
        self.shard_bytes = shard_bytes
        self.info = info
        self.journal_path = run.path(JOURNAL)
        self.committed: list[str] = []
        self.index = 0  # index of the next shard to open
        self._fh: Any = None
        self._pos = 0  # size of the open shard, counting records not yet written out
        self._name: str | None = None
        self._warcinfo_id: str | None = None
        self._journal: Any = None
        self._recs: list[bytes] = []  # gzip members waiting to be written, then ...
        self._lines: list[bytes] = []  # ... the journal lines that account for them
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool: Any = None  # (pid, pipe) of the builder process, see start_builder

    def start_builder(self) -> None:
        """Build records and run ``prepare`` in a forked builder process instead of the writer
        thread: the GIL then serves the event loop alone. Call it while this is the process's
        only thread; without it (or if no process can be started) all runs in the writer thread.
        The two talk over one pipe, a batch each way at a time."""
        import multiprocessing

        try:
            ours, theirs = multiprocessing.Pipe()
            pid = os.fork()
        except (OSError, AttributeError):  # no fork here (Windows): the writer thread does it all
            return
        if pid == 0:  # the builder: never returns into the caller's code
            code = 0
            try:
                ours.close()
                _builder_init()
                _builder_loop(theirs)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self._pool = (pid, ours)

    def _stop_builder(self) -> None:
        if self._pool is None:
            return
        pid, conn = self._pool
        self._pool = None
        conn.close()  # the builder sees the end of its input and exits
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)

    # -- resume ---------------------------------------------------------------------------------
    def replay(self) -> list[dict[str, Any]]:
        """Journal entries of an interrupted run (after repairing both files); [] on a fresh run."""
        entries: list[dict[str, Any]] = []
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            for line in data[: data.rfind(b"\n") + 1].splitlines():
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    break  # torn or garbled: everything after it is discarded
        opened: dict[str, int] = {}
        committed: list[str] = []
        for e in entries:
            if e.get("kind") == "shard-open":
                opened[e["shard"]] = e["end"]
            elif e.get("kind") == "shard-commit":
                committed.append(e["shard"])
        open_shards = [s for s in opened if s not in committed]
        keep_end: dict[str, int] = {}
        for name in open_shards:
            final, partial = self.run.path(name), self.run.path(name + ".partial")
            if final.exists():  # renamed, but the commit line did not make it to the journal
                committed.append(name)
                entries.append({"kind": "shard-commit", "shard": name})
            elif partial.exists():
                keep_end[name] = partial.stat().st_size
            else:
                keep_end[name] = -1  # lost: every entry in it must be refetched
        kept: list[dict[str, Any]] = []
        last_end: dict[str, int] = {}
        for e in entries:
            w = e.get("warc")
            shard = e.get("shard") if e.get("kind") == "shard-open" else (w[0] if w else None)
            if shard in keep_end:
                end = e["end"] if e.get("kind") == "shard-open" else w[2]
                if end > keep_end[shard]:
                    continue
                last_end[shard] = max(last_end.get(shard, 0), end)
            kept.append(e)
        for name, size in keep_end.items():
            partial = self.run.path(name + ".partial")
            if size >= 0 and name in last_end:
                with open(partial, "r+b") as f:
                    f.truncate(last_end[name])
                self._resume_shard(name, kept)
            else:
                partial.unlink(missing_ok=True)
                kept = [e for e in kept if not (e.get("kind") == "shard-open" and e["shard"] == name)]
        self.committed = [s for s in dict.fromkeys(committed)]
        self.index = len(self.committed) + (1 if self._name else 0)
        tmp = self.journal_path.with_name(JOURNAL + ".rewrite")
        with open(tmp, "w", encoding="utf-8") as f:
            for e in kept:
                f.write(json.dumps(e, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)
        return [e for e in kept if e.get("kind") not in ("shard-open", "shard-commit")]

    def _resume_shard(self, name: str, entries: list[dict[str, Any]]) -> None:
        opened = next(e for e in entries if e.get("kind") == "shard-open" and e["shard"] == name)
        self._name = name
        self._warcinfo_id = opened["warcinfo_id"]
        self._fh = open(self.run.path(name + ".partial"), "ab", buffering=0)  # noqa: SIM115
        self._pos = self._fh.seek(0, os.SEEK_END)

    # -- writing (the writer thread) -------------------------------------------------------------
    def record(
        self,
        entry: dict[str, Any],
        exchanges: Sequence[Exchange] = (),
        prepare: Callable[[], dict[str, Any]] | None = None,
        done: Callable[[dict[str, Any] | None, BaseException | None], None] | None = None,
    ) -> None:
        """Queue the exchanges' WARC records and the journal line that accounts for them.

        A writer thread builds, digests and compresses the records (hashlib and zlib release the
        GIL, so this overlaps with the event loop), appends them to the open shard and only then
        appends the journal line, with the byte range, to the journal. Items are written in the
        order they were queued. ``entry`` is not modified and must not be modified afterwards.

        ``prepare()``, if given, runs in the writer thread first and returns fields to add to the
        entry (the crawler extracts a page's links there: lxml parses without the GIL). ``done``,
        if given, is called in the writer thread once the line is written, with the entry as
        journalled (``warc`` byte range included) or with the exception that stopped it.
        """
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer_main, name="warc-writer", daemon=True)
            self._thread.start()
        self._queue.put((entry, tuple(exchanges), prepare, done))

    def _writer_main(self) -> None:
        q = self._queue
        while True:
            items = [q.get()]
            while True:  # take everything queued meanwhile: one write per file for the lot
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            work = [it for it in items if it is not None]
            results: list[tuple[Callable, dict[str, Any] | None, BaseException | None]] = []
            if self._error is None:
                try:
                    results = self._write_items(work)
                except BaseException as e:  # disk full, permissions...: the crawl stops, resumable
                    self._error = StageError(
                        f"{self.run.work}: cannot write the WARC or journal ({e}); free space and rerun"
                    )
            if self._error is not None:
                results = [(it[3], None, self._error) for it in work if it[3] is not None]
            for done, entry, exc in results:
                with contextlib.suppress(Exception):  # the event loop may be gone (crawl failed)
                    done(entry, exc)
            if stop:
                return

    def _prebuild(self, items: list[tuple]) -> tuple[list[tuple] | None, str | None]:
        """Members and prepared fields of ``items`` from the builder process, if there is one."""
        if self._pool is None or not any(it[1] or it[2] for it in items):
            return None, None
        if self._fh is None and any(it[1] for it in items):
            self._open_shard()
        wid = self._warcinfo_id
        conn = self._pool[1]
        try:
            conn.send_bytes(pickle.dumps(([(it[1], it[2]) for it in items], wid), pickle.HIGHEST_PROTOCOL))
            ok, result = pickle.loads(conn.recv_bytes())
        except (OSError, EOFError, pickle.PicklingError, AttributeError, TypeError):
            self._stop_builder()  # lost, or something it cannot take: carry on in this thread
            return None, None
        if not ok:
            raise result
        return result, wid

    def _write_items(self, items: list[tuple]) -> list[tuple[Callable, dict[str, Any] | None, BaseException | None]]:
        results: list[tuple[Callable, dict[str, Any] | None, BaseException | None]] = []
        built, built_wid = self._prebuild(items)
        for i, (entry, exchanges, prepare, done) in enumerate(items):
            prebuilt = built[i] if built is not None else None
            if prepare is not None:
                try:
                    if prebuilt is None:
                        extra = prepare()
                    elif isinstance(prebuilt[0], BaseException):
                        raise prebuilt[0]
                    else:
                        extra = prebuilt[0]
                    entry = {**entry, **extra}
                except Exception as e:  # a bug: the crawl stops with it; nothing written for this URL
                    if done is not None:
                        results.append((done, None, e))
                    continue
            if exchanges:
                if self._fh is None:
                    self._open_shard()
                start = self._pos
                if prebuilt is not None and built_wid == self._warcinfo_id:
                    members: Any = prebuilt[1]
                else:  # no builder, or the shard rotated within the batch (new warcinfo id)
                    members = [m for ex in exchanges for m in self._members(ex)]
                for member in members:
                    self._recs.append(member)
                    self._pos += len(member)
                entry = {**entry, "warc": [self._name, start, self._pos]}
            self._lines.append(json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n")
            if done is not None:
                results.append((done, entry, None))
            if exchanges and self._pos >= self.shard_bytes:
                self._commit_shard()
        self._flush()
        return results

    def _flush(self) -> None:
        """Records first, then the journal lines naming them: a kill between the two writes
        leaves records no line accounts for, which replay cuts away."""
        if self._recs:
            self._fh.write(b"".join(self._recs))
            self._recs = []
        if self._lines:
            if self._journal is None:
                self._journal = open(self.journal_path, "ab", buffering=0)  # noqa: SIM115
            self._journal.write(b"".join(self._lines))
            self._lines = []

    def _log(self, entry: dict[str, Any]) -> None:
        self._lines.append(json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n")

    def _open_shard(self) -> None:
        name = shard_file(self.index)
        self.index += 1
        self._fh = open(self.run.path(name + ".partial"), "wb", buffering=0)  # noqa: SIM115
        self._warcinfo_id = _record_id()
        fields = "".join(f"{k}: {v}\r\n" for k, v in self.info.items() if v).encode("utf-8")
        head = [("WARC-Type", "warcinfo"), ("WARC-Record-ID", self._warcinfo_id), ("WARC-Filename", name),
                ("WARC-Date", warc_date(time.time())), ("WARC-Block-Digest", _sha1(fields)),
                ("Content-Type", "application/warc-fields"),
                ("Content-Length", str(len(fields)))]
        member = _gzip_member(_warc_head(head), fields)
        self._recs.append(member)
        self._pos = len(member)
        self._name = name
        self._log({"kind": "shard-open", "shard": name, "end": self._pos, "warcinfo_id": self._warcinfo_id})

    def _members(self, ex: Exchange) -> tuple[bytes, bytes]:
        return _exchange_members(ex, self._warcinfo_id)

    def _commit_shard(self) -> None:
        if self._fh is None:
            return
        self._flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        name = self._name
        assert name is not None
        self.run.commit(name)
        self.committed.append(name)
        self._fh = self._name = None
        self._log({"kind": "shard-commit", "shard": name})

    def _drain(self) -> None:
        """Let the writer thread finish what was queued, then stop it (and the builder)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._stop_builder()

    def close(self) -> list[str]:
        """Write what is queued, commit the open shard and sync the journal; return the shard names."""
        self._drain()
        if self._error is not None:
            raise self._error
        self._commit_shard()
        self._flush()
        if self._journal is not None:
            os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None
        return list(self.committed)

    def abort(self) -> None:
        """Write what is queued, then close files without committing (on an error or an interrupt;
        the work dir stays resumable)."""
        self._drain()
        if self._error is None:
            with contextlib.suppress(OSError):
                self._flush()
        for f in (self._fh, self._journal):
            if f is not None:
                f.close()
        self._fh = self._journal = None

    @property
    def open_shard(self) -> Path | None:
        return self.run.path(self._name + ".partial") if self._name else None

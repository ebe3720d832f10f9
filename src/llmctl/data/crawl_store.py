"""Where a crawl puts what it fetched: gzip WARC/1.1 shards plus an append-only journal.

Why both: the WARC is the product, the journal is the crawl's memory. Every finished URL (fetched,
refused, failed) gets one journal line, written *after* its WARC records and naming the byte range
they occupy. A rerun after ``kill -9`` replays the journal to rebuild the seen-set and frontier, cuts
the open shard back to the end of the last journalled record (so a record half-written at the kill
is discarded and a fetched-but-unjournalled page is simply fetched again) and drops a torn last
journal line. Shards rotate at a size limit and are committed by an atomic rename; each starts with
a warcinfo record and holds one record per gzip member (warcio's ``WARCWriter``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from ..artifacts import StageRun

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


def _sha1(*parts: bytes) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p)
    return "sha1:" + base64.b32encode(h.digest()).decode("ascii")


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
        self._writer: WARCWriter | None = None
        self._name: str | None = None
        self._warcinfo_id: str | None = None
        self._journal: Any = None

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
        self._fh = open(self.run.path(name + ".partial"), "ab")  # noqa: SIM115 - lives across calls
        self._writer = WARCWriter(self._fh, gzip=True, warc_version="1.1")

    # -- writing --------------------------------------------------------------------------------
    def _log(self, entry: dict[str, Any]) -> None:
        if self._journal is None:
            self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115
        self._journal.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._journal.flush()

    def _open_shard(self) -> None:
        name = shard_file(self.index)
        self.index += 1
        partial = self.run.path(name + ".partial")
        self._fh = open(partial, "wb")  # noqa: SIM115 - lives across calls
        self._writer = WARCWriter(self._fh, gzip=True, warc_version="1.1")
        rec = self._writer.create_warcinfo_record(name, self.info)
        self._warcinfo_id = rec.rec_headers.get_header("WARC-Record-ID")
        self._writer.write_record(rec)
        self._fh.flush()
        self._name = name
        self._log({"kind": "shard-open", "shard": name, "end": self._fh.tell(), "warcinfo_id": self._warcinfo_id})

    def _records(self, ex: Exchange) -> list[Any]:
        w = self._writer
        assert w is not None
        date = warc_date(ex.started)
        resp_id = f"<urn:uuid:{uuid.uuid4()}>"
        common = {"WARC-Date": date, "WARC-Warcinfo-ID": self._warcinfo_id}
        if ex.ip:
            common["WARC-IP-Address"] = ex.ip
        # digests computed here in one pass (warcio would re-read each record's stream twice);
        # the block is exactly the HTTP header bytes warcio writes followed by the payload
        req_http = StatusAndHeaders(ex.request_line, ex.request_headers, is_http_request=True)
        req_http.compute_headers_buffer()
        empty = _sha1(b"")
        req = w.create_warc_record(
            ex.url,
            "request",
            payload=BytesIO(b""),
            length=0,
            http_headers=req_http,
            warc_headers_dict={
                **common, "WARC-Concurrent-To": resp_id,
                "WARC-Block-Digest": _sha1(req_http.headers_buff), "WARC-Payload-Digest": empty,
            },
        )
        resp_http = StatusAndHeaders(
            f"{ex.status} {ex.reason}".strip(), stored_headers(ex.headers, len(ex.body)), protocol=ex.protocol
        )
        resp_http.compute_headers_buffer()
        resp_headers = {
            **common, "WARC-Record-ID": resp_id,
            "WARC-Block-Digest": _sha1(resp_http.headers_buff, ex.body), "WARC-Payload-Digest": _sha1(ex.body),
        }
        if ex.truncated:
            resp_headers["WARC-Truncated"] = "length"
        resp = w.create_warc_record(
            ex.url,
            "response",
            payload=BytesIO(ex.body),
            length=len(ex.body),
            http_headers=resp_http,
            warc_headers_dict=resp_headers,
        )
        return [req, resp]

    def record(self, entry: dict[str, Any], exchanges: Sequence[Exchange] = ()) -> None:
        """Write the exchanges' WARC records, then the journal line that accounts for them."""
        if exchanges:
            if self._writer is None:
                self._open_shard()
            start = self._fh.tell()
            for ex in exchanges:
                for rec in self._records(ex):
                    self._writer.write_record(rec)
            self._fh.flush()
            entry["warc"] = [self._name, start, self._fh.tell()]
        self._log(entry)
        if exchanges and self._fh.tell() >= self.shard_bytes:
            self._commit_shard()

    def _commit_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        name = self._name
        assert name is not None
        self.run.commit(name)
        self.committed.append(name)
        self._fh = self._writer = self._name = None
        self._log({"kind": "shard-commit", "shard": name})

    def close(self) -> list[str]:
        """Commit the open shard and sync the journal; return the committed shard names."""
        self._commit_shard()
        if self._journal is not None:
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None
        return list(self.committed)

    def abort(self) -> None:
        """Close files without committing (on an error; the work dir stays resumable)."""
        for f in (self._fh, self._journal):
            if f is not None:
                f.close()
        self._fh = self._journal = None

    @property
    def open_shard(self) -> Path | None:
        return self.run.path(self._name + ".partial") if self._name else None

"""Tolerant streaming reader for WARC and ARC files, gzip or not.

Real web archives are messy (see REFERENCE.md, "Extraction"): records cut short (Content-Length
larger than the bytes present), gzip members that are corrupt, files gzipped as one stream rather
than one member per record, ``WARC-Target-URI: <http://…>`` in angle brackets (wget), WARC/0.18
headers, ARC files. warcio is strict about several of these (it raises on a non-chunked gzip, stops
at a corrupt member and cannot resynchronise), so record framing is done here: this reader never
raises on bad bytes inside a file; it yields :class:`Record` objects and :class:`Problem` events
(counted by the caller) and carries on with the next record it can find.

How it stays in step:
- gzip is decompressed member by member; a member that fails to inflate is reported as
  ``broken_gzip`` and reading resumes at the next gzip header found in the file;
- a record whose block ends early — at end of file, or at a gzip member boundary where the next
  member starts a new record — is yielded with ``truncated=True``;
- in an uncompressed file a record that claims more bytes than it has swallows the start of the
  next record; when the bytes after the block are not a record boundary the reader looks for a
  record header inside the block, marks the record truncated and rewinds there;
- anything else that is not a record header is skipped up to the next ``WARC/`` line (or the next
  gzip member) and reported as ``malformed_record``.

HTTP payload helpers (status line and headers, chunked transfer coding, content coding) live here
too, since they are part of reading an archived response rather than of extracting text.
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b\x08"
_READ = 1 << 16
_MAX_OUT = 1 << 20
_MAX_LINE = 1 << 16
_MAX_HEADER_LINES = 512
#: a WARC version line; WARC/0.17 and /0.18 appear in old crawls
_WARC_LINE = re.compile(rb"^WARC/\d+\.\d+\s*$")
_WARC_IN_BLOCK = re.compile(rb"\r?\n(WARC/\d+\.\d+\r?\n)")
#: an ARC record header line: URL IP DATE(14) MIME [v2 fields…] LENGTH
_ARC_LINE = re.compile(rb"^(\S+) (\S+) (\d{14}) (\S*)(?: \S+)*? (\d+)\s*$")


class ReadProblem(Exception):
    """Raised internally when the decompressed stream hits the point where a gzip member broke."""


@dataclass(slots=True)
class Problem:
    """Something wrong in the file that is not a record: counted, never fatal."""

    reason: str  # broken_gzip | malformed_record
    offset: int


@dataclass(slots=True)
class Record:
    """One WARC (or ARC) record: its headers and its block (capped at ``max_block`` bytes)."""

    index: int
    offset: int  # file offset of the record (of its gzip member when compressed)
    fmt: str  # "warc" | "arc"
    version: str
    headers: dict[str, str]  # WARC named fields, lower-cased names (first occurrence wins)
    block: bytes
    length: int  # Content-Length the header declares
    truncated: bool = False  # fewer bytes present than declared
    oversized: bool = False  # block longer than max_block; only its head is kept
    uri_fixed: bool = False  # target URI had to be repaired (e.g. wget's <…>)
    rec_type: str = field(default="")

    @property
    def url(self) -> str | None:
        return self.headers.get("warc-target-uri")

    @property
    def date(self) -> str | None:
        return self.headers.get("warc-date")

    @property
    def record_id(self) -> str | None:
        return self.headers.get("warc-record-id")


# ----------------------------------------------------------------------------------------------
# byte stream: decompression with member boundaries and recovery from broken members


class _Stream:
    """The decompressed bytes of a file, with gzip member starts and break points marked."""

    def __init__(self, fh, gz: bool) -> None:
        self.fh = fh
        self.gz = gz
        self.buf = bytearray()
        self.pos = 0  # read position in buf
        self.base = 0  # logical offset of buf[0]
        self.eof = False
        self.members: deque[tuple[int, int]] = deque()  # (logical offset, file offset) of member starts
        self.break_at: int | None = None  # logical offset where a broken member's good bytes end
        self.problems: list[Problem] = []
        # gzip state
        self._dec = None
        self._pending = b""
        self._file_pos = 0  # bytes read from fh so far
        self._member_file_off = 0
        self._member_out = 0  # bytes inflated from the current member
        self._fh_eof = False

    # logical position of the next unread byte
    def tell(self) -> int:
        return self.base + self.pos

    def file_offset_of(self, logical: int) -> int:
        """File offset of the gzip member holding ``logical`` (plain files: the offset itself)."""
        if not self.gz:
            return logical
        off = self._member_file_off
        for lo, fo in self.members:
            if lo <= logical:
                off = fo
            else:
                break
        return off

    def _read_file(self) -> bytes:
        if self._fh_eof:
            return b""
        data = self.fh.read(_READ)
        if not data:
            self._fh_eof = True
        self._file_pos += len(data)
        return data

    def compact(self) -> None:
        """Drop consumed bytes; only between records, when no caller holds buffer indexes."""
        if self.pos > (1 << 20) and self.pos > len(self.buf) // 2:
            del self.buf[: self.pos]
            self.base += self.pos
            self.pos = 0
            while len(self.members) > 1 and self.members[1][0] <= self.base:
                self.members.popleft()

    def _more(self) -> bool:
        """Append decompressed bytes to the buffer; False at the end of the file."""
        if self.eof:
            return False
        if not self.gz:
            data = self._read_file()
            if not data:
                self.eof = True
                return False
            self.buf += data
            return True
        while True:
            if self._dec is None:  # at a member start
                if len(self._pending) < 3:
                    self._pending += self._read_file()
                if not self._pending:
                    self.eof = True
                    return False
                member_off = self._file_pos - len(self._pending)
                if not self._pending.startswith(GZIP_MAGIC):
                    if not self._pending.strip(b"\0\r\n \t") and self._skip_padding():
                        self.eof = True
                        return False
                    self.problems.append(Problem("broken_gzip", member_off))
                    if not self._resync(member_off + 1):
                        self.eof = True
                        return False
                    continue
                self._member_file_off = member_off
                self._member_out = 0
                self.members.append((self.base + len(self.buf), member_off))
                self._dec = zlib.decompressobj(31)
            try:
                out = self._dec.decompress(self._pending, _MAX_OUT)
            except zlib.error:
                # the good bytes inflated so far stay readable; a record crossing this point is lost
                self._dec = None
                self.problems.append(Problem("broken_gzip", self._member_file_off))
                self._mark_break()
                if not self._resync(self._member_file_off + 1):
                    self.eof = True
                    return False
                continue
            if self._dec.eof:
                self._pending = self._dec.unused_data
                self._dec = None
            else:
                self._pending = self._dec.unconsumed_tail
                if not self._pending:
                    self._pending = self._read_file()
                    if not self._pending and not out:
                        # the file ends inside a gzip member: what was inflated is all there is; a
                        # member cut before any of it inflated is a record lost whole, so count it
                        if not self._member_out:
                            self.problems.append(Problem("broken_gzip", self._member_file_off))
                        self._dec = None
                        self.eof = True
                        return False
            if out:
                self._member_out += len(out)
                self.buf += out
                return True

    def _skip_padding(self) -> bool:
        """True if the rest of the file is padding (NULs / whitespace) after the last member."""
        while True:
            more = self._read_file()
            if not more:
                return True
            if more.strip(b"\0\r\n \t"):
                self._pending += more
                return False

    def _mark_break(self) -> None:
        self.break_at = self.base + len(self.buf)

    def _resync(self, start: int) -> bool:
        """Position the compressed input at the next gzip header at or after ``start``."""
        self.fh.seek(start)
        self._file_pos = start
        self._fh_eof = False
        self._pending = b""
        carry = b""
        while True:
            data = self._read_file()
            if not data:
                return False
            chunk = carry + data
            i = chunk.find(GZIP_MAGIC)
            if i >= 0:
                self._pending = chunk[i:]
                return True
            carry = chunk[-2:]

    # -- reads that respect a pending break ----------------------------------------------------
    def _limit(self) -> int | None:
        return None if self.break_at is None else self.break_at - self.base

    def _check_break(self) -> None:
        if self.break_at is not None and self.base + self.pos >= self.break_at:
            # the bytes of the broken member end here: drop whatever the caller was reading
            self.pos = self.break_at - self.base
            self.break_at = None
            raise ReadProblem()

    def readline(self) -> bytes:
        """One line including its newline (or up to the end / a break / _MAX_LINE bytes)."""
        start = self.pos
        scan = self.pos
        while True:
            limit = self._limit()
            end = len(self.buf) if limit is None else min(limit, len(self.buf))
            i = self.buf.find(b"\n", scan, end)
            if i >= 0:
                self.pos = i + 1
                return bytes(self.buf[start : self.pos])
            if end - start >= _MAX_LINE:
                self.pos = end
                return bytes(self.buf[start : self.pos])
            if limit is not None and end >= limit:
                self.pos = limit
                self._check_break()
            scan = end
            if not self._more():
                self.pos = len(self.buf)
                return bytes(self.buf[start:])

    def peek(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n and self._limit() is None and self._more():
            pass
        end = len(self.buf) if self._limit() is None else min(self._limit(), len(self.buf))
        return bytes(self.buf[self.pos : min(self.pos + n, end)])

    def next_member_start(self, after: int) -> int | None:
        for lo, _ in self.members:
            if lo > after:
                return lo
        return None

    def read_block(self, n: int, keep: int) -> tuple[bytes, int, bool]:
        """Read a record block of ``n`` bytes, keeping the first ``keep``.

        Returns (kept bytes, bytes consumed, truncated). The block ends early at the end of the
        file, or at a gzip member boundary whose member starts a new WARC record.
        """
        start_logical = self.tell()
        out = bytearray()
        consumed = 0
        while consumed < n:
            avail_end = len(self.buf)
            limit = self._limit()
            if limit is not None:
                avail_end = min(avail_end, limit)
            if self.gz:
                nxt = self.next_member_start(start_logical)
                if nxt is not None and nxt - self.base < avail_end:
                    avail_end = max(self.pos, nxt - self.base)
                    boundary = True
                else:
                    boundary = False
            else:
                boundary = False
            take = min(n - consumed, avail_end - self.pos)
            if take > 0:
                if len(out) < keep:
                    out += self.buf[self.pos : self.pos + min(take, keep - len(out))]
                self.pos += take
                consumed += take
                continue
            if boundary:
                # a new member begins: does it start a record? then this one was cut short
                if self.peek(5) == b"WARC/" or _ARC_LINE.match(self.peek(300).split(b"\n", 1)[0] + b"\n"):
                    return bytes(out), consumed, True
                start_logical = self.tell()  # a record that spans members: keep reading
                continue
            if limit is not None and self.base + self.pos >= limit:
                self._check_break()
            if not self._more():
                return bytes(out), consumed, True
        return bytes(out), consumed, False

    def unread(self, n: int) -> None:
        self.pos -= n


# ----------------------------------------------------------------------------------------------
# records


def _open(path: Path):
    return open(path, "rb", buffering=0)


_SNIFF_HTML = re.compile(rb"<(!doctype\s+html|html|head|body|title|meta|div|p)[\s>]", re.I)


def looks_like_html(body: bytes) -> bool:
    """Whether a payload served without a (truthful) Content-Type starts like an HTML page."""
    return _SNIFF_HTML.search(body[:2048]) is not None


def sniff(path: Path) -> str | None:
    """'warc' or 'arc' if the file starts like one (after gzip), else None. Never raises on content."""
    with _open(path) as fh:
        head = fh.read(1 << 16)
    if head.startswith(GZIP_MAGIC):
        try:
            head = zlib.decompressobj(31).decompress(head, 4096)
        except zlib.error:
            return None
    head = head.lstrip(b"\r\n")
    first = head.split(b"\n", 1)[0] + b"\n"
    if _WARC_LINE.match(first.rstrip(b"\r\n") + b"\n"):
        return "warc"
    if first.startswith(b"filedesc://") or _ARC_LINE.match(first):
        return "arc"
    return None


def _parse_fields(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            continue
        if line[0] in " \t" and last is not None:  # folded continuation
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        last = name.strip().lower()
        headers.setdefault(last, value.strip())
    return headers


_URI_JUNK = re.compile(r"^[<\"'\s]+|[>\"'\s]+$")


def fix_uri(uri: str | None) -> tuple[str | None, bool]:
    """Strip wget's angle brackets (and quotes, whitespace) around a target URI."""
    if uri is None:
        return None, False
    fixed = _URI_JUNK.sub("", uri)
    return fixed, fixed != uri


def _arc_date(d: str) -> str:
    return f"{d[0:4]}-{d[4:6]}-{d[6:8]}T{d[8:10]}:{d[10:12]}:{d[12:14]}Z"


def iter_records(path: Path | str, max_block: int = 10 << 20) -> Iterator[Record | Problem]:
    """Stream the records of a WARC/ARC file (gzip or plain), never raising on bad content."""
    path = Path(path)
    with _open(path) as fh:
        gz = fh.read(3) == GZIP_MAGIC
        fh.seek(0)
        s = _Stream(fh, gz)
        index = 0
        resyncing = False
        while True:
            yield from _drain(s)
            try:
                kind, rec, offset = _next_record(s, index, max_block)
            except ReadProblem:  # a broken gzip member ate the record being read
                resyncing = False
                continue
            yield from _drain(s)
            if kind == "end":
                return
            if kind == "junk":
                if not resyncing:  # one problem per stretch of junk, however long
                    yield Problem("malformed_record", s.file_offset_of(offset))
                resyncing = True
                continue
            resyncing = False
            index += 1
            yield rec


def _drain(s: _Stream) -> Iterator[Problem]:
    while s.problems:
        yield s.problems.pop(0)


def _next_record(s: _Stream, index: int, max_block: int) -> tuple[str, Record | None, int]:
    """("record", rec, offset), ("end", None, offset), or ("junk", None, offset) for skipped bytes."""
    s.compact()
    while True:  # skip blank lines between records
        start = s.tell()
        line = s.readline()
        if not line:
            return "end", None, start
        if line.strip(b"\r\n\0 \t"):
            break
    stripped = line.rstrip(b"\r\n")
    if _WARC_LINE.match(stripped + b"\n"):
        rec = _read_warc(s, index, start, stripped.decode("ascii", "replace"), max_block)
        return ("record", rec, start) if rec is not None else ("junk", None, start)
    m = _ARC_LINE.match(line)
    if m:
        return "record", _read_arc(s, index, start, m, max_block), start
    return "junk", None, start


def _read_warc(s: _Stream, index: int, start: int, version: str, max_block: int) -> Record | None:
    lines = []
    while True:
        line = s.readline()
        if not line or line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        if len(lines) > _MAX_HEADER_LINES:
            break
    headers = _parse_fields(lines)
    try:
        length = int(headers.get("content-length", ""))
        if length < 0:
            raise ValueError
    except ValueError:
        return None  # no usable length: the block cannot be framed; resync on the next header
    block, consumed, truncated = s.read_block(length, max_block)
    if not truncated and not s.gz:
        truncated = _check_plain_boundary(s, block, consumed)
    uri, fixed = fix_uri(headers.get("warc-target-uri"))
    if uri is not None:
        headers["warc-target-uri"] = uri
    for k in ("warc-record-id", "warc-concurrent-to", "warc-refers-to"):
        if k in headers:
            headers[k] = headers[k].strip()
    return Record(
        index, s.file_offset_of(start), "warc", version, headers, block, length,
        truncated=truncated, oversized=length > max_block and not truncated, uri_fixed=fixed,
        rec_type=headers.get("warc-type", "").lower(),
    )


def _check_plain_boundary(s: _Stream, block: bytes, consumed: int) -> bool:
    """In a plain file: if the block is not followed by a record boundary, look inside it.

    A record whose Content-Length overstates its size swallows the head of the next record; find
    that header in the block, rewind to it and call this record truncated.
    """
    after = s.peek(64)
    rest = after.lstrip(b"\r\n")
    if not rest or rest.startswith(b"WARC/") or _ARC_LINE.match(rest.split(b"\n", 1)[0] + b"\n"):
        return False
    if len(block) < consumed:
        return False  # we did not keep the whole block; resync forward instead
    m = _WARC_IN_BLOCK.search(block)
    if m is None:
        return False
    s.unread(consumed - m.start(1))
    return True


def _read_arc(s: _Stream, index: int, start: int, m: re.Match, max_block: int) -> Record:
    url = m.group(1).decode("utf-8", "replace")
    date = m.group(3).decode()
    mime = m.group(4).decode("utf-8", "replace")
    length = int(m.group(5))
    block, consumed, truncated = s.read_block(length, max_block)
    if url.startswith("filedesc:"):
        rec_type = "warcinfo"
    elif url.startswith(("http:", "https:")) and block[:5].upper() == b"HTTP/":
        rec_type = "response"
    else:
        rec_type = "resource"
    fixed_url, fixed = fix_uri(url)
    headers = {
        "warc-type": rec_type,
        "warc-target-uri": fixed_url,
        "warc-date": _arc_date(date),
        "warc-ip-address": m.group(2).decode("utf-8", "replace"),
        "content-type": "application/http; msgtype=response" if rec_type == "response" else mime,
        "arc-content-type": mime,
    }
    return Record(
        index, s.file_offset_of(start), "arc", "ARC", headers, block, length,
        truncated=truncated, oversized=length > max_block and not truncated, uri_fixed=fixed,
        rec_type=rec_type,
    )


def parse_warc_date(value: str | None) -> datetime | None:
    """WARC-Date (ISO 8601, 'Z', optional fraction) or an ARC 14-digit date → aware UTC datetime."""
    if not value:
        return None
    v = value.strip()
    try:
        if v.isdigit() and len(v) == 14:
            return datetime.strptime(v, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        if v.endswith("Z"):
            v = v[:-1] + "+00:00"
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


# ----------------------------------------------------------------------------------------------
# HTTP payloads


@dataclass(slots=True)
class HttpResponse:
    status: int | None
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    body_offset: int

    def short(self) -> bool:
        """True when the body holds fewer bytes than its Content-Length declares (a transfer cut
        short; a chunked body carries no such length)."""
        declared = self.headers.get("content-length", "").strip()
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        return declared.isdigit() and not chunked and len(self.body) < int(declared)


def parse_http_response(block: bytes) -> HttpResponse | None:
    """Split an archived HTTP response into status, headers and body; None if it is not one."""
    if not block[:5].upper() == b"HTTP/":
        return None
    end = block.find(b"\r\n\r\n")
    sep = 4
    alt = block.find(b"\n\n")
    if end < 0 or (0 <= alt < end):
        end, sep = alt, 2
    if end < 0:
        head, body_off = block, len(block)
    else:
        head, body_off = block[:end], end + sep
    lines = head.split(b"\n")
    parts = lines[0].split(None, 2)
    status = None
    if len(parts) >= 2 and parts[1][:3].isdigit():
        status = int(parts[1][:3])
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.decode("latin-1").rstrip("\r")
        name, sep_, value = line.partition(":")
        if not sep_:
            continue
        k = name.strip().lower()
        v = value.strip()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return HttpResponse(status, headers, block[body_off:], body_off)


def dechunk(body: bytes) -> bytes | None:
    """Undo HTTP chunked transfer coding; None if the body is not validly chunked."""
    out = bytearray()
    pos = 0
    n = len(body)
    while pos < n:
        eol = body.find(b"\n", pos)
        if eol < 0:
            return None
        size_field = body[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            return None
        pos = eol + 1
        if size == 0:
            return bytes(out)
        out += body[pos : pos + size]
        pos += size
        if body[pos : pos + 2] == b"\r\n":
            pos += 2
        elif body[pos : pos + 1] == b"\n":
            pos += 1
    return bytes(out)  # ended without the last chunk: keep what arrived


def decode_content(body: bytes, coding: str) -> bytes | None:
    """Undo a Content-Encoding (gzip, deflate, br when brotli is installed); None if it fails."""
    out = body
    for c in [c.strip().lower() for c in coding.split(",") if c.strip()][::-1]:
        try:
            if c in ("gzip", "x-gzip"):
                d = zlib.decompressobj(31)
                out = d.decompress(out)
            elif c == "deflate":
                try:
                    out = zlib.decompress(out)
                except zlib.error:
                    out = zlib.decompress(out, -15)
            elif c == "br":
                import brotli  # type: ignore[import-not-found]

                out = brotli.decompress(out)
            elif c in ("identity", "none"):
                continue
            else:
                return None
        except Exception:  # noqa: BLE001 - any failure means "could not decode"
            return None
    return out

"""A small HTTP/1.1 client on asyncio, made for the crawler: GET only, keep-alive per origin.

Why not aiohttp: importing it costs a quarter of a second and each request goes through several
layers of general-purpose machinery; a crawler needs little of it (no cookies, no proxies, no
redirect following, no request bodies). What it does need is here:

- connections kept alive and reused per origin; a reused connection that the server had closed
  meanwhile (no byte of a response came back) is retried once on a fresh one, as GET allows;
- the address check after DNS (``allow_private``) on the addresses actually connected to, with the
  answers cached for five minutes; TLS with certificate and host name verification;
- response framing by RFC 9112: 1xx responses skipped, no body for 204 and 304, chunked transfer
  coding, Content-Length, or read to close;
- gzip and deflate content codings undone while reading, the decoded size bounded by ``max_bytes``
  (so a compression bomb stops at the limit); unknown codings are kept as sent;
- a total time limit per request and a separate one for connecting.

Errors are :class:`FetchError` with the crawler's reason names and whether a retry may help.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .crawl_net import GuardedResolver, PrivateAddressError

MAX_HEAD = 64 * 1024  # status line + headers
DNS_TTL = 300.0


class FetchError(Exception):
    """A request that produced no usable response: ``reason`` names why, ``retryable`` says
    whether trying again later may help."""

    def __init__(self, reason: str, retryable: bool, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.retryable = reason, retryable


class _Stale(Exception):
    """A reused connection closed before any byte of the response arrived."""


@dataclass
class Response:
    status: int
    reason: str
    protocol: str  # 'HTTP/1.1'
    headers: list[tuple[str, str]]  # as received, latin-1 decoded
    request_line: str
    request_headers: list[tuple[str, str]]
    ip: str | None
    _conn: Any = None
    _framing: tuple[str, int] = ("none", 0)
    _reusable: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class _Conn(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes in a buffer and a way to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.waiter: asyncio.Future | None = None
        self.ip: str | None = None
        self.used = False  # has carried a request before

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if peer else None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def more(self) -> bool:
        """Wait for more bytes; False at end of stream."""
        if self.eof:
            return False
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.eof = True


class _Decoder:
    """Undoes a gzip or deflate content coding, never producing more than asked for."""

    def __init__(self, coding: str):
        coding = coding.strip().lower()
        self.raw = coding not in ("gzip", "x-gzip", "deflate")
        self.deflate = coding == "deflate"
        self.z = None if self.raw else zlib.decompressobj(16 + zlib.MAX_WBITS if not self.deflate else zlib.MAX_WBITS)
        self.first = self.deflate

    def feed(self, data: bytes, room: int) -> bytes:
        """Decode ``data``; return at most ``room`` bytes (the rest is dropped: truncated)."""
        if self.raw:
            return data[:room]
        assert self.z is not None
        if self.first and data:
            self.first = False
            if (data[0] & 0x0F) != 8:  # raw deflate without the zlib wrapper, as some servers send
                self.z = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            return self.z.decompress(data, room) if room > 0 else b""
        except zlib.error as e:
            raise FetchError("payload-error", True, f"bad {('deflate' if self.deflate else 'gzip')} data") from e

    def more_pending(self) -> bool:
        return not self.raw and self.z is not None and bool(self.z.unconsumed_tail)

    def drain(self, room: int) -> bytes:
        assert self.z is not None
        try:
            return self.z.decompress(self.z.unconsumed_tail, room) if room > 0 else b""
        except zlib.error as e:
            raise FetchError("payload-error", True, "bad compressed data") from e


class HttpClient:
    def __init__(self, user_agent: str, *, allow_private: bool = False, timeout: float = 30.0,
                 connect_timeout: float = 10.0, accept: str = "*/*", per_origin_idle: int = 8):
        self.resolver = GuardedResolver(allow_private)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.per_origin_idle = per_origin_idle
        self.base_headers = [("User-Agent", user_agent), ("Accept", accept), ("Accept-Encoding", "gzip, deflate")]
        self.idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self.dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._ssl: ssl_module.SSLContext | None = None

    # -- connections ------------------------------------------------------------------------------
    async def resolve(self, host: str, port: int) -> list[str]:
        """Addresses for ``host``; PrivateAddressError if one is not public (unless allowed)."""
        now = time.monotonic()
        hit = self.dns.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            infos = await self.resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except PrivateAddressError:
            raise
        except OSError as e:
            raise FetchError("connect-error", True, f"cannot resolve {host}") from e
        addrs = list(dict.fromkeys(info["host"] for info in infos))
        self.dns[(host, port)] = (now + DNS_TTL, addrs)
        return addrs

    def _ssl_context(self) -> ssl_module.SSLContext:
        if self._ssl is None:
            self._ssl = ssl_module.create_default_context()
        return self._ssl

    async def _connect(self, scheme: str, host: str, port: int) -> _Conn:
        try:
            addrs = await self.resolve(host, port)
        except PrivateAddressError as e:
            raise FetchError("private-address", False, str(e)) from e
        loop = asyncio.get_running_loop()
        tls = self._ssl_context() if scheme == "https" else None
        last: BaseException | None = None
        for addr in addrs:
            conn = _Conn()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await loop.create_connection(lambda c=conn: c, addr, port, ssl=tls,
                                                 server_hostname=host if tls else None)
            except (ssl_module.SSLError, ssl_module.CertificateError) as e:
                raise FetchError("tls-error", False, str(e)) from e
            except (OSError, TimeoutError) as e:
                last = e
                continue
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        raise FetchError("connect-error", True, f"cannot connect to {host}:{port} ({last})")

    def _release(self, key: tuple[str, str, int], conn: _Conn, reusable: bool) -> None:
        pool = self.idle.setdefault(key, [])
        if reusable and not conn.eof and not conn.buf and len(pool) < self.per_origin_idle:
            conn.used = True
            pool.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for pool in self.idle.values():
            for c in pool:
                c.close()
        self.idle.clear()

    # -- requests ---------------------------------------------------------------------------------
    async def get(self, url: str, read_body: Callable[[Response], int | None]) -> tuple[Response, bytes, bool]:
        """GET ``url`` (normalised, http or https). ``read_body(response)`` sees the status and
        headers and returns how many decoded body bytes to keep, or None to not read the body at
        all. Returns (response, body, truncated). Raises FetchError."""
        try:
            async with asyncio.timeout(self.timeout):
                for attempt in (0, 1):
                    try:
                        return await self._get(url, read_body, fresh=attempt == 1)
                    except _Stale:
                        continue
                raise FetchError("connection-error", True, "server closed the connection")
        except TimeoutError as e:
            raise FetchError("timeout", True) from e
        except (ValueError, UnicodeError) as e:
            raise FetchError("bad-url", False, str(e)) from e

    async def _get(self, url: str, read_body, fresh: bool) -> tuple[Response, bytes, bool]:
        scheme, rest = url.split("://", 1)
        slash = rest.find("/")
        netloc, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        if netloc.startswith("["):
            host, _, port_s = netloc[1:].partition("]")
            port_s = port_s[1:]
        else:
            host, _, port_s = netloc.partition(":")
        try:
            port = int(port_s) if port_s else (443 if scheme == "https" else 80)
        except ValueError as e:
            raise FetchError("bad-url", False) from e
        key = (scheme, host, port)
        pool = self.idle.get(key)
        conn = None
        while pool and not fresh:
            c = pool.pop()
            if not c.eof and not c.buf:
                conn = c
                break
            c.close()
        if conn is None:
            conn = await self._connect(scheme, host, port)
        request_line = f"GET {target} HTTP/1.1"
        headers = [("Host", netloc), *self.base_headers]
        ok = False
        try:
            assert conn.transport is not None
            conn.transport.write(
                (request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
            )
            resp = await self._read_head(conn)
            resp.request_line, resp.request_headers = request_line, headers
            keep = read_body(resp)
            if keep is None:
                return resp, b"", False  # body left unread: the connection is closed below
            body, truncated = await self._read_body(conn, resp, keep)
            ok = not truncated and resp._reusable
            return resp, body, truncated
        except _Stale:
            raise
        except FetchError:
            raise
        except (OSError, RuntimeError) as e:  # RuntimeError: writing to a transport being closed
            if conn.used and not conn.buf:
                raise _Stale() from e
            raise FetchError("connection-error", True, str(e)) from e
        finally:
            self._release(key, conn, ok)

    async def _read_head(self, conn: _Conn) -> Response:
        while True:  # skip 1xx interim responses
            while True:
                end = conn.buf.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(conn.buf) > MAX_HEAD:
                    raise FetchError("bad-response", False, "response head too large")
                if not await conn.more():
                    if conn.used and not conn.buf:
                        raise _Stale()
                    raise FetchError("connection-error", True, "server closed the connection")
            head = bytes(conn.buf[:end])
            del conn.buf[: end + 4]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit() or len(parts[1]) != 3:
                raise FetchError("bad-response", False, f"bad status line {lines[0][:80]!r}")
            status = int(parts[1])
            protocol = parts[0].decode("latin-1")
            reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
            headers: list[tuple[str, str]] = []
            for line in lines[1:]:
                if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding
                    k, v = headers[-1]
                    headers[-1] = (k, v + " " + line.strip().decode("latin-1"))
                    continue
                k, sep, v = line.partition(b":")
                if not sep or not k or k != k.strip():
                    raise FetchError("bad-response", False, f"bad header line {line[:80]!r}")
                headers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
            if 100 <= status < 200:
                continue
            resp = Response(status, reason, protocol, headers, "", [], conn.ip)
            te = (resp.header("Transfer-Encoding") or "").lower()
            cl = resp.header("Content-Length")
            if status in (204, 304):
                resp._framing = ("none", 0)
            elif te and te.rsplit(",", 1)[-1].strip() == "chunked":
                resp._framing = ("chunked", 0)
            elif te:
                resp._framing = ("close", 0)
            elif cl is not None:
                try:
                    n = int(cl.split(",")[0].strip())
                    if n < 0:
                        raise ValueError
                except ValueError as e:
                    raise FetchError("bad-response", False, f"bad Content-Length {cl!r}") from e
                resp._framing = ("length", n)
            else:
                resp._framing = ("close", 0)
            connection = (resp.header("Connection") or "").lower()
            resp._reusable = resp._framing[0] != "close" and "close" not in connection and (
                protocol != "HTTP/1.0" or "keep-alive" in connection
            )
            return resp

    async def _read_body(self, conn: _Conn, resp: Response, keep: int) -> tuple[bytes, bool]:
        """The decoded body, at most ``keep`` bytes, and whether it was cut there."""
        kind, n = resp._framing
        if kind == "none":
            return b"", False
        dec = _Decoder(resp.header("Content-Encoding") or "identity")
        out: list[bytes] = []
        size = 0

        def take(data: bytes) -> bool:
            """Decode and keep ``data``; True once the limit is passed (stop reading)."""
            nonlocal size
            chunk = dec.feed(data, keep + 1 - size)
            while True:
                out.append(chunk)
                size += len(chunk)
                if size > keep:
                    return True
                if not dec.more_pending():
                    return False
                chunk = dec.drain(keep + 1 - size)

        if kind == "length":
            if dec.raw and n <= keep and len(conn.buf) >= n:  # the common case: all here already
                body = bytes(conn.buf[:n])
                del conn.buf[:n]
                return body, False
            left = n
            while left > 0:
                if not conn.buf and not await conn.more():
                    raise FetchError("payload-error", True, f"connection closed {left} bytes before the end")
                piece = bytes(conn.buf[:left])
                del conn.buf[: len(piece)]
                left -= len(piece)
                if take(piece):
                    return b"".join(out)[:keep], True
        elif kind == "chunked":
            while True:
                while (i := conn.buf.find(b"\r\n")) < 0:
                    if len(conn.buf) > 4096 or not await conn.more():
                        raise FetchError("payload-error", True, "bad chunked encoding")
                size_line = bytes(conn.buf[:i]).split(b";", 1)[0].strip()
                try:
                    csize = int(size_line, 16)
                except ValueError as e:
                    raise FetchError("payload-error", True, "bad chunk size") from e
                del conn.buf[: i + 2]
                if csize == 0:  # trailers, then an empty line
                    while True:
                        while (i := conn.buf.find(b"\r\n")) < 0:
                            if not await conn.more():
                                raise FetchError("payload-error", True, "connection closed in chunk trailers")
                        line = bytes(conn.buf[:i])
                        del conn.buf[: i + 2]
                        if not line:
                            break
                    break
                while len(conn.buf) < csize + 2:
                    if not await conn.more():
                        raise FetchError("payload-error", True, "connection closed inside a chunk")
                piece = bytes(conn.buf[:csize])
                del conn.buf[: csize + 2]
                if take(piece):
                    return b"".join(out)[:keep], True
        else:  # to the end of the connection
            while True:
                if conn.buf:
                    piece = bytes(conn.buf)
                    conn.buf.clear()
                    if take(piece):
                        return b"".join(out)[:keep], True
                if not await conn.more() and not conn.buf:
                    break
        return b"".join(out), False

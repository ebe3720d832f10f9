"""The crawler's HTTP/1.1 client against a raw socket server on 127.0.0.1 that sends exactly the
bytes each test wants: framing (chunked, Content-Length, to close, 1xx, 204), content codings,
keep-alive reuse and a server that drops idle connections, limits, malformed responses."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import tracemalloc
import zlib

import pytest

from llmctl.data.crawl_http import FetchError, HttpClient


class RawServer:
    """Reads one request head at a time and answers with ``routes[path]`` (raw bytes, or a
    callable returning them). After an answer saying Connection: close, or one whose body ends
    at the close, the connection is closed; ``drop_idle`` closes every connection after each
    answer without saying so (a keep-alive timeout on the server)."""

    def __init__(self, routes: dict, drop_idle: bool = False, tls=None):
        self.routes, self.drop_idle, self.tls = routes, drop_idle, tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ValueError):  # the client refused our certificate
                conn.close()
                return
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                path = head.split(b" ")[1].decode()
                answer = self.routes[path]
                answer = answer() if callable(answer) else answer
                conn.sendall(answer)
                delimited = b"Content-Length:" in answer or b"chunked" in answer or b" 204 " in answer
                if self.drop_idle or b"Connection: close" in answer or not delimited:
                    return

    def close(self):
        self.sock.close()


def ok(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(body: bytes, *headers: str, size: int = 7) -> bytes:
    out = [f"HTTP/1.1 200 OK\r\n{''.join(h + chr(13) + chr(10) for h in headers)}Transfer-Encoding: chunked\r\n\r\n".encode()]
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
    out.append(b"0\r\nX-Trailer: yes\r\n\r\n")
    return b"".join(out)


BODY = b"<html><body>" + b"<p>hello world</p>" * 200 + b"</body></html>"


def fetch(client: HttpClient, url: str, keep: int = 1 << 20):
    async def go():
        try:
            return await client.get(url, lambda resp: keep)
        finally:
            client.close()  # its connections belong to this event loop

    return asyncio.run(go())


def test_framings_and_codings():
    deflate_raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = deflate_raw.compress(BODY) + deflate_raw.flush()
    srv = RawServer({
        "/len": ok(BODY, "Content-Type: text/html"),
        "/chunked": chunked(BODY),
        "/gzip": ok(gzip.compress(BODY), "Content-Encoding: gzip"),
        "/gzip-chunked": chunked(gzip.compress(BODY), "Content-Encoding: gzip", size=100),
        "/deflate": ok(zlib.compress(BODY), "Content-Encoding: deflate"),
        "/raw-deflate": ok(raw, "Content-Encoding: deflate"),
        "/br": ok(b"\x0b\x02\x80hi\x03", "Content-Encoding: br"),
        "/continue": b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100"),
        "/nocontent": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        "/close": b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nX-Folded: a\r\n b\r\n\r\n" + BODY,
    })
    try:
        client = HttpClient("test-agent/1.0", allow_private=True)
        for path in ("/len", "/chunked", "/gzip", "/gzip-chunked", "/deflate", "/raw-deflate"):
            resp, body, truncated = fetch(client, srv.base + path)
            assert (resp.status, body, truncated) == (200, BODY, False), path
        resp, body, _ = fetch(client, srv.base + "/br")  # unknown coding: kept as sent
        assert body == b"\x0b\x02\x80hi\x03" and resp.header("content-encoding") == "br"
        resp, body, _ = fetch(client, srv.base + "/continue")
        assert (resp.status, body) == (200, b"after 100")
        resp, body, _ = fetch(client, srv.base + "/nocontent")
        assert (resp.status, resp.reason, body, resp.header("X-A")) == (204, "No Content", b"", "1")
        resp, body, _ = fetch(client, srv.base + "/close")
        assert (resp.protocol, body, resp.header("x-folded")) == ("HTTP/1.0", BODY, "a b")
        req = srv.requests[0].decode().split("\r\n")
        assert req[0] == "GET /len HTTP/1.1" and f"Host: 127.0.0.1:{srv.port}" in req
        assert "User-Agent: test-agent/1.0" in req and "Accept-Encoding: gzip, deflate" in req
        assert resp.request_line == "GET /close HTTP/1.1" and ("User-Agent", "test-agent/1.0") in resp.request_headers
        assert resp.ip == "127.0.0.1"
    finally:
        srv.close()


def test_limits_truncate_decoded_bytes_and_bad_responses_fail():
    bomb = gzip.compress(b"\0" * 20_000_000)  # 20 MB of zeros in ~20 KB
    srv = RawServer({
        "/big": ok(BODY),
        "/bomb": ok(bomb, "Content-Encoding: gzip"),
        "/bomb-chunked": chunked(bomb, "Content-Encoding: gzip", size=4096),
        "/garbage": b"SPAM 200 OK\r\n\r\n",
        "/badlen": b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "/badgzip": ok(b"not gzip at all", "Content-Encoding: gzip"),
        "/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly this",
    }, drop_idle=True)
    try:
        client = HttpClient("t", allow_private=True)
        resp, body, truncated = fetch(client, srv.base + "/big", keep=100)
        assert (body, truncated) == (BODY[:100], True)
        for path in ("/bomb", "/bomb-chunked"):  # decoded only as far as the limit: memory stays small
            tracemalloc.start()
            resp, body, truncated = fetch(client, srv.base + path, keep=1000)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert (body, truncated) == (b"\0" * 1000, True), path
            assert peak < 2_000_000, (path, peak)
        for path, reason, retryable in (("/garbage", "bad-response", False), ("/badlen", "bad-response", False),
                                        ("/badgzip", "payload-error", True), ("/short", "payload-error", True)):
            with pytest.raises(FetchError) as e:
                fetch(client, srv.base + path)
            assert (e.value.reason, e.value.retryable) == (reason, retryable), path
        with pytest.raises(FetchError) as e:  # nobody listening
            fetch(client, "http://127.0.0.1:9/")
        assert (e.value.reason, e.value.retryable) == ("connect-error", True)
    finally:
        srv.close()


def test_keep_alive_reuse_and_a_server_that_drops_idle_connections():
    async def many(client: HttpClient, url: str, n: int):
        try:
            return [await client.get(url, lambda r: 1 << 20) for _ in range(n)]
        finally:
            client.close()

    srv = RawServer({"/": ok(b"x")})
    try:
        res = asyncio.run(many(HttpClient("t", allow_private=True), srv.base + "/", 5))
        assert [b for _, b, _ in res] == [b"x"] * 5 and srv.connections == 1  # one connection, reused
    finally:
        srv.close()
    srv = RawServer({"/": ok(b"x")}, drop_idle=True)
    try:
        res = asyncio.run(many(HttpClient("t", allow_private=True), srv.base + "/", 5))
        assert [b for _, b, _ in res] == [b"x"] * 5 and srv.connections == 5  # stale ones retried, not failed
    finally:
        srv.close()


def test_private_addresses_and_timeouts():
    srv = RawServer({"/slow": lambda: (__import__("time").sleep(1.0), ok(b"late"))[1]})
    try:
        with pytest.raises(FetchError) as e:
            fetch(HttpClient("t"), srv.base + "/slow")
        assert (e.value.reason, e.value.retryable) == ("private-address", False)
        with pytest.raises(FetchError) as e:
            fetch(HttpClient("t", allow_private=True, timeout=0.3), srv.base + "/slow")
        assert (e.value.reason, e.value.retryable) == ("timeout", True)
    finally:
        srv.close()


def test_https_verifies_the_certificate(tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = RawServer({"/": ok(b"secret")}, tls=server_ctx)
    url = f"https://127.0.0.1:{srv.port}/"
    try:
        with pytest.raises(FetchError) as e:  # self-signed: not trusted by the system's CAs
            fetch(HttpClient("t", allow_private=True), url)
        assert (e.value.reason, e.value.retryable) == ("tls-error", False)
        client = HttpClient("t", allow_private=True)
        client._ssl = ssl.create_default_context(cafile=str(cert))  # trusting it, the page comes
        resp, body, _ = fetch(client, url)
        assert (resp.status, body) == (200, b"secret")
        assert f"Host: 127.0.0.1:{srv.port}" in srv.requests[-1].decode()
    finally:
        srv.close()

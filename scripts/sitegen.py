"""Local web sites for the demo and the crawl benchmark, and a server for them on 127.0.0.1.

    python scripts/sitegen.py pydoc DEST            # the standard library's docs as HTML (pydoc)
    python scripts/sitegen.py synthetic DEST -n 2000 # a linked site of N article pages
    python scripts/sitegen.py serve DIR [--port P]  # serve a directory (HTTP/1.1, keep-alive)
"""

from __future__ import annotations

import argparse
import contextlib
import html
import io
import os
import pydoc
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: a few dozen pure-Python standard-library modules: present on every machine with Python
STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions",
    "functools", "getopt", "glob", "gzip", "heapq", "hmac", "html", "html.parser", "http", "http.client",
    "http.server", "json", "json.decoder", "json.encoder", "keyword", "linecache", "logging", "mimetypes",
    "operator", "optparse", "pathlib", "pprint", "queue", "quopri", "random", "re", "sched", "secrets",
    "shlex", "shutil", "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "urllib", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "zipfile",
)

MARKER = ".sitegen-complete"


def render_pydoc_site(dest: Path, modules: tuple[str, ...] = STDLIB_MODULES) -> int:
    """Write one pydoc HTML page per module plus an index linking them; return pages written.

    A second call with the site already complete does nothing (the demo reruns fast).
    """
    dest = Path(dest)
    if (dest / MARKER).exists():
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    doc = pydoc.HTMLDoc()
    written = []
    for name in modules:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                obj, _ = pydoc.resolve(name)
                page = doc.page(pydoc.describe(obj), doc.document(obj, name))
        except (ImportError, pydoc.ErrorDuringImport):
            continue
        (dest / f"{name}.html").write_text(page, encoding="utf-8")
        written.append(name)
    items = "\n".join(f'<li><a href="{n}.html">{html.escape(n)}</a></li>' for n in written)
    index = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>Python standard library (pydoc)</title></head><body>"
        "<h1>Python standard library</h1><p>Documentation of a few dozen standard-library modules, "
        "rendered by pydoc on this machine.</p>\n<ul>\n" + items + "\n</ul></body></html>\n"
    )
    (dest / "index.html").write_text(index, encoding="utf-8")
    (dest / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n", encoding="utf-8")
    (dest / MARKER).write_text(f"{len(written)}\n")
    return len(written) + 1


_WORDS = (
    "the of and to in is was for that on as with by at from his an were are which this be or has had "
    "not first one their its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made river water system history people "
    "government century music series between century large number within village house around area "
    "found several under called although being well however including while second early them public"
).split()


def _paragraph(rng: random.Random, n_sent: int) -> str:
    out = []
    for _ in range(n_sent):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 22))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def generate_site(dest: Path, n_pages: int = 2000, links_per_page: int = 12, seed: int = 0) -> int:
    """A site of ``n_pages`` articles (~6 KB each) reachable from index.html, every page linking to
    ``links_per_page`` others (a ring, so all are reachable, plus random links) and to a nav bar."""
    dest = Path(dest)
    if (dest / MARKER).exists() and (dest / MARKER).read_text().strip() == str(n_pages):
        return 0
    rng = random.Random(seed)
    (dest / "a").mkdir(parents=True, exist_ok=True)
    nav = " | ".join(f'<a href="/a/{i}.html">Section {i}</a>' for i in range(0, min(n_pages, 50), 10))
    for i in range(n_pages):
        targets = {(i + 1) % n_pages} | {rng.randrange(n_pages) for _ in range(links_per_page - 1)}
        links = "".join(f'<li><a href="/a/{t}.html">Article {t}</a></li>' for t in sorted(targets))
        paras = "".join(f"<p>{_paragraph(rng, rng.randint(3, 7))}</p>" for _ in range(rng.randint(4, 9)))
        page = (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Article {i}</title></head>'
            f'<body><nav><a href="/">Home</a> | {nav}</nav><article><h1>Article {i}</h1>{paras}</article>'
            f"<aside><h2>See also</h2><ul>{links}</ul></aside><footer>Generated page {i}</footer></body></html>"
        )
        (dest / "a" / f"{i}.html").write_text(page, encoding="utf-8")
    (dest / "index.html").write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Home</title></head><body>'
        '<a href="/a/0.html">Start</a></body></html>',
        encoding="utf-8",
    )
    (dest / MARKER).write_text(f"{n_pages}\n")
    return n_pages + 1


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server would
    latency = 0.0  # seconds added before each response: a stand-in for a network round trip

    def send_head(self):
        if self.latency:
            time.sleep(self.latency)
        return super().send_head()

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add
        # ~40 ms to every keep-alive request of a sequential client such as wget
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path, port: int = 0, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``root`` on host:port (0 = any free port) in a thread; yield the base URL."""
    handler = partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_processes(
    root: Path, workers: int = 2, port: int = 0, host: str = "127.0.0.1", latency: float = 0.0
) -> Iterator[str]:
    """Serve ``root`` from ``workers`` forked processes sharing one listening socket, as a
    production server's worker processes do (one Python process serves one request at a time
    per core, whatever its threads), each response delayed by ``latency`` seconds. Yield the base
    URL; the workers are stopped on exit."""
    import signal

    handler = partial(type("_Handler", (_QuietHandler,), {"latency": latency}), directory=str(root))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # worker: serve until terminated
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        pids.append(pid)
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)
        server.server_close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pydoc")
    p.add_argument("dest", type=Path)
    s = sub.add_parser("synthetic")
    s.add_argument("dest", type=Path)
    s.add_argument("-n", "--pages", type=int, default=2000)
    v = sub.add_parser("serve")
    v.add_argument("root", type=Path)
    v.add_argument("--port", type=int, default=8000)
    a = ap.parse_args()
    if a.cmd == "pydoc":
        print(f"{render_pydoc_site(a.dest)} pages written to {a.dest}")
    elif a.cmd == "synthetic":
        print(f"{generate_site(a.dest, a.pages)} pages written to {a.dest}")
    else:
        with serve(a.root, a.port) as url:
            print(f"serving {a.root} at {url}/ (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()

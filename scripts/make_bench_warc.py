"""Build a benchmark WARC of real-looking pages from the real HTML in a Common Crawl sample.

Every page is one of the sample's HTML responses (original bytes, charset and headers) with its
paragraphs and list items permuted by a seeded RNG and a URL of its own, so no two pages are
identical and the work per page matches real Common Crawl pages. Written with warcio like
``llmctl crawl``'s output: gzip, one record per member, warcinfo then request + response pairs.

    python scripts/make_bench_warc.py ../shared/data/warc/cc-sample.warc.gz bench.warc.gz --pages 2000
"""

from __future__ import annotations

import argparse
import io
import random
import re
import sys
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

_BLOCKS = (re.compile(rb"<p[\s>].*?</p>", re.S | re.I), re.compile(rb"<li[\s>].*?</li>", re.S | re.I))


def real_pages(src: Path) -> list[tuple[str, list[tuple[str, str]], str, bytes]]:
    """(url, http headers, status line, body) of every 200 HTML response in ``src``."""
    pages = []
    with open(src, "rb") as fh:
        for rec in ArchiveIterator(fh):
            if rec.rec_type != "response" or rec.http_headers is None:
                continue
            if rec.http_headers.get_statuscode() != "200":
                continue
            ctype = rec.http_headers.get_header("Content-Type") or ""
            if "html" not in ctype.lower():
                continue
            body = rec.content_stream().read()
            keep = [(k, v) for k, v in rec.http_headers.headers
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")]
            pages.append((rec.rec_headers.get_header("WARC-Target-URI"), keep, rec.http_headers.statusline, body))
    return pages


def vary(body: bytes, rng: random.Random) -> bytes:
    """Permute the page's paragraphs and list items among their own positions."""
    for pattern in _BLOCKS:
        spans = [m.span() for m in pattern.finditer(body)]
        if len(spans) < 2:
            continue
        parts = [body[a:b] for a, b in spans]
        rng.shuffle(parts)
        out, last = [], 0
        for (a, b), part in zip(spans, parts, strict=True):
            out.append(body[last:a])
            out.append(part)
            last = b
        out.append(body[last:])
        body = b"".join(out)
    return body


def build(src: Path, dst: Path, pages: int, seed: int = 0) -> int:
    originals = real_pages(src)
    if not originals:
        raise SystemExit(f"{src}: no HTML responses to build from")
    rng = random.Random(seed)
    with open(dst, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        w.write_record(w.create_warcinfo_record(dst.name, {"software": "llmctl scripts/make_bench_warc.py"}))
        for i in range(pages):
            url, headers, status, body = originals[i % len(originals)]
            sep = "&" if "?" in url else "?"
            page_url = f"{url}{sep}llmctl-bench={i}"
            req = w.create_warc_record(page_url, "request", http_headers=StatusAndHeaders(
                f"GET {page_url} HTTP/1.1", [("User-Agent", "llmctl-bench")], is_http_request=True))
            resp = w.create_warc_record(page_url, "response", payload=io.BytesIO(vary(body, rng)),
                                        http_headers=StatusAndHeaders(status, headers, protocol="HTTP/1.1"))
            w.write_record(req)
            w.write_record(resp)
    return pages


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    n = build(a.src, a.dst, a.pages, a.seed)
    print(f"wrote {n} pages to {a.dst} ({a.dst.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Crawl throughput: `llmctl crawl` against `wget --recursive --warc-file` on the same local site.

    python scripts/bench_crawl.py [--pages 2000] [--repeat 1]

Generates a site of N linked article pages (scripts/sitegen.py), serves it on 127.0.0.1 from this
process (threaded HTTP/1.1 server), and crawls it completely with both tools, politeness off, each
writing gzip WARC. Pages/s = HTTP responses in the tool's WARC / wall-clock seconds of the whole
command (start-up included). The server is the same for both; on a small machine it competes with
the crawler for CPU, which is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from sitegen import generate_site, serve_processes  # noqa: E402

WGET = shutil.which("wget") or "/usr/bin/wget"


def responses(paths: list[Path]) -> tuple[int, int]:
    """(HTTP responses, of which 200) in WARC files."""
    n = ok = 0
    for p in paths:
        with open(p, "rb") as fh:
            for rec in ArchiveIterator(fh):
                if rec.rec_type == "response" and rec.http_headers is not None:
                    n += 1
                    ok += rec.http_headers.get_statuscode() == "200"
    return n, ok


def run_wget(base: str, work: Path) -> tuple[float, int, int]:
    work.mkdir(parents=True)
    cmd = [
        WGET, "--recursive", "--level=inf", "--no-verbose", "--no-host-directories", "--tries=3",
        "--directory-prefix", str(work / "files"), "--warc-file", str(work / "wget"), "--no-warc-keep-log",
        f"{base}/",
    ]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if res.returncode not in (0, 8):  # 8 = some server error responses (404s), not a failure here
        raise SystemExit(f"wget failed ({res.returncode}): {res.stderr[-500:]}")
    return (secs, *responses(sorted(work.glob("*.warc.gz"))))


def run_llmctl(base: str, work: Path, per_host: int, concurrency: int) -> tuple[float, int, int, dict]:
    out = work / "crawl"
    cmd = [
        sys.executable, "-m", "llmctl", "crawl", f"{base}/", "--out", str(out), "--allow-private",
        "--delay", "0", "--per-host", str(per_host), "--concurrency", str(concurrency),
        "--max-depth", "1000", "--max-pages", "0",
    ]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LLMCTL_PROGRESS": "0"})
    secs = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"llmctl crawl failed ({res.returncode}): {res.stderr[-800:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    # robots.txt (a 404 here) is recorded too; count it like wget's robots.txt request
    return (secs, *responses(sorted(out.glob("*.warc.gz"))), manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1, help="Runs of each tool (alternating); the best is reported.")
    ap.add_argument("--per-host", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--server-workers", type=int, default=2, help="Processes serving the site.")
    ap.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-site")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    a = ap.parse_args()

    generate_site(a.site, a.pages)
    best: dict[str, tuple] = {}
    with serve_processes(a.site, a.server_workers) as base, tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp:
        for i in range(a.repeat):
            w = run_wget(base, Path(tmp) / f"wget-{i}")
            c = run_llmctl(base, Path(tmp) / f"llmctl-{i}", a.per_host, a.concurrency)
            print(f"run {i}: wget {w[1]} responses in {w[0]:.2f} s; llmctl {c[1]} responses in {c[0]:.2f} s",
                  flush=True)
            if "wget" not in best or w[1] / w[0] > best["wget"][1] / best["wget"][0]:
                best["wget"] = w
            if "llmctl" not in best or c[1] / c[0] > best["llmctl"][1] / best["llmctl"][0]:
                best["llmctl"] = c
    ws, wn, wok = best["wget"]
    cs, cn, cok, man = best["llmctl"]
    wr, cr = wn / ws, cn / cs
    print(f"\nsite: {a.pages} article pages + index, served from 127.0.0.1 by a threaded http.server")
    print(f"{'tool':<28}{'responses':>10}{'of which 200':>14}{'seconds':>10}{'pages/s':>10}")
    print(f"{'wget --recursive --warc':<28}{wn:>10}{wok:>14}{ws:>10.2f}{wr:>10.1f}")
    print(f"{'llmctl crawl':<28}{cn:>10}{cok:>14}{cs:>10.2f}{cr:>10.1f}")
    print(f"ratio llmctl / wget: {cr / wr:.2f}x  (llmctl's own in-loop rate: {man['stats']['pages_per_second']} pages/s)")
    if a.json:
        a.json.write_text(json.dumps({
            "pages": a.pages, "wget": {"responses": wn, "seconds": ws, "pages_per_s": wr},
            "llmctl": {"responses": cn, "seconds": cs, "pages_per_s": cr,
                       "in_loop_pages_per_s": man["stats"]["pages_per_second"]},
            "ratio": cr / wr,
        }, indent=2))


if __name__ == "__main__":
    main()

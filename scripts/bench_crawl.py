"""Crawl throughput: `llmctl crawl` against `wget --recursive --warc-file` on the same local site.

    python scripts/bench_crawl.py [--pages 2000] [--repeat 3]

Generates a site of N linked article pages (scripts/sitegen.py), serves it on 127.0.0.1 from
forked worker processes (threaded HTTP/1.1 http.server each, like a production server's workers),
and crawls it completely with both tools, politeness off, each writing gzip WARC, alternating runs.
Pages/s = HTTP responses in the tool's WARC / wall-clock seconds of the whole command, start-up
included (median over runs). CPU ms/page (user + sys of the crawler process) is reported beside it:
on a shared, loaded machine wall time is noisy and CPU time is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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


def timed(cmd: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds, CPU seconds it used (user + sys), the result)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), res


def run_wget(base: str, work: Path) -> dict:
    work.mkdir(parents=True)
    cmd = [
        WGET, "--recursive", "--level=inf", "--no-verbose", "--no-host-directories", "--tries=3",
        "--directory-prefix", str(work / "files"), "--warc-file", str(work / "wget"), "--no-warc-keep-log",
        f"{base}/",
    ]
    wall, cpu, res = timed(cmd)
    if res.returncode not in (0, 8):  # 8 = some server error responses (404s), not a failure here
        raise SystemExit(f"wget failed ({res.returncode}): {res.stderr[-500:]}")
    n, ok = responses(sorted(work.glob("*.warc.gz")))
    return {"wall": wall, "cpu": cpu, "responses": n, "ok": ok}


def run_llmctl(base: str, work: Path, per_host: int, concurrency: int) -> dict:
    out = work / "crawl"
    cmd = [
        sys.executable, "-m", "llmctl", "crawl", f"{base}/", "--out", str(out), "--allow-private",
        "--delay", "0", "--per-host", str(per_host), "--concurrency", str(concurrency),
        "--max-depth", "1000", "--max-pages", "0",
    ]
    wall, cpu, res = timed(cmd, env={**os.environ, "LLMCTL_PROGRESS": "0"})
    if res.returncode != 0:
        raise SystemExit(f"llmctl crawl failed ({res.returncode}): {res.stderr[-800:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    n, ok = responses(sorted(out.glob("*.warc.gz")))  # robots.txt (a 404) is recorded, as wget's is
    return {"wall": wall, "cpu": cpu, "responses": n, "ok": ok, "in_loop": manifest["stats"]["pages_per_second"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5, help="Runs of each tool, alternating; medians reported.")
    ap.add_argument("--per-host", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--server-workers", type=int, default=2, help="Processes serving the site.")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 5.0],
                    help="Delay the server adds to each response (a network round trip); one table per value.")
    ap.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-site")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    a = ap.parse_args()

    generate_site(a.site, a.pages)
    results = {}
    for latency_ms in a.latency_ms:
        results[f"latency_{latency_ms:g}ms"] = bench(a, latency_ms)
    if a.json:
        a.json.write_text(json.dumps({"pages": a.pages, **results}, indent=2))


def bench(a: argparse.Namespace, latency_ms: float) -> dict:
    runs: dict[str, list[dict]] = {"wget": [], "llmctl": []}
    with (
        serve_processes(a.site, a.server_workers, latency=latency_ms / 1000) as base,
        tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp,
    ):
        for i in range(a.repeat):
            w = run_wget(base, Path(tmp) / f"wget-{i}")
            c = run_llmctl(base, Path(tmp) / f"llmctl-{i}", a.per_host, a.concurrency)
            runs["wget"].append(w)
            runs["llmctl"].append(c)
            print(f"run {i}: wget {w['responses']} responses in {w['wall']:.2f} s ({w['cpu']:.2f} s CPU); "
                  f"llmctl {c['responses']} in {c['wall']:.2f} s ({c['cpu']:.2f} s CPU)", flush=True)
    load = os.getloadavg()[0]
    print(f"\nsite: {a.pages} article pages + index, served from 127.0.0.1 by {a.server_workers} "
          f"http.server processes, {latency_ms:g} ms added per response; {a.repeat} alternating runs; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'tool':<26}{'responses':>10}{'median s':>10}{'pages/s':>9}{'best p/s':>10}{'CPU ms/page':>13}")
    summary = {}
    for name, label in (("wget", "wget --recursive --warc"), ("llmctl", "llmctl crawl")):
        rs = runs[name]
        n = rs[0]["responses"]
        med = statistics.median(r["wall"] for r in rs)
        best = min(r["wall"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs) / n * 1e3
        summary[name] = {"responses": n, "median_seconds": med, "pages_per_s": n / med, "best_pages_per_s": n / best,
                         "cpu_ms_per_page": cpu, "runs": rs}
        print(f"{label:<26}{n:>10}{med:>10.2f}{n / med:>9.1f}{n / best:>10.1f}{cpu:>13.2f}")
    ratio = summary["llmctl"]["pages_per_s"] / summary["wget"]["pages_per_s"]
    in_loop = statistics.median(r["in_loop"] for r in runs["llmctl"])
    print(f"ratio llmctl / wget (median pages/s): {ratio:.2f}x; best-run ratio "
          f"{summary['llmctl']['best_pages_per_s'] / summary['wget']['best_pages_per_s']:.2f}x; "
          f"llmctl's rate inside the crawl loop (start-up excluded): {in_loop} pages/s")
    return {"load": load, **summary, "ratio": ratio, "llmctl_in_loop_pages_per_s": in_loop}


if __name__ == "__main__":
    main()

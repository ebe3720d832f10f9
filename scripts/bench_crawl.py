"""Crawl throughput: `llmctl crawl` against `wget --recursive --warc-file` on the same local site.

    python scripts/bench_crawl.py [--pages 2000] [--repeat 3]

Generates a site of N linked article pages (scripts/sitegen.py), serves it on 127.0.0.1 from
forked worker processes (threaded HTTP/1.1 http.server each, like a production server's workers),
and crawls it completely with both tools, politeness off, each writing gzip WARC (one gzip member
per record; wget compresses at zlib level 9, llmctl at 6, so its WARC is a little larger),
alternating runs.
Pages/s = HTTP responses in the tool's WARC / wall-clock seconds of the whole command, start-up
included; the best and the median over the alternating runs are reported, and the ratio of the
bests (on a shared machine the best run is the one least disturbed by other work). CPU ms/page
(user + sys of the crawler process) is reported beside it, and so is the CPU the server spent per
response during each tool's runs, so that one can see the server is neither starved nor the
bottleneck. The load average is printed before and after.
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


def server_cpu() -> float:
    """CPU seconds (user + sys) used so far by this process's live children: the server workers."""
    pid = os.getpid()
    total = 0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return float("nan")
    for kid in kids:
        try:
            fields = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], **kw) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds, CPU seconds it used (user + sys), CPU seconds the
    server used meanwhile, the result)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0 = server_cpu()
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t
    s1 = server_cpu()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), s1 - s0, res


def run_wget(base: str, work: Path) -> dict:
    work.mkdir(parents=True)
    cmd = [
        WGET, "--recursive", "--level=inf", "--no-verbose", "--no-host-directories", "--tries=3",
        "--directory-prefix", str(work / "files"), "--warc-file", str(work / "wget"), "--no-warc-keep-log",
        f"{base}/",
    ]
    wall, cpu, server, res = timed(cmd)
    if res.returncode not in (0, 8):  # 8 = some server error responses (404s), not a failure here
        raise SystemExit(f"wget failed ({res.returncode}): {res.stderr[-500:]}")
    warcs = sorted(work.glob("*.warc.gz"))
    n, ok = responses(warcs)
    return {"wall": wall, "cpu": cpu, "server_cpu": server, "responses": n, "ok": ok,
            "warc_bytes": sum(p.stat().st_size for p in warcs)}


def run_llmctl(base: str, work: Path, per_host: int, concurrency: int) -> dict:
    out = work / "crawl"
    cmd = [
        sys.executable, "-m", "llmctl", "crawl", f"{base}/", "--out", str(out), "--allow-private",
        "--delay", "0", "--per-host", str(per_host), "--concurrency", str(concurrency),
        "--max-depth", "1000", "--max-pages", "0",
    ]
    wall, cpu, server, res = timed(cmd, env={**os.environ, "LLMCTL_PROGRESS": "0"})
    if res.returncode != 0:
        raise SystemExit(f"llmctl crawl failed ({res.returncode}): {res.stderr[-800:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    warcs = sorted(out.glob("*.warc.gz"))
    n, ok = responses(warcs)  # robots.txt (a 404) is recorded, as wget's is
    return {"wall": wall, "cpu": cpu, "server_cpu": server, "responses": n, "ok": ok,
            "warc_bytes": sum(p.stat().st_size for p in warcs), "in_loop": manifest["stats"]["pages_per_second"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5, help="Runs of each tool, alternating; best and median reported.")
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
    load_before = os.getloadavg()[0]
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
          f"load average {load_before:.2f} before, {load:.2f} after, on {os.cpu_count()} CPUs")
    print(f"{'tool':<26}{'responses':>10}{'best s':>8}{'best p/s':>10}{'median p/s':>12}{'CPU ms/page':>13}"
          f"{'server CPU ms/page':>20}{'WARC MB':>9}")
    summary = {}
    for name, label in (("wget", "wget --recursive --warc"), ("llmctl", "llmctl crawl")):
        rs = runs[name]
        n = rs[0]["responses"]
        med = statistics.median(r["wall"] for r in rs)
        best = min(r["wall"] for r in rs)
        cpu = min(r["cpu"] for r in rs) / n * 1e3
        server = statistics.median(r["server_cpu"] for r in rs) / n * 1e3
        summary[name] = {"responses": n, "best_seconds": best, "median_seconds": med, "pages_per_s": n / med,
                         "best_pages_per_s": n / best, "cpu_ms_per_page": cpu, "server_cpu_ms_per_page": server,
                         "runs": rs}
        print(f"{label:<26}{n:>10}{best:>8.2f}{n / best:>10.1f}{n / med:>12.1f}{cpu:>13.2f}{server:>20.2f}"
              f"{rs[0]['warc_bytes'] / 1e6:>9.2f}")
    best_ratio = summary["llmctl"]["best_pages_per_s"] / summary["wget"]["best_pages_per_s"]
    ratio = summary["llmctl"]["pages_per_s"] / summary["wget"]["pages_per_s"]
    in_loop = statistics.median(r["in_loop"] for r in runs["llmctl"])
    print(f"ratio llmctl / wget: best run {best_ratio:.2f}x, median {ratio:.2f}x; CPU per page "
          f"{summary['llmctl']['cpu_ms_per_page'] / summary['wget']['cpu_ms_per_page']:.2f}x wget's (least of each); "
          f"llmctl's rate inside the crawl loop (start-up excluded, median): {in_loop} pages/s")
    return {"load_before": load_before, "load_after": load, **summary, "best_ratio": best_ratio, "median_ratio": ratio,
            "llmctl_in_loop_pages_per_s": in_loop}


if __name__ == "__main__":
    main()

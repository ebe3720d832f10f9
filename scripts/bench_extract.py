"""Benchmark: `llmctl extract` docs/s with 1 and 2 workers vs datatrove's WarcReader → Trafilatura.

Both run on the same WARC of real-looking pages (scripts/make_bench_warc.py: the real HTML responses
of a Common Crawl sample, permuted and given their own URLs), both with trafilatura's FineWeb
settings and deduplicate=False, both timed as whole commands (process start, imports, reading,
extraction, writing). datatrove lives in its own venv outside the repository:

    python3 -m venv /work/peers/datatrove-venv
    /work/peers/datatrove-venv/bin/pip install 'datatrove[io,processing]' warcio lxml_html_clean
    # optional, to compare with the same trafilatura version as ours:
    /work/peers/datatrove-venv/bin/pip install --no-deps --target /work/peers/datatrove-traf2 trafilatura==2.3.1

    python scripts/bench_extract.py --pages 2000 --repeat 2

Rates are pages in the WARC / wall seconds (best of --repeat, rounds interleaved so load changes hit
every contender alike). Targets: ≥ 1.0× datatrove at 1 worker, ≥ 1.8× at 2 workers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_bench_warc import build  # noqa: E402

DATATROVE_JOB = r"""
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.readers import WarcReader
from datatrove.pipeline.writers import JsonlWriter
folder, name, out, tasks, timeout = sys.argv[1:]
LocalPipelineExecutor(
    pipeline=[
        WarcReader(folder, glob_pattern=name),
        Trafilatura(favour_precision=True, deduplicate=False, timeout=float(timeout)),
        JsonlWriter(out),
    ],
    tasks=int(tasks), workers=int(tasks), logging_dir=out + "-logs",
).run()
"""


def run_ours(warc: Path, out: Path, workers: int, timeout: float) -> tuple[float, int, dict]:
    env = {**os.environ, "LLMCTL_PROGRESS": "0"}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "llmctl", "extract", str(warc), "--out", str(out), "--workers", str(workers),
         "--timeout", str(timeout), "--force"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    return wall, stats["docs"], stats


def run_datatrove(python: str, warc: Path, out: Path, tasks: int, timeout: float, pythonpath: str | None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    for p in (out, Path(str(out) + "-logs")):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    t = time.perf_counter()
    subprocess.run([python, "-c", DATATROVE_JOB, str(warc.parent), warc.name, str(out), str(tasks), str(timeout)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    docs = 0
    for f in out.glob("*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += sum(1 for _ in fh)
    return wall, docs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="llmctl extract vs datatrove WarcReader → Trafilatura")
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--src", type=Path, default=ROOT.parent / "shared/data/warc/cc-sample.warc.gz")
    ap.add_argument("--warc", type=Path, help="use this WARC instead of building one")
    ap.add_argument("--datatrove-python", default="/work/peers/datatrove-venv/bin/python")
    ap.add_argument("--datatrove-traf2", default="/work/peers/datatrove-traf2",
                    help="a --target dir with trafilatura 2.x for datatrove ('' to skip that row)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-document timeout given to both")
    ap.add_argument("--only", default="", help="comma list of rows to run (ours1,ours2,dt1,dt1-traf2,dt2)")
    a = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    warc = a.warc
    if warc is None:
        warc = tmp / "bench.warc.gz"
        build(a.src, warc, a.pages)
    pages = a.pages
    print(f"WARC: {warc} ({warc.stat().st_size / 1e6:.1f} MB, {pages} pages); cores: {os.cpu_count()}; "
          f"load avg before: {os.getloadavg()[0]:.2f}", flush=True)

    rows: dict[str, dict] = {}
    contenders = [
        ("ours1", "llmctl extract --workers 1", lambda: run_ours(warc, tmp / "ours1", 1, a.timeout)),
        ("ours2", "llmctl extract --workers 2", lambda: run_ours(warc, tmp / "ours2", 2, a.timeout)),
        ("dt1", "datatrove 1 task (trafilatura 1.11)",
         lambda: run_datatrove(a.datatrove_python, warc, tmp / "dt1", 1, a.timeout, None)),
    ]
    if a.datatrove_traf2 and Path(a.datatrove_traf2).is_dir():
        contenders.append(("dt1-traf2", "datatrove 1 task (trafilatura 2.3.1)",
                           lambda: run_datatrove(a.datatrove_python, warc, tmp / "dt1t2", 1, a.timeout, a.datatrove_traf2)))
    contenders.append(("dt2", "datatrove 2 tasks/workers (trafilatura 1.11)",
                       lambda: run_datatrove(a.datatrove_python, warc, tmp / "dt2", 2, a.timeout, None)))
    if a.only:
        keep = set(a.only.split(","))
        contenders = [c for c in contenders if c[0] in keep]
    for rnd in range(a.repeat):
        for key, label, fn in contenders:
            res = fn()
            wall, docs = res[0], res[1]
            r = rows.setdefault(key, {"label": label, "walls": [], "docs": docs})
            r["walls"].append(wall)
            if len(res) > 2:
                r["inner_dps"] = res[2]["docs_per_second"]
            print(f"  round {rnd + 1}: {label:48s} {wall:7.1f} s  {pages / wall:6.1f} pages/s  {docs} docs  "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\n{'contender':48s} {'best s':>8s} {'pages/s':>8s} {'docs':>6s}")
    for r in rows.values():
        r["best"] = min(r["walls"])
        r["rate"] = pages / r["best"]
        print(f"{r['label']:48s} {r['best']:8.1f} {r['rate']:8.1f} {r['docs']:6d}")
    base = rows.get("dt1")
    if base:
        for key in ("ours1", "ours2"):
            if key in rows:
                print(f"ratio {rows[key]['label']} / datatrove 1 task (traf 1.11): {rows[key]['rate'] / base['rate']:.2f}×")
    for other in ("dt1-traf2", "dt2"):
        if other in rows:
            for key in ("ours1", "ours2"):
                if key in rows:
                    print(f"ratio {rows[key]['label']} / {rows[other]['label']}: {rows[key]['rate'] / rows[other]['rate']:.2f}×")
    print(f"load avg after: {os.getloadavg()[0]:.2f}; outputs in {tmp}")


if __name__ == "__main__":
    main()

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
import threading
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


class TreeCPU:
    """CPU seconds (user + system) used by a process and all its descendants, sampled from /proc.

    Wall time on a shared machine measures our share of contended cores; CPU seconds per page do not
    depend on what else runs. Short-lived processes may be missed by up to one sampling interval.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval = root, interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        parent, cpu = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parent[int(d)] = int(rest[1])
            cpu[int(d)] = (int(rest[11]) + int(rest[12])) / self._tick
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, pp in parent.items():
            children.setdefault(pp, []).append(pid)
        while frontier:
            for c in children.get(frontier.pop(), []):
                if c not in tree:
                    tree.add(c)
                    frontier.append(c)
        for pid in tree:
            if pid in cpu:
                self.seen[pid] = max(self.seen.get(pid, 0.0), cpu[pid])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return sum(self.seen.values())


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meter = TreeCPU(p.pid)
    rc = p.wait()
    wall = time.perf_counter() - t
    cpu = meter.stop()
    if rc != 0:
        raise SystemExit(f"{cmd[:4]}… exited with {rc}")
    return wall, cpu


def run_ours(warc: Path, out: Path, workers: int, timeout: float) -> tuple[float, int, dict]:
    env = {**os.environ, "LLMCTL_PROGRESS": "0"}
    wall, cpu = _timed(
        [sys.executable, "-m", "llmctl", "extract", str(warc), "--out", str(out), "--workers", str(workers),
         "--timeout", str(timeout), "--force"], env)
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    return wall, stats["docs"], cpu, stats


def run_datatrove(python: str, warc: Path, out: Path, tasks: int, timeout: float, pythonpath: str | None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    for p in (out, Path(str(out) + "-logs")):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    wall, cpu = _timed([python, "-c", DATATROVE_JOB, str(warc.parent), warc.name, str(out), str(tasks), str(timeout)],
                       env)
    docs = 0
    for f in out.glob("*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += sum(1 for _ in fh)
    return wall, docs, cpu


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
    if not Path(a.datatrove_python).exists():
        print(f"note: {a.datatrove_python} not found; install datatrove as in this script's docstring to compare")
        contenders = [c for c in contenders if not c[0].startswith("dt")]
    if a.only:
        keep = set(a.only.split(","))
        contenders = [c for c in contenders if c[0] in keep]
    for rnd in range(a.repeat):
        for key, label, fn in contenders:
            wall, docs, cpu = fn()[:3]
            r = rows.setdefault(key, {"label": label, "walls": [], "cpus": [], "docs": docs})
            r["walls"].append(wall)
            r["cpus"].append(cpu)
            print(f"  round {rnd + 1}: {label:48s} {wall:7.1f} s  {pages / wall:6.1f} pages/s  cpu {cpu:7.1f} s  "
                  f"{docs} docs  (load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\n{'contender':48s} {'best s':>8s} {'pages/s':>8s} {'cpu s':>8s} {'pages/cpu-s':>12s} {'docs':>6s}")
    for r in rows.values():
        r["best"] = min(r["walls"])
        r["rate"] = pages / r["best"]
        r["cpu"] = min(r["cpus"])
        print(f"{r['label']:48s} {r['best']:8.1f} {r['rate']:8.1f} {r['cpu']:8.1f} {pages / r['cpu']:12.1f} {r['docs']:6d}")
    base = rows.get("dt1")
    if base:
        for key in ("ours1", "ours2"):
            if key in rows:
                print(f"ratio {rows[key]['label']} / datatrove 1 task (traf 1.11): {rows[key]['rate'] / base['rate']:.2f}× "
                      f"wall, {base['cpu'] / rows[key]['cpu']:.2f}× pages per CPU-second")
    for other in ("dt1-traf2", "dt2"):
        if other in rows:
            for key in ("ours1", "ours2"):
                if key in rows:
                    print(f"ratio {rows[key]['label']} / {rows[other]['label']}: {rows[key]['rate'] / rows[other]['rate']:.2f}×")
    print(f"load avg after: {os.getloadavg()[0]:.2f}; outputs in {tmp}")


if __name__ == "__main__":
    main()

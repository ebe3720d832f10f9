#!/usr/bin/env python3
"""Benchmark ``llmctl dedup`` against datatrove's four MinHash stages on the same documents, in one run.

    .venv/bin/python scripts/bench_dedup.py --docs-dir /tmp/bench-docs --n 10000

Documents come from scripts/make_bench_docs.py (real ../shared/data text in web-page shapes, with
planted exact and near duplicates); it is run first if --docs-dir holds no artifact. Then, each in
its own subprocess and one worker each:

* llmctl: the whole ``llmctl dedup`` stage (exact + MinHash LSH near + boilerplate lines), Parquet in
  and out, 112 permutations = 14 bands × 8 rows over word 5-grams;
* datatrove 0.10.1 (venv /work/peers/datatrove-venv): ParquetReader → MinhashDedupSignature,
  MinhashDedupBuckets, MinhashDedupCluster, ParquetReader → MinhashDedupFilter → JsonlWriter, same
  5-grams, 14 × 8, local executor, one task/worker (the buckets stage as 14 tasks run in sequence).

Reported: wall time and docs/s of each side (I/O included), peak RSS (the largest process), the
keep/drop agreement per document, and how the duplicates found compare (documents removed by
both, by one side only) and how many planted duplicates each side caught.
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

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DT_VENV = Path("/work/peers/datatrove-venv")
PY = sys.executable

# runs a command and prints the peak RSS (KiB) of its largest descendant process
MEASURE = (
    "import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
    "print(json.dumps({'rc': r.returncode, 'wall': time.time() - t, "
    "'max_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr)"
).replace("import resource", "import json, resource")

DATATROVE = r'''
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.writers import JsonlWriter

docs, work = sys.argv[1], sys.argv[2]
cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
reader = lambda: ParquetReader(docs, text_key="text", id_key="id", glob_pattern="docs-*.parquet")
log = lambda s: f"{work}/logs/{s}"
LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)],
                      tasks=1, workers=1, logging_dir=log("sig")).run()
LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets",
                                                    config=cfg)],
                      tasks=cfg.num_buckets, workers=1, logging_dir=log("buckets")).run()
LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove",
                                                    config=cfg)],
                      tasks=1, workers=1, logging_dir=log("cluster")).run()
LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(input_folder=f"{work}/remove",
                                exclusion_writer=JsonlWriter(f"{work}/removed", compression=None)),
                                JsonlWriter(f"{work}/out", compression=None)],
                      tasks=1, workers=1, logging_dir=log("filter")).run()
'''


def measured(cmd: list[str]) -> dict:
    p = subprocess.run([PY, "-c", MEASURE, *cmd], capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1]
    res = json.loads(last)
    if res["rc"] != 0:
        sys.exit(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs-dir", type=Path, default=Path("/tmp/bench-docs"))
    ap.add_argument("--n", type=int, default=10_000, help="documents to build if --docs-dir is empty")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=1, help="llmctl --workers (datatrove always runs one)")
    ap.add_argument("--jaccard-threshold", type=float, default=None,
                    help="llmctl --jaccard-threshold (0: unverified banding, as datatrove; default: llmctl's)")
    ap.add_argument("--skip-datatrove", action="store_true",
                    help="reuse datatrove's output and timing from an earlier run in the same --work")
    a = ap.parse_args()
    if not (a.docs_dir / "manifest.json").is_file():
        subprocess.run([PY, str(ROOT / "scripts" / "make_bench_docs.py"), "--out", str(a.docs_dir),
                        "--docs", str(a.n)], check=True)
    if not (DT_VENV / ".ready").exists():
        sys.exit(f"{DT_VENV}: datatrove venv not ready; python3 -m venv {DT_VENV} && "
                 f"{DT_VENV}/bin/pip install 'datatrove[processing]' && touch {DT_VENV}/.ready")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-dedup-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = pq.read_table(sorted(a.docs_dir.glob("docs-*.parquet")),
                         columns=["id", "planted_dup_of", "planted_dup_kind"]).to_pylist()
    n = len(docs)

    extra = [] if a.jaccard_threshold is None else ["--jaccard-threshold", str(a.jaccard_threshold)]
    shutil.rmtree(work / "ours-rejected", ignore_errors=True)
    load_before = os.getloadavg()
    ours = measured([PY, "-m", "llmctl", "dedup", str(a.docs_dir), "--out", str(work / "ours"),
                     "--keep-rejected", str(work / "ours-rejected"), "--workers", str(a.workers), "--force", *extra])
    dtw = work / "dt"
    dt_timing = work / "dt-timing.json"
    if a.skip_datatrove and dt_timing.is_file():
        dt = json.loads(dt_timing.read_text())
        print(f"datatrove: reused from {dt_timing} (load then {dt.get('load')})")
    else:
        shutil.rmtree(dtw, ignore_errors=True)
        dt = measured([str(DT_VENV / "bin" / "python"), "-c", DATATROVE, str(a.docs_dir), str(dtw)])
        dt["load"] = [round(x, 1) for x in os.getloadavg()]
        dt_timing.write_text(json.dumps(dt))
    print(f"load average (1, 5, 15 min) before llmctl: {[round(x, 1) for x in load_before]}, "
          f"after datatrove: {[round(x, 1) for x in os.getloadavg()]} on {os.cpu_count()} cores")

    manifest = json.loads((work / "ours" / "manifest.json").read_text())
    rej = pq.read_table(sorted((work / "ours-rejected").glob("rejected-*.parquet")),
                        columns=["id", "reason"]).to_pylist()
    ours_dup = {r["id"] for r in rej if r["reason"] in ("exact", "near")}
    ours_boiler = {r["id"] for r in rej if r["reason"] == "boilerplate"}
    dt_removed = set()
    for f in (dtw / "removed").glob("*.jsonl"):
        dt_removed.update(json.loads(line)["id"] for line in f.read_text().splitlines() if line.strip())

    planted = {d["id"]: d["planted_dup_kind"] for d in docs if d["planted_dup_of"]}
    agree = sum(1 for d in docs if (d["id"] in ours_dup) == (d["id"] in dt_removed))
    o_rate, d_rate = n / ours["wall"], n / dt["wall"]
    print(f"documents: {n} in {a.docs_dir} ({len(planted)} planted duplicates: "
          f"{sum(v == 'exact' for v in planted.values())} exact, {sum(v == 'near' for v in planted.values())} near)")
    print(f"{'':12s}{'wall s':>9s}{'docs/s':>9s}{'peak RSS MiB':>14s}{'MiB per 10k docs':>18s}")
    for name, r, rate in (("llmctl", ours, o_rate), ("datatrove", dt, d_rate)):
        mib = r["max_rss_kib"] / 1024
        print(f"{name:12s}{r['wall']:9.2f}{rate:9.1f}{mib:14.0f}{mib * 10000 / n:18.0f}")
    print(f"speed ratio llmctl/datatrove: {o_rate / d_rate:.2f}x "
          f"(llmctl phases: signatures {manifest['stats']['seconds_signatures']}s, plan "
          f"{manifest['stats']['seconds_plan']}s, write {manifest['stats']['seconds_write']}s)")
    print(f"removed as duplicates: llmctl {len(ours_dup)} (+{len(ours_boiler)} emptied by boilerplate-line "
          f"removal, {manifest['stats']['lines_removed']} lines), datatrove {len(dt_removed)}")
    print(f"same decision (duplicate or not) on {agree}/{n} docs = {100 * agree / n:.2f}%; "
          f"both {len(ours_dup & dt_removed)}, llmctl only {len(ours_dup - dt_removed)}, "
          f"datatrove only {len(dt_removed - ours_dup)}")
    for kind in ("exact", "near"):
        ids = [i for i, k in planted.items() if k == kind]
        if ids:
            print(f"planted {kind} duplicates caught: llmctl {sum(i in ours_dup for i in ids)}/{len(ids)}, "
                  f"datatrove {sum(i in dt_removed for i in ids)}/{len(ids)}")
    unplanted_o = len(ours_dup - planted.keys())
    unplanted_d = len(dt_removed - planted.keys())
    print(f"removed but not planted (duplicates already in the source text, or false positives): "
          f"llmctl {unplanted_o}, datatrove {unplanted_d}")
    print(f"scratch: {work}  (at {time.strftime('%Y-%m-%d %H:%M')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

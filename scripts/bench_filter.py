#!/usr/bin/env python3
"""Benchmark llmctl's heuristic filters against datatrove's on the same documents, in one run.

    .venv/bin/python scripts/bench_filter.py --docs-dir /tmp/bench-docs --n 10000

Both sides run the same four filters in FineWeb's order (Gopher repetition, Gopher quality, C4
without the terminal-punctuation rule, FineWeb quality) with default thresholds, one process each,
on the same texts, each in its own subprocess (datatrove in its own venv, /work/peers/datatrove-venv).
Reported: docs/s of the filter work alone, peak RSS of each process, the keep/drop agreement, and
every disagreement grouped by (our reason, datatrove's reason) with examples. Also times the full
``llmctl filter`` stage (Parquet in and out, default chain) on the same artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"
DT_VENV = Path("/work/peers/datatrove-venv")

OURS = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from llmctl.data.filter import FilterConfig, build_chain
from llmctl.data.filters import Doc
rows = [json.loads(x) for x in open(sys.argv[1], encoding="utf-8")]
cfg = FilterConfig(docs="", out="", chain=["gopher_repetition", "gopher_quality", "c4", "fineweb"],
                   filters={"gopher_quality": {"symbols_combined": sys.argv[4] == "1"}})
chain, _ = build_chain(cfg)
out = {}
t0 = time.perf_counter()
for r in rows:
    d = Doc(r["id"], "", r["text"])
    reason = None
    for f in chain:
        v = f.apply(d)
        if v is not None:
            reason = f"{f.family}:{v}"
            break
    out[r["id"]] = reason
el = time.perf_counter() - t0
json.dump({"seconds": el, "decisions": out, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
          open(sys.argv[2], "w"))
"""

DATATROVE = r"""
import json, resource, sys, time
from datatrove.data import Document
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
rows = [json.loads(x) for x in open(sys.argv[1], encoding="utf-8")]
chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
         FineWebQualityFilter()]
names = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
# warm up the lazily loaded spaCy tokenizer outside the timed loop
chain[1].filter(Document(text="warm up the tokenizer. " * 60, id="w"))
out = {}
t0 = time.perf_counter()
for r in rows:
    doc = Document(text=r["text"], id=r["id"])
    reason = None
    for name, f in zip(names, chain):
        res = f.filter(doc)
        ok, why = (res, "") if isinstance(res, bool) else res
        if not ok:
            reason = f"{name}:{why}"
            break
    out[r["id"]] = reason
el = time.perf_counter() - t0
json.dump({"seconds": el, "decisions": out, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
          open(sys.argv[2], "w"))
"""


def ensure_datatrove() -> Path:
    py = DT_VENV / "bin" / "python"
    if not (DT_VENV / ".ready").exists():
        sys.exit(f"{DT_VENV}: datatrove venv not ready; create it with python3 -m venv {DT_VENV} && "
                 f"{DT_VENV}/bin/pip install 'datatrove[processing]' spacy && touch {DT_VENV}/.ready")
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-docs")
    ap.add_argument("--n", type=int, default=10_000, help="documents to build/use")
    ap.add_argument("--examples", type=int, default=2, help="examples shown per disagreement kind")
    ap.add_argument("--reference-symbols", action="store_true",
                    help="also run ours with the symbol ratio split as datatrove does (not REFERENCE.md's)")
    ap.add_argument("--skip-stage", action="store_true", help="skip timing the full llmctl filter stage")
    a = ap.parse_args()
    dt_py = ensure_datatrove()
    if not (a.docs_dir / "manifest.json").is_file():
        subprocess.run([str(PY), str(ROOT / "scripts/make_bench_docs.py"), "--out", str(a.docs_dir), "--docs", str(a.n)],
                       check=True)
    sys.path.insert(0, str(ROOT / "src"))
    from llmctl.data.docs import read_docs

    t = read_docs(a.docs_dir, columns=["id", "url", "text", "timestamp"]).slice(0, a.n)
    work = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    jsonl = work / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, x in zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True):
            f.write(json.dumps({"id": i, "text": x}) + "\n")
    n = t.num_rows
    results = {}
    load0 = os.getloadavg()
    for name, cmd in (
        ("llmctl", [str(PY), "-c", OURS, str(jsonl), str(work / "ours.json"), str(ROOT / "src"), "1"]),
        ("datatrove", [str(dt_py), "-c", DATATROVE, str(jsonl), str(work / "dt.json")]),
    ):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        results[name] = json.loads((work / ("ours.json" if name == "llmctl" else "dt.json")).read_text())
        results[name]["wall"] = time.perf_counter() - t0
    ours, dt = results["llmctl"], results["datatrove"]
    o_rate, d_rate = n / ours["seconds"], n / dt["seconds"]
    print(f"\ndocuments: {n} from {a.docs_dir}; load average (1/5/15 min) at the start "
          f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(a shared machine: docs/s fall with load, the ratio is the figure to compare)")
    print(f"{'':12}{'docs/s':>10}{'seconds':>10}{'peak RSS MiB':>14}{'kept':>8}")
    for name, r, rate in (("llmctl", ours, o_rate), ("datatrove", dt, d_rate)):
        kept = sum(v is None for v in r["decisions"].values())
        print(f"{name:12}{rate:10.1f}{r['seconds']:10.2f}{r['maxrss_kb'] / 1024:14.1f}{kept:8d}")
    print(f"speed ratio llmctl/datatrove: {o_rate / d_rate:.2f}x")
    agree = sum((ours["decisions"][k] is None) == (dt["decisions"][k] is None) for k in ours["decisions"])
    print(f"keep/drop agreement: {agree}/{n} = {100 * agree / n:.2f}%")
    kinds: Counter = Counter()
    examples: dict[tuple, list[str]] = {}
    for k, ov in ours["decisions"].items():
        dv = dt["decisions"][k]
        if (ov is None) != (dv is None):
            key = (ov or "KEEP", dv or "KEEP")
            kinds[key] += 1
            examples.setdefault(key, []).append(k)
    texts = dict(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))
    for (ov, dv), c in kinds.most_common():
        print(f"  {c:5d}  llmctl {ov:40s} datatrove {dv}")
        for ex in examples[(ov, dv)][: a.examples]:
            print("         e.g. " + json.dumps(texts[ex][:160]))
    if a.reference_symbols:
        subprocess.run([str(PY), "-c", OURS, str(jsonl), str(work / "ours2.json"), str(ROOT / "src"), "0"], check=True)
        o2 = json.loads((work / "ours2.json").read_text())
        agree2 = sum((o2["decisions"][k] is None) == (dt["decisions"][k] is None) for k in o2["decisions"])
        print(f"with gopher_quality.symbols_combined=false: agreement {100 * agree2 / n:.2f}%")
    if not a.skip_stage:
        out = work / "stage-out"
        cmd = [str(PY), "-m", "llmctl", "filter", str(a.docs_dir), "--out", str(out), "--force"]
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                           env={**os.environ, "LLMCTL_PROGRESS": "0"})
        el = time.perf_counter() - t0
        rss = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "?"
        m = json.loads((out / "manifest.json").read_text())
        print(f"full stage (default chain, Parquet I/O, 1 worker): {m['stats']['docs_in'] / el:.1f} docs/s "
              f"incl. start-up ({el:.1f} s), peak RSS {int(rss) / 1024 if rss.isdigit() else rss} MiB, "
              f"kept {m['stats']['docs_out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The filter stage: run a chain of filters over a docs artifact, shard by shard.

Work is cut into units of consecutive Parquet row groups of one input shard (about
``unit_rows`` documents); unit k writes ``docs-k.parquet`` (and ``rejected-k.parquet`` into the
``--keep-rejected`` artifact) and a small stats file, all committed atomically, the stats file
last, so an interrupted run resumes at unit granularity and equals an uninterrupted one. Memory is
bounded by one record batch per worker. ``--shard I/N`` processes units k with k % N == I; units
keep their global numbers so parts from a job array can sit side by side.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import MANIFEST, StageRun, open_with_rejected, write_json_atomic
from ..console import progress
from ..errors import UsageError
from .docs import BASE_COLUMNS, check_columns, list_shards, shard_filename
from .filters import DEFAULT_CHAIN, REGISTRY, Doc, Filter

STAGE = "filter"
REJECTED_STAGE = "filter-rejected"
_ARROW_TYPES = {"float64": pa.float64(), "string": pa.string()}


@dataclass
class FilterConfig:
    """Every option of ``llmctl filter`` (the manifest's params)."""

    docs: str
    out: str
    chain: list[str] = field(default_factory=lambda: list(DEFAULT_CHAIN))
    #: per-family parameter overrides, e.g. {"gopher_quality": {"min_doc_words": 40}}
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_rejected: str | None = None
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    unit_rows: int = 4096
    batch_rows: int = 1024
    force: bool = False


def build_chain(cfg: FilterConfig) -> tuple[list[Filter], dict[str, dict[str, Any]]]:
    """The filters of the chain with their resolved parameters; inactive ones are left out.

    ``url`` without blocklists and ``quality`` without a model do nothing and are skipped.
    """
    unknown = [n for n in cfg.chain if n not in REGISTRY]
    if unknown:
        raise UsageError(f"--chain: unknown filter(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    dup = [n for n, c in Counter(cfg.chain).items() if c > 1]
    if dup:
        raise UsageError(f"--chain: {', '.join(dup)} listed twice; list each filter once")
    stray = [n for n in cfg.filters if n not in REGISTRY]
    if stray:
        raise UsageError(f"unknown filter table(s) {', '.join(stray)}; choose from {', '.join(REGISTRY)}")
    chain: list[Filter] = []
    resolved: dict[str, dict[str, Any]] = {}
    for name in cfg.chain:
        cls = REGISTRY[name]
        params = cls.Params()
        params.update(name, cfg.filters.get(name, {}))
        if name == "url" and not params.blocklists:
            continue
        if name == "quality" and not params.model:
            continue
        chain.append(cls(params))
        resolved[name] = asdict(params)
    return chain, resolved


@dataclass
class Unit:
    """Rows [start, start + rows) of one input shard, read from the row groups that hold them."""

    index: int
    shard: str
    row_groups: list[int]
    skip: int  # rows to skip at the start of the first row group
    rows: int


def plan_units(shards: list[Path], unit_rows: int) -> list[Unit]:
    units: list[Unit] = []
    for s in shards:
        try:
            md = pq.ParquetFile(s).metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise UsageError(f"{s}: not a readable Parquet file ({e}); rerun the stage that wrote it") from e
        bounds = [0]
        for g in range(md.num_row_groups):
            bounds.append(bounds[-1] + md.row_group(g).num_rows)
        total = bounds[-1]
        for start in range(0, total, unit_rows):
            end = min(total, start + unit_rows)
            groups = [g for g in range(md.num_row_groups) if bounds[g] < end and bounds[g + 1] > start]
            units.append(Unit(len(units), str(s), groups, start - bounds[groups[0]], end - start))
    return units


def _unit_batches(unit: Unit, batch_rows: int):
    """The unit's rows as record batches of at most ``batch_rows``."""
    pf = pq.ParquetFile(unit.shard)
    skip, left = unit.skip, unit.rows
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=unit.row_groups):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip, min(left, batch.num_rows - skip))
        skip = 0
        left -= batch.num_rows
        yield batch
        if left <= 0:
            break


def _out_schema(in_schema: pa.Schema, chain: list[Filter]) -> pa.Schema:
    schema = in_schema
    for f in chain:
        for name, typ in f.adds_columns.items():
            fld = pa.field(name, _ARROW_TYPES[typ])
            i = schema.get_field_index(name)
            schema = schema.set(i, fld) if i >= 0 else schema.append(fld)
    return schema


# -- the work of one unit (runs in a worker process) ---------------------------------------------
_worker_chain: list[Filter] | None = None


def _init_worker(cfg: FilterConfig, quality_threshold: float | None) -> None:
    global _worker_chain
    chain, _ = build_chain(cfg)
    for f in chain:
        f.check()
        if f.family == "quality" and quality_threshold is not None:
            f.params.threshold = quality_threshold
    _worker_chain = chain


def _process_unit(args: tuple[Unit, StageRun, StageRun | None, int]) -> dict[str, Any]:
    unit, run, rej_run, batch_rows = args
    chain = _worker_chain
    assert chain is not None
    t0 = time.perf_counter()
    for f in chain:
        f.counters.clear()
    pf = pq.ParquetFile(unit.shard)
    in_schema = pf.schema_arrow
    out_schema = _out_schema(in_schema, chain)
    rej_schema = out_schema.append(pa.field("reason", pa.string()))
    name = shard_filename(unit.index)
    rej_name = shard_filename(unit.index, "rejected")
    writer = pq.ParquetWriter(run.partial(name), out_schema, compression="zstd")
    rej_writer = pq.ParquetWriter(rej_run.partial(rej_name), rej_schema, compression="zstd") if rej_run else None
    per = {f.family: {"in": 0, "out": 0, "removed": Counter()} for f in chain}
    stats: dict[str, Any] = {"docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0, "input_rejected": Counter()}
    mixture: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    produced = {c for f in chain for c in f.adds_columns}
    meta_cols = [n for n in in_schema.names if n not in ("id", "url", "text")]

    for batch in _unit_batches(unit, batch_rows):
        cols = batch.to_pydict()
        n = batch.num_rows
        texts = cols["text"]
        docs = [
            Doc(cols["id"][i], cols["url"][i], texts[i] or "", {k: cols[k][i] for k in meta_cols})
            for i in range(n)
        ]
        reasons: list[str | None] = [None] * n
        for i, t in enumerate(texts):
            stats["chars_in"] += len(t or "")
            if not t or not t.strip():
                reasons[i] = "input:empty_text"
                stats["input_rejected"]["empty_text"] += 1
        alive = [i for i in range(n) if reasons[i] is None]
        stats["docs_in"] += n
        for f in chain:
            st = per[f.family]
            st["in"] += len(alive)
            verdicts = f.apply_batch([docs[i] for i in alive])
            still = []
            for i, v in zip(alive, verdicts, strict=True):
                if v is None:
                    still.append(i)
                else:
                    reasons[i] = f"{f.family}:{v}"
                    st["removed"][v] += 1
            alive = still
            st["out"] += len(alive)
        keep = set(alive)
        out_cols: dict[str, list[Any]] = {k: [] for k in out_schema.names}
        rej_cols: dict[str, list[Any]] = {k: [] for k in rej_schema.names} if rej_writer else {}
        for i in range(n):
            d = docs[i]
            if i in keep:
                tgt = out_cols
                stats["docs_out"] += 1
                stats["chars_out"] += len(d.text)
                dom = d.meta.get("domain")
                if dom is not None:
                    m = mixture[dom]
                    m[0] += 1
                    m[1] += len(d.text)
            elif rej_writer is not None:
                tgt = rej_cols
                tgt["reason"].append(reasons[i])
            else:
                continue
            for k in out_schema.names:
                if k == "text":
                    tgt[k].append(d.text if tgt is out_cols else texts[i])
                elif k in produced:
                    tgt[k].append(d.meta.get(k))
                else:
                    tgt[k].append(cols[k][i])
        writer.write_table(pa.Table.from_pydict(out_cols, schema=out_schema))
        if rej_writer is not None:
            rej_writer.write_table(pa.Table.from_pydict(rej_cols, schema=rej_schema))
    writer.close()
    if rej_writer is not None:
        rej_writer.close()
        rej_run.commit(rej_name)
    run.commit(name)
    stats["filters"] = {
        f.family: {**per[f.family], "removed": dict(per[f.family]["removed"]), "counters": dict(f.counters)}
        for f in chain
    }
    stats["input_rejected"] = dict(stats["input_rejected"])
    stats["mixture"] = {k: v for k, v in mixture.items()}
    stats["seconds"] = time.perf_counter() - t0
    stats_name = f"stats/unit-{unit.index:05d}.json"
    part = run.partial(stats_name)
    write_json_atomic(part, stats)
    run.commit(stats_name)
    return stats


# -- the stage -----------------------------------------------------------------------------------
def _inputs_of(docs: Path, shards: list[Path]) -> list[Path]:
    return [docs] if (docs / MANIFEST).is_file() else shards


def prepare(cfg: FilterConfig) -> tuple[list[Filter], dict[str, Any], list[Path], list[Unit]]:
    """Every check that can fail, before any work: chain, files, columns, emptiness."""
    docs = Path(cfg.docs)
    if cfg.workers < 1:
        raise UsageError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.keep_rejected and Path(cfg.keep_rejected).absolute() == Path(cfg.out).absolute():
        raise UsageError("--keep-rejected must be another directory than --out")
    chain, resolved = build_chain(cfg)
    for f in chain:
        f.check()
    shards = list_shards(docs)
    needed = list(BASE_COLUMNS)
    for f in chain:
        needed += [c for c in f.needs_columns if c not in needed]
    total = 0
    for s in shards:
        try:
            pf = pq.ParquetFile(s)
        except (OSError, pa.ArrowInvalid) as e:
            raise UsageError(f"{s}: not a readable Parquet file ({e}); rerun the stage that wrote it") from e
        names = pf.schema_arrow.names
        missing = [c for c in needed if c not in names]
        if missing:
            who = {c: f.family for f in chain for c in f.needs_columns}
            hint = "; ".join(f"'{c}' is needed by the {who[c]} filter (drop it from --chain)" for c in missing if c in who)
            if hint:
                raise UsageError(f"{s}: missing column(s) {', '.join(missing)}; {hint} or produce docs with llmctl extract")
            check_columns(pf.schema_arrow, s, required=needed)
        total += pf.metadata.num_rows
    if total == 0:
        raise UsageError(f"{docs}: holds no documents; nothing to filter (check the input)")
    params = asdict(cfg)
    params.pop("force")
    params["shard"] = f"{cfg.shard[0]}/{cfg.shard[1]}"
    params["filters"] = resolved
    params["chain"] = [f.family for f in chain]
    return chain, params, shards, plan_units(shards, cfg.unit_rows)


def _top_percent_threshold(chain: list[Filter], shards: list[Path], batch_rows: int) -> tuple[float, int] | None:
    q = next((f for f in chain if f.family == "quality"), None)
    if q is None or q.params.top_percent is None:
        return None
    scores = []
    for s in shards:
        for batch in pq.ParquetFile(s).iter_batches(batch_size=batch_rows, columns=["text"]):
            texts = [t or "" for t in batch.column(0).to_pylist()]
            scores.append(q.score(texts).astype(np.float32))
    allsc = np.concatenate(scores)
    return float(np.percentile(allsc, 100.0 - q.params.top_percent)), len(allsc)


def run(cfg: FilterConfig) -> dict[str, Any]:
    """Filter ``cfg.docs`` into ``cfg.out``; returns the manifest (also when already complete)."""
    chain, params, shards, units = prepare(cfg)
    inputs = _inputs_of(Path(cfg.docs), shards)
    rejected = Path(cfg.keep_rejected) if cfg.keep_rejected else None
    run_, rej_run = open_with_rejected(Path(cfg.out), STAGE, rejected, REJECTED_STAGE, params, inputs, cfg.force)
    if run_.done:
        return {**run_.manifest, "already_complete": True}
    i, n = cfg.shard
    mine = [u for u in units if u.index % n == i]
    top = _top_percent_threshold(chain, shards, cfg.batch_rows)
    thr = top[0] if top else None
    todo = [u for u in mine if not run_.has(f"stats/unit-{u.index:05d}.json")]
    if rej_run is not None:  # a unit's rejected shard must exist too, else redo it
        todo = [u for u in mine if u in todo or not rej_run.has(shard_filename(u.index, "rejected"))]
    t0 = time.perf_counter()
    args = [(u, run_, rej_run, cfg.batch_rows) for u in todo]
    with progress() as bar:
        task = bar.add_task("filter", total=sum(u.rows for u in mine), unit="docs")
        bar.advance(task, sum(u.rows for u in mine if u not in todo))
        if cfg.workers == 1 or len(todo) <= 1:
            _init_worker(cfg, thr)
            for a in args:
                _process_unit(a)
                bar.advance(task, a[0].rows)
        else:
            ctx = mp.get_context("forkserver" if os.name == "posix" else "spawn")
            with ctx.Pool(min(cfg.workers, len(todo)), initializer=_init_worker, initargs=(cfg, thr)) as pool:
                for st in pool.imap_unordered(_process_unit, args):
                    bar.advance(task, st["docs_in"])
    elapsed = time.perf_counter() - t0

    unit_stats = []
    for u in mine:
        p = run_.path(f"stats/unit-{u.index:05d}.json")
        unit_stats.append(json.loads(p.read_text(encoding="utf-8")))
    stats = merge_stats(unit_stats, [f.family for f in chain])
    stats["units"] = len(mine)
    stats["units_processed_now"] = len(todo)
    stats["process_seconds"] = round(elapsed, 3)
    stats["docs_per_second"] = round(sum(u.rows for u in todo) / elapsed, 1) if todo and elapsed > 0 else None
    if top:
        stats["quality_threshold_from_top_percent"] = top[0]
        stats["quality_scored_for_percentile"] = top[1]
    for p in sorted(run_.work.glob("stats/*.json")):
        p.unlink()
    if (run_.work / "stats").is_dir():
        (run_.work / "stats").rmdir()
    extra = {"shard": params["shard"]}
    if rej_run is not None:
        rej_stats = {"docs": stats["docs_in"] - stats["docs_out"], "removed_by": stats["removed_by"]}
        rej_run.finish(rej_stats, rejected_from=str(Path(cfg.out).absolute()))
        extra["rejected"] = str(Path(cfg.keep_rejected).absolute())
    return run_.finish(stats, **extra)


def merge_stats(units: list[dict[str, Any]], families: list[str]) -> dict[str, Any]:
    tot: dict[str, Any] = {k: sum(u[k] for u in units) for k in ("docs_in", "docs_out", "chars_in", "chars_out")}
    inp: Counter = Counter()
    for u in units:
        inp.update(u["input_rejected"])
    filt: dict[str, Any] = {}
    removed_by = Counter({f"input:{k}": v for k, v in inp.items()})
    for fam in families:
        d_in = sum(u["filters"][fam]["in"] for u in units)
        d_out = sum(u["filters"][fam]["out"] for u in units)
        rem: Counter = Counter()
        cnt: Counter = Counter()
        for u in units:
            rem.update(u["filters"][fam]["removed"])
            cnt.update(u["filters"][fam]["counters"])
        filt[fam] = {"docs_in": d_in, "docs_out": d_out, "removed": d_in - d_out,
                     "removed_by_reason": dict(rem.most_common()), "counters": dict(sorted(cnt.items()))}
        for k, v in rem.items():
            removed_by[f"{fam}:{k}"] += v
    mix: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for u in units:
        for k, (d, c) in u["mixture"].items():
            mix[k][0] += d
            mix[k][1] += c
    total_chars = sum(c for _, c in mix.values()) or 1
    total_docs = sum(d for d, _ in mix.values()) or 1
    tot["input_rejected"] = dict(inp)
    tot["filters"] = filt
    tot["removed_by"] = dict(removed_by.most_common())
    if mix:
        tot["mixture"] = {
            k: {"docs": d, "chars": c, "docs_frac": round(d / total_docs, 6), "chars_frac": round(c / total_chars, 6)}
            for k, (d, c) in sorted(mix.items(), key=lambda kv: -kv[1][1])
        }
    tot["filter_seconds"] = round(sum(u["seconds"] for u in units), 3)
    return tot


__all__ = ["FilterConfig", "build_chain", "merge_stats", "prepare", "run"]

"""``llmctl dedup``: remove exact duplicates, near-duplicates (MinHash LSH) and boilerplate lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import summary, table
from . import app
from .common import ConfigOpt, ForceOpt, SeedOpt, ShardOpt, WorkersOpt

EPILOG = """
Example:

  llmctl dedup runs/filtered --out runs/deduped --workers 2 --keep-rejected runs/dedup-rejected

  llmctl dedup runs/filtered --out runs/dedup-0 --shard 0/4 --lsh-storage redis://10.0.0.5:6379
"""


@app.command("dedup", epilog=EPILOG)
def dedup(
    docs: Annotated[list[Path], typer.Argument(help="Docs artifact(s) or Parquet files to deduplicate.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output docs artifact directory.")],
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods, applied in this order: exact,near,lines.")
    ] = "exact,near,lines",
    num_perm: Annotated[int, typer.Option("--num-perm", help="MinHash permutations (64-bit).")] = 112,
    bands: Annotated[int, typer.Option("--bands", help="LSH bands.")] = 14,
    rows: Annotated[int, typer.Option("--rows", help="Rows (MinHash values) per band.")] = 8,
    ngram: Annotated[int, typer.Option("--ngram", help="Words per shingle.")] = 5,
    seed: SeedOpt = 1,
    jaccard_threshold: Annotated[
        float,
        typer.Option("--jaccard-threshold", help="Keep an LSH candidate pair only if its estimated Jaccard is at least this (0: off)."),
    ] = 0.75,
    line_min_docs: Annotated[
        int, typer.Option("--line-min-docs", help="A line is boilerplate if it is in at least this many documents …")
    ] = 10,
    line_min_frac: Annotated[
        float, typer.Option("--line-min-frac", help="… and in at least this fraction of the documents.")
    ] = 0.0,
    line_scope: Annotated[
        str, typer.Option("--line-scope", help="edges: remove boilerplate lines only in a document's leading and trailing runs (headers, navigation, footers), keeping frequent lines inside it, such as code; all: wherever they are.")
    ] = "edges",
    lsh_storage: Annotated[
        str, typer.Option("--lsh-storage", help="'memory' or redis://HOST:PORT (optionally /DB) for an index shared by workers and machines.")
    ] = "memory",
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Name of the shared Redis index (default: derived from parameters and inputs).")
    ] = None,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds a --shard task waits for the others to fill the shared index.")
    ] = 3600.0,
    keep_rejected: Annotated[
        Path | None, typer.Option("--keep-rejected", help="Write removed documents here, with reason and duplicate_of (the id of the document kept in its place).")
    ] = None,
    workers: WorkersOpt = 1,
    shard: ShardOpt = "0/1",
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Deduplicate documents: exact (hash of normalised text), near-duplicate (MinHash over word
    5-grams, 14 bands × 8 rows, union-find clusters) and boilerplate lines repeated across documents.

    The survivor of each group is its first document in (input shard, row) order, whatever the number
    of workers. With --shard I/N a task takes input shards K with K mod N = I: alone with the in-memory
    index, or, with --lsh-storage redis://…, as one part of a global run sharing one index.
    """
    from ..data.dedup import DedupConfig, run

    cfg = DedupConfig(
        inputs=list(docs), out=out, methods=[m.strip() for m in methods.split(",") if m.strip()],
        num_perm=num_perm, bands=bands, rows=rows, ngram=ngram, seed=seed, jaccard_threshold=jaccard_threshold,
        line_min_docs=line_min_docs, line_min_frac=line_min_frac, line_scope=line_scope, lsh_storage=lsh_storage, run_id=run_id,
        wait_timeout=wait_timeout, keep_rejected=keep_rejected, workers=workers, shard=shard, force=force,
    )
    manifest = run(cfg)
    if manifest.get("already_complete"):
        typer.echo(f"{out}: already complete with these parameters and inputs (pass --force to redo it)")
    s = manifest["stats"]
    removed = s.get("removed", {})
    summary(
        f"dedup → {manifest.get('params', {}).get('out', out)}",
        [
            ("docs in", s.get("docs_in", 0)),
            ("removed: exact duplicates", removed.get("exact", 0)),
            ("removed: near duplicates", removed.get("near", 0)),
            ("removed: empty after boilerplate lines", removed.get("boilerplate", 0)),
            ("docs out", s.get("docs_out", 0)),
            ("exact clusters", s.get("exact_clusters", "-")),
            ("near clusters (verified pairs / candidates)",
             f"{s.get('near_clusters', '-')} ({s.get('verified_pairs', '-')}/{s.get('candidate_pairs', '-')})"),
            ("boilerplate lines (distinct / removed)",
             f"{s.get('boilerplate_distinct_lines', '-')} / {s.get('lines_removed', '-')}"),
            ("docs/s", s.get("docs_per_second") or 0.0),
        ],
    )
    hist_rows = []
    for method in ("exact", "near"):
        h = s.get(f"{method}_cluster_sizes")
        if h:
            hist_rows.append([method, *h.values()])
    if hist_rows:
        labels = list(s.get("near_cluster_sizes") or s.get("exact_cluster_sizes")).copy()
        table("cluster sizes (documents per cluster)", ["method", *labels], hist_rows)

"""`llmctl extract WARC... --out DIR`: web archives → Parquet documents."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..console import console, progress, summary
from . import app
from .common import ConfigOpt, ForceOpt, ShardOpt, WorkersOpt

#: default --workers: the machine's cores, at most 8
DEFAULT_WORKERS = max(1, min(os.cpu_count() or 1, 8))
_EPILOG = (
    "Example: llmctl extract crawl/*.warc.gz CC-MAIN-*.warc.gz --out docs --workers 4 --timeout 30\n\n"
    "Reruns of a finished extract are no-ops (--force redoes it); an interrupted one resumes at shard granularity."
)


@app.command("extract", epilog=_EPILOG)
def extract_cmd(
    warcs: Annotated[
        list[Path],
        typer.Argument(
            help="WARC or ARC files (gzip or plain), or directories holding them.", show_default=False, metavar="WARC"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Docs artifact directory to write.")],
    workers: WorkersOpt = DEFAULT_WORKERS,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Hard limit in seconds per document; a page over it is dropped as 'timeout'.")
    ] = 30.0,
    records_per_shard: Annotated[
        int, typer.Option("--records-per-shard", min=1, help="Records (of all types) per output shard of each input file.")
    ] = 10_000,
    max_page_bytes: Annotated[
        int, typer.Option("--max-page-bytes", min=1, help="Pages larger than this are dropped as 'too_large'.")
    ] = 10 << 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Documents sent to a worker at a time.")] = 8,
    shard: ShardOpt = "0/1",
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Extract main text, title and language from WARC/ARC archives into Parquet documents.

    trafilatura with FineWeb's settings (favor_precision, no comments, no cross-document dedup), py3langid for language, WARC-Date as timestamp. Bad records are counted by reason, never fatal.
    """
    from ..data.extract import ExtractConfig, run

    cfg = ExtractConfig(
        inputs=[str(w) for w in warcs],
        out=str(out),
        workers=workers,
        timeout=timeout,
        records_per_shard=records_per_shard,
        max_page_bytes=max_page_bytes,
        batch_size=batch_size,
        shard=shard,
        force=force,
    )
    with progress() as bar:
        manifest = run(cfg, progress=bar)
    if manifest.get("already_done"):
        console.print(f"{out}: extract is already complete (same inputs and options); --force redoes it")
        return
    st = manifest["stats"]
    rows: list[tuple[str, object]] = [
        ("input files", st["files"]),
        ("records", st["records"]),
        ("responses", st["responses"]),
        ("documents", st["docs"]),
    ]
    rows += [(f"dropped: {k}", v) for k, v in sorted(st["dropped"].items())]
    rows += [(f"problem: {k}", v) for k, v in sorted(st["problems"].items())]
    if st.get("uri_fixed"):
        rows.append(("target URIs repaired", st["uri_fixed"]))
    rows += [
        ("shards (resumed)", f"{st['shards']} ({st['shards_resumed']})"),
        ("worker restarts", st["worker_restarts"]),
        ("docs/s", st["docs_per_second"]),
        ("wall seconds", st["wall_seconds"]),
        ("output", str(out)),
    ]
    summary("extract", rows)

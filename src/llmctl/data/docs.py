"""The Parquet document schema that every data stage reads and writes.

Shards are ``docs-00000.parquet`` (zstd). The first four columns are fixed: ``id`` (a stable
string), ``url``, ``text``, ``timestamp`` (UTC). Stages append metadata columns (``title``,
``language``, ``language_score``, ``quality_score``, ``domain``, …) and never rename these four,
so anyone can read a docs artifact with datasets, pandas, pyarrow or DuckDB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import MANIFEST, a_stage, read_manifest
from ..errors import UsageError

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("text", pa.string(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),
]
BASE_COLUMNS = [f.name for f in BASE_FIELDS]
SHARD_PREFIX = "docs"
REJECTED_PREFIX = "rejected"
#: stages whose output is a docs artifact
DOC_STAGES = ("extract", "filter", "dedup")


def doc_id(*parts: str) -> str:
    """A stable id from the parts that identify a document (e.g. URL and capture date)."""
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def schema(extra: Sequence[pa.Field] = ()) -> pa.Schema:
    return pa.schema([*BASE_FIELDS, *extra])


def shard_filename(index: int, prefix: str = SHARD_PREFIX) -> str:
    return f"{prefix}-{index:05d}.parquet"


def write_table(table: pa.Table, path: Path) -> None:
    """Write one shard (zstd, modest row groups so readers can stream)."""
    pq.write_table(table, path, compression="zstd", row_group_size=2048)


def check_columns(table_or_schema: pa.Table | pa.Schema, where: Path | str, required: Sequence[str] = BASE_COLUMNS) -> None:
    names = set(table_or_schema.schema.names if isinstance(table_or_schema, pa.Table) else table_or_schema.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise UsageError(
            f"{where}: missing column(s) {', '.join(missing)}; docs need {', '.join(required)} "
            "(produce them with llmctl extract)"
        )


def list_shards(path: Path, prefix: str = SHARD_PREFIX) -> list[Path]:
    """The Parquet shards of a docs artifact directory, or the file itself, in order.

    Accepts an artifact directory (checked to be a complete docs artifact), a directory of plain
    Parquet files, or one Parquet file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".parquet":
            raise UsageError(f"{path}: not a Parquet file; pass a docs artifact directory or .parquet files")
        return [path]
    if not path.exists():
        raise UsageError(f"{path}: no such docs artifact; run llmctl extract first")
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        if m.get("stage") not in DOC_STAGES:
            raise UsageError(
                f"{path}: is {a_stage(m.get('stage'))}, not documents; pass the output of "
                f"{'/'.join(DOC_STAGES)}"
            )
        shards = sorted(path.glob(f"{prefix}-*.parquet"))
    else:
        shards = sorted(path.glob("*.parquet"))
    if not shards:
        raise UsageError(f"{path}: holds no Parquet document shards; check the path")
    return shards


def iter_tables(paths: Sequence[Path], columns: Sequence[str] | None = None, batch_rows: int = 4096) -> Iterator[pa.Table]:
    """Stream record batches of all shards as small tables (memory bounded by ``batch_rows``)."""
    for p in paths:
        try:
            pf = pq.ParquetFile(p)
        except (OSError, pa.ArrowInvalid) as e:
            raise UsageError(f"{p}: not a readable Parquet file ({e}); rerun the stage that wrote it") from e
        check_columns(pf.schema_arrow, p, required=columns or BASE_COLUMNS)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
            yield pa.Table.from_batches([batch])


def read_docs(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole (small) docs artifact into memory: convenient for tests and tiny corpora."""
    tables = list(iter_tables(list_shards(path), columns=columns))
    if not tables:
        return schema().empty_table()
    return pa.concat_tables(tables, promote_options="default")

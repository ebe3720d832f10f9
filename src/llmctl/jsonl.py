"""Reading users' JSON Lines files (training data, eval tasks): plain or .gz, one record per line.

A line that is not UTF-8 or not JSON is reported to the caller's ``skip`` by reason and left out,
never fatal: bad records inside a good file are counted. A byte-order mark is no part of the first
line (``utf-8-sig``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def open_binary(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes, through gzip when its name ends in .gz."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def json_lines(lines: Iterable[bytes], skip: Callable[[str], None]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; ``skip("not_utf8")`` or
    ``skip("bad_json")`` for a line that does not parse."""
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            skip("not_utf8")
        except ValueError:
            skip("bad_json")

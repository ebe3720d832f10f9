"""Result rows, standard errors, and the per-item score files."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Metric:
    metric: str
    value: float
    stderr: float
    n: int
    protocol: str


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / √n, as lm-eval reports)."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = math.fsum(xs) / n
    if n < 2:
        return m, 0.0
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def write_items(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def table_rows(results: dict[str, Any]) -> list[list[object]]:
    """Rows for the summary table: task, metric, protocol, value ± stderr, n."""
    out = []
    for r in results.get("results", []):
        value, se = (f"{x:.4f}" if x is not None else "n/a" for x in (r["value"], r["stderr"]))  # null: no item scored
        out.append([r["task"], r["metric"], r["protocol"], value, se, r["n"]])
    return out

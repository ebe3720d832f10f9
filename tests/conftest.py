"""Shared test helpers: where the real data lives, and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: real data shared by the team; never copied into the repository
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (a fresh clone has no shared data)")
    return SHARED_DATA


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_llmctl(*args: str | os.PathLike, timeout: float = 300, env: dict | None = None) -> Result:
    """Run ``python -m llmctl ARGS`` in a subprocess, exactly as a user's shell would."""
    full_env = {**os.environ, "LLMCTL_PROGRESS": "0", "COLUMNS": "200", **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "llmctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def llmctl():
    return run_llmctl

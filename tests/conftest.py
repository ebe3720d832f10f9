"""Shared test helpers: where the real data lives, and running the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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


def torchrun_llmctl(*args: str | os.PathLike, nproc: int = 2, timeout: float = 300) -> Result:
    """``torchrun --nproc-per-node NPROC -m llmctl ARGS`` on a free loopback port (gloo, one thread each)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # PYTHONFAULTHANDLER: a rank that dies by a signal (a C++ abort at teardown) prints its Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMCTL_PROGRESS": "0", "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
         "-m", "llmctl", *map(str, args)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def llmctl():
    return run_llmctl


def cli(*args: str | os.PathLike) -> int:
    """The real CLI entry point in-process (a subprocess pays torch's import); returns the exit code."""
    from llmctl.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def one_process_and_two_ranks(args: list, root: Path) -> tuple[dict, dict]:
    """Run the CLI command ``args`` in this process into ``root/one`` and under torchrun with 2
    gloo ranks into ``root/two``; returns the two manifests' stats (for same-global-batch checks)."""
    assert cli(*args, "--out", root / "one") == 0
    p = torchrun_llmctl(*args, "--out", root / "two")
    assert p.code == 0, p.err[-3000:]
    s1, s2 = (json.loads((root / r / "manifest.json").read_text())["stats"] for r in ("one", "two"))
    return s1, s2


def train_losses(run: Path) -> list[float]:
    """The logged training losses of a run, in step order."""
    return [r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are chains of tiny ops: one torch thread avoids spinning on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A real llmctl tokenizer trained on this repository's source and multilingual text."""
    from modelkit import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def tok(spm_model):
    from llmctl.tokenizer import Tokenizer

    return Tokenizer(spm_model)

"""Checkpoints: ``checkpoints/step-NNNNNNN/`` written to a temp dir, then renamed into place.

A checkpoint directory holds ``model.safetensors`` (the model and any extra trained modules, fp32),
``optimizer.pt`` (optimizer + grad-scaler states, loaded with ``weights_only=True``), ``rng.pt``
(python, numpy, torch CPU and CUDA generator states, per rank), ``data.json`` (the objective's data
position) and ``trainer_state.json`` (step, tokens, elapsed seconds, format version). It is written
into ``checkpoints/.step-NNNNNNN.tmp`` and renamed when complete, so a crash while writing leaves
the previous checkpoint untouched; stale temp dirs are removed at the next start. Only the last
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..artifacts import write_json_atomic
from ..errors import UsageError
from ..model.io import save_state

CHECKPOINT_FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def clean_stale(root: Path) -> None:
    """Remove half-written checkpoint temp dirs left by an interrupted write."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    pv, pstate, pgauss = random.getstate()
    nname, nkeys, npos, nhas, ncached = np.random.get_state()
    state = {
        "python": {"version": pv, "state": torch.tensor(pstate, dtype=torch.int64), "gauss": pgauss},
        "numpy": {"name": nname, "keys": torch.from_numpy(nkeys.astype(np.int64)), "pos": int(npos),
                  "has_gauss": int(nhas), "cached": float(ncached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_states: list[dict[str, Any]],
    optimizer_layout: str,
    scaler_state: dict[str, Any] | None,
    data_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep: int = 3,
) -> Path:
    """Write one checkpoint atomically and prune old ones; return its directory.

    ``model_state`` is the full (unsharded) state dict; ``optimizer_layout`` says how the optimizer
    states key their parameters: ``"index"`` (``Optimizer.state_dict()``) or ``"fqn"`` (parameter
    names, torch.distributed.checkpoint's full state dict, as written under --fsdp)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_state(model_state, tmp / "model.safetensors")
    torch.save(
        {"optimizers": optimizer_states, "layout": optimizer_layout, "scaler": scaler_state},
        tmp / "optimizer.pt",
    )
    torch.save({"ranks": rng_states}, tmp / "rng.pt")
    write_json_atomic(tmp / "data.json", data_state)
    write_json_atomic(tmp / "trainer_state.json", {"format": CHECKPOINT_FORMAT, "step": step, **trainer_state})
    if final.exists():  # the same step written again (e.g. final checkpoint right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise UsageError(f"{ckpt}: checkpoint written by a newer llmctl (format {state.get('format')}); upgrade llmctl")
    return state


@dataclass
class Checkpoint:
    """What a checkpoint holds, read back (the RNG states are restored by ``load_checkpoint``)."""

    trainer_state: dict[str, Any]
    data_state: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_states: list[dict[str, Any]]
    optimizer_layout: str
    scaler_state: dict[str, Any] | None


def load_checkpoint(ckpt: Path, *, rank: int = 0) -> Checkpoint:
    """Read a checkpoint and restore this rank's RNG states; the caller loads the weights and
    optimizer states into its (possibly sharded) model."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)["ranks"]
    set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return Checkpoint(
        trainer_state=state,
        data_state=json.loads((ckpt / "data.json").read_text(encoding="utf-8")),
        model_state=load_file(str(ckpt / "model.safetensors")),
        optimizer_states=opt["optimizers"],
        optimizer_layout=opt.get("layout", "index"),  # checkpoints before --fsdp keyed by index
        scaler_state=opt.get("scaler"),
    )

"""Weights on disk: safetensors files plus config.json, for runs and checkpoints alike.

A finished run directory (pretrain, sft, reward, dpo, ppo) holds ``config.json`` (with a ``model``
section: the ModelConfig), ``model.safetensors`` (final weights) and ``tokenizer.model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import a_stage, read_manifest
from ..errors import UsageError
from .config import ModelConfig
from .transformer import Transformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
RUN_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a module's weights atomically (see ``save_state``)."""
    save_state(module.state_dict(), path, metadata)


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict atomically (temp file + rename); contiguous CPU copies, no shared storage."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
    mask = os.umask(0)  # safetensors creates the file 0600: give it the mode every other file gets
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def load_weights(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise UsageError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def read_run_config(run: Path) -> dict[str, Any]:
    p = Path(run) / CONFIG
    if not p.is_file():
        raise UsageError(f"{run}: no {CONFIG}; pass a finished llmctl run directory")
    return json.loads(p.read_text(encoding="utf-8"))


def load_model(run: Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """The final model of a finished run, in fp32 on ``device``, in eval mode, and the run config."""
    run = Path(run)
    m = read_manifest(run)
    if m.get("stage") not in RUN_STAGES:
        raise UsageError(f"{run}: is {a_stage(m.get('stage'))}, not a model run ({', '.join(RUN_STAGES)})")
    config = read_run_config(run)
    model = Transformer(ModelConfig.from_dict(config["model"]))
    load_weights(model, run / WEIGHTS)
    return model.to(device).eval(), config

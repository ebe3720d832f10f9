"""Optimizers: AdamW for everything, or torch's own Muon for the hidden 2-D matrices + AdamW for the rest.

Parameter groups (both modes):

* hidden matrices (the attention q/k/v/o and MLP gate/up/down weights, any 2-D weight inside
  ``model.layers``): weight decay; under ``muon`` they go to ``torch.optim.Muon``.
* embeddings and the output head: AdamW, weight decay (as GPT-2/nanoGPT decay every 2-D weight).
* norms' scales and any 1-D parameter: AdamW, no weight decay.

Muon is created with ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling 0.2·√max(A, B)), so
its update has AdamW's RMS and the same peak learning rate works for both; ``muon_lr`` overrides it.
Every optimizer's groups carry ``base_lr``; the trainer sets ``lr = base_lr × schedule factor``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UsageError

OPTIMIZERS = ("adamw", "muon")


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and ".layers." in f".{name}" and "embed" not in name and "lm_head" not in name


def build_optimizers(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
) -> list[torch.optim.Optimizer]:
    """The optimizers for these parameters (one, or Muon + AdamW), in a fixed order."""
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    matrices, decay, no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if _is_hidden_matrix(name, p):
            matrices.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = []
    if optimizer == "adamw":
        decay = matrices + decay
        matrices = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "base_lr": lr, "lr": lr})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "lr": lr})
    opts: list[torch.optim.Optimizer] = []
    if matrices:
        mlr = muon_lr if muon_lr is not None else lr
        muon = torch.optim.Muon(
            [{"params": matrices, "base_lr": mlr, "lr": mlr}],
            lr=mlr,
            weight_decay=weight_decay,
            momentum=muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        opts.append(muon)
    if groups:
        # the fused kernel (CPU and CUDA) is one pass over each tensor: on CPU it is ~6x faster than
        # foreach (which is slower than the plain loop there), a measurable share of a small model's step
        devices = {p.device.type for g in groups for p in g["params"]}
        impl = {"fused": True} if devices <= {"cpu", "cuda"} else {"foreach": True}
        opts.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **impl))
    return opts


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Scale every group's ``base_lr`` by ``factor``; return the first group's resulting lr."""
    first = None
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
            if first is None:
                first = g["lr"]
    return float(first or 0.0)

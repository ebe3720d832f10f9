"""Optimizers: AdamW for everything, or torch's own Muon for the hidden 2-D matrices + AdamW for the rest.

Parameter groups (both modes):

* hidden matrices (the attention q/k/v/o and MLP gate/up/down weights, any 2-D weight inside
  ``model.layers``): weight decay; under ``muon`` they go to Muon (``BatchedMuon`` below).
* embeddings and the output head: AdamW, weight decay (as GPT-2/nanoGPT decay every 2-D weight).
* norms' scales and any 1-D parameter: AdamW, no weight decay.

Muon is created with ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling 0.2·√max(A, B)), so
its update has AdamW's RMS and the same peak learning rate works for both; ``muon_lr`` overrides it.
It is ``torch.optim.Muon`` (its hyperparameters, state and checkpoints) with one change in ``step``:
the Newton–Schulz orthogonalisation runs batched over same-shaped matrices (one ``bmm`` chain per
shape instead of one ``mm`` chain per matrix) and in ``ns_dtype``. torch's own runs it in bf16, which
is right on GPUs and AMX CPUs; on a CPU without bf16 units (the dev machine: 0.4 GFLOP/s bf16 vs 189
fp32) the trainer passes fp32, and one step for a 4-layer d128 model takes 30 ms instead of 630
(``scripts/bench_muon.py``).

Every optimizer's groups carry ``base_lr``; the trainer sets ``lr = base_lr × schedule factor``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UsageError

OPTIMIZERS = ("adamw", "muon")


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton–Schulz step is batched by matrix shape and runs in ``ns_dtype``.

    Same update as torch's: Nesterov momentum, the quintic iteration on the (wide-oriented) matrix
    scaled to unit Frobenius norm, the per-shape lr adjustment, decoupled weight decay."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kw) -> None:
        super().__init__(params, **kw)
        self.ns_dtype = ns_dtype

    @staticmethod
    def _lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
        if adjust_lr_fn in (None, "original"):
            return math.sqrt(max(1.0, rows / cols))
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return 1.0

    def _orthogonalise(self, x: torch.Tensor, coeffs: tuple[float, float, float], steps: int, eps: float):
        """x: (batch, m, n) with m <= n, in ns_dtype; the iteration's result, same shape."""
        a, b, c = coeffs
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            lr, wd, mom = float(group["lr"]), float(group["weight_decay"]), float(group["momentum"])
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            updates = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
            by_shape: dict[tuple, list[int]] = {}
            for i, u in enumerate(updates):
                rows, cols = u.shape
                by_shape.setdefault((rows, cols, u.device), []).append(i)
            for (rows, cols, _), idx in by_shape.items():
                tall = rows > cols  # orthogonalise the wide orientation: its Gram matrix is the smaller one
                x = torch.stack([(updates[i].mT if tall else updates[i]).to(self.ns_dtype) for i in idx])
                x = self._orthogonalise(x, group["ns_coefficients"], group["ns_steps"], group["eps"])
                step_lr = lr * self._lr_ratio(group["adjust_lr_fn"], rows, cols)
                for j, i in enumerate(idx):
                    p = params[i]
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_((x[j].mT if tall else x[j]).to(p.dtype), alpha=-step_lr)
        return loss


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
    muon_ns_dtype: torch.dtype = torch.bfloat16,
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
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        # under --fsdp the model's parameters are DTensor shards and an objective's extra modules
        # (a reward or value head) whole tensors: one fused step cannot take both, so each kind
        # gets its own group (without FSDP there is one kind, and the groups are as before)
        for kind in _by_kind(params):
            groups.append({"params": kind, "weight_decay": wd, "base_lr": lr, "lr": lr})
    opts: list[torch.optim.Optimizer] = []
    if matrices:
        mlr = muon_lr if muon_lr is not None else lr
        muon = BatchedMuon(
            [{"params": matrices, "base_lr": mlr, "lr": mlr}],
            ns_dtype=muon_ns_dtype,
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


def _by_kind(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` split into DTensor shards and plain tensors (the non-empty lists, in that order)."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    return [k for k in (sharded, plain) if k]


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Scale every group's ``base_lr`` by ``factor``; return the first group's resulting lr."""
    first = None
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
            if first is None:
                first = g["lr"]
    return float(first or 0.0)

"""Direct preference optimisation: a run (usually sft's) → a policy that prefers the chosen replies.

For each pair, with π the policy and π_ref a frozen copy of the starting model,
``Δ = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]`` and the loss is
``−log σ(Δ)`` (REFERENCE.md, Post-training; β = 0.1). Log-probabilities are summed over the reply's
tokens only (the final assistant turn, its ``<|end|>`` and EOS; the prompt and earlier turns are
context). At the first step π = π_ref, so Δ = 0 and the loss is exactly ln 2. Logged as TRL does:
``rewards/chosen`` = β(log π − log π_ref)(y_w), ``rewards/rejected``, ``rewards/accuracies`` (the
fraction with Δ > 0) and ``rewards/margins`` (mean Δ).

Data: HH-RLHF's ``{"chosen", "rejected"}`` dialogues (the same conversation ending in two different
assistant turns) or ``{"prompt", "chosen", "rejected"}`` records (``chat.to_preference``), .json or
.jsonl, .gz too. Both sides of a pair are rendered in the chat format; a pair whose longer side
exceeds ``seq_len`` loses the start of its prompt on both sides alike, so both replies follow the
same context (counted as ``truncated``); a pair whose reply alone does not fit is dropped
(``reply_too_long``). Chosen and rejected rows go through the model in one forward pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import UsageError
from .distributed import init_distributed
from .finetune import (
    already_done,
    check_fits,
    fit_and_publish,
    prepare,
)
from .preference import (
    PairConfig,
    PairObjective,
    read_pairs,
)
from .sft import Example, collate

STAGE = "dpo"


@dataclass
class DPOConfig(PairConfig):
    """Every option of ``llmctl dpo`` (the loop's and the pair stages' options, plus β)."""

    beta: float = 0.1
    micro_batch: int = 4


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def reply_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (labels -100 ignored), in fp32: [rows]."""
    # rows × positions flattened: cross_entropy over a transposed [rows, vocab, T] view takes a
    # strided path on CPU that was ~40x slower for this
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows, padded to the longest of the batch."""
    exs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return collate(exs, [[i] for i in range(len(exs))], pad_id, packed=False)


class DPOObjective(PairObjective):
    name = "dpo"
    VAL_KEYS = ("val_loss", "val_accuracy", "val_margin")

    def __init__(self, train: list[Pair], val: list[Pair], cfg: DPOConfig, pad_id: int, global_pairs: int) -> None:
        super().__init__(train, val, cfg.micro_batch, pad_id, global_pairs, cfg.seed)
        self.beta = cfg.beta

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # π_ref: the starting weights, frozen (a copy, so the policy's updates never reach it)
        self.ref = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    def batch(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        return pair_batch(pairs, self.pad_id)

    def _margins(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels = batch["input_ids"], batch["labels"]
        pc, pr = reply_logps(model(ids), labels).chunk(2)
        with torch.no_grad():
            rc, rr = reply_logps(self.ref(ids), labels).chunk(2)
        b = self.beta
        return b * (pc - rc), b * (pr - rr), pc.detach(), pr.detach()

    def loss(self, model, batch, modules):
        chosen, rejected, pc, pr = self._margins(model, batch)
        margin = chosen - rejected
        metrics = {
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/accuracies": (margin.detach() > 0).float().mean(),
            "rewards/margins": margin.detach().mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }
        return -F.logsigmoid(margin).mean(), metrics

    def val_sums(self, model, modules, batch) -> torch.Tensor:
        chosen, rejected, _, _ = self._margins(model, batch)
        m = (chosen - rejected).double()
        return torch.stack([-F.logsigmoid(m).sum(), (m > 0).sum(), m.sum(), torch.tensor(float(len(m)), device=m.device, dtype=m.dtype)])


def run(cfg: DPOConfig) -> dict[str, Any]:
    """Train (or resume) and publish the run; return its manifest."""
    if cfg.beta <= 0:
        raise UsageError(f"--beta {cfg.beta}: give --beta > 0")
    if (done := already_done(cfg, STAGE)) is not None:
        return done
    mcfg, tok_path, tok = prepare(cfg)
    data = read_pairs(cfg, tok, int(cfg.seq_len) + 1)  # + 1: a side's inputs and targets are its ids shifted by one
    train = [Pair(Example(*c.targets()), Example(*r.targets())) for c, r in data.train]
    val = [Pair(Example(*c.targets()), Example(*r.targets())) for c, r in data.val]
    device = resolve_device(cfg.device)
    with init_distributed(device.type) as dist_ctx:
        world = dist_ctx.world_size
        global_pairs, accum = cfg.batch_layout(world)
        cfg.steps_from_epochs(len(train), global_pairs)
        # two rows per pair, and a second (frozen, gradient-free) copy of the weights
        check_fits(cfg, mcfg, device, 2 * cfg.micro_batch, f"the policy and its reference ({mcfg.total_params():,} parameters each)",
                   frozen_params=mcfg.total_params(), world=world)
        objective = DPOObjective(train, val, cfg, tok.pad_id, global_pairs)
        return fit_and_publish(
            cfg, STAGE, dist_ctx, mcfg, tok_path, objective, accum=accum,
            flops_per_token=mcfg.flops_per_token(cfg.seq_len) * 4 / 3,  # + the reference's forward (2 of fwd+bwd's 6)
            headline=f"{data.describe(cfg.seq_len)}; β {cfg.beta}; global batch {global_pairs} pairs = {accum} × "
            f"{cfg.micro_batch} × {world}; {cfg.max_steps or '—'} steps",
            stats=lambda result, final: {
                **data.stats(),
                "epochs": round(objective.epochs(result["steps"]), 4),
                "global_batch_pairs": global_pairs,
                "final_val_loss": final.get("val_loss"),
                "final_val_accuracy": final.get("val_accuracy"),
                "final_val_margin": final.get("val_margin"),
            },
        )

"""Reward modelling: a run (usually sft's) + preference pairs → a Bradley–Terry reward model.

The model is the base transformer with a score head (``model/reward.py``): its final hidden state
at the last token of "prompt + reply" (the EOS that ends the conversation), projected to one
number. For each pair the loss is ``−log σ(r_chosen − r_rejected)`` (REFERENCE.md, Post-training);
the head starts at zero, so every score starts at 0 and the first loss is exactly ln 2. Logged:
``accuracy`` (the fraction of pairs with r_chosen > r_rejected), ``margin`` (mean r_c − r_r) and the
mean chosen and rejected scores; the val split reports the same, and the final pass also the mean
and standard deviation of every val score (what a score of 1.0 means for this model, for ppo).

Data and truncation are dpo's (``train/preference.py``): HH-RLHF dialogues or prompt/chosen/
rejected records; a side longer than ``seq_len`` loses the start of its prompt, a pair whose reply
does not fit is dropped. The run holds the backbone (``model.safetensors``) and the head
(``score.safetensors``); ``llmctl ppo --reward RUN`` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..chat import ChatTokens
from ..device import resolve_device
from ..model.io import save_weights
from ..model.reward import SCORE, pad_right, rewards, score_head
from .distributed import init_distributed
from .finetune import (
    already_done,
    check_fits,
    fit_and_publish,
    prepare,
)
from .preference import PairConfig, PairObjective, read_pairs

STAGE = "reward"


@dataclass
class RewardConfig(PairConfig):
    """Every option of ``llmctl reward`` (the loop's and the pair stages' options)."""

    micro_batch: int = 8


def pair_rows(pairs: list[tuple[ChatTokens, ChatTokens]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows, right-padded to the longest, with each row's length."""
    ids, lengths = pad_right([c.ids for c, _ in pairs] + [r.ids for _, r in pairs], pad_id)
    return {"input_ids": ids, "lengths": lengths, "real_tokens": lengths.sum()}


class RewardObjective(PairObjective):
    name = "reward"
    VAL_KEYS = ("val_loss", "val_accuracy", "val_margin", "val_score_mean", "val_score_sq")

    def __init__(self, train: list, val: list, cfg: RewardConfig, pad_id: int, global_pairs: int, d_model: int) -> None:
        super().__init__(train, val, cfg.micro_batch, pad_id, global_pairs, cfg.seed)
        self.head = score_head(d_model)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"score": self.head}

    def batch(self, pairs: list) -> dict[str, torch.Tensor]:
        return pair_rows(pairs, self.pad_id)

    def _scores(self, model, batch, modules) -> tuple[torch.Tensor, torch.Tensor]:
        return rewards(model, modules["score"], batch["input_ids"], batch["lengths"]).chunk(2)

    def loss(self, model, batch, modules):
        chosen, rejected = self._scores(model, batch, modules)
        margin = chosen - rejected
        m = margin.detach()
        metrics = {
            "accuracy": (m > 0).float().mean(),
            "margin": m.mean(),
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
        }
        return -F.logsigmoid(margin).mean(), metrics

    def val_sums(self, model, modules, batch) -> torch.Tensor:
        chosen, rejected = (s.double() for s in self._scores(model, batch, modules))
        m = chosen - rejected
        both = torch.cat([chosen, rejected])
        # the score sums count both sides: halved here so that ÷ pairs gives the per-score mean
        return torch.stack([
            -F.logsigmoid(m).sum(), (m > 0).sum(), m.sum(), both.sum() / 2, both.square().sum() / 2,
            torch.tensor(float(len(m)), device=m.device, dtype=m.dtype),
        ])

    def evaluate(self, model, modules, full: bool) -> dict[str, float]:
        out = super().evaluate(model, modules, full)
        if out:
            mean, sq = out.pop("val_score_mean"), out.pop("val_score_sq")
            if full:
                out["val_score_mean"] = mean
                out["val_score_std"] = round(max(sq - mean * mean, 0.0) ** 0.5, 6)
        return out


def run(cfg: RewardConfig) -> dict[str, Any]:
    """Train (or resume) and publish the reward model; return its manifest."""
    if (done := already_done(cfg, STAGE)) is not None:
        return done
    mcfg, tok_path, tok = prepare(cfg)
    data = read_pairs(cfg, tok, int(cfg.seq_len))
    device = resolve_device(cfg.device)
    with init_distributed(device.type) as dist_ctx:
        world = dist_ctx.world_size
        global_pairs, accum = cfg.batch_layout(world)
        cfg.steps_from_epochs(len(data.train), global_pairs)
        check_fits(cfg, mcfg, device, 2 * cfg.micro_batch, f"the reward model ({mcfg.total_params():,} parameters)", world=world)
        objective = RewardObjective(data.train, data.val, cfg, tok.pad_id, global_pairs, mcfg.d_model)
        keys = ("val_loss", "val_accuracy", "val_margin", "val_score_mean", "val_score_std")
        return fit_and_publish(
            cfg, STAGE, dist_ctx, mcfg, tok_path, objective, accum=accum,
            flops_per_token=mcfg.flops_per_token(int(cfg.seq_len)),
            headline=f"{data.describe(int(cfg.seq_len))}; global batch {global_pairs} pairs = {accum} × {cfg.micro_batch} × "
            f"{world}; {cfg.max_steps or '—'} steps",
            extra_files=lambda work: save_weights(objective.head, work / SCORE),
            stats=lambda result, final: {
                **data.stats(),
                "epochs": round(objective.epochs(result["steps"]), 4),
                "global_batch_pairs": global_pairs,
                **{f"final_{k}": final.get(k) for k in keys},
            },
        )

"""Preference pairs for the stages that learn from them (reward, dpo): reading, the val split, and
their tokens cut to fit a row.

A pair is (prompt messages, chosen reply, rejected reply), read by ``chat.to_preference`` from
HH-RLHF's two full dialogues or ``{"prompt", "chosen", "rejected"}`` records. Both sides render in
the chat format with only the final reply marked as trained; a side longer than the row loses the
start of its prompt (counted as ``truncated``), and a pair whose reply alone does not fit is
dropped as ``reply_too_long``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..chat import BadRecord, ChatTokens, Message, encode_chats, render_prompt, to_preference
from ..tokenizer import _unit
from .finetune import EpochOrder, FinetuneConfig, count, no_usable, read_records, train_val
from .loop import Objective

Preference = tuple[list[Message], Message, Message]
PairTokens = tuple[ChatTokens, ChatTokens]


@dataclass
class PairConfig(FinetuneConfig):
    """The options of the stages that learn from preference pairs (reward, dpo)."""

    unit: ClassVar[str] = "pairs"
    what: ClassVar[str] = "preference data"

    lr: float = 1e-5


@dataclass
class PairData:
    """The train and val pairs of a run, with what reading them counted."""

    train: list[PairTokens]
    val: list[PairTokens]
    records: int
    truncated: int
    bad: dict[str, int] = field(default_factory=dict)

    def describe(self, seq_len: int) -> str:
        return (
            f"{len(self.train):,} train / {len(self.val):,} val pairs from {self.records:,} records "
            f"({sum(self.bad.values()):,} skipped, {self.truncated:,} prompts cut to {seq_len} tokens)"
        )

    def stats(self) -> dict[str, Any]:
        return {"train_pairs": len(self.train), "val_pairs": len(self.val), "truncated": self.truncated, "skipped": self.bad}


def read_pairs(cfg: PairConfig, tok: Any, keep: int) -> PairData:
    """DATA (and ``--val``, or a hashed val split) as token pairs of at most ``keep`` ids each;
    raises the "no usable pairs" error when no train pair is left."""
    bad: dict[str, int] = {}
    train_prefs, val_prefs, n_records = train_val(cfg, load_preferences, split_val, bad)
    train, cut = encode_pairs(tok, train_prefs, keep, bad)
    val, cut_val = encode_pairs(tok, val_prefs, keep, bad)
    if not train:
        raise no_usable("preference pairs", cfg, bad)
    return PairData(train, val, n_records, cut + cut_val, bad)


def load_preferences(paths: list[Path], bad: dict[str, int]) -> list[Preference]:
    out = []
    for p in paths:
        for rec in read_records(Path(p), bad):
            try:
                out.append(to_preference(rec))
            except BadRecord as e:
                count(bad, e.reason)
    return out


def split_val(prefs: list[Preference], fraction: float) -> tuple[list[Preference], list[Preference]]:
    """(train, val) by a seed-independent hash of each pair's prompt (pairs on one prompt stay together)."""
    train, val = [], []
    for pref in prefs:
        (val if _unit(0, "dpo-val", render_prompt(pref[0])) < fraction else train).append(pref)
    return train, val


def cut_pair(chosen: ChatTokens | BadRecord, rejected: ChatTokens | BadRecord, keep: int) -> tuple[ChatTokens, ChatTokens, bool]:
    """Both sides of a pair in at most ``keep`` ids (and whether any were cut), by one cut: the
    longer side's excess goes from the start of both, so the two replies are scored after the
    same context (the sides share their prompt ids). Each kept window must hold every trained id
    and start with an untrained one (the reply's context), else ``BadRecord("reply_too_long")``."""
    for ct in (chosen, rejected):
        if isinstance(ct, BadRecord):
            raise ct
    cut = max(len(chosen.ids), len(rejected.ids)) - keep
    if cut <= 0:
        return chosen, rejected, False
    if any(chosen.trained[: cut + 1]) or any(rejected.trained[: cut + 1]):
        raise BadRecord("reply_too_long")
    return ChatTokens(chosen.ids[cut:], chosen.trained[cut:]), ChatTokens(rejected.ids[cut:], rejected.trained[cut:]), True


def encode_pairs(tok: Any, prefs: list[Preference], keep: int, bad: dict[str, int]) -> tuple[list[PairTokens], int]:
    """Both sides of each pair as tokens of at most ``keep`` ids (BOS … EOS, the final reply trained);
    (pairs, how many had a side cut). Unusable pairs are counted in ``bad`` by reason."""
    sides = encode_chats(tok, [[*p, reply] for p, c, r in prefs for reply in (c, r)], last_only=True)
    pairs, truncated = [], 0
    for k in range(len(prefs)):
        try:
            c, r, cut = cut_pair(sides[2 * k], sides[2 * k + 1], keep)
        except BadRecord as e:
            count(bad, e.reason)
            continue
        pairs.append((c, r))
        truncated += cut
    return pairs, truncated


class PairObjective(Objective):
    """What the pair objectives (reward, dpo) share: the data stream, the val loop and the data
    position. Optimizer step ``s`` takes pairs ``[s·G, (s+1)·G)`` of an ``EpochOrder`` stream over the
    train pairs (G = the global batch in pairs); rank ``r``'s ``i``-th micro-batch of that step is its
    slice, so the stream is the same for any split into ranks and micro-batches. A subclass builds
    ``batch(pairs)`` and ``loss``, and gives ``val_sums`` (per-val-batch sums, the last one the
    number of pairs) with ``VAL_KEYS`` naming the means reported."""

    VAL_KEYS: tuple[str, ...] = ()

    def __init__(self, train: list, val: list, micro_batch: int, pad_id: int, global_pairs: int, seed: int) -> None:
        self.train, self.val, self.micro_batch, self.pad_id = train, val, micro_batch, pad_id
        self.global_pairs = global_pairs
        self.order = EpochOrder(len(train), seed)
        self.micro = 0  # micro-batches drawn by this rank (the data position)

    @abstractmethod
    def batch(self, pairs: list) -> dict[str, torch.Tensor]:
        """One micro-batch of pairs as tensors (CPU)."""

    @abstractmethod
    def val_sums(self, model, modules, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp64 sums over the batch's pairs, one per ``VAL_KEYS`` entry, then the number of pairs."""

    def epochs(self, steps: int) -> float:
        return steps * self.global_pairs / len(self.train)

    def next_batch(self) -> dict[str, torch.Tensor]:
        d, mb, accum = self.ctx.dist, self.micro_batch, self.ctx.accum_steps
        step, i = divmod(self.micro, accum)
        first = step * self.global_pairs + (d.rank * accum + i) * mb
        self.micro += 1
        return self.batch([self.train[self.order[first + j]] for j in range(mb)])

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["real_tokens"])

    def evaluate(self, model, modules, full: bool) -> dict[str, float]:
        if not self.val:
            return {}
        d, dev, mb = self.ctx.dist, self.ctx.device, self.micro_batch
        total = torch.zeros(len(self.VAL_KEYS) + 1, dtype=torch.float64, device=dev)
        mine = list(range(d.rank, len(self.val), d.world_size))
        for k in self.ctx.lockstep(range(0, len(mine), mb)):
            b = {n: t.to(dev) for n, t in self.batch([self.val[i] for i in mine[k : k + mb]]).items()}
            total += self.val_sums(model, modules, b)
        d.all_reduce_sum(total)
        n = float(total[-1])
        return {key: round(float(v) / n, 6) for key, v in zip(self.VAL_KEYS, total[:-1], strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"micro": self.micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro = int(state["micro"])

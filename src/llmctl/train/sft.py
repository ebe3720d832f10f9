"""Supervised fine-tuning: a pretrained run → a chat model, trained on the assistant replies only.

``run(SFTConfig)`` loads the base run (weights, model config, tokenizer), reads instruction data
(``chat.to_messages`` layouts, .json/.jsonl, .gz too), renders every example in llmctl's chat
format and tokenises it with a loss mask (``chat.encode_chat``: prompt, role markers and padding
are -100; replies, their ``<|end|>`` and the final EOS are targets), holds out a val split, and
trains with ``Trainer``. The result is a run like pretrain's (config.json, model.safetensors,
tokenizer.model, metrics.jsonl, loss.png, checkpoints/), so generate, export and eval take it.

Packing (default): examples are packed into rows of ``seq_len`` tokens by best-fit decreasing
(``pack``). Position ids restart at 0 for every example and the attention mask is block-diagonal
causal, so a packed example sees exactly what it would see alone (no cross-example attention);
the rows are fixed once and each epoch visits them in a new seeded order. Without packing every
row is one example, padded to the longest of its micro-batch. An example longer than ``seq_len``
is cut to its first ``seq_len`` targets (counted as ``truncated``); one whose prompt alone fills the
window has no target left and is dropped (``prompt_too_long``).

The loss is the mean over every target token of the optimizer step, on all ranks: each
micro-batch's summed nats are divided by the step's global target count (one all-reduce per step),
so gradient accumulation and data parallelism weight every token equally, however the tokens fall
into micro-batches (a mean of per-micro-batch means would overweight short ones).

Val: ``--val FILE`` gives the held-out examples exactly; otherwise a fraction ``val_fraction`` of
the examples, chosen by a hash of their text (independent of ``--seed``, and duplicates land on the
same side). ``val_loss`` is the mean nats per target token over the whole val split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..chat import BadRecord, encode_chats, render_prompt, to_messages
from ..device import resolve_device
from ..model.transformer import lm_loss
from ..tokenizer import _unit
from .distributed import init_distributed
from .finetune import (
    EpochOrder,
    FinetuneConfig,
    already_done,
    check_fits,
    count,
    fit_and_publish,
    no_usable,
    prepare,
    read_records,
    train_val,
)
from .loop import Objective

STAGE = "sft"


@dataclass
class SFTConfig(FinetuneConfig):
    """Every option of ``llmctl sft`` (the loop's and the post-training stages' options, plus packing)."""

    what: ClassVar[str] = "training data"

    packing: bool = True
    epochs: float = 3.0


# --- data ---------------------------------------------------------------------------------------
def load_conversations(paths: list[Path], bad: dict[str, int]) -> list[list[dict[str, str]]]:
    """Every conversation in the files, in order; records that are not one are counted by reason."""
    out = []
    for p in paths:
        for rec in read_records(Path(p), bad):
            try:
                out.extend(to_messages(rec))
            except BadRecord as e:
                count(bad, e.reason)
    return out


@dataclass
class Example:
    inputs: list[int]
    targets: list[int]  # -100 where no loss is taken

    @property
    def n_targets(self) -> int:
        return sum(t != -100 for t in self.targets)


def tokenize_examples(tok: Any, convs: list[list[dict[str, str]]], seq_len: int, bad: dict[str, int]) -> tuple[list[Example], int]:
    """(examples, how many were truncated to ``seq_len``); failures are counted in ``bad``."""
    out, truncated = [], 0
    for ct in encode_chats(tok, convs):
        if isinstance(ct, BadRecord):
            count(bad, ct.reason)
            continue
        inputs, targets = ct.targets()
        if len(inputs) > seq_len:
            inputs, targets = inputs[:seq_len], targets[:seq_len]
            truncated += 1
        ex = Example(inputs, targets)
        if ex.n_targets == 0:
            count(bad, "prompt_too_long")
            continue
        out.append(ex)
    return out, truncated


def split_val(convs: list[list[dict[str, str]]], fraction: float) -> tuple[list, list]:
    """(train, val) by a seed-independent hash of each conversation's text."""
    train, val = [], []
    for msgs in convs:
        key = render_prompt(msgs)
        (val if _unit(0, "sft-val", key) < fraction else train).append(msgs)
    return train, val


def pack(lengths: list[int], seq_len: int, order: list[int]) -> list[list[int]]:
    """Rows of example indices, at most ``seq_len`` tokens each, by best-fit decreasing: longest
    examples first (ties in ``order``), each into the fullest row it still fits. That packs rows
    ~97-100% full where filling them one after another in ``order`` leaves ~20% padding on
    instruction data; the rows' own order is shuffled per epoch."""
    import bisect

    rank = {i: r for r, i in enumerate(order)}
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for i in sorted(order, key=lambda i: (-lengths[i], rank[i])):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A micro-batch: ids padded to the longest row; packed rows add restarting position ids and a
    block-diagonal causal mask [B, 1, T, T] (padding attends only to padding, never to a token)."""
    T = max(sum(len(examples[i].inputs) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    real = 0
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex.inputs)
            ids[b, t : t + n] = torch.tensor(ex.inputs)
            labels[b, t : t + n] = torch.tensor(ex.targets)
            pos[b, t : t + n] = torch.arange(n)
            seg[b, t : t + n] = s
            t += n
        real += t
    batch = {"input_ids": ids, "labels": labels, "real_tokens": torch.tensor(real)}
    if packed and any(len(r) > 1 for r in rows):
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        batch["position_ids"] = pos
        batch["attn_mask"] = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    return batch


class SFTObjective(Objective):
    """Rows of packed (or single) chat examples → cross-entropy on the reply tokens."""

    name = "sft"

    def __init__(self, train: list[Example], val: list[Example], cfg: SFTConfig, pad_id: int, global_rows: int) -> None:
        self.train, self.val, self.cfg, self.pad_id = train, val, cfg, pad_id
        self.global_rows = global_rows
        lengths = [len(e.inputs) for e in train]
        if cfg.packing:
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(train), generator=g).tolist()
            self.rows = pack(lengths, int(cfg.seq_len), order)
        else:
            self.rows = [[i] for i in range(len(train))]
        self.order = EpochOrder(len(self.rows), cfg.seed)
        self.step = 0  # optimizer steps drawn so far (the data position)
        self._buffer: list[dict[str, torch.Tensor]] = []

    def _row(self, g: int) -> list[int]:
        """The g-th row of the endless stream (epochs of the rows in seeded orders)."""
        return self.rows[self.order[g]]

    def epochs(self, steps: int | None = None) -> float:
        steps = self.step if steps is None else steps
        return steps * self.global_rows / len(self.rows)

    def _fill(self) -> None:
        d, mb, accum = self.ctx.dist, self.cfg.micro_batch, self.ctx.accum_steps
        first = self.step * self.global_rows + d.rank * mb * accum
        rows = [self._row(first + j) for j in range(mb * accum)]
        self.step += 1
        batches = [
            collate(self.train, rows[i : i + mb], self.pad_id, self.cfg.packing) for i in range(0, len(rows), mb)
        ]
        n = torch.tensor([float(sum(int((b["labels"] != -100).sum()) for b in batches))])
        d.all_reduce_sum(n)  # the step's target tokens over every rank
        scale = accum * d.world_size / max(float(n), 1.0)
        for b in batches:
            b["loss_scale"] = torch.tensor(scale)
        self._buffer = batches

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self._buffer:
            self._fill()
        return self._buffer.pop(0)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["real_tokens"])

    def loss(self, model, batch, modules):
        kw = {k: batch[k] for k in ("position_ids", "attn_mask") if k in batch}
        logits = model(batch["input_ids"], **kw)
        nats = lm_loss(logits, batch["labels"], reduction="sum")
        return nats * batch["loss_scale"], {}

    def evaluate(self, model, modules, full: bool) -> dict[str, float]:
        if not self.val:
            return {}
        d, dev, mb = self.ctx.dist, self.ctx.device, self.cfg.micro_batch
        total = torch.zeros(2, dtype=torch.float64, device=dev)  # summed nats, targets
        mine = list(range(d.rank, len(self.val), d.world_size))
        # longest first: rows of a micro-batch have similar lengths, so little padding
        mine.sort(key=lambda i: -len(self.val[i].inputs))
        for k in self.ctx.lockstep(range(0, len(mine), mb)):
            b = collate(self.val, [[i] for i in mine[k : k + mb]], self.pad_id, packed=False)
            logits = model(b["input_ids"].to(dev))
            labels = b["labels"].to(dev)
            total[0] += lm_loss(logits, labels, reduction="sum").double()
            total[1] += (labels != -100).sum()
        d.all_reduce_sum(total)
        if total[1] == 0:
            return {}
        loss = float(total[0] / total[1])
        return {"val_loss": round(loss, 6), "val_ppl": round(math.exp(min(loss, 50.0)), 4)}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._buffer = []


def run(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune (or resume) and publish the run; return its manifest."""
    if (done := already_done(cfg, STAGE)) is not None:
        return done
    mcfg, tok_path, tok = prepare(cfg)
    bad: dict[str, int] = {}
    train_convs, val_convs, n_convs = train_val(cfg, load_conversations, split_val, bad)
    train, trunc_train = tokenize_examples(tok, train_convs, cfg.seq_len, bad)
    val, trunc_val = tokenize_examples(tok, val_convs, cfg.seq_len, bad)
    if not train:
        raise no_usable("training examples", cfg, bad)

    device = resolve_device(cfg.device)
    with init_distributed(device.type) as dist_ctx:
        world = dist_ctx.world_size
        global_rows, accum = cfg.batch_layout(world)
        objective = SFTObjective(train, val, cfg, tok.pad_id, global_rows)
        cfg.steps_from_epochs(len(objective.rows), global_rows)
        check_fits(cfg, mcfg, device, cfg.micro_batch, f"the model ({mcfg.total_params():,} parameters)", world=world)

        packed_tokens = sum(len(e.inputs) for e in train)
        fill = packed_tokens / (len(objective.rows) * cfg.seq_len) if cfg.packing else None
        headline = (
            f"{len(train):,} train / {len(val):,} val examples from {n_convs:,} conversations "
            f"({sum(bad.values()):,} records skipped); {len(objective.rows):,} rows of ≤ {cfg.seq_len} tokens"
            + (f" (packed, {fill:.0%} full)" if fill is not None else "")
            + f"; global batch {global_rows} rows = {accum} × {cfg.micro_batch} × {world}; {cfg.max_steps or '—'} steps"
        )
        return fit_and_publish(
            cfg, STAGE, dist_ctx, mcfg, tok_path, objective, accum=accum,
            flops_per_token=mcfg.flops_per_token(cfg.seq_len), headline=headline,
            stats=lambda result, final: {
                "train_examples": len(train),
                "val_examples": len(val),
                "train_target_tokens": sum(e.n_targets for e in train),
                "truncated": trunc_train + trunc_val,
                "skipped": bad,
                "rows": len(objective.rows),
                "packing_fill": None if fill is None else round(fill, 4),
                "epochs": round(objective.epochs(result["steps"]), 4),
                "global_batch_rows": global_rows,
                "final_val_loss": final.get("val_loss"),
                "final_val_ppl": final.get("val_ppl"),
            },
        )

"""Pretraining: next-token cross-entropy on a token artifact; the first user of the training loop.

``run(PretrainConfig)`` builds the model (preset + explicit dims, vocabulary from the tokens),
refuses configs that do not fit in memory, trains with ``Trainer`` in the run's work directory
(checkpoints there make a rerun resume), scores the FULL val split at the end, and publishes the
run: ``config.json`` ({"model": ModelConfig, "train": every option}), ``model.safetensors``,
``tokenizer.model``, ``metrics.jsonl``, ``loss.png``, ``checkpoints/`` and a manifest whose stats
hold non_embedding_params, total_params, tokens_seen, steps, train_epochs, final_val_loss,
final_val_bpb, tokens_per_s, mfu, peak_memory_bytes and stop_reason.

Batches: every optimizer step sees ``global_batch_tokens / seq_len`` random windows of the train
split (``tokens.BatchSampler``: epochs without replacement, drawn from (seed, step) alone, so 1 and
N data-parallel ranks see the same global batch), cut into micro-batches of ``micro_batch``
windows per rank. The manifest's ``train_epochs`` says how many passes over the split that was.

Val bits per byte, exactly: the val split is cut into disjoint windows of ``seq_len`` (every token
but the first is a target once, ``tokens.iter_eval_windows``). ``val_loss`` is the mean
cross-entropy in nats per target token; ``val_bpb = val_loss × (val_tokens − 1) / val_bytes / ln 2``
where val_tokens and val_bytes (UTF-8 bytes of the val text) come from the token manifest. On the
final, full pass that is exactly the summed nats over the whole val split divided by ln 2 and by
its bytes; the periodic passes score the first ``eval_batches × micro_batch`` windows (the same
ones however many ranks share them) and extrapolate the same way.

Anneal: with ``anneal_tokens`` and ``anneal_fraction`` F, the data source switches to the second
artifact (same tokenizer, checked) for the last F of the run — pair it with ``schedule=wsd`` and
``decay_fraction=F`` so the warmdown happens on the high-quality domain.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import write_json_atomic
from ..console import console
from ..device import resolve_device
from ..errors import UsageError
from ..model.config import ModelConfig, from_preset
from ..model.io import CONFIG, TOKENIZER, WEIGHTS, save_state
from ..model.transformer import Transformer, lm_loss
from ..tokens import BatchSampler, TokenArtifact, check_compatible, iter_eval_windows
from .distributed import init_distributed, open_run
from .loop import METRICS, PLOT, LoopConfig, Objective, Trainer, check_memory, estimate_train_memory
from .precision import available_memory, resolve_precision

STAGE = "pretrain"


@dataclass
class PretrainConfig(LoopConfig):
    """Every option of ``llmctl pretrain`` (the loop's options plus model, data and batch)."""

    tokens: Path = Path()
    out: Path = Path()
    preset: str = "micro"
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    d_model: int | None = None
    ffn_hidden: int | None = None  # None → SwiGLU's 8/3·d rounded up to a multiple of 64
    seq_len: int | None = None
    qk_norm: bool | None = None
    tie_embeddings: bool | None = None
    global_batch_tokens: int = 0  # 0 → micro_batch × seq_len × world size (no accumulation)
    micro_batch: int = 16  # windows per forward/backward on each rank
    eval_batches: int = 20  # periodic val: the first this-many micro-batches of windows, over all ranks (the final pass scores all)
    anneal_tokens: Path | None = None
    anneal_fraction: float = 0.0
    force: bool = False  # not a parameter of the run (left out of the manifest's params)

    def model_config(self, vocab_size: int) -> ModelConfig:
        over: dict[str, Any] = dict(
            n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head, d_model=self.d_model,
            ffn_hidden=self.ffn_hidden, max_seq_len=self.seq_len, qk_norm=self.qk_norm, tie_embeddings=self.tie_embeddings,
        )
        return from_preset(self.preset, vocab_size=vocab_size, **over)


class PretrainObjective(Objective):
    """Random windows of the train split → next-token cross-entropy; val loss and bits per byte."""

    name = "pretrain"

    def __init__(self, tokens: TokenArtifact, cfg: PretrainConfig, anneal: TokenArtifact | None = None) -> None:
        self.tokens, self.cfg, self.anneal = tokens, cfg, anneal
        self.seq_len = 0
        self.annealing = False
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, ctx) -> None:
        super().setup(ctx)
        c = self.cfg
        self.seq_len = int(c.seq_len)
        rows = c.micro_batch * ctx.accum_steps  # this rank's rows per optimizer step
        d = ctx.dist
        self.main = BatchSampler(self.tokens, "train", rows, self.seq_len, c.seed, d.rank, d.world_size)
        self.second = (
            BatchSampler(self.anneal, "train", rows, self.seq_len, c.seed + 1, d.rank, d.world_size)
            if self.anneal is not None
            else None
        )

    def on_progress(self, step: int, progress: float) -> None:
        if self.second is not None and not self.annealing and progress >= 1.0 - self.cfg.anneal_fraction:
            self.annealing = True
            if self.ctx.dist.is_main:
                console.print(f"pretrain: anneal phase from step {step:,}: data from {self.anneal.path}")

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self._buffer:
            sampler = self.second if self.annealing else self.main
            x, y = sampler.next()
            mb = self.cfg.micro_batch
            self._buffer = [(x[i : i + mb], y[i : i + mb]) for i in range(0, x.shape[0], mb)]
        x, y = self._buffer.pop(0)
        return {"input_ids": x, "labels": y}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def loss(self, model, batch, modules):
        logits = model(batch["input_ids"])
        return lm_loss(logits, batch["labels"]), {}

    def evaluate(self, model, modules, full: bool) -> dict[str, float]:
        if not has_val(self.tokens):  # encoded with --val-fraction 0: nothing to score
            return {}
        d = self.ctx.dist
        dev = self.ctx.device
        total = torch.zeros(2, dtype=torch.float64, device=dev)  # summed nats, targets
        cap = None if full else self.cfg.eval_batches * self.cfg.micro_batch  # windows, over all ranks
        it = iter_eval_windows(self.tokens, "val", self.seq_len, self.cfg.micro_batch, d.rank, d.world_size, cap)
        for x, y in self.ctx.lockstep(it):
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            total[0] += lm_loss(logits, y, reduction="sum").double()
            total[1] += (y != -100).sum()
        d.all_reduce_sum(total)
        if total[1] == 0:
            return {}
        loss = float(total[0] / total[1])
        val_targets = max(self.tokens.num_tokens("val") - 1, 1)
        val_bytes = self.tokens.num_bytes("val")
        out = {"val_loss": round(loss, 6)}
        if val_bytes:
            out["val_bpb"] = round(loss * val_targets / val_bytes / math.log(2), 6)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "anneal": self.second.state_dict() if self.second is not None else None,
            "annealing": self.annealing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        if self.second is not None and state.get("anneal"):
            self.second.load_state_dict(state["anneal"])
        self.annealing = bool(state.get("annealing", False))
        self._buffer = []


def _params_of(cfg: PretrainConfig) -> dict[str, Any]:
    p = asdict(cfg)
    p.pop("force")
    for k, v in p.items():
        if isinstance(v, Path):
            p[k] = str(v)
    return p


def has_val(tokens: TokenArtifact) -> bool:
    return "val" in tokens.splits and tokens.num_tokens("val") > 0


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) and publish the run; return its manifest."""
    cfg.check()
    if not (cfg.max_steps or cfg.max_tokens or cfg.time_budget):
        raise UsageError("no stopping rule: give --max-steps, --max-tokens or --time-budget")
    tokens = TokenArtifact(cfg.tokens)
    anneal = None
    if cfg.anneal_tokens is not None:
        if not 0.0 < cfg.anneal_fraction < 1.0:
            raise UsageError(f"--anneal-fraction {cfg.anneal_fraction}: give a fraction in (0, 1) with --anneal-tokens")
        anneal = TokenArtifact(cfg.anneal_tokens)
        check_compatible(anneal, tokens.tokenizer_path)
    elif cfg.anneal_fraction:
        raise UsageError("--anneal-fraction needs --anneal-tokens (the high-quality token artifact)")
    if cfg.micro_batch < 1:
        raise UsageError("--micro-batch must be ≥ 1")
    preset_len = from_preset(cfg.preset, vocab_size=tokens.vocab_size).max_seq_len
    cfg.seq_len = int(cfg.seq_len or preset_len)
    mcfg = cfg.model_config(tokens.vocab_size)
    check_compatible(tokens, mcfg.vocab_size)

    device = resolve_device(cfg.device)
    dist_ctx = init_distributed(device.type)
    try:
        world = dist_ctx.world_size
        rows_per_micro = cfg.micro_batch * world
        global_rows = cfg.global_batch_tokens // cfg.seq_len if cfg.global_batch_tokens else rows_per_micro
        if global_rows < rows_per_micro or global_rows % rows_per_micro:
            raise UsageError(
                f"--global-batch-tokens {cfg.global_batch_tokens:,} is {global_rows} windows of {cfg.seq_len}, "
                f"not a multiple of --micro-batch {cfg.micro_batch} × {world} ranks; "
                f"use a multiple of {rows_per_micro * cfg.seq_len:,} tokens"
            )
        accum = global_rows // rows_per_micro
        precision = resolve_precision(cfg.precision, device)
        est = estimate_train_memory(mcfg, cfg.micro_batch, cfg.seq_len, cfg.optimizer, precision,
                                    shards=world if cfg.fsdp else 1)
        check_memory(est, available_memory(device), f"the model ({mcfg.total_params():,} parameters)")

        params = _params_of(cfg)
        inputs = [cfg.tokens] + ([cfg.anneal_tokens] if cfg.anneal_tokens else [])
        stage, done, work, manifest = open_run(cfg.out, STAGE, params, inputs, cfg.force, dist_ctx)
        if done:
            if dist_ctx.is_main:
                console.print(f"pretrain: {cfg.out} is already complete (same options and tokens); nothing to do")
            return manifest if dist_ctx.is_main else {}  # only rank 0's CLI prints the summary

        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg)
        fpt = mcfg.flops_per_token(cfg.seq_len)
        if dist_ctx.is_main:
            console.print(
                f"pretrain: {mcfg.n_layer} layers × d {mcfg.d_model}, {mcfg.n_head} heads ({mcfg.n_kv_head} kv), "
                f"vocab {mcfg.vocab_size:,}, seq {cfg.seq_len}: {mcfg.total_params():,} parameters "
                f"({mcfg.non_embedding_params():,} non-embedding), {fpt / 1e6:,.2f} MFLOPs/token; "
                f"global batch {global_rows * cfg.seq_len:,} tokens = {accum} × {cfg.micro_batch} × {world} × "
                f"{cfg.seq_len}; precision {precision}; est. memory {est['total'] / 2**20:,.0f} MiB"
            )
            write_json_atomic(work / CONFIG, {"model": mcfg.to_dict(), "train": params})
            if not has_val(tokens):
                console.print(
                    f"[yellow]warning:[/] {cfg.tokens} has no val tokens: no val loss or bits per byte will be reported "
                    "(re-encode with --val-fraction > 0 or --val DOCS to have them)"
                )
        objective = PretrainObjective(tokens, cfg, anneal)
        trainer = Trainer(
            model, objective, cfg.loop_config(), work, accum_steps=accum, flops_per_token=fpt,
            dist_ctx=dist_ctx, title="pretrain",
        )
        result = trainer.fit()
        weights = trainer.model_state()  # under --fsdp every rank takes part in gathering them
        if not dist_ctx.is_main:
            return {}
        save_state(weights, work / WEIGHTS)
        shutil.copyfile(tokens.tokenizer_path, work / TOKENIZER)
        final = result.pop("final_eval") or {}
        stats = {
            "non_embedding_params": mcfg.non_embedding_params(),
            "total_params": mcfg.total_params(),
            "flops_per_token": fpt,
            "tokens_seen": result["tokens_seen"],
            "steps": result["steps"],
            "final_val_loss": final.get("val_loss"),
            "final_val_bpb": final.get("val_bpb"),
            "global_batch_tokens": global_rows * cfg.seq_len,
            "accum_steps": accum,
            "world_size": world,
            "train_compute_flops": fpt * result["tokens_seen"],
            "train_epochs": round(objective.main.epochs(objective.main.step), 4),
            **({"anneal_epochs": round(objective.second.epochs(objective.second.step), 4)} if anneal else {}),
            **{k: v for k, v in result.items() if k not in ("steps", "tokens_seen")},
        }
        assert (work / METRICS).is_file() and (work / PLOT).is_file()
        return stage.finish(stats)
    finally:
        dist_ctx.close()

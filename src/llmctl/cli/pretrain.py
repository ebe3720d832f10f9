"""`llmctl pretrain TOKENS --out RUN`: train a decoder-only transformer on a token artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import or_na, summary
from . import app
from .common import ConfigOpt, ForceOpt, SeedOpt
from .train_options import (
    OPT,
    STOP,
    CheckpointEveryOpt,
    CompileOpt,
    DeviceOpt,
    EvalEveryOpt,
    FsdpOpt,
    GradClipOpt,
    KeepCheckpointsOpt,
    LogEveryOpt,
    LrOpt,
    MaxTokensOpt,
    MinLrOpt,
    PrecisionOpt,
    ScheduleOpt,
    TimeBudgetOpt,
    WarmupOpt,
    WeightDecayOpt,
    config_from,
)

_D = "Model"


@app.command(
    "pretrain",
    epilog=(
        "Example: llmctl pretrain tokens --out runs/micro --preset micro --time-budget 600 "
        "--global-batch-tokens 16384 --compile\n\n"
        "Data parallel: torchrun --nproc-per-node 2 -m llmctl pretrain tokens --out runs/ddp --max-steps 1000\n\n"
        "Rerun the same command after an interruption to resume from the last checkpoint."
    ),
)
def pretrain_cmd(
    tokens: Annotated[Path, typer.Argument(help="Token artifact written by llmctl tokenize encode.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    preset: Annotated[str, typer.Option("--preset", help="Model size: nano, micro, tiny, small, base, gpt2-small.", rich_help_panel=_D)] = "micro",
    n_layer: Annotated[int | None, typer.Option("--n-layer", help="Layers (overrides the preset).", rich_help_panel=_D)] = None,
    n_head: Annotated[int | None, typer.Option("--n-head", help="Attention heads.", rich_help_panel=_D)] = None,
    n_kv_head: Annotated[int | None, typer.Option("--n-kv-head", help="Key/value heads (< n-head: grouped-query attention).", rich_help_panel=_D)] = None,
    d_model: Annotated[int | None, typer.Option("--d-model", help="Model width.", rich_help_panel=_D)] = None,
    ffn_hidden: Annotated[int | None, typer.Option("--ffn-hidden", help="SwiGLU hidden width (default 8/3·d rounded up to a multiple of 64; 8/3·d matches a 4·d GELU MLP's parameters).", rich_help_panel=_D)] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Context length of training windows (default: the preset's).", rich_help_panel=_D)] = None,
    qk_norm: Annotated[bool | None, typer.Option("--qk-norm/--no-qk-norm", help="Per-head RMSNorm of queries and keys.", rich_help_panel=_D)] = None,
    tie_embeddings: Annotated[bool | None, typer.Option("--tie-embeddings/--untie-embeddings", help="Share input embedding and output head.", rich_help_panel=_D)] = None,
    global_batch_tokens: Annotated[int, typer.Option("--global-batch-tokens", help="Tokens per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=OPT)] = 0,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Windows per forward/backward on each rank.", rich_help_panel=OPT)] = 16,
    lr: LrOpt = 3e-3,
    min_lr_ratio: MinLrOpt = 0.1,
    schedule: ScheduleOpt = "cosine",
    warmup_steps: WarmupOpt = 50,
    decay_fraction: Annotated[float, typer.Option("--decay-fraction", help="wsd: fraction of the run spent in the linear warmdown.", rich_help_panel=OPT)] = 0.3,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw, or muon (torch.optim.Muon for hidden matrices + AdamW for the rest).", rich_help_panel=OPT)] = "adamw",
    muon_lr: Annotated[float | None, typer.Option("--muon-lr", help="Muon's peak lr (default: --lr; Muon's update is RMS-matched to AdamW).", rich_help_panel=OPT)] = None,
    weight_decay: WeightDecayOpt = 0.1,
    beta1: Annotated[float, typer.Option("--beta1", rich_help_panel=OPT)] = 0.9,
    beta2: Annotated[float, typer.Option("--beta2", rich_help_panel=OPT)] = 0.95,
    grad_clip: GradClipOpt = 1.0,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    fsdp: FsdpOpt = False,
    device: DeviceOpt = "auto",
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop after this many optimizer steps (0 = no limit).", rich_help_panel=STOP)] = 0,
    max_tokens: MaxTokensOpt = 0,
    time_budget: TimeBudgetOpt = 0.0,
    log_every: LogEveryOpt = 10,
    eval_every: EvalEveryOpt = 0,
    eval_batches: Annotated[int, typer.Option("--eval-batches", help="Periodic evals score the val split's first N × --micro-batch windows, the same ones however many ranks share them (the final eval scores all).", rich_help_panel=STOP)] = 20,
    checkpoint_every: CheckpointEveryOpt = 0,
    keep_checkpoints: KeepCheckpointsOpt = 3,
    anneal_tokens: Annotated[Path | None, typer.Option("--anneal-tokens", help="Second token artifact (high-quality domain) for the final phase.", rich_help_panel=STOP)] = None,
    anneal_fraction: Annotated[float, typer.Option("--anneal-fraction", help="Fraction of the run, at its end, trained on --anneal-tokens.", rich_help_panel=STOP)] = 0.0,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Pretrain a Llama/Qwen-style transformer with next-token cross-entropy.

    Writes RUN with config.json, model.safetensors, tokenizer.model, metrics.jsonl, loss.png and
    checkpoints/; the manifest's stats hold final val loss (nats/token) and bits per byte.
    """
    from ..train.pretrain import PretrainConfig, run

    cfg = config_from(PretrainConfig, locals())
    m = run(cfg)
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]

    summary(
        f"pretrain → {out}",
        [
            ("parameters (non-embedding)", f"{s['total_params']:,} ({s['non_embedding_params']:,})"),
            ("steps", s["steps"]),
            ("tokens seen", s["tokens_seen"]),
            ("stop reason", s["stop_reason"]),
            ("final val loss (nats/token)", or_na(s["final_val_loss"], "{:.4f}")),
            ("final val bits per byte", or_na(s["final_val_bpb"], "{:.4f}")),
            ("tokens/s (median)", or_na(s["tokens_per_s"], "{:,.0f}")),
            ("MFU", or_na(s["mfu"] * 100 if s["mfu"] is not None else None, "{:.1f}%")),
            ("precision", s["precision"]),
            ("peak memory (MiB)", s["peak_memory_bytes"] / 2**20),
            ("train seconds", s["train_seconds"]),
        ],
    )

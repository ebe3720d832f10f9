"""`llmctl pretrain TOKENS --out RUN`: train a decoder-only transformer on a token artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import summary
from . import app
from .common import ConfigOpt, ForceOpt, SeedOpt

_D = "Model"
_O = "Optimization"
_S = "Stopping, eval and checkpoints"


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
    global_batch_tokens: Annotated[int, typer.Option("--global-batch-tokens", help="Tokens per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=_O)] = 0,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Windows per forward/backward on each rank.", rich_help_panel=_O)] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_O)] = 3e-3,
    min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio", help="Final learning rate as a fraction of the peak.", rich_help_panel=_O)] = 0.1,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, wsd (warmup-stable-decay, linear warmdown) or constant.", rich_help_panel=_O)] = "cosine",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.", rich_help_panel=_O)] = 50,
    decay_fraction: Annotated[float, typer.Option("--decay-fraction", help="wsd: fraction of the run spent in the linear warmdown.", rich_help_panel=_O)] = 0.3,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw, or muon (torch.optim.Muon for hidden matrices + AdamW for the rest).", rich_help_panel=_O)] = "adamw",
    muon_lr: Annotated[float | None, typer.Option("--muon-lr", help="Muon's peak lr (default: --lr; Muon's update is RMS-matched to AdamW).", rich_help_panel=_O)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Decoupled weight decay of matrices and embeddings.", rich_help_panel=_O)] = 0.1,
    beta1: Annotated[float, typer.Option("--beta1", rich_help_panel=_O)] = 0.9,
    beta2: Annotated[float, typer.Option("--beta2", rich_help_panel=_O)] = 0.95,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the global gradient norm (0 = off).", rich_help_panel=_O)] = 1.0,
    precision: Annotated[str, typer.Option("--precision", help="auto, bf16, fp16 or fp32 (fp32 master weights always).", rich_help_panel=_O)] = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model.", rich_help_panel=_O)] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=_O)] = "auto",
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop after this many optimizer steps (0 = no limit).", rich_help_panel=_S)] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Stop after this many training tokens (0 = no limit).", rich_help_panel=_S)] = 0,
    time_budget: Annotated[float, typer.Option("--time-budget", help="Stop training after SECONDS of wall clock, then score the full val split (0 = no limit).", rich_help_panel=_S)] = 0.0,
    log_every: Annotated[int, typer.Option("--log-every", help="Log a metrics line every N steps.", rich_help_panel=_S)] = 10,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Val loss/bpb every N steps (0 = only at the end).", rich_help_panel=_S)] = 0,
    eval_batches: Annotated[int, typer.Option("--eval-batches", help="Micro-batches of val scored by periodic evals (the final eval scores all).", rich_help_panel=_S)] = 20,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0 = only at the end).", rich_help_panel=_S)] = 0,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Keep the last K checkpoints.", rich_help_panel=_S)] = 3,
    anneal_tokens: Annotated[Path | None, typer.Option("--anneal-tokens", help="Second token artifact (high-quality domain) for the final phase.", rich_help_panel=_S)] = None,
    anneal_fraction: Annotated[float, typer.Option("--anneal-fraction", help="Fraction of the run, at its end, trained on --anneal-tokens.", rich_help_panel=_S)] = 0.0,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Pretrain a Llama/Qwen-style transformer with next-token cross-entropy.

    Writes RUN with config.json, model.safetensors, tokenizer.model, metrics.jsonl, loss.png and
    checkpoints/; the manifest's stats hold final val loss (nats/token) and bits per byte.
    """
    from ..train.pretrain import PretrainConfig, run

    cfg = PretrainConfig(
        tokens=tokens, out=out, preset=preset, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
        d_model=d_model, ffn_hidden=ffn_hidden, seq_len=seq_len, qk_norm=qk_norm, tie_embeddings=tie_embeddings,
        global_batch_tokens=global_batch_tokens, micro_batch=micro_batch, lr=lr, min_lr_ratio=min_lr_ratio,
        schedule=schedule, warmup_steps=warmup_steps, decay_fraction=decay_fraction, optimizer=optimizer,
        muon_lr=muon_lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_clip=grad_clip,
        precision=precision, compile=compile, device=device, max_steps=max_steps, max_tokens=max_tokens,
        time_budget=time_budget, log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, anneal_tokens=anneal_tokens,
        anneal_fraction=anneal_fraction, seed=seed, force=force,
    )
    m = run(cfg)
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]

    def _f(v, fmt):
        return fmt.format(v) if v is not None else "n/a"

    summary(
        f"pretrain → {out}",
        [
            ("parameters (non-embedding)", f"{s['total_params']:,} ({s['non_embedding_params']:,})"),
            ("steps", s["steps"]),
            ("tokens seen", s["tokens_seen"]),
            ("stop reason", s["stop_reason"]),
            ("final val loss (nats/token)", _f(s["final_val_loss"], "{:.4f}")),
            ("final val bits per byte", _f(s["final_val_bpb"], "{:.4f}")),
            ("tokens/s (median)", _f(s["tokens_per_s"], "{:,.0f}")),
            ("MFU", _f(s["mfu"] * 100 if s["mfu"] is not None else None, "{:.1f}%")),
            ("precision", s["precision"]),
            ("peak memory (MiB)", s["peak_memory_bytes"] / 2**20),
            ("train seconds", s["train_seconds"]),
        ],
    )

"""`llmctl dpo BASE DATA... --out RUN`: direct preference optimisation on chosen/rejected pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import summary
from . import app
from .common import ConfigOpt, ForceOpt, SeedOpt

_D = "Data"
_O = "Optimization"
_S = "Stopping, eval and checkpoints"


@app.command(
    "dpo",
    epilog=(
        "Example: llmctl dpo runs/micro-sft ../shared/data/preference/hh-rlhf-harmless-test.jsonl.gz "
        "--out runs/micro-dpo --epochs 1 --beta 0.1\n\n"
        "Rerun the same command after an interruption to resume from the last checkpoint."
    ),
)
def dpo_cmd(
    base: Annotated[Path, typer.Argument(help="Run to start from and to use, frozen, as the reference (usually llmctl sft output).")],
    data: Annotated[list[Path], typer.Argument(help="Preference pairs: .json or .jsonl (.gz too) of HH-RLHF chosen/rejected dialogues or prompt/chosen/rejected records.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    val: Annotated[list[Path] | None, typer.Option("--val", help="Held-out pairs file (repeatable); default: a hashed --val-fraction of DATA.", rich_help_panel=_D)] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Fraction of DATA's pairs held out for val (by a hash of their prompt).", rich_help_panel=_D)] = 0.05,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Row length in tokens (default: the base model's context); longer prompts lose their start.", rich_help_panel=_D)] = None,
    beta: Annotated[float, typer.Option("--beta", help="β: how far the policy may move from the reference (larger = closer).", rich_help_panel=_O)] = 0.1,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Pairs per forward/backward on each rank.", rich_help_panel=_O)] = 4,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Pairs per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=_O)] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_O)] = 1e-5,
    min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio", help="Final learning rate as a fraction of the peak.", rich_help_panel=_O)] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, wsd or constant.", rich_help_panel=_O)] = "cosine",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.", rich_help_panel=_O)] = 10,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Decoupled weight decay of matrices and embeddings.", rich_help_panel=_O)] = 0.0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the global gradient norm (0 = off).", rich_help_panel=_O)] = 1.0,
    precision: Annotated[str, typer.Option("--precision", help="auto, bf16, fp16 or fp32 (fp32 master weights always).", rich_help_panel=_O)] = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the policy.", rich_help_panel=_O)] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=_O)] = "auto",
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the training pairs; sets the step count unless --max-steps is given (0 = no epoch limit).", rich_help_panel=_S)] = 1.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop after this many optimizer steps (0 = from --epochs).", rich_help_panel=_S)] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Stop after this many training tokens (0 = no limit).", rich_help_panel=_S)] = 0,
    time_budget: Annotated[float, typer.Option("--time-budget", help="Stop training after SECONDS of wall clock (0 = no limit).", rich_help_panel=_S)] = 0.0,
    log_every: Annotated[int, typer.Option("--log-every", help="Log a metrics line every N steps.", rich_help_panel=_S)] = 10,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Val loss/accuracy every N steps (0 = only at the end).", rich_help_panel=_S)] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0 = only at the end).", rich_help_panel=_S)] = 0,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Keep the last K checkpoints.", rich_help_panel=_S)] = 3,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Tune a run to prefer the chosen reply of each pair over the rejected one (DPO), against a
    frozen copy of itself; no reward model and no sampling.

    Writes RUN like sft (config.json, model.safetensors, tokenizer.model, metrics.jsonl with
    rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins, loss.png, checkpoints/).
    """
    from ..train.dpo import DPOConfig, run

    cfg = DPOConfig(
        base=base, data=list(data), out=out, val=list(val or []), val_fraction=val_fraction, seq_len=seq_len,
        beta=beta, micro_batch=micro_batch, global_batch=global_batch, epochs=epochs, lr=lr,
        min_lr_ratio=min_lr_ratio, schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
        grad_clip=grad_clip, precision=precision, compile=compile, device=device, max_steps=max_steps,
        max_tokens=max_tokens, time_budget=time_budget, log_every=log_every, eval_every=eval_every,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed, force=force,
    )
    m = run(cfg)
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]

    def _f(v, fmt):
        return fmt.format(v) if v is not None else "n/a"

    summary(
        f"dpo → {out}",
        [
            ("pairs (train / val)", f"{s['train_pairs']:,} / {s['val_pairs']:,}"),
            ("records skipped", ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()) or "none"),
            ("prompts cut to --seq-len", s["truncated"]),
            ("steps (epochs)", f"{s['steps']:,} ({s['epochs']:.2f})"),
            ("stop reason", s["stop_reason"]),
            ("final val loss", _f(s["final_val_loss"], "{:.4f}")),
            ("final val accuracy (chosen preferred)", _f(s["final_val_accuracy"], "{:.3f}")),
            ("final val margin", _f(s["final_val_margin"], "{:.4f}")),
            ("tokens/s (median)", _f(s["tokens_per_s"], "{:,.0f}")),
            ("train seconds", s["train_seconds"]),
        ],
    )

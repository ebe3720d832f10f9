"""`llmctl dpo BASE DATA... --out RUN`: direct preference optimisation on chosen/rejected pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import or_na, summary
from . import app
from .train_options import (
    DATA,
    OPT,
    config_from,
    finetune_options,
)


@app.command(
    "dpo",
    epilog=(
        "Example: llmctl dpo runs/micro-sft ../shared/data/preference/hh-rlhf-harmless-test.jsonl.gz "
        "--out runs/micro-dpo --epochs 1 --beta 0.1\n\n"
        "Rerun the same command after an interruption to resume from the last checkpoint."
    ),
)
@finetune_options("pairs", lr=1e-5)
def dpo_cmd(
    base: Annotated[Path, typer.Argument(help="Run to start from and to use, frozen, as the reference (usually llmctl sft output).")],
    data: Annotated[list[Path], typer.Argument(help="Preference pairs: .json or .jsonl (.gz too) of HH-RLHF chosen/rejected dialogues or prompt/chosen/rejected records.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Row length in tokens (default: the base model's context); longer prompts lose their start.", rich_help_panel=DATA)] = None,
    beta: Annotated[float, typer.Option("--beta", help="β: how far the policy may move from the reference (larger = closer).", rich_help_panel=OPT)] = 0.1,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Pairs per forward/backward on each rank.", rich_help_panel=OPT)] = 4,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Pairs per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=OPT)] = 0,
    **common: Any,
) -> None:
    """Tune a run to prefer the chosen reply of each pair over the rejected one (DPO), against a
    frozen copy of itself; no reward model and no sampling.

    Writes RUN like sft (config.json, model.safetensors, tokenizer.model, metrics.jsonl with
    rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins, loss.png, checkpoints/).
    """
    from ..train.dpo import DPOConfig, run

    m = run(config_from(DPOConfig, {**locals(), **common}))
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]
    summary(
        f"dpo → {out}",
        [
            ("pairs (train / val)", f"{s['train_pairs']:,} / {s['val_pairs']:,}"),
            ("records skipped", ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()) or "none"),
            ("prompts cut to --seq-len", s["truncated"]),
            ("steps (epochs)", f"{s['steps']:,} ({s['epochs']:.2f})"),
            ("stop reason", s["stop_reason"]),
            ("final val loss", or_na(s["final_val_loss"], "{:.4f}")),
            ("final val accuracy (chosen preferred)", or_na(s["final_val_accuracy"], "{:.3f}")),
            ("final val margin", or_na(s["final_val_margin"], "{:.4f}")),
            ("tokens/s (median)", or_na(s["tokens_per_s"], "{:,.0f}")),
            ("train seconds", s["train_seconds"]),
        ],
    )

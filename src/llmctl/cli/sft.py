"""`llmctl sft BASE DATA... --out RUN`: supervised fine-tuning of a pretrained run on chat data."""

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
    "sft",
    epilog=(
        "Example: llmctl sft runs/micro ../shared/data/sft/code-alpaca-2k.json --out runs/micro-sft --epochs 2\n\n"
        "Then: llmctl generate runs/micro-sft --chat --prompt 'Write a haiku about rain.'\n\n"
        "Rerun the same command after an interruption to resume from the last checkpoint."
    ),
)
@finetune_options("rows", lr=1e-4, epochs=3.0)
def sft_cmd(
    base: Annotated[Path, typer.Argument(help="Run to start from (llmctl pretrain or sft output).")],
    data: Annotated[list[Path], typer.Argument(help="Instruction data: .json (an array) or .jsonl files, .gz too: messages, Alpaca instruction/input/output, seed-task instances or prompt/completion records.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Row length in tokens (default: the base model's context); longer examples are cut.", rich_help_panel=DATA)] = None,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Pack examples into full rows (position ids restart, no cross-example attention).", rich_help_panel=DATA)] = True,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Rows per forward/backward on each rank.", rich_help_panel=OPT)] = 8,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Rows per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=OPT)] = 0,
    **common: Any,
) -> None:
    """Fine-tune a pretrained run on instruction/chat data, with the loss on the assistant replies only.

    Writes RUN like pretrain (config.json, model.safetensors, tokenizer.model, metrics.jsonl,
    loss.png, checkpoints/); the manifest's stats hold the final val loss on reply tokens.
    """
    from ..train.sft import SFTConfig, run

    m = run(config_from(SFTConfig, {**locals(), **common}))
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]
    fill = s["packing_fill"] * 100 if s["packing_fill"] is not None else None
    summary(
        f"sft → {out}",
        [
            ("examples (train / val)", f"{s['train_examples']:,} / {s['val_examples']:,}"),
            ("records skipped", ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()) or "none"),
            ("truncated to --seq-len", s["truncated"]),
            ("rows (packing fill)", f"{s['rows']:,} ({or_na(fill, '{:.0f}%')})"),
            ("steps (epochs)", f"{s['steps']:,} ({s['epochs']:.2f})"),
            ("stop reason", s["stop_reason"]),
            ("final val loss (nats/reply token)", or_na(s["final_val_loss"], "{:.4f}")),
            ("tokens/s (median)", or_na(s["tokens_per_s"], "{:,.0f}")),
            ("train seconds", s["train_seconds"]),
        ],
    )

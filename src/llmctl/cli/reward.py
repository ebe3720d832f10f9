"""`llmctl reward BASE DATA... --out RUN`: a Bradley–Terry reward model from chosen/rejected pairs."""

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
    "reward",
    epilog=(
        "Example: llmctl reward runs/micro-sft ../shared/data/preference/hh-rlhf-harmless-test.jsonl.gz "
        "--out runs/micro-rm --epochs 1\n\n"
        "Rerun the same command after an interruption to resume from the last checkpoint."
    ),
)
@finetune_options("pairs", lr=1e-5)
def reward_cmd(
    base: Annotated[Path, typer.Argument(help="Run whose transformer becomes the reward model's body (usually llmctl sft output).")],
    data: Annotated[list[Path], typer.Argument(help="Preference pairs: .json or .jsonl (.gz too) of HH-RLHF chosen/rejected dialogues or prompt/chosen/rejected records.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Row length in tokens (default: the base model's context); longer prompts lose their start.", rich_help_panel=DATA)] = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Pairs per forward/backward on each rank.", rich_help_panel=OPT)] = 8,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Pairs per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=OPT)] = 0,
    **common: Any,
) -> None:
    """Train a reward model: the base transformer plus a score head read at each conversation's
    last token, fitted so chosen replies score above rejected ones (Bradley–Terry loss
    −log σ(r_chosen − r_rejected)).

    Writes RUN (config.json, model.safetensors, score.safetensors, tokenizer.model, metrics.jsonl
    with accuracy, margin, rewards/chosen and rewards/rejected, loss.png, checkpoints/); llmctl ppo
    --reward RUN scores its rollouts with it.
    """
    from ..train.reward import RewardConfig, run

    m = run(config_from(RewardConfig, {**locals(), **common}))
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]
    summary(
        f"reward → {out}",
        [
            ("pairs (train / val)", f"{s['train_pairs']:,} / {s['val_pairs']:,}"),
            ("records skipped", ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()) or "none"),
            ("prompts cut to --seq-len", s["truncated"]),
            ("steps (epochs)", f"{s['steps']:,} ({s['epochs']:.2f})"),
            ("stop reason", s["stop_reason"]),
            ("final val loss", or_na(s["final_val_loss"], "{:.4f}")),
            ("final val accuracy (chosen scored higher)", or_na(s["final_val_accuracy"], "{:.3f}")),
            ("final val margin", or_na(s["final_val_margin"], "{:.4f}")),
            ("val scores (mean ± std)", f"{or_na(s['final_val_score_mean'], '{:.3f}')} ± {or_na(s['final_val_score_std'], '{:.3f}')}"),
            ("tokens/s (median)", or_na(s["tokens_per_s"], "{:,.0f}")),
            ("train seconds", s["train_seconds"]),
        ],
    )

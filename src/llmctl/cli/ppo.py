"""`llmctl ppo BASE PROMPTS... --reward RM --out RUN`: RLHF with PPO against a reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import or_na, summary
from . import app
from .train_options import (
    DATA,
    OPT,
    RL,
    config_from,
    finetune_options,
)


@app.command(
    "ppo",
    epilog=(
        "Example: llmctl ppo runs/micro-sft prompts.txt --reward runs/micro-rm --out runs/micro-ppo "
        "--epochs 1 --rollout-batch 16 --kl-coef 0.05\n\n"
        "Rerun the same command after an interruption to resume from the last checkpoint."
    ),
)
@finetune_options("prompts", lr=1e-5)
def ppo_cmd(
    base: Annotated[Path, typer.Argument(help="Chat run to start from and to keep close to, frozen, as the KL reference (usually llmctl sft output).")],
    data: Annotated[list[Path], typer.Argument(help="Prompts: .txt (one per line), or .json/.jsonl (.gz too) records with a prompt (text or messages), HH-RLHF dialogues, or any sft layout (cut before its last reply).")],
    reward: Annotated[Path, typer.Option("--reward", help="llmctl reward run that scores the replies (same tokenizer as BASE).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Prompt + reply length in tokens (default: the base model's context); longer prompts lose their start.", rich_help_panel=DATA)] = None,
    rollout_batch: Annotated[int, typer.Option("--rollout-batch", help="Prompts answered per rollout on each rank.", rich_help_panel=RL)] = 16,
    ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", help="Passes of PPO updates over each rollout.", rich_help_panel=RL)] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply sampled.", rich_help_panel=RL)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature of the rollouts (log-probs are taken at it too).", rich_help_panel=RL)] = 0.7,
    kl_coef: Annotated[float, typer.Option("--kl-coef", help="Weight of the per-token KL penalty against the reference.", rich_help_panel=RL)] = 0.05,
    kl_estimator: Annotated[str, typer.Option("--kl-estimator", help="k1 (log π − log π_ref) or k3 ((r − 1) − log r, never negative).", rich_help_panel=RL)] = "k1",
    clip: Annotated[float, typer.Option("--clip", help="PPO's clip range of the probability ratio.", rich_help_panel=RL)] = 0.2,
    clip_value: Annotated[float, typer.Option("--clip-value", help="Clip range of the value estimates.", rich_help_panel=RL)] = 0.2,
    vf_coef: Annotated[float, typer.Option("--vf-coef", help="Weight of the value loss.", rich_help_panel=RL)] = 0.1,
    gamma: Annotated[float, typer.Option("--gamma", help="Discount of GAE.", rich_help_panel=RL)] = 1.0,
    lam: Annotated[float, typer.Option("--lam", help="λ of GAE.", rich_help_panel=RL)] = 0.95,
    missing_end_penalty: Annotated[float, typer.Option("--missing-end-penalty", help="Subtracted from the score of a reply cut at --max-new-tokens.", rich_help_panel=RL)] = 0.0,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Replies per forward/backward on each rank.", rich_help_panel=OPT)] = 8,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Replies per optimizer step over all ranks (gradient accumulation fills it); 0 = one micro-batch per rank.", rich_help_panel=OPT)] = 0,
    **common: Any,
) -> None:
    """Reinforcement learning from a reward model (PPO): sample replies to the prompts, score them
    with --reward, subtract a KL penalty against the starting model, and update the policy and a
    value head with PPO's clipped objectives.

    Writes RUN like sft (config.json, model.safetensors, tokenizer.model, metrics.jsonl with
    objective/kl, objective/scores, objective/rlhf_reward, policy/clipfrac, policy/approxkl,
    loss/value, loss.png, checkpoints/) and the val score before and after.
    """
    from ..train.ppo import PPOConfig, run

    m = run(config_from(PPOConfig, {**locals(), **common}))
    if not m:  # a non-zero data-parallel rank
        return
    s = m["stats"]
    start, final = s["start_val"] or {}, s["final_val"] or {}

    def moved(key: str, fmt: str) -> str:
        return f"{or_na(start.get(key), fmt)} → {or_na(final.get(key), fmt)}"

    summary(
        f"ppo → {out}",
        [
            ("prompts (train / val)", f"{s['train_prompts']:,} / {s['val_prompts']:,}"),
            ("records skipped", ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()) or "none"),
            ("prompts cut to fit", s["truncated"]),
            ("steps (rollouts, epochs)", f"{s['steps']:,} ({s['rollouts']:,}, {s['epochs']:.2f})"),
            ("stop reason", s["stop_reason"]),
            ("val score (start → end)", moved("val_score", "{:.4f}")),
            ("val KL to the reference", moved("val_kl", "{:.4f}")),
            ("val reply length", moved("val_length", "{:.1f}")),
            ("val replies ended", moved("val_ended", "{:.2f}")),
            ("tokens/s (median step, rollouts included)", or_na(s["tokens_per_s"], "{:,.0f}")),
            ("making rollouts (share of train time)", f"{s['rollout_seconds']:.1f} s ({or_na(s['rollout_share'], '{:.0%}')})"),
            ("sampling speed (reply tokens/s)", or_na(s["sample_tokens_per_s"], "{:,.0f}")),
            ("train seconds", s["train_seconds"]),
        ],
    )

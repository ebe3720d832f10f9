"""Options the training commands (pretrain, sft, dpo) share, and building a stage config from them.

Each alias carries the option's name, help and panel; a command gives its own default
(``lr: LrOpt = 1e-4``), so stages with other defaults still share one definition.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

OPT = "Optimization"
STOP = "Stopping, eval and checkpoints"
DATA = "Data"
RL = "Rollouts and PPO"

LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=OPT)]
MinLrOpt = Annotated[float, typer.Option("--min-lr-ratio", help="Final learning rate as a fraction of the peak.", rich_help_panel=OPT)]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cosine, wsd (warmup-stable-decay, linear warmdown) or constant.", rich_help_panel=OPT)]
WarmupOpt = Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.", rich_help_panel=OPT)]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="Decoupled weight decay of matrices and embeddings.", rich_help_panel=OPT)]
GradClipOpt = Annotated[float, typer.Option("--grad-clip", help="Clip the global gradient norm (0 = off).", rich_help_panel=OPT)]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, bf16, fp16 or fp32 (fp32 master weights always).", rich_help_panel=OPT)]
CompileOpt = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model.", rich_help_panel=OPT)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=OPT)]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Stop after this many training tokens (0 = no limit).", rich_help_panel=STOP)]
TimeBudgetOpt = Annotated[float, typer.Option("--time-budget", help="Stop training after SECONDS of wall clock, then score the full val split (0 = no limit).", rich_help_panel=STOP)]
LogEveryOpt = Annotated[int, typer.Option("--log-every", help="Log a metrics line every N steps.", rich_help_panel=STOP)]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", help="Val metrics every N steps (0 = only at the end).", rich_help_panel=STOP)]
CheckpointEveryOpt = Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0 = only at the end).", rich_help_panel=STOP)]
KeepCheckpointsOpt = Annotated[int, typer.Option("--keep-checkpoints", help="Keep the last K checkpoints.", rich_help_panel=STOP)]

# post-training stages (sft, dpo)
ValOpt = Annotated[list[Path] | None, typer.Option("--val", help="Held-out data file (repeatable); default: a hashed --val-fraction of DATA.", rich_help_panel=DATA)]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction", help="Fraction of DATA held out for val (by a hash of the text, independent of --seed).", rich_help_panel=DATA)]
FinetuneMaxStepsOpt = Annotated[int, typer.Option("--max-steps", help="Stop after this many optimizer steps (0 = from --epochs).", rich_help_panel=STOP)]

C = TypeVar("C")


def config_from(cls: type[C], values: dict[str, Any]) -> C:
    """``cls`` (a stage's config dataclass) from a command's parameters: every field the command
    has (``None`` lists become empty ones); parameters that are not fields (``config``) are ignored."""
    kw = {f.name: values[f.name] for f in fields(cls) if f.name in values}  # type: ignore[arg-type]
    for k in ("data", "val"):
        if k in kw:
            kw[k] = list(kw[k] or [])
    return cls(**kw)

"""Options the training commands (pretrain, sft, dpo) share, and building a stage config from them.

Each alias carries the option's name, help and panel; a command gives its own default
(``lr: LrOpt = 1e-4``), so stages with other defaults still share one definition.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .common import ConfigOpt, ForceOpt, SeedOpt

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
FsdpOpt = Annotated[bool, typer.Option("--fsdp/--no-fsdp", help="Under torchrun, shard the weights, gradients and optimizer state over the ranks (FSDP2, one unit per transformer block) instead of a whole copy on each (DDP): for models whose training state does not fit one device. AdamW only; no effect in one process.", rich_help_panel=OPT)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=OPT)]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Stop after this many training tokens (0 = no limit).", rich_help_panel=STOP)]
TimeBudgetOpt = Annotated[float, typer.Option("--time-budget", help="Stop training after SECONDS of wall clock, then score the full val split (0 = no limit).", rich_help_panel=STOP)]
LogEveryOpt = Annotated[int, typer.Option("--log-every", help="Log a metrics line every N steps (loss, grad norm and the objective's metrics as means over those steps).", rich_help_panel=STOP)]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", help="Val metrics every N steps (0 = only at the end).", rich_help_panel=STOP)]
CheckpointEveryOpt = Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0 = only at the end).", rich_help_panel=STOP)]
KeepCheckpointsOpt = Annotated[int, typer.Option("--keep-checkpoints", help="Keep the last K checkpoints.", rich_help_panel=STOP)]

# post-training stages (sft, dpo)
ValOpt = Annotated[list[Path] | None, typer.Option("--val", help="Held-out data file (repeatable); default: a hashed --val-fraction of DATA.", rich_help_panel=DATA)]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction", help="Fraction of DATA held out for val (by a hash of the text, independent of --seed).", rich_help_panel=DATA)]
FinetuneMaxStepsOpt = Annotated[int, typer.Option("--max-steps", help="Stop after this many optimizer steps (0 = from --epochs).", rich_help_panel=STOP)]

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])


def finetune_options(epoch_unit: str, *, lr: float, epochs: float = 1.0) -> Callable[[F], F]:
    """Give a post-training command (sft, reward, dpo, ppo) the options they all share, after its
    own parameters: the val split, the optimizer and schedule, precision and device, the stopping
    rules, logging and checkpoints, --seed, --force and --config. The command takes them as
    ``**common``; ``lr`` and ``epochs`` are the stage's defaults, ``epoch_unit`` names what an
    epoch passes over in --epochs' help."""
    EpochsOpt = Annotated[float, typer.Option("--epochs", help=f"Passes over the training {epoch_unit}; sets the step count unless --max-steps is given (0 = no epoch limit).", rich_help_panel=STOP)]
    shared = [
        ("val", ValOpt, None), ("val_fraction", ValFractionOpt, 0.05),
        ("lr", LrOpt, lr), ("min_lr_ratio", MinLrOpt, 0.0), ("schedule", ScheduleOpt, "cosine"),
        ("warmup_steps", WarmupOpt, 10), ("weight_decay", WeightDecayOpt, 0.0), ("grad_clip", GradClipOpt, 1.0),
        ("precision", PrecisionOpt, "auto"), ("compile", CompileOpt, False), ("fsdp", FsdpOpt, False), ("device", DeviceOpt, "auto"),
        ("epochs", EpochsOpt, epochs), ("max_steps", FinetuneMaxStepsOpt, 0), ("max_tokens", MaxTokensOpt, 0),
        ("time_budget", TimeBudgetOpt, 0.0), ("log_every", LogEveryOpt, 10), ("eval_every", EvalEveryOpt, 0),
        ("checkpoint_every", CheckpointEveryOpt, 0), ("keep_checkpoints", KeepCheckpointsOpt, 3),
        ("seed", SeedOpt, 0), ("force", ForceOpt, False), ("config", ConfigOpt, None),
    ]

    def decorate(fn: F) -> F:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        params = own + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a) for n, a, d in shared]

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            return fn(**kw)

        # typer reads the parameters from the signature (and type hints): the command's own, then the shared ones
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate


def config_from(cls: type[C], values: dict[str, Any]) -> C:
    """``cls`` (a stage's config dataclass) from a command's parameters: every field the command
    has (``None`` lists become empty ones); parameters that are not fields (``config``) are ignored."""
    kw = {f.name: values[f.name] for f in fields(cls) if f.name in values}  # type: ignore[arg-type]
    for k in ("data", "val"):
        if k in kw:
            kw[k] = list(kw[k] or [])
    return cls(**kw)

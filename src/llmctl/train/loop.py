"""The one training loop: every objective (pretrain, sft, reward, dpo, ppo) plugs into ``Trainer``.

An objective is an object with these methods (``Objective`` below is the base class to subclass):

``setup(ctx)``
    Called once before training with a ``TrainContext`` (device, precision, DDP rank/world size,
    the number of micro-batches per optimizer step on this rank, the loop config, and the plain
    model already on the device). Build data sources here; dpo and ppo copy ``ctx.model`` into a
    frozen reference, and ppo samples its rollouts from it (under ``torch.no_grad``).
``extra_modules() -> dict[str, nn.Module]``
    Modules trained alongside the model (a value head, a reward head); optimized, checkpointed,
    and moved to the device with it. Default: none.
``next_batch() -> dict[str, Tensor]``
    One micro-batch for this rank (CPU tensors; the trainer moves every tensor to the device).
    The trainer calls it ``accum_steps`` times per optimizer step.
``tokens_in(batch) -> int``
    Tokens this micro-batch processes (for tokens/s, MFU and ``max_tokens``).
``loss(model, batch, modules) -> (loss, metrics)``
    The scalar loss to minimise (a mean over the micro-batch) and a dict of float/tensor metrics to
    log. ``model`` is the (compiled, DDP-wrapped) transformer to call, for logits or, with
    ``return_hidden=True``, the final hidden states a reward or value head reads; ``modules`` the
    extra modules. Runs under autocast; compute the loss itself in fp32.
``evaluate(model, modules, full) -> dict[str, float]``
    Optional evaluation under ``torch.no_grad`` in eval mode, on every rank (sum across ranks with
    ``ctx.dist.all_reduce_sum``). Iterate this rank's val batches through ``ctx.lockstep(...)``:
    under --fsdp every forward is a collective, so ranks with fewer batches must keep step with
    the others (lockstep runs their idle forwards). ``full=False`` for the periodic pass (may subsample), ``True`` for
    the final pass. Default: nothing.
``on_progress(step, progress)``
    Called before every optimizer step with the run's progress in [0, 1] (e.g. to switch to an
    anneal data source). Default: nothing.
``state_dict()`` / ``load_state_dict(state)``
    The data position, saved in every checkpoint (JSON), so a resumed run sees the same batches.

The trainer owns the rest: fp32 master weights with bf16/fp16 autocast (GradScaler for fp16),
torch.compile, DDP (gradient all-reduce only on the last micro-batch) or FSDP (``--fsdp``: weights,
gradients and optimizer state sharded over the ranks, one unit per block), gradient accumulation,
clipping, AdamW or Muon+AdamW, the warmup+cosine/WSD schedule, stop at ``max_steps``/``max_tokens``/
``time_budget``, NaN/inf detection, periodic eval, atomic checkpoints with exact resume,
``metrics.jsonl`` and ``loss.png``. ``Trainer.fit()`` returns the run's statistics.

Exact resume: a checkpoint at step ``k`` holds weights, optimizer and scaler states, every RNG and
the objective's data position; restoring it and continuing gives, on CPU with the same seed and
thread count, the same losses bit for bit as a run that was never interrupted. ``metrics.jsonl``
is cut back to step ``k`` on resume. (Runs stopped by ``time_budget`` are not bit-reproducible:
their learning-rate schedule follows the wall clock.)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..console import console
from ..errors import StageError, UsageError
from . import checkpoint as ckpt
from .distributed import DistContext
from .optim import OPTIMIZERS, build_optimizers, set_lr
from .precision import (
    autocast,
    make_scaler,
    newton_schulz_dtype,
    peak_flops,
    peak_memory,
    resolve_precision,
)
from .schedule import SCHEDULES, lr_factor

T = TypeVar("T")

METRICS = "metrics.jsonl"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"


@dataclass
class LoopConfig:
    """Options of the training loop shared by every objective."""

    max_steps: int = 0  # optimizer steps; 0 = no limit (another limit must be set)
    max_tokens: int = 0  # tokens processed (all ranks); 0 = no limit
    time_budget: float = 0.0  # seconds of wall clock for training; 0 = no limit
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.3  # wsd: the final warmdown fraction of the run
    optimizer: str = "adamw"
    muon_lr: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    fsdp: bool = False  # under torchrun: shard weights, grads and optimizer state (FSDP2) instead of DDP
    eval_every: int = 0  # optimizer steps; 0 = only the final eval
    checkpoint_every: int = 0  # optimizer steps; 0 = only the final checkpoint
    keep_checkpoints: int = 3

    def check(self) -> None:
        """Refuse out-of-range loop options in one line each, before anything is written (torch's
        optimizers would raise a bare ValueError mid-setup, and others would train nonsense)."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(what)

        need(self.lr > 0, f"--lr {self.lr}: the learning rate must be > 0")
        need(self.muon_lr is None or self.muon_lr > 0, f"--muon-lr {self.muon_lr}: must be > 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio {self.min_lr_ratio}: give a fraction of the peak in [0, 1]")
        need(0.0 <= self.decay_fraction <= 1.0, f"--decay-fraction {self.decay_fraction}: give a fraction of the run in [0, 1]")
        need(self.warmup_steps >= 0, f"--warmup-steps {self.warmup_steps}: must be ≥ 0")
        need(self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be ≥ 0")
        for name, b in (("--beta1", self.beta1), ("--beta2", self.beta2)):
            need(0.0 <= b < 1.0, f"{name} {b}: Adam's betas are in [0, 1)")
        need(self.grad_clip >= 0, f"--grad-clip {self.grad_clip}: give a norm > 0, or 0 for no clipping")
        for name, v in (("--max-steps", self.max_steps), ("--max-tokens", self.max_tokens), ("--time-budget", self.time_budget),
                        ("--eval-every", self.eval_every), ("--checkpoint-every", self.checkpoint_every)):
            need(v >= 0, f"{name} {v}: must be ≥ 0 (0 = off)")
        need(self.log_every >= 1, f"--log-every {self.log_every}: must be ≥ 1")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints {self.keep_checkpoints}: keep at least 1 (resume reads the last)")
        need(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        need(not (self.fsdp and self.optimizer == "muon"),
             "--fsdp with --optimizer muon: Muon orthogonalises whole matrices, which FSDP splits over the ranks; "
             "use --optimizer adamw with --fsdp, or Muon without --fsdp (DDP)")

    def loop_config(self) -> LoopConfig:
        """Just the loop's options (a stage's config subclasses this one and adds its own)."""
        return LoopConfig(**{f.name: getattr(self, f.name) for f in fields(LoopConfig)})


@dataclass
class TrainContext:
    device: torch.device
    precision: str
    dist: DistContext
    accum_steps: int
    config: LoopConfig
    #: the plain model on the device (not compiled, not DDP-wrapped): for frozen reference copies
    #: and sampling; the differentiable forward goes through the ``model`` given to ``loss``.
    #: Under --fsdp it is sharded in place after ``setup`` (copies made in ``setup`` stay whole).
    model: nn.Module
    sharded: bool = False  # --fsdp under torchrun: every forward of ``model`` is a collective

    def lockstep(self, batches: Iterable[T]) -> Iterator[T]:
        """This rank's ``batches``; under --fsdp, once they run out while another rank still has
        some, an idle forward of one token per remaining batch of the others, so every rank joins
        the same number of all-gathers (a bare loop would hang). Cap the batches before, not by
        breaking out of the loop (``itertools.islice``)."""
        if not self.sharded:
            yield from batches
            return
        it = iter(batches)
        idle = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        while True:
            b = next(it, None)
            more = torch.tensor([0.0 if b is None else 1.0], device=self.device)
            self.dist.all_reduce_max(more)
            if not more.item():
                return
            if b is None:
                with torch.no_grad():
                    self.model(idle)
            else:
                yield b


class Objective(ABC):
    """Base class of a training objective; see the module docstring for the contract."""

    name = "objective"

    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    def extra_modules(self) -> dict[str, nn.Module]:
        return {}

    @abstractmethod
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of this rank (tensors on CPU; the loop moves them to the device)."""

    @abstractmethod
    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the batch trains on (for tokens/s, MFU and --max-tokens)."""

    @abstractmethod
    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], modules: dict[str, nn.Module]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The scalar loss to minimise and the metrics to log for this micro-batch."""

    def evaluate(self, model: nn.Module, modules: dict[str, nn.Module], full: bool) -> dict[str, float]:
        return {}

    def on_progress(self, step: int, progress: float) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def estimate_train_memory(
    model_cfg: Any, micro_batch: int, seq_len: int, optimizer: str = "adamw", precision: str = "fp32", shards: int = 1
) -> dict[str, int]:
    """Bytes needed to train: fp32 weights + grads + optimizer states + activations of one micro-batch.

    With ``shards`` > 1 (--fsdp over that many ranks) each rank holds 1/shards of the weights,
    grads and optimizer states, plus the gathered weights and grads of two blocks at a time (the
    one computing and the one prefetched) and the always-gathered embeddings.

    Activations per token per layer are counted as saved tensors of the attention and SwiGLU
    blocks (≈ 16·d + 4·ffn values, plus ``n_head·T`` attention weights when SDPA falls back to the
    math kernel), and the logits three times (logits, fp32 copy, gradient).
    """
    p = model_cfg.total_params()
    matrices = model_cfg.n_layer * (model_cfg.params_per_layer() - 2 * model_cfg.d_model)
    states = 8 * p if optimizer == "adamw" else 8 * (p - matrices) + 4 * matrices
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    tokens = micro_batch * seq_len
    per_layer = 16 * model_cfg.d_model + 4 * model_cfg.ffn_hidden + model_cfg.n_head * seq_len
    activations = tokens * model_cfg.n_layer * per_layer * act_bytes + 3 * tokens * model_cfg.vocab_size * 4
    weights = grads = 4 * p
    if shards > 1:
        gathered = 2 * 4 * model_cfg.params_per_layer() + 4 * model_cfg.vocab_size * model_cfg.d_model
        weights, grads, states = 4 * p // shards + gathered, 4 * p // shards + gathered, states // shards
    total = weights + grads + states + activations
    return {"weights": weights, "grads": grads, "optimizer": states, "activations": activations, "total": total}


def check_memory(est: dict[str, int], available: int, what: str = "this model") -> None:
    """Refuse (UsageError) before allocating when the estimate exceeds 90% of the memory available."""
    if est["total"] > 0.9 * available:
        gib = 1 << 30
        raise UsageError(
            f"{what} needs ≈{est['total'] / gib:.1f} GiB to train (weights {est['weights'] / gib:.1f}, "
            f"grads {est['grads'] / gib:.1f}, optimizer {est['optimizer'] / gib:.1f}, activations "
            f"{est['activations'] / gib:.1f}) but only {available / gib:.1f} GiB is available; "
            "choose a smaller preset/dims or a smaller --micro-batch"
        )


class _Container(nn.Module):
    """The model plus the objective's extra modules, for one optimizer and one checkpoint file."""

    def __init__(self, model: nn.Module, extra: dict[str, nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.extra = nn.ModuleDict(extra)


class Trainer:
    """Runs an ``Objective`` on a model in ``work`` (which holds checkpoints/ and metrics.jsonl)."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: LoopConfig,
        work: Path,
        *,
        accum_steps: int,
        flops_per_token: float,
        dist_ctx: DistContext | None = None,
        title: str = "train",
    ) -> None:
        self.cfg = config
        self.work = Path(work)
        self.objective = objective
        self.dist = dist_ctx or DistContext()
        self.accum_steps = accum_steps
        self.flops_per_token = flops_per_token
        self.title = title
        config.check()
        if not (config.max_steps or config.max_tokens or config.time_budget):
            raise UsageError("no stopping rule: give --max-steps, --max-tokens or --time-budget")
        if accum_steps < 1:
            raise UsageError("gradient accumulation steps must be ≥ 1")
        from ..device import resolve_device

        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(config.precision, self.device)
        self.model = model.to(self.device)
        self.sharded = config.fsdp and self.dist.enabled
        if config.fsdp and not self.dist.enabled and self.dist.is_main:
            console.print("--fsdp: one process, nothing to shard (it takes effect under torchrun)")
        self.ctx = TrainContext(self.device, self.precision, self.dist, accum_steps, config, self.model, self.sharded)
        objective.setup(self.ctx)
        self.extra = {k: m.to(self.device) for k, m in objective.extra_modules().items()}
        if self.sharded:
            _fully_shard(self.model)  # in place: parameters become DTensor shards; before the optimizers
        self.container = _Container(self.model, self.extra)
        ns_dtype = newton_schulz_dtype(self.device) if config.optimizer == "muon" else torch.bfloat16
        if ns_dtype == torch.float32 and self.dist.is_main:
            console.print("muon: Newton-Schulz in fp32 (this CPU runs bf16 matmuls slower than fp32)")
        self.optimizers = build_optimizers(
            self.container.named_parameters(),
            optimizer=config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.beta1, config.beta2),
            muon_lr=config.muon_lr,
            muon_ns_dtype=ns_dtype,
        )
        self.scaler = make_scaler(self.device, self.precision)
        self.fwd_model: nn.Module = self.model
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
            self.fwd_model = self.ddp
        else:
            self.ddp = None
        if config.compile:
            self.fwd_model = torch.compile(self.fwd_model)
        # MFU's denominator: the peak of one device (or this process's CPU threads) × the ranks
        self.peak = peak_flops(self.device, self.precision) * self.dist.world_size
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.warmup_end: float | None = None  # the progress at which warmup ended, once it has
        # sums and counts of the per-step figures since the last metrics record (it logs their means)
        self.log_sums: dict[str, float] = {}
        self.log_counts: dict[str, int] = {}
        self.ckpt_root = self.work / CHECKPOINTS

    # -- progress -------------------------------------------------------------------------------
    def progress(self, step: int | None = None, tokens: int | None = None, elapsed: float | None = None) -> float:
        c = self.cfg
        step = self.step if step is None else step
        tokens = self.tokens if tokens is None else tokens
        elapsed = self.elapsed if elapsed is None else elapsed
        fr = []
        if c.max_steps:
            fr.append(step / c.max_steps)
        if c.max_tokens:
            fr.append(tokens / c.max_tokens)
        if c.time_budget:
            fr.append(elapsed / c.time_budget)
        return min(1.0, max(fr))

    def _warn_warmup(self, steps: int) -> None:
        if self.dist.is_main and self.cfg.warmup_steps >= steps:
            console.print(
                f"[yellow]warning:[/] --warmup-steps {self.cfg.warmup_steps} ≥ the run's {steps:,} steps: the learning "
                "rate reaches its peak at best on the last step and never decays; lower --warmup-steps"
            )

    def _sync_clock(self) -> None:
        """Under torchrun with a time budget, one clock for all ranks (the slowest's), so they
        follow the same learning-rate schedule and stop at the same step."""
        if self.dist.enabled and self.cfg.time_budget:
            clock = torch.tensor([self.elapsed], dtype=torch.float64, device=self.device)
            self.elapsed = float(self.dist.all_reduce_max(clock).item())

    def _stop_reason(self) -> str | None:
        c = self.cfg
        if c.max_steps and self.step >= c.max_steps:
            return "max_steps"
        if c.max_tokens and self.tokens >= c.max_tokens:
            return "max_tokens"
        if c.time_budget and self.elapsed >= c.time_budget:
            return "time_budget"
        return None

    # -- checkpoints ----------------------------------------------------------------------------
    def _rng_states(self) -> list[dict[str, Any]]:
        mine = ckpt.rng_state()
        if not self.dist.enabled:
            return [mine]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def _full_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """The model's (and extra modules') whole state dict and the optimizers' states, on rank 0.
        Under --fsdp this gathers the shards: a collective every rank must call."""
        if not self.sharded:
            if not self.dist.is_main:
                return {}, []
            return self.container.state_dict(), [o.state_dict() for o in self.optimizers]
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = _full_state_options()
        return (get_model_state_dict(self.container, options=opts),
                [get_optimizer_state_dict(self.container, o, options=opts) for o in self.optimizers])

    def model_state(self) -> dict[str, torch.Tensor]:
        """The trained model's whole state dict (rank 0; {} elsewhere), to publish. Under --fsdp a
        collective every rank must call."""
        if not self.sharded:
            return self.model.state_dict() if self.dist.is_main else {}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_full_state_options())

    def save(self) -> Path | None:
        rngs = self._rng_states()
        model_state, optimizer_states = self._full_state()
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                self.step,
                model_state=model_state,
                optimizer_states=optimizer_states,
                optimizer_layout="fqn" if self.sharded else "index",
                scaler_state=self.scaler.state_dict() if self.scaler else None,
                data_state=self.objective.state_dict(),
                trainer_state={"tokens": self.tokens, "elapsed": self.elapsed, "precision": self.precision,
                               "warmup_end": self.warmup_end, "log_sums": self.log_sums, "log_counts": self.log_counts},
                rng_states=rngs,
                keep=self.cfg.keep_checkpoints,
            )
        self.dist.barrier()
        return path

    def _load_state(self, path: Path, c: ckpt.Checkpoint) -> None:
        """Load a checkpoint's whole state dicts into the (possibly sharded) model and optimizers."""
        layout = "fqn" if self.sharded else "index"
        if c.optimizer_layout != layout:
            how = ("sharded (--fsdp under torchrun); resume it the same way, torchrun with --fsdp"
                   if c.optimizer_layout == "fqn" else "unsharded (one process, or DDP); resume it without --fsdp")
            where = "" if self.dist.enabled else " (this is one process: --fsdp shards only under torchrun)"
            raise UsageError(f"{path}: checkpoint written {how}{where}, or start over with --force")
        if len(c.optimizer_states) != len(self.optimizers):
            raise UsageError(f"{path}: checkpoint has {len(c.optimizer_states)} optimizers, this run {len(self.optimizers)}")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            opts = _full_state_options(cpu_offload=False)
            set_model_state_dict(self.container, c.model_state, options=opts)
            for o, st in zip(self.optimizers, c.optimizer_states, strict=True):
                set_optimizer_state_dict(self.container, o, st, options=opts)
        else:
            missing, unexpected = self.container.load_state_dict(c.model_state, strict=False)
            if missing or unexpected:
                raise UsageError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            for o, st in zip(self.optimizers, c.optimizer_states, strict=True):
                o.load_state_dict(st)
        if self.scaler is not None and c.scaler_state:
            self.scaler.load_state_dict(c.scaler_state)

    def resume(self) -> int:
        """Restore the newest complete checkpoint in the work dir, if any; return its step."""
        if self.dist.is_main:
            ckpt.clean_stale(self.ckpt_root)
        self.dist.barrier()
        found = ckpt.list_checkpoints(self.ckpt_root)
        if not found:
            return 0
        step, path = found[-1]
        c = ckpt.load_checkpoint(path, rank=self.dist.rank)
        self._load_state(path, c)
        self.objective.load_state_dict(c.data_state)
        state = c.trainer_state
        self.step, self.tokens, self.elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed"])
        self.warmup_end = state.get("warmup_end", 0.0)  # absent: a checkpoint from before it was kept
        self.log_sums, self.log_counts = dict(state.get("log_sums", {})), dict(state.get("log_counts", {}))
        if self.dist.is_main:
            self._truncate_metrics(self.step)
        return step

    def _truncate_metrics(self, step: int) -> None:
        path = self.work / METRICS
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        tmp.replace(path)

    # -- the loop -------------------------------------------------------------------------------
    def _log(self, rec: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.work / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}

    def evaluate(self, full: bool) -> dict[str, float]:
        self.model.eval()
        for m in self.extra.values():
            m.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                # eval runs the plain module: the compiled one would recompile for other shapes
                return self.objective.evaluate(self.model, self.extra, full)
        finally:
            self.model.train()
            for m in self.extra.values():
                m.train()

    def train_step(self) -> tuple[float, float, int, dict[str, float]]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (loss, grad_norm, tokens, metrics)."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        extra_metrics: dict[str, float] = {}
        for i in range(self.accum_steps):
            batch = self._to_device(self.objective.next_batch())
            tokens += self.objective.tokens_in(batch)
            last = i == self.accum_steps - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            if self.sharded:  # reduce-scatter the gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            with sync:
                with autocast(self.device, self.precision):
                    loss, metrics = self.objective.loss(self.fwd_model, batch, self.extra)
                scaled = loss / self.accum_steps
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                extra_metrics[k] = extra_metrics.get(k, 0.0) + float(v) / self.accum_steps
        if self.dist.enabled and self.extra:  # extra modules are not under DDP: average their grads
            for m in self.extra.values():
                for p in m.parameters():
                    if p.grad is not None:
                        self.dist.all_reduce_sum(p.grad)
                        p.grad /= self.dist.world_size
        loss_val = loss_sum / self.accum_steps
        if self.dist.enabled:
            # one all-reduce: the loss and metrics become means over the ranks, the tokens their sum,
            # so every rank counts the same tokens (and stops at the same --max-tokens step)
            keys = sorted(extra_metrics)
            packed = torch.tensor([float(loss_val), float(tokens), *(extra_metrics[k] for k in keys)], dtype=torch.float64)
            packed = packed.to(self.device)
            self.dist.all_reduce_sum(packed)
            packed = packed.cpu()
            w = self.dist.world_size
            loss_val, tokens = packed[0] / w, int(packed[1])
            extra_metrics = {k: float(v) / w for k, v in zip(keys, packed[2:].tolist(), strict=True)}
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        params = [p for p in self.container.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        gnorm = _clip_grad_norm(params, max_norm) if self.sharded else torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            for opt in self.optimizers:
                opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return float(loss_val), float(gnorm), tokens, extra_metrics

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed_at = self.resume()
        if resumed_at and self.dist.is_main:
            console.print(f"{self.title}: resumed from checkpoint step {resumed_at:,} ({self.tokens:,} tokens)")
        if cfg.max_steps:
            self._warn_warmup(cfg.max_steps)
        self.model.train()
        stop = self._stop_reason()
        last_val: dict[str, float] = {}
        window_tokens, window_time = 0, 0.0
        last_good = ckpt.list_checkpoints(self.ckpt_root)
        while stop is None:
            t0 = time.perf_counter()
            if self.warmup_end is None and self.step >= cfg.warmup_steps:
                self.warmup_end = self.progress()  # where the decay starts from the peak
            factor = lr_factor(
                self.step,
                self.progress(),
                schedule=cfg.schedule,
                warmup_steps=cfg.warmup_steps,
                warmup_end=self.warmup_end or 0.0,
                decay_fraction=cfg.decay_fraction,
                min_lr_ratio=cfg.min_lr_ratio,
            )
            lr = set_lr(self.optimizers, factor)
            self.objective.on_progress(self.step, self.progress())
            loss, gnorm, tokens, metrics = self.train_step()
            if not math.isfinite(loss):
                good = ckpt.list_checkpoints(self.ckpt_root) or last_good
                where = f"the last good checkpoint {good[-1][1]} is kept" if good else "no checkpoint was written yet"
                raise StageError(
                    f"loss became {loss} at step {self.step + 1}; stopped ({where}); "
                    "lower --lr, raise --warmup-steps or use --precision fp32, then rerun to resume"
                )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens
            self.elapsed += dt
            window_tokens += tokens
            window_time += dt
            for k, v in {"loss": loss, "grad_norm": gnorm, **metrics}.items():
                self.log_sums[k] = self.log_sums.get(k, 0.0) + v
                self.log_counts[k] = self.log_counts.get(k, 0) + 1
            self._sync_clock()
            if self.step == 1 and cfg.max_tokens and not cfg.max_steps:  # the step count follows from the first step
                self._warn_warmup(math.ceil(cfg.max_tokens / max(tokens, 1)))
            stop = self._stop_reason()
            do_eval = cfg.eval_every and self.step % cfg.eval_every == 0 and stop is None
            do_save = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and stop is None
            rec: dict[str, Any] | None = None
            if self.step % max(cfg.log_every, 1) == 0 or self.step == 1 or stop or do_eval:
                tps = window_tokens / window_time if window_time > 0 else 0.0
                mfu = tps * self.flops_per_token / self.peak if self.peak else None
                # loss, grad norm and the objective's metrics: means over the steps since the last record
                means = {k: v / self.log_counts[k] for k, v in self.log_sums.items()}
                rec = {
                    "step": self.step, "tokens": self.tokens, "loss": means.pop("loss"), "lr": lr,
                    "grad_norm": means.pop("grad_norm"), "tokens_per_s": round(tps, 2),
                    "mfu": None if mfu is None else round(mfu, 5), "elapsed": round(self.elapsed, 3), **means,
                }
                window_tokens, window_time = 0, 0.0
                self.log_sums, self.log_counts = {}, {}
            if do_eval:
                t_eval = time.perf_counter()
                last_val = self.evaluate(full=False)
                self.elapsed += time.perf_counter() - t_eval
                if rec is not None:
                    rec.update(last_val)
            if rec is not None:
                self._log(rec)
                if self.dist.is_main:
                    val = "".join(f" {k} {v:.4f}" for k, v in last_val.items()) if do_eval else ""
                    mfu_s = f" mfu {rec['mfu'] * 100:.1f}%" if rec["mfu"] is not None else ""
                    console.print(
                        f"{self.title} step {self.step:,} tokens {self.tokens:,} loss {rec['loss']:.4f} lr {lr:.2e} "
                        f"gnorm {rec['grad_norm']:.3f} {rec['tokens_per_s']:,.0f} tok/s{mfu_s}{val}"
                    )
            if do_save:
                t_ck = time.perf_counter()
                self.save()
                self.elapsed += time.perf_counter() - t_ck
            if do_eval or do_save:  # their time joined the clock on each rank: share it again
                self._sync_clock()
        final_val = self.evaluate(full=True)
        if final_val:
            final_rec = {"step": self.step, "tokens": self.tokens, "final": True, **final_val}
            self._log(final_rec)
        self.save()
        if self.dist.is_main:
            self.plot()
        return {
            "steps": self.step,
            "tokens_seen": self.tokens,
            "stop_reason": stop,
            "train_seconds": round(self.elapsed, 3),
            "precision": self.precision,
            "final_eval": final_val,
            "peak_memory_bytes": peak_memory(self.device),
            "peak_flops": self.peak,
            "resumed_from_step": resumed_at,
            **self._speed(),
        }

    def _speed(self) -> dict[str, Any]:
        """Median tokens/s and MFU over the logged steps (the first logged step includes warm-up)."""
        recs = read_metrics(self.work / METRICS)
        tps = sorted(r["tokens_per_s"] for r in recs if r.get("tokens_per_s") and r["step"] > 1)
        if not tps:
            tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
        if not tps:
            return {"tokens_per_s": None, "mfu": None}
        med = tps[len(tps) // 2]
        mfu = med * self.flops_per_token / self.peak if self.peak else None
        return {"tokens_per_s": round(med, 2), "mfu": None if mfu is None else round(mfu, 5)}

    def plot(self) -> None:
        plot_metrics(self.work / METRICS, self.work / PLOT, title=self.title)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)


def _fully_shard(model: nn.Module) -> None:
    """FSDP2 in place: one unit per transformer block (its weights gathered just for its forward
    and backward), and the root for the embeddings, final norm and head."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)


def _full_state_options(cpu_offload: bool = True) -> Any:
    """torch.distributed.checkpoint options for whole (unsharded) state dicts: gathered to rank 0's
    CPU when saving; every rank passes the whole dict when loading, and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded (DTensor) and plain gradients together (an objective's
    extra modules stay whole under --fsdp): the global norm of both kinds, then one scale."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    norms = []
    for group in (sharded, plain):
        if group:
            n = get_total_norm([p.grad for p in group])
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            clip_grads_with_norm_(group, max_norm, total)
    return total


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def plot_metrics(metrics: Path, png: Path, title: str = "train") -> None:
    """Train loss (and val loss where evaluated) against tokens seen, to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png).with_name(f".{Path(png).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)

"""What every post-training stage (sft, dpo, …) does around its objective: read JSON/JSONL data,
load the base run, open the output run on rank 0 and share it with the other ranks, train with
``Trainer`` and publish weights + tokenizer. Each stage adds only its data handling and loss."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..artifacts import (
    MANIFEST,
    StageRun,
    input_record,
    params_fingerprint,
    require_artifact,
    write_json_atomic,
)
from ..console import console
from ..errors import UsageError
from ..jsonl import json_lines, open_binary
from ..model.config import ModelConfig
from ..model.io import CONFIG, TOKENIZER, WEIGHTS, load_weights, read_run_config, save_state
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer, load_tokenizer
from .distributed import DistContext, open_run
from .loop import METRICS, PLOT, LoopConfig, Objective, Trainer, check_memory, estimate_train_memory
from .precision import available_memory, resolve_precision

#: runs a post-training stage can start from
BASE_STAGES = ("pretrain", "sft", "dpo", "ppo")


@dataclass
class FinetuneConfig(LoopConfig):
    """The options every post-training stage has: a base run, data files and a val split, rows of
    ``seq_len``, a batch counted in ``unit`` (rows, pairs), epochs, and fine-tuning defaults."""

    unit: ClassVar[str] = "rows"
    what: ClassVar[str] = "training data"  # named in the "no data" error

    base: Path = Path()
    data: list[Path] = field(default_factory=list)
    out: Path = Path()
    val: list[Path] = field(default_factory=list)  # exactly these are val (else val_fraction of data)
    val_fraction: float = 0.05
    seq_len: int | None = None  # None → the base model's max_seq_len
    micro_batch: int = 8  # units per forward/backward on each rank
    global_batch: int = 0  # units per optimizer step over all ranks; 0 → micro_batch × world
    epochs: float = 1.0  # sets max_steps unless --max-steps is given; 0 = no epoch limit
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    force: bool = False
    #: the fingerprint of the options as given and the inputs, before any is derived from the data
    #: (set by ``already_done``; kept in the manifest so a rerun can be a no-op without reading data)
    request: str = ""

    def inputs(self) -> list[Path]:
        return [Path(self.base), *self.data, *self.val]

    def batch_layout(self, world: int) -> tuple[int, int]:
        """(units per optimizer step, micro-batches per step on each rank)."""
        per_micro = self.micro_batch * world
        global_units = self.global_batch or per_micro
        if global_units % per_micro:
            raise UsageError(
                f"--global-batch {global_units} {self.unit} is not a multiple of --micro-batch {self.micro_batch} × "
                f"{world} ranks; use a multiple of {per_micro}"
            )
        return global_units, global_units // per_micro

    def steps_from_epochs(self, units_per_epoch: int, global_units: int) -> None:
        """Set max_steps from --epochs unless given (--time-budget / --max-tokens may stop it earlier)."""
        if not self.max_steps and self.epochs > 0:
            self.max_steps = max(1, math.ceil(self.epochs * units_per_epoch / global_units))


def prepare(cfg: FinetuneConfig) -> tuple[ModelConfig, Path, Tokenizer]:
    """Check the options every post-training stage shares and load the base run (seq_len resolved)."""
    cfg.check()
    if not cfg.data:
        raise UsageError(f"no {cfg.what} given; pass .json or .jsonl files")
    if not cfg.val and not 0.0 <= cfg.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {cfg.val_fraction}: give a fraction in [0, 1)")
    if cfg.micro_batch < 1:
        raise UsageError("--micro-batch must be ≥ 1")
    if cfg.epochs < 0 or (cfg.epochs == 0 and not (cfg.max_steps or cfg.max_tokens or cfg.time_budget)):
        raise UsageError("--epochs must be > 0 (or 0 with --max-steps, --max-tokens or --time-budget)")
    mcfg, tok_path, tok = load_base(cfg.base)
    cfg.seq_len = int(cfg.seq_len or mcfg.max_seq_len)
    if cfg.seq_len > mcfg.max_seq_len:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the base model's context {mcfg.max_seq_len}; use ≤ {mcfg.max_seq_len}")
    return mcfg, tok_path, tok


def train_val(
    cfg: FinetuneConfig, load: Callable[[list[Path], dict[str, int]], list], split: Callable[[list, float], tuple[list, list]],
    bad: dict[str, int],
) -> tuple[list, list, int]:
    """(train records, val records, records read from DATA): val is ``--val`` (its bad records
    counted as ``val_<reason>``) or ``split`` of DATA by ``val_fraction``."""
    records = load(cfg.data, bad)
    n_read = len(records) + sum(bad.values())  # the records that loaded and those skipped while loading
    if not cfg.val:
        return *split(records, cfg.val_fraction), n_read
    val_bad: dict[str, int] = {}
    val = load(cfg.val, val_bad)
    if not val:
        reasons = ", ".join(f"{k} {v}" for k, v in val_bad.items()) or "the files hold no records"
        raise UsageError(f"--val {', '.join(map(str, cfg.val))}: no usable records ({reasons}); check the file or drop --val")
    for k, v in val_bad.items():
        count(bad, f"val_{k}", v)
    return records, val, n_read


def no_usable(what: str, cfg: FinetuneConfig, bad: dict[str, int]) -> UsageError:
    reasons = ", ".join(f"{k} {v}" for k, v in bad.items()) or "the files hold no records"
    return UsageError(f"no usable {what} in {', '.join(map(str, cfg.data))} ({reasons}); check the data layout")


def read_records(path: Path, bad: dict[str, int]) -> list[Any]:
    """The JSON records of a .json (one array) or .jsonl file (.gz too). In JSON Lines a line that
    is not UTF-8 or not JSON is counted and skipped; a .json file is one document, so it must parse."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file; pass .json or .jsonl data")
    name = path.name.lower().removesuffix(".gz")
    if not name.endswith((".json", ".jsonl", ".ndjson")):
        raise UsageError(f"{path}: unknown data file type; pass .json (an array) or .jsonl files")
    try:
        with open_binary(path) as f:
            if name.endswith(".json"):
                try:
                    data = json.loads(f.read())
                except ValueError as e:  # UnicodeDecodeError is a ValueError too
                    raise UsageError(f"{path}: not valid JSON ({e}); fix the file or pass JSON Lines as .jsonl") from e
                if not isinstance(data, list):
                    raise UsageError(f"{path}: a .json data file must hold one array of examples")
                return data
            return [rec for _, rec in json_lines(f, lambda reason: count(bad, reason))]
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: unreadable ({e}); check the file") from e


class EpochOrder:
    """An endless stream over ``n`` items: epoch ``e`` visits each once, in an order seeded by
    (seed, e); item ``g`` of the stream is a pure function of g, so a resumed run (or another rank)
    continues the same stream from its step alone."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perm: tuple[int, list[int]] | None = None

    def __getitem__(self, g: int) -> int:
        epoch, k = divmod(g, self.n)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1][k]


def count(bad: dict[str, int], reason: str, n: int = 1) -> None:
    bad[reason] = bad.get(reason, 0) + n


def load_base(base: Path) -> tuple[ModelConfig, Path, Tokenizer]:
    """The base run's model config, tokenizer path and tokenizer (which must have the chat markers)."""
    require_artifact(base, BASE_STAGES)
    mcfg = ModelConfig.from_dict(read_run_config(base)["model"])
    tok_path = Path(base) / TOKENIZER
    tok = load_tokenizer(tok_path)
    missing = [r for r in ("system", "user", "assistant", "end") if r not in tok.role_ids]
    if missing:
        raise UsageError(
            f"{tok_path}: the tokenizer has no chat role markers ({', '.join(missing)}); retrain it with llmctl tokenize train"
        )
    return mcfg, tok_path, tok


def base_model(base: Path, mcfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(mcfg)
    load_weights(model, Path(base) / WEIGHTS)
    return model


def already_done(cfg: FinetuneConfig, stage_name: str) -> dict[str, Any] | None:
    """The manifest of ``cfg.out`` when it is a finished ``stage_name`` run of these same options
    and inputs (then the stage has nothing to do, and need not read or tokenise its data); else
    None. Under torchrun a rank other than 0 gets ``{}`` for a finished run, as it does from a
    training run, so only rank 0's CLI prints the summary. Either way ``cfg.request`` is set, for
    the manifest of the run about to be made."""
    try:
        cfg.request = params_fingerprint(params_of(cfg), [input_record(p) for p in cfg.inputs()])
    except UsageError:  # a missing input: the stage's own checks say so in their words
        return None
    mf = Path(cfg.out) / MANIFEST
    if cfg.force or not mf.is_file():
        return None
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if m.get("stage") != stage_name or m.get("request_fingerprint") != cfg.request:
        return None
    if os.environ.get("RANK", "0") != "0":  # under torchrun, before the process group exists:
        return {}  # only rank 0 reports (and its CLI prints the summary)
    console.print(f"{stage_name}: {cfg.out} is already complete (same options and data); nothing to do")
    return m


def params_of(cfg: Any) -> dict[str, Any]:
    """A stage config as manifest parameters (paths as strings, ``force`` and ``request`` left out)."""
    p = asdict(cfg)
    p.pop("force", None)
    p.pop("request", None)
    for k, v in p.items():
        if isinstance(v, Path):
            p[k] = str(v)
        elif isinstance(v, list):
            p[k] = [str(x) for x in v]
    return p


def write_config(work: Path, mcfg: ModelConfig, params: dict[str, Any], base: Path) -> None:
    write_json_atomic(work / CONFIG, {"model": mcfg.to_dict(), "train": params, "base": str(Path(base).resolve())})


def check_fits(cfg: FinetuneConfig, mcfg: ModelConfig, device: torch.device, rows: int, what: str, frozen_params: int = 0,
               world: int = 1) -> None:
    """Refuse before allocating when training ``rows`` rows of ``seq_len`` per micro-batch, plus
    frozen fp32 copies of ``frozen_params`` parameters (a reference, a reward model), does not fit
    (with --fsdp the trained state is shared by the ``world`` ranks)."""
    est = estimate_train_memory(mcfg, rows, int(cfg.seq_len), cfg.optimizer, resolve_precision(cfg.precision, device),
                                shards=world if cfg.fsdp else 1)
    est["total"] += 4 * frozen_params
    check_memory(est, available_memory(device), what)


def fit_and_publish(
    cfg: FinetuneConfig,
    stage_name: str,
    dist_ctx: DistContext,
    mcfg: ModelConfig,
    tok_path: Path,
    objective: Objective,
    *,
    accum: int,
    flops_per_token: float,
    headline: str,
    stats: Callable[[dict[str, Any], dict[str, float]], dict[str, Any]],
    before_fit: Callable[[Trainer], None] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """What every post-training stage does once its data and batch layout are checked: open the
    run (rank 0; a complete one with the same options and inputs is a no-op), load the base
    weights, train ``objective`` with ``Trainer``, and publish. ``stats(result, final_eval)`` gives
    the stage's own statistics (``Trainer.fit()``'s result and the final val metrics);
    ``before_fit(trainer)`` runs before training, ``extra_files(work)`` writes the stage's own files
    into the run before it is published. Returns the manifest ({} on ranks other than 0)."""
    params = params_of(cfg)
    stage, done, work, manifest = open_run(cfg.out, stage_name, params, cfg.inputs(), cfg.force, dist_ctx)
    if done:
        if dist_ctx.is_main:
            console.print(f"{stage_name}: {cfg.out} is already complete (same options and data); nothing to do")
        return manifest if dist_ctx.is_main else {}
    model = base_model(cfg.base, mcfg, cfg.seed)
    if dist_ctx.is_main:
        console.print(f"{stage_name}: {headline}")
        write_config(work, mcfg, params, cfg.base)
    trainer = Trainer(
        model, objective, cfg.loop_config(), work, accum_steps=accum, flops_per_token=flops_per_token,
        dist_ctx=dist_ctx, title=stage_name,
    )
    if before_fit is not None:
        before_fit(trainer)
    result = trainer.fit()
    weights = trainer.model_state()  # under --fsdp every rank takes part in gathering them
    if stage is None:
        return {}
    final = result.pop("final_eval") or {}
    if extra_files is not None:
        extra_files(work)
    own = stats(result, final)
    return publish(
        stage, weights, tok_path, {**own, "accum_steps": accum, "world_size": dist_ctx.world_size, **result}, cfg.request,
    )


def publish(run: StageRun, weights: dict[str, torch.Tensor], tok_path: Path, stats: dict[str, Any], request: str = "") -> dict[str, Any]:
    """Write the final weights (a whole state dict) and the tokenizer into the run and finish it;
    returns the manifest."""
    save_state(weights, run.work / WEIGHTS)
    shutil.copyfile(tok_path, run.work / TOKENIZER)
    assert (run.work / METRICS).is_file() and (run.work / PLOT).is_file()
    return run.finish(stats, **({"request_fingerprint": request} if request else {}))

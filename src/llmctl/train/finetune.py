"""What every post-training stage (sft, dpo, …) does around its objective: read JSON/JSONL data,
load the base run, open the output run on rank 0 and share it with the other ranks, train with
``Trainer`` and publish weights + tokenizer. Each stage adds only its data handling and loss."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..artifacts import StageRun, require_artifact, write_json_atomic
from ..errors import UsageError
from ..model.config import ModelConfig
from ..model.io import CONFIG, TOKENIZER, WEIGHTS, load_weights, read_run_config, save_weights
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer, load_tokenizer
from .distributed import DistContext
from .loop import METRICS, PLOT

#: runs a post-training stage can start from
BASE_STAGES = ("pretrain", "sft", "dpo")


def read_records(path: Path, bad: dict[str, int]) -> list[Any]:
    """The JSON records of a .json (one array) or .jsonl file (.gz too). In JSON Lines a line that
    is not UTF-8 or not JSON is counted and skipped; a .json file is one document, so it must parse."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file; pass .json or .jsonl data")
    name = path.name.lower().removesuffix(".gz")
    if not name.endswith((".json", ".jsonl", ".ndjson")):
        raise UsageError(f"{path}: unknown data file type; pass .json (an array) or .jsonl files")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if name.endswith(".json"):
                try:
                    data = json.loads(f.read())
                except ValueError as e:  # UnicodeDecodeError is a ValueError too
                    raise UsageError(f"{path}: not valid JSON ({e}); fix the file or pass JSON Lines as .jsonl") from e
                if not isinstance(data, list):
                    raise UsageError(f"{path}: a .json data file must hold one array of examples")
                return data
            records = []
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    records.append(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    count(bad, "not_utf8")
                except ValueError:
                    count(bad, "bad_json")
            return records
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


def params_of(cfg: Any) -> dict[str, Any]:
    """A stage config as manifest parameters (paths as strings, ``force`` left out)."""
    p = asdict(cfg)
    p.pop("force", None)
    for k, v in p.items():
        if isinstance(v, Path):
            p[k] = str(v)
        elif isinstance(v, list):
            p[k] = [str(x) for x in v]
    return p


def open_run(out: Path, stage: str, params: dict[str, Any], inputs: list[Path], force: bool, dist: DistContext) -> tuple[StageRun | None, bool, Path, dict[str, Any]]:
    """(stage on rank 0 else None, already done, work dir, manifest if done), the same on every rank."""
    if dist.is_main:
        run = StageRun.open(out, stage, params, inputs, force=force)
        shared = [run.done, str(run.work), run.manifest]
    else:
        run, shared = None, [None, None, None]
    if dist.enabled:
        import torch.distributed as tdist

        tdist.broadcast_object_list(shared, src=0)
    return run, bool(shared[0]), Path(shared[1]), shared[2]


def write_config(work: Path, mcfg: ModelConfig, params: dict[str, Any], base: Path) -> None:
    write_json_atomic(work / CONFIG, {"model": mcfg.to_dict(), "train": params, "base": str(Path(base).resolve())})


def publish(run: StageRun, model: Transformer, tok_path: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Write the final weights and the tokenizer into the run and finish it; returns the manifest."""
    save_weights(model, run.work / WEIGHTS)
    shutil.copyfile(tok_path, run.work / TOKENIZER)
    assert (run.work / METRICS).is_file() and (run.work / PLOT).is_file()
    return run.finish(stats)

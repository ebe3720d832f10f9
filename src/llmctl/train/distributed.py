"""Data parallelism under torchrun: process-group setup from the environment, and small collectives.

``torchrun --nproc-per-node N -m llmctl pretrain …`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; the trainer then joins a process group (gloo on CPU, nccl on CUDA), wraps the
model in DistributedDataParallel, and each rank draws its share of every global batch. Without
those variables everything runs in one process and these helpers are no-ops.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group. On the way out of a finished stage (no exception in flight)
        every rank first waits for the others, so no rank tears its group down while another still
        publishes or has collective work in flight. After an error, no waiting (torchrun stops the
        other ranks). The process then skips the interpreter's teardown, where a rank intermittently
        aborted even after this barrier: see ``cli._leave_if_torchrun_rank``."""
        if self.initialized_here and dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init_distributed(device_type: str) -> DistContext:
    """Join the torchrun process group if the environment describes one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        created = True
    return DistContext(rank=rank, world_size=world, local_rank=local, initialized_here=created)


def open_run(
    out: Path, stage: str, params: dict[str, Any], inputs: list[Path], force: bool, dist_ctx: DistContext
) -> tuple[Any, bool, Path, dict[str, Any]]:
    """Open a training stage's run directory on rank 0 and tell every rank about it: (the
    ``StageRun`` on rank 0, else None; already complete; the work directory; the manifest if complete)."""
    from ..artifacts import StageRun
    from ..errors import UsageError

    refused: UsageError | None = None
    run, shared = None, [None, None, None, None]
    if dist_ctx.is_main:
        try:
            run = StageRun.open(out, stage, params, inputs, force=force)
            shared = [run.done, str(run.work), run.manifest, None]
        except UsageError as e:  # tell the other ranks, which would otherwise die in the broadcast
            refused, shared = e, [None, None, None, str(e)]
    if dist_ctx.enabled:
        dist.broadcast_object_list(shared, src=0)
    if refused is not None:
        raise refused
    if shared[3] is not None:
        raise UsageError(shared[3])
    return run, bool(shared[0]), Path(shared[1]), shared[2]

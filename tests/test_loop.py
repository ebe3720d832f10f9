"""The training loop's objective contract, with objectives other than pretraining.

Two objectives of the post-training kind, written here against ``Objective`` on real preference
pairs (../shared/data/preference, Anthropic HH harmless): a Bradley–Terry reward model, whose scalar
head is an extra module the loop must optimise, checkpoint, resume and synchronise under DDP; and
DPO, which keeps a frozen copy of the starting policy as its reference. Each needs only its batches
and its loss, which is what the loop promises sft, reward, dpo and ppo.
"""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmctl.model import ModelConfig, Transformer
from llmctl.train import checkpoint as ckpt
from llmctl.train.distributed import DistContext
from llmctl.train.loop import CHECKPOINTS, METRICS, LoopConfig, Objective, Trainer, read_metrics

SEQ = 48  # tokens per side of a pair: the last SEQ tokens of the dialogue, where the answers differ
N_PAIRS = 8


class _Pairs(Objective):
    """Micro-batches of (chosen, rejected) pairs in one global order whatever the rank layout:
    micro-batch ``k`` of rank ``r`` in a world of ``w`` is rows ``[(k·w + r)·mb, …+mb)`` (cycled)."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, micro_batch: int) -> None:
        self.chosen, self.rejected, self.mb = chosen, rejected, micro_batch
        self.k = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        d = self.ctx.dist
        start = (self.k * d.world_size + d.rank) * self.mb
        rows = (torch.arange(self.mb) + start) % self.chosen.shape[0]
        self.k += 1
        return {"chosen": self.chosen[rows], "rejected": self.rejected[rows]}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen"].numel() + batch["rejected"].numel())

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])


class RewardObjective(_Pairs):
    """Bradley–Terry: −log σ(r(chosen) − r(rejected)), r = a linear head (zero at the start) on the
    last hidden state."""

    name = "reward"

    def __init__(self, chosen, rejected, micro_batch: int, d_model: int) -> None:
        super().__init__(chosen, rejected, micro_batch)
        self.head = nn.Linear(d_model, 1, bias=False)
        nn.init.zeros_(self.head.weight)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"reward_head": self.head}

    def _rewards(self, model, chosen, rejected, head) -> tuple[torch.Tensor, torch.Tensor]:
        h = model(torch.cat([chosen, rejected]), return_hidden=True)[:, -1]
        return head(h).float().squeeze(-1).chunk(2)

    def loss(self, model, batch, modules):
        rc, rr = self._rewards(model, batch["chosen"], batch["rejected"], modules["reward_head"])
        return -F.logsigmoid(rc - rr).mean(), {"accuracy": (rc > rr).float().mean()}

    def evaluate(self, model, modules, full: bool) -> dict[str, float]:
        rc, rr = self._rewards(model, self.chosen.to(self.ctx.device), self.rejected.to(self.ctx.device),
                               modules["reward_head"])
        return {"pair_accuracy": float((rc > rr).float().mean()), "pair_loss": float(-F.logsigmoid(rc - rr).mean())}


class DPOObjective(_Pairs):
    """DPO: −log σ(β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)]) over the answer
    tokens, with π_ref a frozen copy of the policy as training starts (taken from ``ctx.model``)."""

    name = "dpo"

    def __init__(self, chosen, rejected, micro_batch: int, answer_tokens: int = 16, beta: float = 0.1) -> None:
        super().__init__(chosen, rejected, micro_batch)
        self.answer, self.beta = answer_tokens, beta

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.ref = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    def _logp(self, model, ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids[:, :-1]).float()[:, -self.answer :]
        target = ids[:, -self.answer :]
        return torch.gather(logits.log_softmax(-1), -1, target[..., None]).squeeze(-1).sum(-1)

    def loss(self, model, batch, modules):
        both = torch.cat([batch["chosen"], batch["rejected"]])
        pc, pr = self._logp(model, both).chunk(2)
        with torch.no_grad():
            rc, rr = self._logp(self.ref, both).chunk(2)
        margin = self.beta * ((pc - rc) - (pr - rr))
        return -F.logsigmoid(margin).mean(), {"margin": margin.mean().detach()}


# -- real pairs, a tiny model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """The first N_PAIRS HH pairs whose sides both have SEQ tokens and differ in the last SEQ."""
    from conftest import SHARED_DATA

    path = SHARED_DATA / "preference" / "hh-rlhf-harmless-test.jsonl.gz"
    if not path.is_file():
        pytest.skip("../shared/data is absent (a fresh clone has no shared data)")
    chosen, rejected = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in itertools.islice(f, 200):
            rec = json.loads(line)
            c, r = tok.encode([rec["chosen"], rec["rejected"]])
            if min(len(c), len(r)) >= SEQ and c[-SEQ:] != r[-SEQ:]:
                chosen.append(c[-SEQ:])
                rejected.append(r[-SEQ:])
            if len(chosen) == N_PAIRS:
                break
    assert len(chosen) == N_PAIRS
    return torch.tensor(chosen), torch.tensor(rejected)


def _model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=SEQ))


def _loop(**kw) -> LoopConfig:
    base = dict(max_steps=6, lr=3e-3, warmup_steps=2, precision="fp32", device="cpu", log_every=1, seed=0)
    return LoopConfig(**{**base, **kw})


def _reward_trainer(pairs, vocab: int, work: Path, micro_batch: int, accum: int, dist_ctx: DistContext | None = None,
                    **loop_kw) -> tuple[Trainer, RewardObjective]:
    work.mkdir(parents=True, exist_ok=True)
    model = _model(vocab)
    torch.manual_seed(1)
    objective = RewardObjective(*pairs, micro_batch=micro_batch, d_model=model.cfg.d_model)
    trainer = Trainer(model, objective, _loop(**loop_kw), work, accum_steps=accum, flops_per_token=1.0,
                      dist_ctx=dist_ctx, title="reward")
    return trainer, objective


def _reward_run(*args, **kw) -> tuple[Trainer, RewardObjective, dict]:
    trainer, objective = _reward_trainer(*args, **kw)
    return trainer, objective, trainer.fit()


def _losses(work: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(work / METRICS) if "loss" in r}


# -- the tests --------------------------------------------------------------------------------------

def test_reward_head_is_an_extra_module_the_loop_trains_and_checkpoints(pairs, tok, tmp_path, one_thread):
    trainer, objective = _reward_trainer(pairs, tok.vocab_size, tmp_path, micro_batch=4, accum=1, max_steps=40)
    start = objective.head.weight.detach().clone()
    result = trainer.fit()
    end = trainer.extra["reward_head"].weight.detach()
    assert not torch.equal(start, end)  # the head was optimised with the model
    losses = _losses(tmp_path)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-7)  # a zero head scores both sides alike
    assert sum(losses[s] for s in range(36, 41)) / 5 < 0.2  # the 8 pairs are learnt
    assert result["final_eval"]["pair_accuracy"] == 1.0
    # the final checkpoint holds the head beside the model, and the data position
    step, path = ckpt.list_checkpoints(tmp_path / CHECKPOINTS)[-1]
    from safetensors.torch import load_file

    saved = load_file(path / "model.safetensors")
    assert step == 40 and torch.equal(saved["extra.reward_head.weight"], end)
    assert any(k.startswith("model.") for k in saved)
    assert objective.state_dict() == {"k": 40}


def test_reward_run_resumed_from_a_checkpoint_continues_bit_for_bit(pairs, tok, tmp_path, one_thread):
    whole = tmp_path / "whole"
    t1, _, _ = _reward_run(pairs, tok.vocab_size, whole, micro_batch=2, accum=2, checkpoint_every=3)
    cut = tmp_path / "cut"
    shutil.copytree(ckpt.step_dir(whole / CHECKPOINTS, 3), ckpt.step_dir(cut / CHECKPOINTS, 3))
    t2, objective, result = _reward_run(pairs, tok.vocab_size, cut, micro_batch=2, accum=2, checkpoint_every=3)
    assert result["resumed_from_step"] == 3 and objective.k == 6 * 2
    a, b = _losses(whole), _losses(cut)
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in b), (a, b)  # head weights and its AdamW moments came back too
    assert torch.equal(t1.extra["reward_head"].weight, t2.extra["reward_head"].weight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, pairs, vocab: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from llmctl.train.distributed import init_distributed

    dist_ctx = init_distributed("cpu")

    try:
        _reward_run(pairs, vocab, Path(work), micro_batch=2, accum=1, dist_ctx=dist_ctx)
    finally:
        dist_ctx.close()


def test_reward_under_ddp_matches_one_process_at_the_same_global_batch(pairs, tok, tmp_path, one_thread):
    """Two gloo ranks (the model under DDP, the head's gradients averaged by the loop) against one
    process accumulating the same 4 pairs per step."""
    one = tmp_path / "one"
    _reward_run(pairs, tok.vocab_size, one, micro_batch=2, accum=2)
    two = tmp_path / "two"
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), pairs, tok.vocab_size, str(two)), nprocs=2)
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6), (s, a[s], b[s])
    assert a[6] < a[1]


def test_dpo_starts_at_log2_against_its_frozen_reference_and_moves_away(pairs, tok, tmp_path, one_thread):
    model = _model(tok.vocab_size)
    start = copy.deepcopy(model.state_dict())
    objective = DPOObjective(*pairs, micro_batch=4)
    trainer = Trainer(model, objective, _loop(max_steps=12, lr=1e-2), tmp_path, accum_steps=1,
                      flops_per_token=1.0, title="dpo")
    trainer.fit()
    recs = [r for r in read_metrics(tmp_path / METRICS) if "loss" in r]
    # policy = reference at the first step: the margin is exactly 0 and the loss exactly log 2
    assert recs[0]["margin"] == 0.0 and recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert recs[-1]["margin"] > 0 and recs[-1]["loss"] < recs[0]["loss"]
    ref = objective.ref.state_dict()
    assert all(torch.equal(ref[k], start[k]) for k in start)  # the reference never moved
    assert not all(torch.equal(model.state_dict()[k], start[k]) for k in start)
    assert all(not p.requires_grad for p in objective.ref.parameters())

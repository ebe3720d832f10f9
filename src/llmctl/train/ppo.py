"""RLHF with PPO: a chat run (usually sft's) + a reward model + prompts → a policy whose replies the
reward model scores higher, kept close to where it started by a KL penalty.

Each rollout, every rank samples one reply per prompt for ``rollout_batch`` prompts from the
current policy (KV-cache sampling at ``temperature``, stopping at ``<|end|>``), then, without
gradients, computes per reply token:

- the policy's log-probabilities (the "old" ones of the ratio) and the value head's estimates,
- the frozen reference's log-probabilities, and the KL estimate k1 = log π − log π_ref or
  k3 = (r − 1) − log r with r = π_ref/π (REFERENCE.md, Post-training),
- the reward: −kl_coef·KL on every token, plus the reward model's score of the whole conversation
  (read at its final EOS) on the last reply token; a reply cut at ``max_new_tokens`` without
  ``<|end|>`` loses ``missing_end_penalty`` from its score,
- advantages by GAE (γ, λ) over the reply and returns = advantages + values; advantages are then
  whitened over the rollout.

The rollout is then used for ``ppo_epochs`` passes in shuffled micro-batches; each optimizer step
minimises ``max(−A·ρ, −A·clip(ρ, 1 ± clip))`` + ``vf_coef`` · ``0.5·max((V − R)², (clip(V, V_old ±
clip_value) − R)²)`` (masked token means), with ρ = π/π_old. The value head is a linear layer on
the policy's own final hidden states (shared body), trained with it. Log-probabilities of policy
and reference are both taken at the sampling temperature, as TRL does.

Logged per step: ``objective/kl`` (mean summed KL per reply), ``objective/scores``,
``objective/rlhf_reward`` (score − kl_coef·KL), ``objective/entropy``, ``policy/clipfrac``,
``policy/approxkl`` (½·mean (log ρ)²), ``loss/policy``, ``loss/value``, ``rollout/length`` and
``rollout/ended`` (the fraction of replies that ended with ``<|end|>``). Val: replies to the held-out
prompts, sampled with a fixed seed, scored the same way (``val_score``, ``val_kl``,
``val_rlhf_reward``, ``val_length``, ``val_ended``); the stats also hold that val pass for the
starting model, so the run says how far the score moved.

Resume is exact: the data position holds the rollout count, the step within it and the rollout
itself (tokens, old log-probs, values, advantages, returns), so a run killed mid-rollout continues
with the same micro-batches.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import require_artifact
from ..chat import BadRecord, Message, render_prompt, to_prompts
from ..console import console
from ..device import resolve_device
from ..errors import UsageError
from ..model.config import ModelConfig
from ..model.generate import SamplingParams, generate
from ..model.io import TOKENIZER, read_run_config
from ..model.reward import load_reward_model, pad_right, score_sequences
from ..tokenizer import _unit
from .distributed import init_distributed
from .finetune import (
    EpochOrder,
    FinetuneConfig,
    already_done,
    check_fits,
    count,
    fit_and_publish,
    no_usable,
    prepare,
    read_records,
    train_val,
)
from .loop import Objective, Trainer
from .precision import autocast

STAGE = "ppo"
#: per-token arrays of a rollout, aligned with each reply's tokens
TOKEN_FIELDS = ("old_logp", "old_values", "advantages", "returns")
ROLLOUT_STATS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy", "rollout/length", "rollout/ended")
#: how long making the rollout took (sampling + scoring) and the sampler's speed in reply tokens/s;
#: logged beside the rollout's statistics (a rollout in a checkpoint of an older run may lack them)
ROLLOUT_TIMES = ("rollout/seconds", "rollout/sample_tokens_per_s")


@dataclass
class PPOConfig(FinetuneConfig):
    """Every option of ``llmctl ppo``: the post-training stages' options plus the rollout and the
    PPO update (defaults from REFERENCE.md / TRL)."""

    what: ClassVar[str] = "prompts"

    reward: Path = Path()
    rollout_batch: int = 16  # prompts (so replies) per rollout on each rank
    micro_batch: int = 8  # replies per forward/backward
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.7
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    missing_end_penalty: float = 0.0
    lr: float = 1e-5
    val_fraction: float = 0.05
    val: list[Path] = field(default_factory=list)

    def inputs(self) -> list[Path]:
        return [Path(self.base), Path(self.reward), *self.data, *self.val]


# -- data ----------------------------------------------------------------------------------------
def load_prompts(paths: list[Path], bad: dict[str, int]) -> list[list[Message]]:
    """Prompts from .txt files (one user turn per non-empty line) or .json/.jsonl records
    (``chat.to_prompts`` layouts); bad records are counted by reason."""
    out: list[list[Message]] = []
    for p in paths:
        p = Path(p)
        if p.suffix.lower() == ".txt":
            if not p.is_file():
                raise UsageError(f"{p}: no such file; pass .txt, .json or .jsonl prompts")
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise UsageError(f"{p}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8") from e
            records: list[Any] = [line for line in lines if line.strip()]
        else:
            records = read_records(p, bad)
        for rec in records:
            try:
                out.extend(to_prompts(rec))
            except BadRecord as e:
                count(bad, e.reason)
    return out


def split_val(prompts: list[list[Message]], fraction: float) -> tuple[list, list]:
    """(train, val) by a seed-independent hash of each prompt's text."""
    train, val = [], []
    for p in prompts:
        (val if _unit(0, "ppo-val", render_prompt(p)) < fraction else train).append(p)
    return train, val


def encode_prompts(tok: Any, prompts: list[list[Message]], keep: int) -> tuple[list[list[int]], int]:
    """BOS + the rendered prompt (ending in ``<|assistant|>``), cut from the left to ``keep`` ids;
    (ids per prompt, how many were cut)."""
    texts = [render_prompt(p) for p in prompts]
    out, cut = [], 0
    for ids in tok.encode(texts) if texts else []:
        ids = [tok.bos_id, *ids]
        if len(ids) > keep:
            ids, cut = ids[-keep:], cut + 1
        out.append(ids)
    return out, cut


# -- the PPO arithmetic ------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled tokens: k1 = log π − log π_ref, or
    k3 = (r − 1) − log r with r = π_ref/π (unbiased and never negative)."""
    if estimator == "k1":
        return logp - ref_logp
    log_r = ref_logp - logp
    return log_r.exp() - 1 - log_r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, N] by generalised advantage estimation over each row's reply
    tokens; positions past a reply's end (mask 0) have value 0, so the last token bootstraps from 0."""
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        nxt = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL's masked_whiten)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean).square() * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_losses(
    logp: torch.Tensor, values: torch.Tensor, batch: dict[str, torch.Tensor], clip: float, clip_value: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(policy loss, value loss, metrics) of one micro-batch (REFERENCE.md's clipped objectives)."""
    mask, adv, ret, old_v = batch["mask"], batch["advantages"], batch["returns"], batch["old_values"]
    log_ratio = logp - batch["old_logp"]
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    pg = masked_mean(torch.maximum(pg1, pg2), mask)
    v_clipped = old_v + (values - old_v).clamp(-clip_value, clip_value)
    vf = 0.5 * masked_mean(torch.maximum((values - ret).square(), (v_clipped - ret).square()), mask)
    lr_d = log_ratio.detach()
    metrics = {
        "policy/clipfrac": masked_mean((pg2 > pg1).float().detach(), mask),
        "policy/approxkl": 0.5 * masked_mean(lr_d.square(), mask),
        "policy/ratio": masked_mean(ratio.detach(), mask),
        "loss/policy": pg.detach(),
        "loss/value": vf.detach(),
    }
    return pg, vf, metrics


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) per position of ``logits`` [B, N, V] at ``temperature``, in fp32."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent


@dataclass
class Rollout:
    """One rank's sampled replies and everything the updates need (lists, so a checkpoint can hold it)."""

    prompts: list[list[int]]
    replies: list[list[int]]
    token: dict[str, list[list[float]]]  # TOKEN_FIELDS → per row, per reply token
    stats: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "replies": self.replies, "token": self.token, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollout:
        return cls(d["prompts"], d["replies"], d["token"], d["stats"])

    def batch(self, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Micro-batch tensors of ``rows``: prompt+reply ids right-padded [B, L]; ``index`` [B, N]
        the position whose logits predict each reply token; the per-token fields [B, N] and ``mask``."""
        seqs = [self.prompts[i] + self.replies[i] for i in rows]
        ids, lengths = pad_right(seqs, pad_id)
        n = max(len(self.replies[i]) for i in rows)
        index = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n)
        out = {k: torch.zeros(len(rows), n) for k in TOKEN_FIELDS}
        for b, i in enumerate(rows):
            start, m = len(self.prompts[i]), len(self.replies[i])
            index[b] = start - 1
            index[b, :m] = torch.arange(start - 1, start - 1 + m)
            mask[b, :m] = 1.0
            for k in TOKEN_FIELDS:
                out[k][b, :m] = torch.tensor(self.token[k][i])
        stats = {k: torch.tensor(v) for k, v in self.stats.items()}
        return {"input_ids": ids, "index": index, "mask": mask, "real_tokens": lengths.sum(), **out, **stats}


def reply_logits(model: nn.Module, batch: dict[str, torch.Tensor], with_values: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logits at the positions that predict each reply token [B, N, V], hidden states there
    [B, N, d] or None, the reply tokens [B, N])."""
    ids, index = batch["input_ids"], batch["index"]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
    if with_values:
        logits, h = model(ids, with_hidden=True)
        hidden = h[rows, index]
    else:
        logits, hidden = model(ids), None
    return logits[rows, index], hidden, ids.gather(1, index + 1)


class PPOObjective(Objective):
    name = "ppo"

    def __init__(
        self, train: list[list[int]], val: list[list[int]], cfg: PPOConfig, tok: Any, reward_run: Path, d_model: int,
    ) -> None:
        self.train, self.val, self.cfg, self.tok = train, val, cfg, tok
        self.reward_run = reward_run
        self.order = EpochOrder(len(train), cfg.seed)
        self.rollouts = 0  # rollouts made by this rank
        self.micro = 0  # micro-batches drawn from the current rollout
        self.rollout: Rollout | None = None
        # this rank's time making rollouts, time sampling and tokens sampled (kept over a resume)
        self.timing = {"rollout_seconds": 0.0, "sample_seconds": 0.0, "sampled_tokens": 0}
        self._last_sample = (0.0, 0)  # (seconds, tokens) of the latest sampling
        self.value_head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.end_id = tok.role_ids["end"]

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # each optimizer step takes micro_batch × accum_steps of this rank's rollout_batch replies
        self.steps_per_rollout = self.cfg.ppo_epochs * (self.cfg.rollout_batch // (self.cfg.micro_batch * ctx.accum_steps))
        self.ref = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        rm, head, _ = load_reward_model(self.reward_run, ctx.device)
        self.rm, self.rm_head = rm, head

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}

    # -- rollouts --------------------------------------------------------------------------------
    def _ended(self, reply: list[int]) -> bool:
        """Whether a reply ended by itself (``<|end|>``, or EOS) rather than at ``max_new_tokens``."""
        return bool(reply) and reply[-1] in (self.end_id, self.tok.eos_id)

    def _sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """The sampled replies' ids; the time and token count go into ``self.timing``."""
        t0 = time.perf_counter()
        params = SamplingParams(
            max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, stop_ids=(self.end_id,), seed=seed,
        )
        model = self.ctx.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(self.ctx.device, self.ctx.precision):
                done = generate(model, self.tok, prompts, params, batch_size=len(prompts))
        finally:
            model.train(was_training)
        replies = [c.token_ids for c in done]  # Python lists: the device has finished
        self._last_sample = (time.perf_counter() - t0, sum(map(len, replies)))
        self.timing["sample_seconds"] += self._last_sample[0]
        self.timing["sampled_tokens"] += self._last_sample[1]
        return replies

    def _scores(self, prompts: list[list[int]], replies: list[list[int]]) -> torch.Tensor:
        """The reward model's score of each conversation; one whose reply ended at ``<|end|>`` gets
        the EOS that ends every training conversation, one cut short loses ``missing_end_penalty``."""
        ctx_len = self.rm.cfg.max_seq_len
        seqs, ended = [], []
        for p, r in zip(prompts, replies, strict=True):
            s = p + r + ([self.tok.eos_id] if r and r[-1] == self.end_id else [])
            seqs.append(s[-ctx_len:])
            ended.append(self._ended(r))
        with torch.no_grad(), autocast(self.ctx.device, self.ctx.precision):
            scores = torch.tensor(score_sequences(self.rm, self.rm_head, seqs, self.tok.pad_id, batch_size=self.cfg.micro_batch))
        return scores - self.cfg.missing_end_penalty * (1.0 - torch.tensor(ended, dtype=torch.float32))

    @torch.no_grad()
    def _token_stats(self, r: Rollout, rows: list[int]) -> dict[str, torch.Tensor]:
        """Policy log-probs, entropies and values, and the reference's log-probs, of ``rows`` [B, N]."""
        dev = self.ctx.device
        b = {k: v.to(dev) for k, v in r.batch(rows, self.tok.pad_id).items()}
        with autocast(dev, self.ctx.precision):
            logits, hidden, targets = reply_logits(self.ctx.model, b, with_values=True)
            ref_logits, _, _ = reply_logits(self.ref, b, with_values=False)
            values = self.value_head(hidden).float().squeeze(-1)
        logp, ent = token_logps(logits, targets, self.cfg.temperature)
        ref_logp, _ = token_logps(ref_logits, targets, self.cfg.temperature)
        return {"logp": logp.cpu(), "ref_logp": ref_logp.cpu(), "entropy": ent.cpu(), "values": values.cpu(), "mask": b["mask"].cpu()}

    def _evaluate_replies(self, prompts: list[list[int]], seed: int) -> tuple[Rollout, dict[str, torch.Tensor], torch.Tensor]:
        """Sample replies to ``prompts``, score them and take their token statistics."""
        replies = self._sample(prompts, seed)
        r = Rollout(prompts, replies, {k: [[0.0] * len(x) for x in replies] for k in TOKEN_FIELDS}, {})
        scores = self._scores(prompts, replies)
        mb = self.cfg.micro_batch
        parts = [self._token_stats(r, list(range(k, min(k + mb, len(prompts))))) for k in range(0, len(prompts), mb)]
        n = max(len(x) for x in replies)
        stats = {k: torch.cat([F.pad(p[k], (0, n - p[k].shape[1])) for p in parts]) for k in parts[0]}
        return r, stats, scores

    def _make_rollout(self) -> Rollout:
        cfg, d = self.cfg, self.ctx.dist
        t0 = time.perf_counter()
        R = cfg.rollout_batch
        first = (self.rollouts * d.world_size + d.rank) * R
        prompts = [self.train[self.order[first + j]] for j in range(R)]
        seed = (cfg.seed * 1_000_033 + self.rollouts) * 4096 + d.rank
        r, st, scores = self._evaluate_replies(prompts, seed)
        mask = st["mask"]
        kl = kl_estimate(st["logp"], st["ref_logp"], cfg.kl_estimator) * mask
        rewards = -cfg.kl_coef * kl
        last = mask.sum(1).long() - 1
        rewards[torch.arange(R), last] += scores
        adv, returns = gae(rewards, st["values"], mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask)
        lengths = mask.sum(1)
        fields = {"old_logp": st["logp"], "old_values": st["values"] * mask, "advantages": adv, "returns": returns}
        r.token = {k: [v[i, : int(lengths[i])].tolist() for i in range(R)] for k, v in fields.items()}
        kl_sum = kl.sum(1)
        ended = torch.tensor([float(self._ended(x)) for x in r.replies])
        r.stats = {
            "objective/kl": float(kl_sum.mean()),
            "objective/scores": float(scores.mean()),
            "objective/rlhf_reward": float((scores - cfg.kl_coef * kl_sum).mean()),
            "objective/entropy": float((st["entropy"] * mask).sum(1).mean()),
            "rollout/length": float(lengths.mean()),
            "rollout/ended": float(ended.mean()),
        }
        seconds = time.perf_counter() - t0
        self.timing["rollout_seconds"] += seconds
        sample_s, sample_n = self._last_sample
        r.stats |= {"rollout/seconds": round(seconds, 4), "rollout/sample_tokens_per_s": round(sample_n / max(sample_s, 1e-9), 2)}
        self.rollouts += 1
        self.micro = 0
        return r

    # -- the objective ---------------------------------------------------------------------------
    def epochs(self) -> float:
        return self.rollouts * self.ctx.dist.world_size * self.cfg.rollout_batch / len(self.train)

    def next_batch(self) -> dict[str, torch.Tensor]:
        cfg, d = self.cfg, self.ctx.dist
        if self.rollout is None or self.micro >= self.steps_per_rollout * self.ctx.accum_steps:
            self.rollout = self._make_rollout()
        mb = cfg.micro_batch
        epoch, k = divmod(self.micro * mb, cfg.rollout_batch)
        g = torch.Generator().manual_seed(((cfg.seed * 1_000_033 + self.rollouts) * 64 + epoch) * 4096 + d.rank)
        perm = torch.randperm(cfg.rollout_batch, generator=g).tolist()
        self.micro += 1
        return self.rollout.batch(perm[k : k + mb], self.tok.pad_id)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["real_tokens"])

    def loss(self, model, batch, modules):
        logits, hidden, targets = reply_logits(model, batch, with_values=True)
        logp, _ = token_logps(logits, targets, self.cfg.temperature)
        values = modules["value_head"](hidden).float().squeeze(-1)
        pg, vf, metrics = ppo_losses(logp, values, batch, self.cfg.clip, self.cfg.clip_value)
        metrics.update({k: batch[k] for k in ROLLOUT_STATS + ROLLOUT_TIMES if k in batch})
        return pg + self.cfg.vf_coef * vf, metrics

    def evaluate(self, model, modules, full: bool) -> dict[str, float]:
        if not self.val:
            return {}
        d, cfg = self.ctx.dist, self.cfg
        mine = [self.val[i] for i in range(d.rank, len(self.val), d.world_size)]
        total = torch.zeros(5, dtype=torch.float64)  # score, kl, length, ended, replies
        if mine:
            # a fixed seed: every val pass samples with the same random numbers
            r, st, scores = self._evaluate_replies(mine, seed=cfg.seed * 4096 + 4095 - d.rank)
            kl = (kl_estimate(st["logp"], st["ref_logp"], cfg.kl_estimator) * st["mask"]).sum(1)
            ended = sum(self._ended(x) for x in r.replies)
            total += torch.tensor([float(scores.sum()), float(kl.sum()), float(st["mask"].sum()), ended, len(mine)], dtype=torch.float64)
        total = total.to(self.ctx.device)
        d.all_reduce_sum(total)
        n = float(total[4])
        score, kl_m = float(total[0]) / n, float(total[1]) / n
        return {
            "val_score": round(score, 6), "val_kl": round(kl_m, 6), "val_rlhf_reward": round(score - cfg.kl_coef * kl_m, 6),
            "val_length": round(float(total[2]) / n, 4), "val_ended": round(float(total[3]) / n, 4),
        }

    def speed(self, train_seconds: float) -> dict[str, Any]:
        """Where rank 0's training time went: making rollouts (sampling, scoring, the reference's
        log-probs) versus PPO updates, and the sampler's reply tokens/s."""
        t = self.timing
        return {
            "rollout_seconds": round(t["rollout_seconds"], 3),
            "rollout_share": round(t["rollout_seconds"] / train_seconds, 4) if train_seconds > 0 else None,
            "sample_tokens_per_s": round(t["sampled_tokens"] / t["sample_seconds"], 2) if t["sample_seconds"] > 0 else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "rollouts": self.rollouts, "micro": self.micro, "rollout": None if self.rollout is None else self.rollout.to_dict(),
            "timing": dict(self.timing),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts, self.micro = int(state["rollouts"]), int(state["micro"])
        self.rollout = None if state.get("rollout") is None else Rollout.from_dict(state["rollout"])
        self.timing.update(state.get("timing", {}))


def check_options(cfg: PPOConfig) -> None:
    if cfg.kl_estimator not in ("k1", "k3"):
        raise UsageError(f"--kl-estimator {cfg.kl_estimator}: choose k1 or k3")
    for name in ("rollout_batch", "ppo_epochs", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1")
    if cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: PPO samples its replies; give a temperature > 0")
    for name in ("kl_coef", "clip_value", "vf_coef", "missing_end_penalty"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 0")
    if cfg.clip <= 0:
        raise UsageError(f"--clip {cfg.clip}: the policy ratio's clip range must be > 0 (0 would freeze the policy)")
    if cfg.fsdp:
        raise UsageError(
            "--fsdp: ppo samples its rollouts from the policy, and replies of different lengths on each rank "
            "would leave FSDP's gathers unmatched; train ppo without --fsdp (DDP under torchrun)"
        )
    if not (0 < cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise UsageError("--gamma must be in (0, 1] and --lam in [0, 1]")


def same_tokenizer(policy_tok: Path, reward_run: Path) -> None:
    """The reward model (a reward run) must read the policy's token ids: its tokenizer file must be the same."""
    require_artifact(reward_run, ("reward",))
    theirs = Path(reward_run) / TOKENIZER
    if not theirs.is_file() or theirs.read_bytes() != Path(policy_tok).read_bytes():
        raise UsageError(
            f"{reward_run}: the reward model's tokenizer is not the policy's ({policy_tok}); train the reward model "
            "from a run with the same tokenizer (e.g. the same sft run)"
        )


def run(cfg: PPOConfig) -> dict[str, Any]:
    """Train (or resume) the policy with PPO against the reward model and publish it."""
    check_options(cfg)
    if (done := already_done(cfg, STAGE)) is not None:
        return done
    mcfg, tok_path, tok = prepare(cfg)
    same_tokenizer(tok_path, cfg.reward)
    if cfg.max_new_tokens >= int(cfg.seq_len):
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in {cfg.seq_len} tokens; use fewer")
    bad: dict[str, int] = {}
    train_p, val_p, n_records = train_val(cfg, load_prompts, split_val, bad)
    keep = int(cfg.seq_len) - cfg.max_new_tokens
    train, cut = encode_prompts(tok, train_p, keep)
    val, cut_val = encode_prompts(tok, val_p, keep)
    if not train:
        raise no_usable("prompts", cfg, bad)

    device = resolve_device(cfg.device)
    with init_distributed(device.type) as dist_ctx:
        world = dist_ctx.world_size
        global_rows, accum = cfg.batch_layout(world)
        per_rank = global_rows // world
        if cfg.rollout_batch % per_rank:
            raise UsageError(
                f"--rollout-batch {cfg.rollout_batch} is not a multiple of the {per_rank} replies each rank takes per "
                "optimizer step (--global-batch ÷ ranks); make it one"
            )
        steps_per_rollout = cfg.ppo_epochs * (cfg.rollout_batch // per_rank)
        if not cfg.max_steps and cfg.epochs > 0:
            rollouts = max(1, math.ceil(cfg.epochs * len(train) / (cfg.rollout_batch * world)))
            cfg.max_steps = rollouts * steps_per_rollout
        rm_params = ModelConfig.from_dict(read_run_config(cfg.reward)["model"]).total_params()
        check_fits(
            cfg, mcfg, device, cfg.micro_batch,
            f"the policy, its reference and the reward model ({mcfg.total_params():,} + {rm_params:,} parameters)",
            frozen_params=mcfg.total_params() + rm_params,  # the frozen reference and the reward model
        )

        objective = PPOObjective(train, val, cfg, tok, cfg.reward, mcfg.d_model)
        headline = (
            f"{len(train):,} train / {len(val):,} val prompts from {n_records:,} ({sum(bad.values()):,} records skipped, "
            f"{cut + cut_val:,} prompts cut to {keep} tokens); rollouts of {cfg.rollout_batch} × {world} replies, "
            f"{cfg.ppo_epochs} PPO epochs in batches of {global_rows} = {accum} × {cfg.micro_batch} × {world}; "
            f"{cfg.max_steps or '—'} steps"
        )
        start: dict[str, float] = {}

        def start_eval(trainer: Trainer) -> None:
            # the starting policy's val replies (the same on resume: the weights are the base's until fit)
            start.update(trainer.evaluate(full=True))
            if dist_ctx.is_main and start:
                console.print("ppo: starting val " + " ".join(f"{k} {v:.4f}" for k, v in start.items()))

        return fit_and_publish(
            cfg, STAGE, dist_ctx, mcfg, tok_path, objective, accum=accum,
            flops_per_token=mcfg.flops_per_token(int(cfg.seq_len)), headline=headline, before_fit=start_eval,
            stats=lambda result, final: {
                "train_prompts": len(train),
                "val_prompts": len(val),
                "truncated": cut + cut_val,
                "skipped": bad,
                "rollouts": objective.rollouts,
                "epochs": round(objective.epochs(), 4),
                "global_batch_rows": global_rows,
                **objective.speed(result["train_seconds"]),
                "start_val": start or None,
                "final_val": final or None,
            },
        )

"""A reward model: the transformer's final hidden state at each sequence's last real token,
projected to one number by ``score`` (d_model → 1, no bias: the head of transformers'
``LlamaForSequenceClassification`` with one label).

The score is read at the LAST NON-PAD token of each row (REFERENCE.md: a wrong pooled token is the
classic bug). Rows are right-padded, so with causal attention the padding after a row's last token
cannot change that token's hidden state, and no attention mask is needed.

A reward run (``llmctl reward``) stores the backbone as ``model.safetensors`` like every run, and
the head as ``score.safetensors`` (one tensor, ``weight`` [1, d_model]).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..artifacts import require_artifact
from ..errors import UsageError
from .io import load_model
from .transformer import Transformer

SCORE = "score.safetensors"


def score_head(d_model: int) -> nn.Linear:
    """A zero-initialised head: every score starts at 0, so the Bradley–Terry loss starts at ln 2."""
    head = nn.Linear(d_model, 1, bias=False)
    nn.init.zeros_(head.weight)
    return head


def pool_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, d] at each row's last real position (``lengths - 1``) → [B, d]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


def rewards(model: nn.Module, head: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scalar rewards [B] in fp32 of right-padded rows ``ids`` [B, T] with ``lengths`` [B].
    ``model`` is called for its hidden states (``return_hidden``), so a DDP or compiled wrapper works."""
    h = model(ids, return_hidden=True)
    return head(pool_last(h, lengths)).float().squeeze(-1)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] right-padded with ``pad_id``, lengths [B])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids, lengths


def load_reward_model(run: Path, device: str | torch.device = "cpu") -> tuple[Transformer, nn.Linear, dict[str, Any]]:
    """The backbone (eval mode, fp32, frozen), its score head and the run config of a finished
    ``llmctl reward`` run."""
    run = Path(run)
    require_artifact(run, ("reward",))
    model, config = load_model(run, device)
    path = run / SCORE
    if not path.is_file():
        raise UsageError(f"{run}: no {SCORE}; pass a finished llmctl reward run")
    head = score_head(model.cfg.d_model)
    state = load_file(str(path))
    if set(state) != {"weight"} or tuple(state["weight"].shape) != (1, model.cfg.d_model):
        raise UsageError(f"{path}: not a score head for this model (want one 'weight' of shape [1, {model.cfg.d_model}])")
    head.load_state_dict(state)
    for m in (model, head):
        m.to(device).eval().requires_grad_(False)
    return model, head, config


@torch.no_grad()
def score_sequences(model: Transformer, head: nn.Linear, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The reward of each token sequence (scored in batches of similar length)."""
    device = model.embed_tokens.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        ids, lengths = pad_right([seqs[i] for i in chunk], pad_id)
        for i, r in zip(chunk, rewards(model, head, ids.to(device), lengths.to(device)).tolist(), strict=True):
            out[i] = r
    return out


"""Model configuration, named presets, and the parameter and FLOP arithmetic the lecture uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import UsageError


@dataclass
class ModelConfig:
    """A decoder-only transformer in the Llama/Qwen family.

    Pre-norm RMSNorm, rotary position embeddings (half-split convention, as transformers' Llama),
    SwiGLU MLP, no biases, optional per-head QK RMSNorm (as Qwen3), grouped-query attention when
    ``n_kv_head < n_head``, tied or untied input/output embeddings.
    """

    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 → same as n_head (plain multi-head attention)
    d_model: int = 256
    ffn_hidden: int = 0  # 0 → SwiGLU's 8/3·d rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.ffn_hidden == 0:
            self.ffn_hidden = 64 * -(-int(8 * self.d_model / 3) // 64)
        if self.d_model % self.n_head:
            raise UsageError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}; pick dims that divide")
        if self.n_head % self.n_kv_head:
            raise UsageError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise UsageError(f"head dim {self.d_model // self.n_head} must be even for RoPE; change d_model or n_head")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"model {name} must be ≥ 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # -- arithmetic ----------------------------------------------------------------------------
    def params_per_layer(self) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_head * hd) + 2 * d * (self.n_kv_head * hd) + (self.n_head * hd) * d
        mlp = 3 * d * self.ffn_hidden
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        return attn + mlp + norms

    def non_embedding_params(self) -> int:
        """N in the scaling laws: every parameter except the token embedding and output head."""
        return self.n_layer * self.params_per_layer() + self.d_model  # + final norm

    def total_params(self) -> int:
        emb = self.vocab_size * self.d_model
        return self.non_embedding_params() + emb * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (matmul params incl. the output head) + attention 12·L·d·T."""
        t = seq_len or self.max_seq_len
        n_matmul = self.non_embedding_params() + self.vocab_size * self.d_model
        return 6.0 * n_matmul + 12.0 * self.n_layer * self.d_model * t

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"model config has unknown keys {sorted(unknown)}; written by a newer llmctl?")
        return cls(**d)


#: Named sizes. "nano"… are for CPU experiments; "gpt2-small" is the 124M-class shape for GPUs.
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(n_layer=2, n_head=2, d_model=64, max_seq_len=128),
    "micro": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=256),
    "tiny": dict(n_layer=6, n_head=6, d_model=192, max_seq_len=256),
    "small": dict(n_layer=8, n_head=8, d_model=384, max_seq_len=512),
    "base": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, tie_embeddings=True),
}


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    merged = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**merged)

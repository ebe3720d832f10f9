"""The decoder-only transformer: the whole model on one screen.

Layout and parameter names follow transformers' Llama/Qwen3 closely enough that export is a
renaming (see ``model/hf.py``): q/k/v/o projections without biases, RoPE in the half-split
convention, SwiGLU MLP (gate, up, down), RMSNorm before attention and MLP and at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (stable under bf16 autocast), scaled by ``weight``, in x's dtype: the one
    formula of :class:`RMSNorm` and of eval's rearranged scoring passes."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (stable under bf16 autocast), scaled by a weight.

    One fused ``F.rms_norm`` kernel instead of five elementwise ops: at small widths the norms'
    dispatch and autograd overhead, not their arithmetic, is what costs.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin of shape [max_len, head_dim] for the half-split rotary convention.

    The sin table carries the rotation's sign (−sin on the first half, +sin on the second), so
    ``apply_rope`` is one roll and two multiplies instead of slices, a negation and a concatenation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)]).double()
    return emb.cos().float(), (emb.sin() * sign).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by the tables of ``rope_tables`` (``sin`` signed).

    x·cos + rotate_half(x)·sin with rotate_half(x) = [−x2, x1] = roll(x, d/2)·[−1…, +1…].
    cos/sin broadcast against x (e.g. [1, 1, T, d] for [B, H, T, d]).
    """
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len``."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0  # number of positions filled (same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """A new cache holding batch rows ``index`` of this one (rows may repeat), same fill."""
        out = KVCache.__new__(KVCache)
        out.k = [k.index_select(0, index) for k in self.k]
        out.v = [v.index_select(0, index) for v in self.v]
        out.max_len, out.pos = self.max_len, self.pos
        return out


#: the longest context at which CPU training attends in fp32 under bf16/fp16 autocast (see below)
CPU_FP32_ATTENTION_MAX_LEN = 256


def _fp32_attention(q: torch.Tensor) -> bool:
    """Whether attention over ``q`` should run in fp32 although autocast made it 16-bit.

    torch's CPU flash-attention backward in bf16 is 2.5-4x slower than in fp32 at short contexts
    (torch 2.13 on an AVX-512-BF16 CPU, fwd+bwd of [12, 4, 64, 32]: 4.0 vs 1.1 ms; at 128: 5.9 vs
    2.3 ms; at 256: 10.4 vs 7.8 ms; the same with sft's packing masks; fp16 is worse still: 8.3 vs
    1.8 ms at 64), while from 512 on bf16 is as fast or faster (at 1024: 92 vs 116 ms). So CPU training at contexts up to
    ``CPU_FP32_ATTENTION_MAX_LEN`` attends in fp32: the upcast costs less than the slow kernel, and
    fp32 is the more precise choice anyway. Inference and CUDA keep the 16-bit kernels, which are
    not slower there.
    """
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-2] <= CPU_FP32_ATTENTION_MAX_LEN
        and torch.is_grad_enabled()
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in fp32 where :func:`_fp32_attention` says so."""
    if _fp32_attention(q):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kw)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
        start: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # one matmul for q, k and v (the weights stay separate parameters, as in Llama/Qwen)
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv = F.linear(x, w).view(B, T, H + 2 * KV, hd)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [., T, 1, hd]: heads are dim 2 here
        if self.q_norm is None:  # q and k are adjacent: rotate both in one pass
            q, k = apply_rope(qkv[:, :, : H + KV], cos, sin).transpose(1, 2).split([H, KV], dim=1)
        else:
            q = apply_rope(self.q_norm(qkv[:, :, :H]), cos, sin).transpose(1, 2)
            k = apply_rope(self.k_norm(qkv[:, :, H : H + KV]), cos, sin).transpose(1, 2)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)
        gqa = cfg.n_kv_head != cfg.n_head
        if attn_mask is None and k.shape[2] == T:
            y = _attend(q, k, v, is_causal=True, enable_gqa=gqa)
        elif attn_mask is None and T == 1:  # one new token attends to every cached key: no mask
            y = _attend(q, k, v, enable_gqa=gqa)
        else:
            if attn_mask is None:  # decoding with a cache: queries sit at the end of the keys
                S = k.shape[2]
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = _attend(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one matmul for gate and up (separate parameters, as in Llama/Qwen)
        gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token ids [B, T] → logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, 0.02), residual output projections scaled by 1/√(2·layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states [B, T, d] (used by the LM head and by reward/value heads).

        ``position_ids`` [B, T] restart positions (packed sequences); ``attn_mask`` is a boolean
        [B, 1, T, S] or [T, S] mask, True where attention is allowed; with a ``cache`` the tokens
        are appended at ``cache.pos`` and the cache advances.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if position_ids is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos = self.rope_cos[start : start + T][None, None]
            sin = self.rope_sin[start : start + T][None, None]
        else:
            cos = self.rope_cos[position_ids][:, None]
            sin = self.rope_sin[position_ids][:, None]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, start)
        if cache is not None:
            cache.pos = start + T
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        with_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, vocab]; with ``return_hidden`` the final normalised hidden states [B, T, d]
        instead, with ``with_hidden`` both (logits, hidden) (for reward and value heads: going
        through ``forward`` keeps DDP's gradient synchronisation and torch.compile in the path,
        which calling ``hidden`` directly would skip)."""
        h = self.hidden(idx, position_ids=position_ids, attn_mask=attn_mask, cache=cache)
        if return_hidden:
            return h
        logits = F.linear(h, self.output_weight())
        return (logits, h) if with_hidden else logits

    def rope_rotation(self) -> torch.Tensor:
        """The rotary angles as unit complex numbers [max_len, head_dim/2], e^(i·t·f_j): the rotation
        of the pair (j, j + head_dim/2) at position t (the half-split convention's pairs)."""
        half = self.cfg.head_dim // 2
        # both tables repeat the angles in their two halves; sin's second half is +sin (the first
        # half carries the rotate-half sign, see rope_tables)
        return torch.complex(self.rope_cos[:, half:], self.rope_sin[:, half:])

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, p.device, p.dtype)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32; targets of -100 are ignored (prompt and padding)."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction
    )

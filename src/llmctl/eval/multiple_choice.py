"""Log-likelihood scoring of continuations, batched, with each shared context computed once.

A request is ``(context ids, [continuation ids, …])``: one context and the continuations that
share it (the choices of one question, or a single continuation). Several requests are scored
together, in batches:

- when every continuation of a request is ONE token (MMLU's " A".." D", most letter-answer
  tasks), its context is run once and the log-probabilities of all the choices are read from the
  logits at its last position: one forward pass per question, no second pass. Contexts that begin
  with the same tokens (a task's header, shared few-shot examples) share that prefix: it runs once
  per group and its keys and values serve every member (:func:`prefix_groups`,
  :func:`forward_rows`). These passes are unpadded (tokens end to end, attention row by row).
- otherwise (batches of similar length, so padding is small) the contexts are left-padded and
  run once, filling a KV cache; the cache rows are then repeated once per continuation and every
  continuation of every request is run in a second batch. Positions restart at each row's first
  real token and a boolean mask hides the padding.

Either way a request's scores do not depend on its batch (checked against one-by-one, uncached
scoring in the tests).

The context/continuation split follows lm-eval-harness: trailing spaces move from the context to
the continuation, ``context + continuation`` is tokenised as a whole and the continuation is the
tokens after ``len(tokenise(context))``; an empty context becomes the BOS token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..model.transformer import RMSNorm, Transformer, rms_norm
from ..tokenizer import Tokenizer


@dataclass
class Request:
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    loglik: float  # summed log-probability of the continuation's tokens
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


def encode_many(tok, texts: Sequence[str]) -> list[list[int]]:
    """``[tok.encode(t) for t in texts]`` in one call where the tokenizer has a batch API
    (sentencepiece takes a list; ``tokenizers`` has ``encode_batch``); the same ids either way."""
    texts = list(texts)
    if isinstance(tok, Tokenizer):  # sentencepiece takes the whole list in one call
        return tok.encode(texts)
    inner = getattr(tok, "tok", None)
    if type(tok).__name__ == "HFTokenizer" and hasattr(inner, "encode_batch"):
        return [e.ids for e in inner.encode_batch(texts, add_special_tokens=False)]
    return [tok.encode(t) for t in texts]


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def split_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval-harness computes them."""
    context, continuation = _move_spaces(context, continuation)
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


def context_ids(tok, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The shared context ids of one question and each choice's continuation ids.

    With a context that is empty (or only spaces) the context is the BOS token, as in lm-eval.
    """
    return many_context_ids(tok, [(context, continuations)])[0]


def many_context_ids(
    tok, questions: Sequence[tuple[str, Sequence[str]]]
) -> list[tuple[list[int], list[list[int]]]]:
    """:func:`context_ids` of many questions with all their texts tokenised in one batch call."""
    texts: list[str] = []
    for context, conts in questions:
        pairs = [_move_spaces(context, c) for c in conts]
        texts.append(pairs[0][0] if pairs else context.rstrip())
        texts += [a + b for a, b in pairs]
    ids = encode_many(tok, texts)
    out, k = [], 0
    for _, conts in questions:
        ctx = ids[k]
        wholes = ids[k + 1 : k + 1 + len(conts)]
        k += 1 + len(conts)
        out.append((ctx or [tok.bos_id], [w[len(ctx) :] for w in wholes]))
    return out


def request_length(r: Request) -> int:
    """Tokens the model must see at once: the context and all but the last continuation token."""
    return len(r.context) + max(len(c) for c in r.continuations) - 1


def _mask(pad: torch.Tensor, q_start: int, q_len: int, k_len: int) -> torch.Tensor:
    """[B, 1, q_len, k_len]: key j is visible to query i if it is real (j ≥ pad) and not later than
    i; every query also sees itself, so padding rows never attend to nothing (no NaN)."""
    q = torch.arange(q_start, q_start + q_len, device=pad.device)[:, None]
    k = torch.arange(k_len, device=pad.device)[None, :]
    causal = k <= q
    real = k[None] >= pad[:, None, None]
    return ((causal[None] & real) | (k == q)[None])[:, None]


def one_token(r: Request) -> bool:
    return all(len(c) == 1 for c in r.continuations)


@torch.inference_mode()
def score_batch(model: Transformer, requests: Sequence[Request]) -> list[list[Score]]:
    """Scores of every continuation of every request, in order."""
    if all(one_token(r) for r in requests):
        return _score_one_token(model, requests)
    if all(len(r.continuations) == 1 for r in requests):
        return _score_whole_sequences(model, requests)
    dev = model.embed_tokens.weight.device
    W = model.output_weight()
    B = len(requests)
    lc = max(len(r.context) for r in requests)
    conts = [c for r in requests for c in r.continuations]
    owner = torch.tensor([i for i, r in enumerate(requests) for _ in r.continuations], device=dev)
    lt = max(len(c) for c in conts)
    pad = torch.tensor([lc - len(r.context) for r in requests], device=dev)

    ctx = torch.zeros(B, lc, dtype=torch.long, device=dev)
    for i, r in enumerate(requests):
        ctx[i, lc - len(r.context) :] = torch.tensor(r.context, device=dev)
    pos = (torch.arange(lc, device=dev)[None] - pad[:, None]).clamp_min(0)
    cache = model.new_cache(B, lc + lt - 1)
    h = model.hidden(ctx, position_ids=pos, attn_mask=_mask(pad, 0, lc, lc), cache=cache)
    first = F.linear(h[:, -1], W).float().log_softmax(-1)[owner]  # [R, V] predicts token 0

    R = len(conts)
    lp_rest = greedy_rest = None
    tgt = torch.zeros(R, lt, dtype=torch.long, device=dev)
    for j, c in enumerate(conts):
        tgt[j, : len(c)] = torch.tensor(c, device=dev)
    if lt > 1:
        rows = cache.select_rows(owner)
        rpad = pad[owner]
        inp = tgt[:, :-1]
        # padding after a short continuation may run past the context: clamp (never scored)
        pos2 = (torch.arange(lc, lc + lt - 1, device=dev)[None] - rpad[:, None]).clamp_max(model.cfg.max_seq_len - 1)
        h2 = model.hidden(inp, position_ids=pos2, attn_mask=_mask(rpad, lc, lt - 1, lc + lt - 1), cache=rows)
        logp = F.linear(h2, W).float().log_softmax(-1)  # [R, lt-1, V] predicts tokens 1..
        lp_rest = logp.gather(-1, tgt[:, 1:, None])[..., 0]
        greedy_rest = logp.argmax(-1) == tgt[:, 1:]
    lp0 = first.gather(-1, tgt[:, :1])[:, 0]
    g0 = first.argmax(-1) == tgt[:, 0]

    out: list[list[Score]] = [[] for _ in requests]
    for j, c in enumerate(conts):
        n = len(c)
        ll = float(lp0[j])
        g = bool(g0[j])
        if n > 1:
            ll += float(lp_rest[j, : n - 1].double().sum())
            g = g and bool(greedy_rest[j, : n - 1].all())
        out[int(owner[j])].append(Score(ll, g, n))
    return out


class _Layer(NamedTuple):
    ln1: RMSNorm
    wqkv: torch.Tensor  # q, k, v projections stacked; q and k rows in interleaved RoPE order
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    q_norm_w: torch.Tensor | None
    k_norm_w: torch.Tensor | None
    wo: torch.Tensor
    ln2: RMSNorm
    wgu: torch.Tensor  # gate and up projections stacked
    wd: torch.Tensor


class FastModel:
    """A :class:`Transformer`'s weights arranged for scoring passes (same function, fewer ops).

    - q, k and v are one matrix product, gate and up another;
    - q and k come out with each head's dimensions interleaved (``i, i + hd/2`` side by side):
      the half-split rotation is then one complex multiplication, and a dot product of two
      vectors permuted alike is unchanged, so attention is the model's own;
    """

    def __init__(self, model: Transformer) -> None:
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        hd = cfg.head_dim
        half = hd // 2
        perm = torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()

        def heads(w: torch.Tensor, n: int) -> torch.Tensor:
            return w.view(n, hd, -1)[:, perm].reshape(n * hd, -1)

        self.layers: list[_Layer] = []
        with torch.no_grad():
            for blk in model.layers:
                att, mlp = blk.self_attn, blk.mlp
                self.layers.append(_Layer(
                    blk.input_layernorm,
                    torch.cat([heads(att.q_proj.weight, cfg.n_head), heads(att.k_proj.weight, cfg.n_kv_head),
                               att.v_proj.weight]),
                    att.q_norm, att.k_norm,
                    None if att.q_norm is None else att.q_norm.weight[perm],
                    None if att.k_norm is None else att.k_norm.weight[perm],
                    att.o_proj.weight, blk.post_attention_layernorm,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight))
            self.rot = model.rope_rotation()  # [max_len, hd/2] complex

    @staticmethod
    def norm(x: torch.Tensor, mod: RMSNorm, weight: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, mod.weight if weight is None else weight, mod.eps)

    @staticmethod
    def rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x [N, heads, hd] (interleaved pairs) rotated by rot [N, 1, hd/2] (complex)."""
        c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(c * rot).flatten(-2).to(x.dtype)


class PrefixKV:
    """Keys and values (after RoPE) of shared context prefixes, every layer: ``k[layer]`` is
    [tokens, kv_heads, hd], the prefixes laid end to end; ``at[g]`` is where prefix g starts."""

    def __init__(self, n_layer: int) -> None:
        self.k: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]
        self.at: list[int] = []
        self.size = 0

    def add(self, seqs: Sequence[Sequence[int]], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for n in map(len, seqs):
            self.at.append(self.size)
            self.size += n
        for layer, (k, v) in enumerate(kv):
            self.k[layer].append(k)
            self.v[layer].append(v)

    def freeze(self) -> None:
        self.k = [[torch.cat(k)] if len(k) > 1 else k for k in self.k]
        self.v = [[torch.cat(v)] if len(v) > 1 else v for v in self.v]


def prefix_groups(contexts: Sequence[Sequence[int]], min_shared: int = 8) -> list[tuple[int, list[int]]]:
    """Contexts grouped by a shared leading run of token ids: ``(p, members)``, where the first
    ``p`` ids are the same in every member's context and ``p`` is shorter than each of them (the
    last token of a context is always its own), or ``p = 0`` for a context that shares nothing
    worth computing once (fewer than ``min_shared`` tokens).

    Contexts are sorted by their ids, so ones with a common prefix are neighbours; a neighbour
    joins the current group while it shares at least ``min_shared`` tokens with it and the tokens
    saved (``p × (members − 1)``) do not drop. Working on ids, not text, a prefix is always a
    true token prefix of every member (the text's tokenisation is never split differently).
    """
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    groups: list[tuple[int, list[int]]] = []
    cur: list[int] = []
    p = 0
    for i in order:
        c = contexts[i]
        if cur:
            first = contexts[cur[0]]
            cap = min(p, len(c) - 1)
            n = 0
            while n < cap and first[n] == c[n]:
                n += 1
            if n >= min_shared and n * len(cur) >= p * (len(cur) - 1):
                cur.append(i)
                p = n
                continue
            groups.append((p if len(cur) > 1 else 0, cur))
        cur, p = [i], len(c) - 1
    if cur:
        groups.append((p if len(cur) > 1 else 0, cur))
    return groups


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of one row: q [H, s, hd], k and v [KV, L, hd], ``mask`` [s, L] added to
    the scores (0 or −inf) → [H, s, hd]. Query head h reads key/value head h // (H / KV), as
    ``scaled_dot_product_attention(enable_gqa=True)``; plain batched matrix products, which on CPU
    beat its fused kernel at these sizes (head dims of 64 and rows of tens to hundreds of tokens).
    """
    H, s, hd = q.shape
    KV = k.shape[0]
    qg = q.reshape(KV, H // KV * s, hd)  # the query heads that share a key head, stacked
    scale = 1.0 / math.sqrt(hd)
    if mask is None:
        sc = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)
    else:
        sc = torch.baddbmm(mask.repeat(H // KV, 1) if H != KV else mask, qg, k.transpose(1, 2), alpha=scale)
    return torch.bmm(sc.softmax(-1), v).view(H, s, hd)


def forward_rows(
    fm: FastModel,
    seqs: Sequence[Sequence[int]],
    past: Sequence[tuple[int, int]] | None = None,
    store: PrefixKV | None = None,
    record: bool = False,
) -> torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over rows of tokens, each optionally continuing a cached prefix.

    ``seqs[i]`` are row i's tokens; ``past[i] = (g, p)`` says they follow the ``p`` tokens of
    prefix ``g`` in ``store`` (``p = 0``: nothing before them). Returns the final hidden state
    [B, d] at each row's last token, or with ``record`` the keys and values of every layer for
    every token ([N, kv_heads, hd] each, rows end to end, as :class:`PrefixKV` stores them).

    Nothing is padded: norms, projections, RoPE and MLPs run on the real tokens laid end to end
    ([N, d]) and attention runs row by row on views of them (a row's keys are its prefix's, then
    its own; query j of a row with a prefix of p sees keys up to p + j), in blocks of
    ``ATTN_BLOCK`` queries that skip the keys after their last query. The first block's q, k, v
    are computed once per distinct token id. In the last block only keys and values are computed
    for every token; query, attention and MLP run at the one position read.
    """
    model, cfg = fm.model, fm.cfg
    dev = model.embed_tokens.weight.device
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    B = len(seqs)
    lens_l = [len(s) for s in seqs]
    past_l = [p for _, p in past] if past else [0] * B
    starts = [0]
    for n in lens_l:
        starts.append(starts[-1] + n)
    pos = torch.cat([torch.arange(p, p + n) for p, n in zip(past_l, lens_l, strict=True)])
    ends = torch.tensor(starts[1:], device=dev) - 1
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    rot = fm.rot[pos.to(dev)][:, None]  # [N, 1, hd/2]
    N = len(ids)
    with_past = any(past_l)
    kstart = starts  # where each row's keys begin among all rows' keys
    if with_past:  # each row's keys are its prefix's then its own: gathered once per layer
        assert store is not None and past is not None
        kstart = [0]
        for p, n in zip(past_l, lens_l, strict=True):
            kstart.append(kstart[-1] + p + n)
        own = torch.cat([torch.arange(kstart[r] + past_l[r], kstart[r + 1]) for r in range(B)]).to(dev)
        pre_at = torch.cat([torch.arange(kstart[r], kstart[r] + past_l[r]) for r in range(B)]).to(dev)
        pre_src = torch.cat([torch.arange(store.at[g], store.at[g] + p) if p else torch.arange(0) for g, p in past]).to(dev)
    # one additive causal mask for every row: rows with a prefix of p take columns P - p onwards
    P = max(past_l)
    Ls = max(lens_l)
    keep = torch.ones(Ls, P + Ls, dtype=torch.bool, device=dev).tril(P)
    mask = torch.zeros(keep.shape, dtype=model.embed_tokens.weight.dtype, device=dev).masked_fill_(~keep, float("-inf"))
    x = model.embed_tokens(ids)  # [N, d]
    uniq, inv = torch.unique(ids, return_inverse=True)
    recorded = []
    n_layer = len(fm.layers)
    for i, L in enumerate(fm.layers):
        last = i == n_layer - 1
        if i == 0 and len(uniq) < 0.8 * N:  # the first q, k, v depend on the token id alone
            qkv = F.linear(fm.norm(model.embed_tokens(uniq), L.ln1), L.wqkv)[inv]
        else:
            qkv = F.linear(fm.norm(x, L.ln1), L.wqkv)
        q = qkv[:, : H * hd].view(N, H, hd)
        k = qkv[:, H * hd : (H + KV) * hd].view(N, KV, hd)
        v = qkv[:, (H + KV) * hd :].view(N, KV, hd)
        if last and not record:
            q = q[ends]
        if L.q_norm is not None:
            q, k = fm.norm(q, L.q_norm, L.q_norm_w), fm.norm(k, L.k_norm, L.k_norm_w)
        k = fm.rope(k, rot)
        if record:
            recorded.append((k, v.contiguous()))
            if last:
                return recorded
        q = fm.rope(q, rot[ends] if last else rot)
        if with_past:
            K, V = k.new_empty(kstart[-1], KV, hd), v.new_empty(kstart[-1], KV, hd)
            K[own], V[own] = k, v
            K[pre_at], V[pre_at] = store.k[i][0][pre_src], store.v[i][0][pre_src]
            k, v = K, V
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [KV, keys, hd]
        if last:
            y = q.new_empty(B, H, hd)
        else:
            y = q.new_empty(N, H, hd)
            qt = q.transpose(0, 1)
            yt = y.transpose(0, 1)  # [H, N, hd] view
        for r in range(B):
            a, b, p = starts[r], starts[r + 1], past_l[r]
            K, V = kt[:, kstart[r] : kstart[r + 1]], vt[:, kstart[r] : kstart[r + 1]]
            if last:
                y[r] = _attend(q[r][:, None], K, V, None)[:, 0]
            else:  # query blocks see keys up to their last query only (causal: ~half the work on long rows)
                for j0 in range(0, b - a, ATTN_BLOCK):
                    j1 = min(b - a, j0 + ATTN_BLOCK)
                    yt[:, a + j0 : a + j1] = _attend(qt[:, a + j0 : a + j1], K[:, : p + j1], V[:, : p + j1],
                                                     mask[j0:j1, P - p : P + j1])
        if last:
            x = x[ends] + F.linear(y.view(B, H * hd), L.wo)
        else:
            x = x + F.linear(y.view(N, H * hd), L.wo)
        gu = F.linear(fm.norm(x, L.ln2), L.wgu)
        f = gu.shape[-1] // 2
        x = x + F.linear(F.silu(gu[:, :f]) * gu[:, f:], L.wd)
    return model.norm(x)


def _score_whole_sequences(model: Transformer, requests: Sequence[Request]) -> list[list[Score]]:
    """Requests with one continuation each (rolling perplexity windows, LAMBADA's last word).

    Nothing is shared between continuations, so each request is one causal pass over context +
    continuation, right-padded: padding sits after every real token, so causal attention never
    lets a real position see it, and positions start at 0 without a mask or a cache.
    """
    dev = model.embed_tokens.weight.device
    seqs = [r.context + r.continuations[0] for r in requests]
    width = max(len(q) for q in seqs) - 1  # the last token is only ever a target
    x = torch.zeros(len(seqs), width, dtype=torch.long, device=dev)
    for i, q in enumerate(seqs):
        x[i, : len(q) - 1] = torch.tensor(q[:-1], device=dev)
    h = model.hidden(x)
    W = model.output_weight()
    out: list[list[Score]] = []
    for i, r in enumerate(requests):
        cont = r.continuations[0]
        start = len(r.context) - 1
        logp = F.linear(h[i, start : start + len(cont)], W).float().log_softmax(-1)
        tgt = torch.tensor(cont, device=dev)
        ll = float(logp.gather(-1, tgt[:, None])[:, 0].double().sum())
        out.append([Score(ll, bool((logp.argmax(-1) == tgt).all()), len(cont))])
    return out


#: tokens per one-token scoring pass at most: unpadded activations of a batch this size stay in
#: the CPU's caches (on the 2-core bench machine, 1024-2048 run ~20% faster than 16384)
ONE_TOKEN_BATCH = 2048

#: queries per attention block in one-token passes (a block's scores are computed in full; blocks
#: skip the keys after their last query)
ATTN_BLOCK = 128

#: elements of cached prefix keys and values held at once (128 MiB in fp32); more prefixes are
#: handled in rounds
PREFIX_STORE_ELEMENTS = 1 << 25


def _batches(sizes: Sequence[int], max_tokens: float, max_rows: int) -> list[list[int]]:
    """Indices longest first, cut where a batch's tokens would pass ``max_tokens`` or its rows
    ``max_rows`` (a longer row alone makes a batch of its own)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    out: list[list[int]] = []
    held = 0
    for i in order:
        if out and len(out[-1]) < max_rows and held + sizes[i] <= max_tokens:
            out[-1].append(i)
            held += sizes[i]
        else:
            out.append([i])
            held = sizes[i]
    return out


def _score_one_token(
    model: Transformer,
    requests: Sequence[Request],
    max_batch_tokens: float = float("inf"),
    max_batch_rows: int = 1 << 30,
    on_done: Callable[[int], None] | None = None,
    min_shared: int = 8,
) -> list[list[Score]]:
    """Every continuation is one token: one pass over each context, the choices'
    log-probabilities read from its last position (no cache, no second pass).

    Contexts that begin with the same tokens (a task's header, few-shot examples) share them:
    the shared prefix of each group (:func:`prefix_groups`) runs once, its keys and values are
    kept, and each context's remaining tokens run attending to them.
    """
    fm = FastModel(model)
    cfg = model.cfg
    W = model.output_weight()
    contexts = [r.context for r in requests]
    groups = prefix_groups(contexts, min_shared)
    budget = max(1, PREFIX_STORE_ELEMENTS // (2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim))
    out: list[list[Score]] = [[] for _ in requests]
    k = 0
    while k < len(groups):  # rounds of groups whose prefixes fit the store
        part, held = [groups[k]], groups[k][0]
        k += 1
        while k < len(groups) and held + groups[k][0] <= budget:
            part.append(groups[k])
            held += groups[k][0]
            k += 1
        store = PrefixKV(cfg.n_layer)
        shared = [(p, m) for p, m in part if p]
        pre = [contexts[m[0]][:p] for p, m in shared]
        slot = [0] * len(shared)  # shared group → its index in the store
        for batch in _batches([len(s) for s in pre], max_batch_tokens, max_batch_rows):
            for b in batch:
                slot[b] = len(store.at) + batch.index(b)
            store.add([pre[b] for b in batch], forward_rows(fm, [pre[b] for b in batch], record=True))  # type: ignore[arg-type]
        store.freeze()
        past = {}  # request → (store index, prefix length)
        for g, (p, members) in enumerate(shared):
            for i in members:
                past[i] = (slot[g], p)
        todo = [i for _, m in part for i in m]
        for batch in _batches([len(contexts[i]) - past.get(i, (0, 0))[1] for i in todo], max_batch_tokens,
                              max_batch_rows):
            idx = [todo[b] for b in batch]
            pasts = [past.get(i, (0, 0)) for i in idx]
            last = forward_rows(fm, [contexts[i][p:] for i, (_, p) in zip(idx, pasts, strict=True)], pasts, store)
            logp = F.linear(last, W).float().log_softmax(-1)  # [B, V]
            best = logp.argmax(-1).tolist()
            owner = [b for b, i in enumerate(idx) for _ in requests[i].continuations]
            tgt = [c[0] for i in idx for c in requests[i].continuations]
            lp = logp[owner, tgt].tolist()
            for b, t, ll in zip(owner, tgt, lp, strict=True):
                out[idx[b]].append(Score(ll, best[b] == t, 1))
            if on_done:
                on_done(len(idx))
    return out


def score_requests(
    model: Transformer,
    requests: Sequence[Request],
    max_batch_tokens: int = 16384,
    max_batch_rows: int = 128,
    on_done: Callable[[int], None] | None = None,
) -> list[list[Score]]:
    """Score all requests in batches of similar length (longest first); results in input order.

    Every request must fit the model's context (``request_length ≤ max_seq_len``); callers skip
    the ones that do not, counting them.
    """
    ctx_len = model.cfg.max_seq_len
    for r in requests:
        if not r.context or not r.continuations or not all(r.continuations):
            raise ValueError("a request needs a context and non-empty continuations")
        if request_length(r) > ctx_len:
            raise ValueError(f"request of {request_length(r)} tokens exceeds the context {ctx_len}")
    results: list[list[Score] | None] = [None] * len(requests)
    # one-token requests first: they share context prefixes and need no cache
    single = [i for i, r in enumerate(requests) if one_token(r)]
    if single:
        with torch.inference_mode():
            scores = _score_one_token(model, [requests[i] for i in single], min(max_batch_tokens, ONE_TOKEN_BATCH),
                                      max_batch_rows, on_done)
        for i, s in zip(single, scores, strict=True):
            results[i] = s
    order = sorted((i for i, r in enumerate(requests) if not one_token(r)), key=lambda i: -request_length(requests[i]))
    b = 0
    while b < len(order):
        # cost ≈ contexts × width (each context once) + continuations; rows bounds the cache copies
        chunk = [order[b]]
        width = request_length(requests[order[b]])  # the longest in this chunk
        rows = len(requests[order[b]].continuations)
        while b + len(chunk) < len(order):
            nrows = len(requests[order[b + len(chunk)]].continuations)
            if (len(chunk) + 1) * width > max_batch_tokens or rows + nrows > max_batch_rows:
                break
            chunk.append(order[b + len(chunk)])
            rows += nrows
        for i, s in zip(chunk, score_batch(model, [requests[i] for i in chunk]), strict=True):
            results[i] = s
        b += len(chunk)
        if on_done:
            on_done(len(chunk))
    return results  # type: ignore[return-value]


def reference_score(model: Transformer, context: list[int], continuation: list[int]) -> Score:
    """One continuation scored by a plain, uncached forward pass (what the batched path must equal)."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.inference_mode():
        logp = model(ids)[0, len(context) - 1 :].float().log_softmax(-1)
    tgt = torch.tensor(continuation)
    ll = float(logp.gather(-1, tgt[:, None]).double().sum())
    return Score(ll, bool((logp.argmax(-1) == tgt).all()), len(continuation))

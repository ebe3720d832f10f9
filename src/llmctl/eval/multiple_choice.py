"""Log-likelihood scoring of continuations, batched, with each shared context computed once.

A request is ``(context ids, [continuation ids, …])``: one context and the continuations that
share it (the choices of one question, or a single continuation). Several requests are scored
together, in batches of similar length (sorted, so padding is small):

- when every continuation of every request in the batch is ONE token (MMLU's " A".." D", most
  letter-answer tasks), the contexts are run once (unpadded except inside attention, see
  :func:`last_hidden`) and the log-probabilities of all the choices are read from the logits at
  each context's last position. One forward pass per question, no cache, no second pass.
- otherwise the contexts are left-padded and run once, filling a KV cache; the cache rows are then
  repeated once per continuation and every continuation of every request is run in a second
  batch. Positions restart at each row's first real token and a boolean mask hides the padding.

Either way a request's scores do not depend on its batch (checked against one-by-one, uncached
scoring in the tests).

The context/continuation split follows lm-eval-harness: trailing spaces move from the context to
the continuation, ``context + continuation`` is tokenised as a whole and the continuation is the
tokens after ``len(tokenise(context))``; an empty context becomes the BOS token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.transformer import KVCache, Transformer, apply_rope
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
        rows = KVCache.__new__(KVCache)
        rows.k = [k.index_select(0, owner) for k in cache.k]
        rows.v = [v.index_select(0, owner) for v in cache.v]
        rows.max_len, rows.pos = cache.max_len, cache.pos
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


def last_hidden(model: Transformer, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Final hidden state [B, d] at the last token of each context; equal to
    ``model.hidden([ctx])[0, -1]`` for each, computed with less work:

    - unpadded: norms, projections, RoPE and MLPs run on the real tokens only, laid end to end
      ([N, d]); only attention sees a padded [B, H, L, hd] layout (causal, so a row's padding,
      which comes after its tokens, is never attended to);
    - the last block computes keys and values for every token but its query, attention output
      and MLP only at the one position that is read.
    """
    dev = model.embed_tokens.weight.device
    cfg = model.cfg
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    B, L = len(contexts), max(len(c) for c in contexts)
    lens = torch.tensor([len(c) for c in contexts])
    pos = torch.cat([torch.arange(n) for n in lens.tolist()]).to(dev)  # [N] position of each token
    slot = (torch.repeat_interleave(torch.arange(B), lens) * L).to(dev) + pos  # [N] place in [B*L]
    ends = (torch.cumsum(lens, 0) - 1).to(dev)  # [B] index of each row's last token in [N]
    ids = torch.tensor([t for c in contexts for t in c], device=dev)
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # [N, 1, hd]
    gqa = KV != H

    def padded(t: torch.Tensor, heads: int) -> torch.Tensor:  # [N, heads, hd] → [B, heads, L, hd]
        out = t.new_zeros(B * L, heads, hd)
        out[slot] = t
        return out.view(B, L, heads, hd).transpose(1, 2)

    x = model.embed_tokens(ids)  # [N, d]
    for i, blk in enumerate(model.layers):
        att = blk.self_attn
        h = blk.input_layernorm(x)
        last = i == len(model.layers) - 1
        q = att.q_proj(h[ends] if last else h).view(-1, H, hd)
        k = att.k_proj(h).view(-1, KV, hd)
        v = att.v_proj(h).view(-1, KV, hd)
        if att.q_norm is not None:
            q, k = att.q_norm(q), att.k_norm(k)
        k = apply_rope(k, cos, sin)
        if not last:
            q = apply_rope(q, cos, sin)
            y = F.scaled_dot_product_attention(padded(q, H), padded(k, KV), padded(v, KV), is_causal=True, enable_gqa=gqa)
            y = y.transpose(1, 2).reshape(B * L, H * hd)[slot]  # back to [N, H·hd]
            x = x + att.o_proj(y)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        else:
            q = apply_rope(q, cos[ends], sin[ends])[:, :, None]  # [B, H, 1, hd]
            mask = (torch.arange(L, device=dev)[None] < lens.to(dev)[:, None])[:, None, None]  # [B, 1, 1, L]
            y = F.scaled_dot_product_attention(q, padded(k, KV), padded(v, KV), attn_mask=mask, enable_gqa=gqa)
            x = x[ends] + att.o_proj(y.reshape(B, H * hd))
            x = x + blk.mlp(blk.post_attention_layernorm(x))
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


def _score_one_token(model: Transformer, requests: Sequence[Request]) -> list[list[Score]]:
    """Every continuation is one token: one pass over the contexts, the choices'
    log-probabilities read from the last context position of each (no cache, no second pass)."""
    dev = model.embed_tokens.weight.device
    last = last_hidden(model, [r.context for r in requests])
    logp = F.linear(last, model.output_weight()).float().log_softmax(-1)  # [B, V]
    best = logp.argmax(-1).tolist()
    owner = [i for i, r in enumerate(requests) for _ in r.continuations]
    tgt = [c[0] for r in requests for c in r.continuations]
    lp = logp[torch.tensor(owner, device=dev), torch.tensor(tgt, device=dev)].tolist()
    out: list[list[Score]] = [[] for _ in requests]
    for i, t, ll in zip(owner, tgt, lp, strict=True):
        out[i].append(Score(ll, best[i] == t, 1))
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
    # one-token requests first (they batch without a cache), each group longest first
    single = [one_token(r) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (not single[i], -request_length(requests[i])))
    results: list[list[Score] | None] = [None] * len(requests)
    b = 0
    while b < len(order):
        # cost ≈ contexts × width (each context once) + continuations; rows bounds the cache copies
        # (a one-token batch has no cache: its rows are the contexts alone)
        chunk = [order[b]]
        kind = single[order[b]]
        width = request_length(requests[order[b]])  # the longest in this chunk
        rows = 1 if kind else len(requests[order[b]].continuations)
        while b + len(chunk) < len(order):
            j = order[b + len(chunk)]
            nrows = 1 if kind else len(requests[j].continuations)
            if (single[j] != kind or (len(chunk) + 1) * width > max_batch_tokens
                    or rows + nrows > max_batch_rows):
                break
            chunk.append(j)
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

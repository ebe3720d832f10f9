"""Log-likelihood scoring of continuations, batched, with each shared context computed once.

A request is ``(context ids, [continuation ids, …])``: one context and the continuations that
share it (the choices of one question, or a single continuation). Several requests are scored
together: their contexts are left-padded into one batch and run once, filling a KV cache; the
cache rows are then repeated once per continuation and every continuation of every request is
run in a second batch. Positions restart at each row's first real token and a boolean mask hides
the padding, so a request's scores do not depend on its batch (checked against one-by-one,
uncached scoring in the tests).

The context/continuation split follows lm-eval-harness: trailing spaces move from the context to
the continuation, ``context + continuation`` is tokenised as a whole and the continuation is the
tokens after ``len(tokenise(context))``; an empty context becomes the BOS token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.transformer import KVCache, Transformer


@dataclass
class Request:
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    loglik: float  # summed log-probability of the continuation's tokens
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


def split_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval-harness computes them."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


def context_ids(tok, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The shared context ids of one question and each choice's continuation ids.

    With a context that is empty (or only spaces) the context is the BOS token, as in lm-eval.
    """
    pairs = [split_pair(tok, context, c) for c in continuations]
    ctx = pairs[0][0]
    if not ctx:
        ctx = [tok.bos_id]
    return ctx, [p[1] for p in pairs]


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


@torch.no_grad()
def score_batch(model: Transformer, requests: Sequence[Request]) -> list[list[Score]]:
    """Scores of every continuation of every request, in order."""
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
    order = sorted(range(len(requests)), key=lambda i: -request_length(requests[i]))
    results: list[list[Score] | None] = [None] * len(requests)
    b = 0
    while b < len(order):
        # cost ≈ contexts × width (each context once) + continuations; rows bounds the cache copies
        chunk = [order[b]]
        width = request_length(requests[order[b]])  # the longest in this chunk
        rows = len(requests[order[b]].continuations)
        while b + len(chunk) < len(order):
            nxt = requests[order[b + len(chunk)]]
            if (len(chunk) + 1) * width > max_batch_tokens or rows + len(nxt.continuations) > max_batch_rows:
                break
            chunk.append(order[b + len(chunk)])
            rows += len(nxt.continuations)
        for i, s in zip(chunk, score_batch(model, [requests[i] for i in chunk]), strict=True):
            results[i] = s
        b += len(chunk)
        if on_done:
            on_done(len(chunk))
    return results  # type: ignore[return-value]


def reference_score(model: Transformer, context: list[int], continuation: list[int]) -> Score:
    """One continuation scored by a plain, uncached forward pass (what the batched path must equal)."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logp = model(ids)[0, len(context) - 1 :].float().log_softmax(-1)
    tgt = torch.tensor(continuation)
    ll = float(logp.gather(-1, tgt[:, None]).double().sum())
    return Score(ll, bool((logp.argmax(-1) == tgt).all()), len(continuation))

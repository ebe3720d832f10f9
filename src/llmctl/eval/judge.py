"""Pairwise judging (AlpacaEval's protocol on local models): the model under test answers each
instruction, a judge compares that answer with a reference answer, and the win rate is the mean
preference for the model (REFERENCE.md, Evaluation).

Judges:

- a reward model (``llmctl reward`` run): preference = σ(r(model's answer) − r(reference)),
  both scored as the reply to the same user turn; symmetric, so the order of the pair is moot.
- a language model (an llmctl chat run or a transformers directory): asked which of "Response A"
  and "Response B" follows the instruction better, as a user turn of its chat format (llmctl's or
  its directory's chat template; a plain prompt ending in "Answer:" when it has neither);
  preference = its probability of the letter naming the model's answer among "A" and "B" at the
  next token. The order of the two answers is
  drawn per item (seeded), since LM judges favour a position.

Length control: judges favour long answers, so the preference is also fitted by a logistic
regression on a model term θ and γ·tanh(standardised length difference) (soft labels, the
characters of the two answers); the length-controlled win rate is σ(θ), the prediction at zero
length difference, with a bootstrap standard error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..chat import BadRecord, ChatFormat, ChatTokens, chat_format, encode_chats
from ..errors import UsageError
from ..model.generate import SamplingParams, encode_prompt, generate

JUDGE_QUESTION = (
    "Which response follows the instruction better?\n\nInstruction: {instruction}\n\nResponse A: {a}\n\n"
    "Response B: {b}\n\nAnswer with A or B."
)


@dataclass
class JudgeItem:
    id: str
    instruction: str
    reference: str

    def text(self) -> str:  # what contamination checks read
        return self.instruction


#: (instruction, answer, other) per pair → (p(answer better), whether the judge's input was cut to
#: fit its context) per pair; p is None where it did not fit and ``truncate`` is "skip"
Judge = Callable[[list[tuple[str, str, str]]], list[tuple[float | None, bool]]]


def answer_prompt(tok, item: JudgeItem, chat: ChatFormat | None, bos: bool) -> list[int]:
    """The prompt the model answers: the instruction as a user turn of ``chat``, else plain text."""
    return chat.prompt(item.instruction) if chat is not None else encode_prompt(tok, item.instruction, bos)


def answers(model, tok, prompts: Sequence[list[int]], chat: ChatFormat | None, max_new_tokens: int) -> list[str]:
    """The model's greedy answer to each prompt (``answer_prompt``)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=chat.stop_ids if chat is not None else ())
    return [c.text.strip() for c in generate(model, tok, list(prompts), params)]


def _fit_texts(tok, texts: Sequence[str], budget: int) -> list[str]:
    """Cut the longest of ``texts`` (from their ends) until their tokens sum to at most ``budget``:
    every text keeps min(its length, c) tokens for the largest such cap c."""
    ids = [tok.encode(t) for t in texts]
    lens = sorted(len(x) for x in ids)
    cap, used = 0, 0
    for i, n in enumerate(lens):  # raise the cap through the sorted lengths while it fits
        left = len(lens) - i
        if used + n * left > budget:
            cap = (budget - used) // left
            break
        used += n
        cap = n
    return [t if len(x) <= cap else tok.decode(x[: max(cap, 0)]) for t, x in zip(texts, ids, strict=True)]


def _cut_both(a: ChatTokens, b: ChatTokens, ctx: int) -> tuple[list[int], list[int]]:
    """Two conversations that share their instruction, each in at most ``ctx`` ids, cut as training
    cuts a preference pair (``cut_pair``: the same prompt ids from both, so both answers follow the
    same context); where one reply alone overflows the context, each keeps its own end."""
    from ..train.preference import cut_pair

    try:
        ca, cb, _ = cut_pair(a, b, ctx)
        return ca.ids, cb.ids
    except BadRecord:
        return a.ids[-ctx:], b.ids[-ctx:]


def reward_judge(run: Path, device: torch.device, truncate: str = "left") -> Judge:
    """Score each answer as the reply to the instruction. A pair longer than the reward model's
    context loses the same start of the instruction on both sides (``truncate`` "left"; the
    replies, read at their EOS, are kept whole where they fit) or is not judged ("skip")."""
    from ..model.reward import load_reward_model, score_sequences
    from ..tokenizer import load_tokenizer

    rm, head, _ = load_reward_model(run, device)
    tok = load_tokenizer(Path(run) / "tokenizer.model")
    ctx = rm.cfg.max_seq_len

    def prefer(pairs: list[tuple[str, str, str]]) -> list[tuple[float | None, bool]]:
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a or " "}] for q, x, y in pairs for a in (x, y)]
        seqs = encode_chats(tok, convs)
        if any(isinstance(ct, BadRecord) for ct in seqs):
            raise UsageError("the reward judge's tokenizer cannot encode an answer in its chat format")
        cut = [len(seqs[2 * k].ids) > ctx or len(seqs[2 * k + 1].ids) > ctx for k in range(len(pairs))]
        keep = [k for k in range(len(pairs)) if truncate == "left" or not cut[k]]
        r = score_sequences(rm, head, [s for k in keep for s in _cut_both(seqs[2 * k], seqs[2 * k + 1], ctx)],
                            tok.pad_id) if keep else []
        out: list[tuple[float | None, bool]] = [(None, c) for c in cut]
        for i, k in enumerate(keep):
            out[k] = (1.0 / (1.0 + math.exp(-(r[2 * i] - r[2 * i + 1]))), cut[k])
        return out

    return prefer


def lm_judge(model, tok, where: object, truncate: str = "left") -> Judge:
    """Ask ``model`` (at ``where``) which of two responses is better; p("A") among {"A", "B"} at the
    next token: in its chat format where it has one, else as text ending in "Answer:". A question
    longer than the judge's context keeps its frame (the question, both labels, "Answer with A or
    B"): the longest of instruction and responses are cut from their ends until it fits
    (``truncate`` "left"), or the pair is not judged ("skip")."""
    try:
        chat: ChatFormat | None = chat_format(tok, where)
    except UsageError:
        chat = None
    letters = [tok.encode(x if chat is not None else " " + x) for x in ("A", "B")]
    if any(len(ids) < 1 for ids in letters) or letters[0][0] == letters[1][0]:
        raise UsageError(f"{where}: the judge's tokenizer cannot tell the answers A and B apart")
    a_id, b_id = letters[0][0], letters[1][0]
    device = model.embed_tokens.weight.device
    ctx = model.cfg.max_seq_len

    def encode(q: str, a: str, b: str) -> list[int]:
        text = JUDGE_QUESTION.format(instruction=q, a=a, b=b)
        return chat.prompt(text) if chat is not None else encode_prompt(tok, text + "\nAnswer:", True)

    frame = len(encode("", "", ""))

    @torch.no_grad()
    def prefer(pairs: list[tuple[str, str, str]]) -> list[tuple[float | None, bool]]:
        out: list[tuple[float | None, bool]] = []
        for q, a, b in pairs:
            ids = encode(q, a, b)
            cut = len(ids) > ctx
            if cut and truncate != "left":
                out.append((None, True))
                continue
            budget = ctx - frame
            while len(ids) > ctx and budget > 0:  # re-encoding at the joins can add a token or two
                ids = encode(*_fit_texts(tok, (q, a, b), budget))
                budget -= max(len(ids) - ctx, 1)
            ids = ids[-ctx:]
            logits = model(torch.tensor([ids], device=device))[0, -1].float()
            out.append((float(torch.softmax(logits[[a_id, b_id]], -1)[0]), cut))
        return out

    return prefer


def length_controlled(pref: Sequence[float], len_model: Sequence[int], len_ref: Sequence[int], iters: int = 50) -> tuple[float, float]:
    """(θ, γ) of p ≈ σ(θ + γ·tanh(Δ/sd(Δ))) fitted to soft preferences by Newton's method on the
    cross-entropy (a 1e-4 ridge keeps a unanimous preference finite); Δ = model − reference length."""
    p = torch.tensor(pref, dtype=torch.float64)
    d = torch.tensor(len_model, dtype=torch.float64) - torch.tensor(len_ref, dtype=torch.float64)
    sd = float(d.std()) if len(d) > 1 else 0.0
    x = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)
    X = torch.stack([torch.ones_like(x), x], 1)
    w = torch.zeros(2, dtype=torch.float64)
    ridge = 1e-4 * len(p)
    for _ in range(iters):
        q = torch.sigmoid(X @ w)
        grad = X.T @ (q - p) + ridge * w
        hess = X.T @ (X * (q * (1 - q))[:, None]) + ridge * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w -= step
        if float(step.abs().max()) < 1e-10:
            break
    return float(w[0]), float(w[1])


def lc_win_rate(pref: Sequence[float], len_model: Sequence[int], len_ref: Sequence[int], seed: int, boots: int = 200) -> tuple[float, float]:
    """(length-controlled win rate σ(θ), its bootstrap standard error)."""
    theta, _ = length_controlled(pref, len_model, len_ref)
    rng = random.Random(seed)
    n = len(pref)
    samples = []
    for _ in range(boots if n > 1 else 0):
        idx = [rng.randrange(n) for _ in range(n)]
        t, _ = length_controlled([pref[i] for i in idx], [len_model[i] for i in idx], [len_ref[i] for i in idx])
        samples.append(1.0 / (1.0 + math.exp(-t)))
    m = sum(samples) / len(samples) if samples else 0.0
    se = math.sqrt(sum((s - m) ** 2 for s in samples) / (len(samples) - 1)) if len(samples) > 1 else 0.0
    return 1.0 / (1.0 + math.exp(-theta)), se


def judge_items(judge: Judge, items: Sequence[JudgeItem], outputs: Sequence[str], seed: int, symmetric: bool) -> list[dict[str, Any]]:
    """One row per item: the model's answer, which position it took, and the preference for it."""
    firsts = [symmetric or random.Random(f"{seed}/{it.id}").random() < 0.5 for it in items]
    pairs = [(it.instruction, o, it.reference) if first else (it.instruction, it.reference, o)
             for it, o, first in zip(items, outputs, firsts, strict=True)]
    rows = []
    for it, o, first, (p, cut) in zip(items, outputs, firsts, judge(pairs), strict=True):
        row = {"id": it.id, "output": o, "reference": it.reference, "model_first": first,
               "preference": None if p is None else (p if first else 1.0 - p), "length": len(o),
               "reference_length": len(it.reference)}
        if cut and p is None:
            row["skip_judge"] = "longer_than_context"
        elif cut:
            row["truncated_judge"] = True
        rows.append(row)
    return rows

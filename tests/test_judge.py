"""Pairwise judging: the length-controlled win rate removes a judge's length bias (REFERENCE.md's
logistic regression on tanh of the standardised length difference), and the judge task's data."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest

from llmctl.chat import ChatTokens
from llmctl.eval.judge import _cut_both, lc_win_rate, length_controlled
from llmctl.eval.tasks import load_task


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_the_fit_recovers_the_model_and_length_terms():
    rng = random.Random(0)
    len_ref = [rng.randint(50, 400) for _ in range(300)]
    len_model = [r + rng.randint(-150, 150) for r in len_ref]
    d = [m - r for m, r in zip(len_model, len_ref, strict=True)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    pref = [_sig(0.7 + 1.5 * math.tanh(x / sd)) for x in d]
    theta, gamma = length_controlled(pref, len_model, len_ref)
    assert theta == pytest.approx(0.7, abs=0.01) and gamma == pytest.approx(1.5, abs=0.02)


def test_a_judge_that_only_likes_length_gets_an_even_lc_win_rate():
    """The model writes the longer answer in 80% of items and a length-loving judge prefers it:
    the raw win rate says the model is better, the length-controlled one says they are even."""
    rng = random.Random(1)
    len_ref = [200] * 200
    len_model = [200 + (rng.randint(20, 200) if rng.random() < 0.8 else -rng.randint(20, 200)) for _ in len_ref]
    sd = 120.0
    pref = [_sig(3 * math.tanh((m - r) / sd)) for m, r in zip(len_model, len_ref, strict=True)]
    raw = sum(pref) / len(pref)
    lc, se = lc_win_rate(pref, len_model, len_ref, seed=0)
    assert raw > 0.7
    assert lc == pytest.approx(0.5, abs=0.05) and 0 < se < 0.1


def test_judge_items_and_bad_records(tmp_path):
    f = tmp_path / "alpaca-style.jsonl"
    f.write_text("\n".join([
        json.dumps({"instruction": "Name a colour.", "output": "Blue.", "generator": "ref"}),
        json.dumps({"prompt": "Say hi.", "reference": "Hi!"}),
        json.dumps({"instruction": "No answer"}),
        json.dumps({"output": "no question"}),
        "{broken",
    ]) + "\n", encoding="utf-8")
    task = load_task(f"judge:{f}")
    assert task.kind == "judge" and [(i.instruction, i.reference) for i in task.items] == [("Name a colour.", "Blue."), ("Say hi.", "Hi!")]
    assert task.skipped == {"no_reference": 1, "no_instruction": 1, "bad_json": 1}
    # gzip-compressed, with a line that is not UTF-8: counted, not fatal
    gz = tmp_path / "alpaca-style.jsonl.gz"
    gz.write_bytes(gzip.compress(f.read_bytes() + b'{"instruction": "caf\xe9", "output": "x"}\n'))
    task = load_task(f"judge:{gz}")
    assert len(task.items) == 2 and task.skipped == {"no_reference": 1, "no_instruction": 1, "bad_json": 1, "not_utf8": 1}
    bom = tmp_path / "bom.jsonl"  # a byte-order mark is no part of the first record
    bom.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert len(load_task(f"judge:{bom}").items) == 2


def test_a_reward_judge_scores_both_answers_after_the_same_context():
    def conv(reply: list[int]) -> ChatTokens:
        prompt = list(range(100, 130))  # a long instruction both conversations share
        return ChatTokens(prompt + reply, [False] * len(prompt) + [True] * len(reply))

    a, b = conv([1, 2, 3]), conv([7, 8, 9, 10, 11])
    ca, cb = _cut_both(a, b, 20)
    assert len(cb) == 20 and ca == a.ids[15:] and cb == b.ids[15:]  # the longer one's excess, from both starts
    assert _cut_both(a, b, 40) == (a.ids, b.ids)
    # a reply that alone overflows the context: each side keeps its own end (the reply is read at its EOS)
    long = conv(list(range(60)))
    assert _cut_both(a, long, 40) == (a.ids[-40:], long.ids[-40:])

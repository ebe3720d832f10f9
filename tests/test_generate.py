"""Sampling with the KV cache: greedy equals a full-recompute reference, batched equals unbatched,
seeds reproduce, stop strings / EOS / context limits end generation, streaming prints whole
characters, and the CLI writes JSONL atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from modelkit import PROMPTS, make_run

from llmctl.errors import UsageError
from llmctl.model import ModelConfig, Transformer
from llmctl.model.generate import (
    GenerateConfig,
    SamplingParams,
    _Detokenizer,
    filter_logits,
    generate,
    run_generate,
)
from llmctl.tokenizer import Tokenizer

#: decoding a tiny model is a chain of tiny ops: one thread avoids spinning on a shared machine
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, spm_model) -> Path:
    path = tmp_path_factory.mktemp("runs") / "run"
    make_run(path, spm_model, n_kv_head=2, qk_norm=True)
    return path


def _model(spm_model, **kw) -> Transformer:
    vocab = Tokenizer(spm_model).vocab_size
    torch.manual_seed(kw.pop("seed", 0))
    kw = {"init_std": 0.15, **kw}
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, d_model=64, max_seq_len=96, **kw)).eval()




def _reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache, no padding)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "qk_norm": True, "tie_embeddings": False}])
def test_greedy_batched_equals_unbatched_and_full_recompute(spm_model, tok, kw):
    model = _model(spm_model, **kw)
    single = [generate(model, tok, [p], temperature=0, max_new_tokens=12)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=12, batch_size=3)
    lens = {len(c.prompt_ids) for c in batched}
    assert len(lens) > 2  # the batches really are padded
    for s, b in zip(single, batched, strict=True):
        assert b.token_ids == s.token_ids
        assert b.text == s.text
        assert b.prompt_ids[0] == tok.bos_id and b.prompt_ids[1:] == tok.encode(b.prompt)
        assert b.token_ids == _reference_greedy(model, b.prompt_ids, 12)[: len(b.token_ids)]
        assert all(math.isfinite(x) for x in b.logprobs)


def test_logprobs_are_the_models_log_softmax(spm_model, tok):
    model = _model(spm_model)
    c = generate(model, tok, ["The fox"], temperature=1.0, top_k=20, max_new_tokens=8, seed=3)[0]
    seq = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0].float(), -1)
    n = len(c.prompt_ids)
    want = [logp[n - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(want, abs=1e-4)


def test_sampling_is_reproducible_and_independent_of_batch_size(spm_model, tok):
    model = _model(spm_model)
    p = SamplingParams(max_new_tokens=10, temperature=1.2, top_k=50, top_p=0.9, seed=7)
    a = generate(model, tok, PROMPTS, p, batch_size=5)
    b = generate(model, tok, PROMPTS, p, batch_size=2)
    c = generate(model, tok, PROMPTS, p, batch_size=5, seed=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    greedy = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=10)
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]  # it does sample
    top1 = generate(model, tok, PROMPTS, temperature=1.5, top_k=1, max_new_tokens=10)
    assert [x.token_ids for x in top1] == [x.token_ids for x in greedy]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.76)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.7)) == [False, True, False, True]


class _EosIs(Tokenizer):
    """The real tokenizer with another end-of-sequence id."""

    def __init__(self, path, eos_id: int) -> None:
        super().__init__(path)
        self.eos_id = eos_id


def test_stop_string_and_eos_end_generation(spm_model, tok):
    model = _model(spm_model)
    # a random model may well emit the real EOS within 30 tokens (the test tokenizer is trained on
    # this repository's source, so its ids move with every commit): run without one
    never = _EosIs(spm_model, -1)
    full = generate(model, never, ["The"], temperature=0, max_new_tokens=30)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = next(full.text[i : i + 2] for i in range(len(full.text) // 2, len(full.text)) if full.text[i : i + 2].strip())
    at = full.text.find(stop)
    c = generate(model, never, ["The"], temperature=0, max_new_tokens=30, stop=(stop,))[0]
    assert c.finish_reason == "stop" and c.text == full.text[:at]
    assert c.token_ids == full.token_ids[: len(c.token_ids)] and len(c.token_ids) < 30

    fake = _EosIs(spm_model, full.token_ids[3])  # pretend the 4th greedy token is EOS
    first = full.token_ids.index(fake.eos_id)
    e = generate(model, fake, ["The"], temperature=0, max_new_tokens=30)[0]
    assert e.finish_reason == "eos" and e.token_ids == full.token_ids[: first + 1]
    assert e.text == tok.decode(full.token_ids[:first]) or full.text.startswith(e.text)


def test_streamed_text_is_the_completion_and_whole_characters(spm_model, tok):
    model = _model(spm_model)
    pieces: dict[int, list[str]] = {}
    out = generate(model, tok, PROMPTS, temperature=1.0, max_new_tokens=25, seed=1, batch_size=2,
                   on_text=lambda i, s: pieces.setdefault(i, []).append(s), stop=("zz",))
    for i, c in enumerate(out):
        assert "".join(pieces.get(i, [])) == c.text
    # byte-fallback pieces of one emoji: nothing is shown until the character is complete
    ids = tok.encode("a😀")
    emoji = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert all(i != tok.unk_id for i in emoji)
    d = _Detokenizer(tok, [tok.bos_id, *tok.encode("x")], ())
    shown = []
    for t in emoji:
        d.push(t)
        shown.append(d.ready())
    assert shown == ["", "", "", "😀"]
    assert tok.decode(ids) == "a😀"


def test_leading_space_of_completion_is_kept(spm_model, tok):
    d = _Detokenizer(tok, [tok.bos_id, *tok.encode("hello")], ())
    assert d.set_ids(tok.encode(" world")) == " world"


def test_context_limits(spm_model, tok):
    model = _model(spm_model)
    with pytest.raises(UsageError, match="context is 96"):
        generate(model, tok, ["x" * 400])
    prompt = "The quick brown fox " * 3
    n = len(tok.encode(prompt)) + 1
    c = generate(model, tok, [prompt, "a"], temperature=0, max_new_tokens=500)
    assert c[0].finish_reason == "length" and n + len(c[0].token_ids) == 96
    assert len(c[1].token_ids) == 96 - 2 or c[1].finish_reason == "eos"
    with pytest.raises(UsageError, match="temperature"):
        SamplingParams(temperature=-1)


def test_bf16_generation_runs(spm_model, tok):
    model = _model(spm_model).to(torch.bfloat16)
    c = generate(model, tok, PROMPTS[:2], temperature=0, max_new_tokens=5)
    assert all(len(x.token_ids) == 5 for x in c)


def test_cli_generate_streams_and_writes_jsonl(llmctl, run_dir, tmp_path, tok):
    from llmctl.model.io import load_model

    r = llmctl("generate", run_dir, "--prompt", "def f(x):", "-n", "15", "--temperature", "0", "--device", "cpu",
               env=ONE_THREAD)
    assert r.code == 0, r.err
    model, _ = load_model(run_dir)
    want = generate(model, tok, ["def f(x):"], temperature=0, max_new_tokens=15)[0]
    assert r.out == "def f(x):" + want.text + "\n"
    assert "tokens/s" in r.err

    prompts = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": p, "id": i}, ensure_ascii=False) for i, p in enumerate(PROMPTS)]
    prompts.write_text("\n".join([*lines, "not json", '{"text": "no prompt"}']) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["generate", run_dir, "--prompts", prompts, "--out", out, "-t", "0", "-n", "10", "--logprobs", "-b", "2"]
    r = llmctl(*args, env=ONE_THREAD)
    assert r.code == 0, r.err
    assert "invalid_json" in r.out and "no_prompt_field" in r.out and "tokens/s" in r.out
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == list(range(len(PROMPTS)))
    batched = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=10)
    assert [row["token_ids"] for row in rows] == [c.token_ids for c in batched]
    assert [row["completion"] for row in rows] == [c.text for c in batched]
    assert all(len(row["logprobs"]) == row["completion_tokens"] for row in rows)
    assert not list(tmp_path.glob(".out.jsonl.tmp-*"))

    r = llmctl("generate", run_dir, "--prompt", "x" * 500, env=ONE_THREAD)
    assert r.code == 2 and "context is 96" in r.err and "Traceback" not in r.err


def test_run_generate_files_and_bad_input(run_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n\nworld\n", encoding="utf-8")
    cfg = GenerateConfig(run=str(run_dir), prompts=str(txt), out=str(out), max_new_tokens=3, device="cpu")
    done, stats, bad = run_generate(cfg)
    assert [c.prompt for c in done] == ["hello", "world"] and not bad
    assert stats.generated_tokens == sum(len(c.token_ids) for c in done) and stats.tokens_per_second > 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    before = out.read_bytes()
    with pytest.raises(UsageError, match="--force"):
        run_generate(cfg)
    assert out.read_bytes() == before
    bad_cases = [
        (dict(prompts=str(tmp_path / "missing.txt")), "no such prompts file"),
        (dict(prompts=str(run_dir / "config.json")), ".txt"),
        (dict(out=str(tmp_path / "o.json"), force=True), "jsonl"),
        (dict(out=None), "needs --out"),
        (dict(prompt="x", prompts=None), None),  # fine: one prompt written to --out
        (dict(run=str(tmp_path)), "manifest"),
        (dict(device="cuda:0" if not torch.cuda.is_available() else "nope"), "device"),
        (dict(precision="fp8"), "precision"),
    ]
    for change, message in bad_cases:
        c = GenerateConfig(**{**cfg.__dict__, "force": True, **change})
        if message is None:
            assert run_generate(c)[0][0].prompt == "x"
        else:
            with pytest.raises(UsageError, match=message):
                run_generate(c)


def test_samples_follow_the_models_distribution(spm_model, tok):
    """1000 one-token samples (one generator per prompt index): frequencies match softmax(logits/T),
    and top-k / top-p never pick outside their set."""
    model = _model(spm_model, init_std=0.3)
    prompt = [tok.bos_id, *tok.encode("The quick")]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    n = 1000
    for temp in (1.0, 0.7):
        probs = torch.softmax(logits / temp, -1)
        got = generate(model, tok, [prompt] * n, temperature=temp, max_new_tokens=1, batch_size=n, seed=5)
        counts = torch.bincount(torch.tensor([c.token_ids[0] for c in got]), minlength=len(probs)).float()
        top = probs.argsort(descending=True)[:5]
        for t in top:  # each frequency within 4 standard errors of its probability
            p = probs[t].item()
            assert abs(counts[t].item() / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-3
    k_set = set(logits.topk(3).indices.tolist())
    got = generate(model, tok, [prompt] * 200, temperature=1.0, top_k=3, max_new_tokens=1, batch_size=200)
    assert {c.token_ids[0] for c in got} <= k_set and len({c.token_ids[0] for c in got}) > 1
    sorted_p, order = torch.softmax(logits, -1).sort(descending=True)
    nucleus = set(order[: int((sorted_p.cumsum(0) < 0.5).sum()) + 1].tolist())
    got = generate(model, tok, [prompt] * 200, temperature=1.0, top_p=0.5, max_new_tokens=1, batch_size=200)
    assert {c.token_ids[0] for c in got} <= nucleus

"""llmctl eval on a real tiny model (trained tokenizer, llmctl run, exported transformers dir)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import cli
from modelkit import make_run, train_tokenizer

from llmctl.errors import UsageError
from llmctl.eval.contamination import find_contaminated, item_grams
from llmctl.eval.generation_mc import parse_letter
from llmctl.eval.multiple_choice import (
    Request,
    context_ids,
    many_context_ids,
    one_token,
    prefix_groups,
    reference_score,
    score_requests,
    split_pair,
)
from llmctl.eval.perplexity import rolling_windows
from llmctl.eval.runner import EvalConfig, run_eval
from llmctl.eval.tasks import load_mmlu, load_task
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf import ExportConfig, export_hf, load_any
from llmctl.tokenizer import Tokenizer

QUESTIONS = [
    ("What do bees make?", ["honey", "steel", "glass"], 0),
    ("Which animal barks?", ["a cat", "a dog", "a fish", "a bird"], 1),
    ("def main(argv): returns", ["0", "a string of text", "None"], 0),
    ("The capital of France is", ["Berlin", "Madrid", "Paris"], 2),
    ("Water freezes at", ["zero degrees", "one hundred degrees"], 0),
    ("for i in range(10): print", ["(i)", "[i]"], 0),
]


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(llmctl run, exported transformers dir, tokenizer) of one tiny GQA model, context 128."""
    root = tmp_path_factory.mktemp("evalmodel")
    spm = train_tokenizer(root / "tok")
    make_run(root / "run", spm, seed=3, n_kv_head=2, max_seq_len=128)
    export_hf(ExportConfig(run=root / "run", out=root / "hf"))
    return root / "run", root / "hf", Tokenizer(spm)


def write_task(d: Path, rows: list[dict], **spec) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    s = {"name": "qa", "data": "items.jsonl", "template": "Question: {q}\nAnswer:", "choices": "opts", "gold": "label"}
    s.update(spec)
    (d / "spec.json").write_text(json.dumps(s), encoding="utf-8")
    return d / "spec.json"


def qa_rows():
    return [{"q": q, "opts": o, "label": g} for q, o, g in QUESTIONS]


def test_batched_shared_context_scoring_equals_one_by_one_uncached():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=48,
                                init_std=0.15, qk_norm=True)).eval()
    rng = random.Random(1)
    reqs = []
    for k in range(45):
        ctx = [rng.randrange(300) for _ in range(rng.randint(1, 30 if k % 3 else 48))]
        # every third request has one-token choices only (scored from the context pass alone)
        longest = 1 if k % 3 == 0 else 9
        conts = [[rng.randrange(300) for _ in range(rng.randint(1, longest))] for _ in range(rng.randint(1, 4))]
        if len(ctx) + max(map(len, conts)) - 1 <= 48:
            reqs.append(Request(ctx, conts))
    assert sum(map(one_token, reqs)) >= 12 and sum(not one_token(r) for r in reqs) >= 15
    rng.shuffle(reqs)
    got = score_requests(m, reqs, max_batch_tokens=300)  # several batches of each kind, different pads
    alone = [score_requests(m, [r])[0] for r in reqs[:5]]
    greedy_seen = False
    for k, (r, scores) in enumerate(zip(reqs, got, strict=True)):
        for c, s in zip(r.continuations, scores, strict=True):
            ref = reference_score(m, r.context, c)
            assert abs(ref.loglik - s.loglik) < 1e-4 and ref.greedy == s.greedy and s.n_tokens == len(c)
            greedy_seen |= s.greedy
        if k < 5:
            assert [s.loglik for s in alone[k]] == pytest.approx([s.loglik for s in scores], abs=1e-5)
    with pytest.raises(ValueError):
        score_requests(m, [Request([1] * 40, [[2] * 10])])


def _shared_prefix_requests(rng: random.Random, vocab: int, max_len: int) -> list[Request]:
    """One-token requests whose contexts share prefixes the way a task's do: groups with a common
    header of varying length (some also sharing a few-shot block), a context that is exactly
    another's prefix, duplicates, one-token contexts, and loners that share nothing."""
    def toks(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def choices() -> list[list[int]]:
        return [[rng.randrange(vocab)] for _ in range(rng.randint(1, 4))]

    reqs = []
    for _ in range(6):
        header = toks(rng.randint(8, 20))
        shots = toks(rng.randint(5, 15))
        for _ in range(rng.randint(2, 6)):
            body = (shots if rng.random() < 0.5 else []) + toks(rng.randint(1, 20))
            reqs.append(Request((header + body)[:max_len], choices()))
        reqs.append(Request(list(header), choices()))  # the bare header: the others' prefix itself
    reqs += [Request(list(reqs[3].context), choices()), Request(list(reqs[3].context), choices())]  # duplicates
    reqs += [Request(toks(1), choices()) for _ in range(3)]
    reqs += [Request(toks(rng.randint(2, max_len)), choices()) for _ in range(8)]
    rng.shuffle(reqs)
    return reqs


def test_prefix_groups_share_true_token_prefixes():
    rng = random.Random(4)
    ctxs = [r.context for r in _shared_prefix_requests(rng, 50, 60)]
    groups = prefix_groups(ctxs, min_shared=8)
    assert sorted(i for _, m in groups for i in m) == list(range(len(ctxs)))  # a partition
    shared = [(p, m) for p, m in groups if p]
    assert len(shared) >= 6 and sum(p * (len(m) - 1) for p, m in shared) > 100
    for p, members in groups:
        if p == 0:
            continue
        assert p >= 8 and len(members) >= 2
        for i in members:  # the first p ids are every member's, and no member is only the prefix
            assert ctxs[i][:p] == ctxs[members[0]][:p] and len(ctxs[i]) > p
    # headers and a shared block: the longest common run is taken, never more, never a part token
    a, b, c = [1] * 9 + [2, 3, 4], [1] * 9 + [2, 3, 5], [1] * 9 + [7]
    assert prefix_groups([a, b]) == [(11, [0, 1])]
    assert prefix_groups([a, b, c]) == [(9, [0, 1, 2])]  # 9 tokens × 2 saved ≥ 11 × 1
    assert prefix_groups([a, a]) == [(11, [0, 1])]  # duplicates keep their last token to themselves
    assert prefix_groups([[1] * 7 + [2], [1] * 7 + [3]]) == [(0, [0]), (0, [1])]  # under min_shared
    assert prefix_groups([[5], [5]]) == [(0, [0]), (0, [1])]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_one_token_scores_with_shared_prefixes_equal_uncached_reference(qk_norm, monkeypatch):
    """Shared-prefix scoring (prefix keys and values computed once per group, in several store
    rounds and batches) gives every request the scores of a plain uncached pass over it alone."""
    import llmctl.eval.multiple_choice as mc

    torch.manual_seed(2)
    m = Transformer(ModelConfig(vocab_size=200, n_layer=3, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                init_std=0.15, qk_norm=qk_norm)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    reqs = _shared_prefix_requests(random.Random(5), 200, 64)
    assert all(one_token(r) for r in reqs)
    # a store of about 40 prefix tokens: several rounds of groups; attention in blocks of 7 queries
    monkeypatch.setattr(mc, "PREFIX_STORE_ELEMENTS", 40 * 2 * 3 * 2 * 16)
    monkeypatch.setattr(mc, "ATTN_BLOCK", 7)
    done = []
    got = score_requests(m, reqs, max_batch_tokens=70, on_done=done.append)
    assert sum(done) == len(reqs) and len(done) > 4
    for r, scores in zip(reqs, got, strict=True):
        assert len(scores) == len(r.continuations)
        for c, s in zip(r.continuations, scores, strict=True):
            ref = reference_score(m, r.context, c)
            assert abs(ref.loglik - s.loglik) < 1e-5 and ref.greedy == s.greedy and s.n_tokens == 1
    # with no sharing at all (every context alone) the scores are the same too
    monkeypatch.setattr(mc, "prefix_groups", lambda ctxs, min_shared=8: [(0, [i]) for i in range(len(ctxs))])
    alone = score_requests(m, reqs)
    assert [s.loglik for x in alone for s in x] == pytest.approx([s.loglik for x in got for s in x], abs=1e-5)


def test_single_continuation_batches_equal_uncached_reference():
    """Perplexity windows and LAMBADA words (one continuation each) run as right-padded whole
    sequences; their scores must equal the uncached reference whatever the padding."""
    torch.manual_seed(1)
    m = Transformer(ModelConfig(vocab_size=300, n_layer=2, n_head=4, d_model=64, max_seq_len=48, init_std=0.15)).eval()
    rng = random.Random(2)
    reqs = [
        Request([rng.randrange(300) for _ in range(rng.randint(1, 20))],
                [[rng.randrange(300) for _ in range(rng.randint(2, 28))]])
        for _ in range(30)
    ]
    got = score_requests(m, reqs, max_batch_tokens=400)
    for r, (s,) in zip(reqs, got, strict=True):
        ref = reference_score(m, r.context, r.continuations[0])
        assert abs(ref.loglik - s.loglik) < 1e-4 and ref.greedy == s.greedy and s.n_tokens == len(r.continuations[0])


def test_context_split_moves_trailing_spaces_and_tokenises_together(models):
    tok = models[2]
    ctx, cont = split_pair(tok, "Question: the fox  ", "jumps")
    assert ctx == tok.encode("Question: the fox")
    assert ctx + cont == tok.encode("Question: the fox  jumps")
    assert tok.decode(cont) == "  jumps"
    # the batched split (one tokenizer call for all questions) equals the pair-by-pair split,
    # with the run's sentencepiece tokenizer and the export's tokenizer.json alike
    qs = [("Question: " + q + "\nAnswer:", [" " + o for o in opts]) for q, opts, _ in QUESTIONS]
    qs += [("Emoji 😀 and  ", ["happy", "日本語"]), ("", ["first words", "x"]), ("   ", ["a"])]
    for t in (tok, load_any(models[1])[1]):
        got = many_context_ids(t, qs)
        for (c, conts), (ctx, cids) in zip(qs, got, strict=True):
            pairs = [split_pair(t, c, x) for x in conts]
            assert ctx == (pairs[0][0] or [t.bos_id]) and cids == [p[1] for p in pairs]
            assert context_ids(t, c, conts) == (ctx, cids)
        assert got[-2][0] == [t.bos_id]  # an empty context is BOS, as in lm-eval


def test_rolling_windows_score_every_token_once():
    toks = list(range(100, 337))
    for L in (16, 50, 237, 400):
        wins = rolling_windows(toks, 1, L)
        targets = [t for _, b in wins for t in b]
        assert targets == toks
        assert wins[0][0] == [1]
        for a, b in wins:
            assert len(a) + len(b) - 1 <= L and a  # fits the context, has a context
        for a, b in wins[1:]:
            assert a[-1] == toks[toks.index(b[0]) - 1]  # the context ends right before the targets
    assert rolling_windows([], 1, 8) == []


def test_strict_letter_parsing():
    assert parse_letter(" B", 4) == 1
    assert parse_letter("C.", 4) == 2
    assert parse_letter(" A) because", 4) == 0
    assert parse_letter("D", 4) == 3
    for bad in ("E", " b", "The answer is B", "", "AB", " (A)"):
        assert parse_letter(bad, 4) is None


def test_eval_run_and_export_agree_and_results_are_complete(models, tmp_path):
    run, hf, tok = models
    spec = write_task(tmp_path / "task", qa_rows())
    doc = tmp_path / "doc.txt"
    doc.write_text(Path(__file__).read_text(encoding="utf-8")[:6000], encoding="utf-8")
    out = {}
    for name, model in (("run", run), ("hf", hf)):
        run_eval(EvalConfig(model=str(model), tasks=[f"jsonl:{spec}", f"ppl:{doc}"], out=str(tmp_path / name),
                            protocol="both", num_fewshot=1))
        out[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert out["run"]["model_kind"] == "llmctl run" and out["hf"]["model_kind"] == "transformers directory"
    key = lambda r: (r["task"], r["metric"], r["protocol"])  # noqa: E731
    a = {key(r): r for r in out["run"]["results"]}
    b = {key(r): r for r in out["hf"]["results"]}
    assert set(a) == set(b) == {
        ("qa", "acc", "likelihood"), ("qa", "acc_norm", "likelihood"), ("qa", "acc", "generation"),
        ("qa", "unparseable", "generation"), ("ppl", "token_perplexity", "rolling"),
        ("ppl", "word_perplexity", "rolling"), ("ppl", "byte_perplexity", "rolling"), ("ppl", "bits_per_byte", "rolling"),
    }
    for k in a:
        assert a[k]["value"] == pytest.approx(b[k]["value"], abs=1e-5)
        assert a[k]["n"] == b[k]["n"]
    assert a[("qa", "acc", "likelihood")]["n"] == len(QUESTIONS)

    # per-item file: the chosen answer is the argmax of the log-likelihoods written beside it
    items = [json.loads(x) for x in (tmp_path / "run" / "items-qa.jsonl").read_text().splitlines()]
    assert len(items) == len(QUESTIONS)
    n_correct = 0
    for it, (_, opts, gold) in zip(items, QUESTIONS, strict=True):
        assert len(it["loglik"]) == len(opts) and it["gold"] == gold
        assert it["pred"] == max(range(len(opts)), key=lambda i: it["loglik"][i])
        norm = [ll / len(o) for ll, o in zip(it["loglik"], opts, strict=True)]
        assert it["pred_norm"] == max(range(len(opts)), key=lambda i: norm[i])
        n_correct += it["pred"] == gold
        assert "gen_output" in it and (it["gen_pred"] is None or 0 <= it["gen_pred"] < len(opts))
    assert a[("qa", "acc", "likelihood")]["value"] == pytest.approx(n_correct / len(QUESTIONS))

    # the perplexity metrics are one corpus sum seen through different units
    ppl = json.loads((tmp_path / "run" / "items-ppl.jsonl").read_text().splitlines()[0])
    assert ppl["tokens"] == len(tok.encode(doc.read_text()))
    bpb = a[("ppl", "bits_per_byte", "rolling")]["value"]
    assert bpb == pytest.approx(-ppl["loglik"] / ppl["bytes"] / math.log(2))
    assert a[("ppl", "byte_perplexity", "rolling")]["value"] == pytest.approx(2**bpb)
    assert a[("ppl", "token_perplexity", "rolling")]["value"] == pytest.approx(math.exp(-ppl["loglik"] / ppl["tokens"]))
    assert ppl["tokens"] > 2 * 128  # several windows

    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["stage"] == "eval" and m["params"]["ngram"] == 13 and m["params"]["protocol"] == "both"
    manifest, runs = run_eval(EvalConfig(model=str(run), tasks=[f"jsonl:{spec}", f"ppl:{doc}"],
                                         out=str(tmp_path / "run"), protocol="both", num_fewshot=1))
    assert runs == []  # no-op rerun


def test_cli_table_and_bad_inputs(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    run, hf, _ = models
    rows = qa_rows()
    rows.append({"q": "missing options"})  # missing field
    rows.append({"q": "x", "opts": ["a", "b"], "label": 5})  # gold out of range
    rows.append({"q": "long " * 200, "opts": ["a", "b"], "label": 0})  # longer than the context
    rows.append({"q": "x", "opts": ["long " * 200, "b"], "label": 1})  # a choice longer than the context
    spec = write_task(tmp_path / "t", rows)
    code = cli("eval", hf, "--task", f"jsonl:{spec}", "--protocol", "likelihood", "--out", tmp_path / "o")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "acc_norm" in out and "likelihood" in out and "skipped · qa" in err + out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    acc = next(r for r in res["results"] if r["metric"] == "acc")
    # --truncate left (the default, as lm-eval): the long question is scored on the end of its
    # context; a choice that alone exceeds the context cannot be, and is skipped
    assert acc["n"] == len(QUESTIONS) + 1 and acc["settings"]["truncated"] == {"likelihood": 1}
    assert "truncated · qa" in " ".join((out + err).split())
    assert acc["settings"]["skipped"] == {"missing_field": 1, "gold_out_of_range": 1,
                                          "likelihood:longer_than_context": 1}
    items = [json.loads(x) for x in (tmp_path / "o" / "items-qa.jsonl").read_text().splitlines()]
    long_row = next(r for r in items if r.get("truncated_likelihood"))
    assert len(long_row["loglik"]) == 2 and res["settings"]["truncate"] == "left"
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["stats"]["items_scored"] == len(QUESTIONS) + 1
    # --truncate skip: the long question is left out and counted
    code = cli("eval", hf, "--task", f"jsonl:{spec}", "--protocol", "likelihood", "--truncate", "skip", "--out", tmp_path / "o-skip")
    capsys.readouterr()
    acc = next(r for r in json.loads((tmp_path / "o-skip" / "results.json").read_text())["results"] if r["metric"] == "acc")
    assert code == 0 and acc["n"] == len(QUESTIONS) and "truncated" not in acc["settings"]
    assert acc["settings"]["skipped"]["likelihood:longer_than_context"] == 2
    # a task none of whose items can be scored: a warning, and null (strict JSON) rather than NaN
    long_only = write_task(tmp_path / "t-long", [{"q": "long " * 200, "opts": ["a", "b"], "label": 0}])
    code = cli("eval", run, "--task", f"jsonl:{long_only}", "--protocol", "likelihood", "--truncate", "skip",
               "--out", tmp_path / "o-long")
    out, err = capsys.readouterr()
    assert code == 0 and "no item could be scored (likelihood:longer_than_context 1)" in " ".join((out + err).split())
    strict = json.loads((tmp_path / "o-long" / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert {r["metric"]: r["value"] for r in strict["results"]} == {"acc": None, "acc_norm": None}

    # generation with --max-new-tokens that leaves no room for a prompt: one line, not N skips
    code = cli("eval", run, "--task", f"jsonl:{spec}", "--protocol", "generation", "--max-new-tokens", "500",
               "--out", tmp_path / "o-gen")
    out, err = capsys.readouterr()
    assert code == 2 and "--max-new-tokens 500 leaves no room for a prompt" in err and not (tmp_path / "o-gen").exists()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": "items.jsonl", "template": "{q}"}))
    code = cli("eval", run, "--task", f"jsonl:{bad}", "--out", tmp_path / "o2")
    out, err = capsys.readouterr()
    assert code == 2 and "lacks choices, gold" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    only_bad = write_task(tmp_path / "t3", [{"q": "x", "opts": ["a"], "label": 3}])
    with pytest.raises(UsageError, match="no usable item"):
        run_eval(EvalConfig(model=str(run), tasks=[f"jsonl:{only_bad}"], out=str(tmp_path / "o3")))
    with pytest.raises(UsageError, match="KIND:PATH"):
        run_eval(EvalConfig(model=str(run), tasks=["nope:x"], out=str(tmp_path / "o4")))
    with pytest.raises(UsageError):
        run_eval(EvalConfig(model=str(tmp_path), tasks=[f"jsonl:{spec}"], out=str(tmp_path / "o5")))
    assert not any((tmp_path / f"o{i}").exists() for i in (3, 4, 5))
    # templates: a stray brace or an attribute lookup is the spec's fault (one line); a format spec a
    # record's value does not take is that record's ("bad_field", counted)
    for template, msg in (("Q: {q} {x\nA:", "template is not a format string"), ("Q: {q.real}", "template field {q.real}")):
        with pytest.raises(UsageError, match=re.escape(msg)):
            load_task(f"jsonl:{write_task(tmp_path / 't4', qa_rows(), template=template)}")
    rows = [{**r, "n": 1} for r in qa_rows()] + [{"q": "x", "opts": ["a", "b"], "label": 0, "n": "one"}]
    typed = load_task(f"jsonl:{write_task(tmp_path / 't5', rows, template='{q} ({n:d})')}")
    assert typed.skipped == {"bad_field": 1} and len(typed.items) == len(QUESTIONS)


def test_contamination_flags_and_decontaminate_scores_only_clean(models, tmp_path):
    run = models[0]
    spec = write_task(tmp_path / "t", qa_rows())
    train = tmp_path / "train.jsonl"
    leak = "Question: The capital of France is\nAnswer: Berlin Madrid Paris, which everyone knows"
    train.write_text(json.dumps({"text": "unrelated words " * 20}) + "\n" + json.dumps({"text": leak}) + "\n")
    task = load_task(f"jsonl:{spec}")
    hit, stats = find_contaminated([x.text() for x in task.items], train, n=8)
    assert hit == [False, False, False, True, False, False] and stats["training_docs"] == 2
    assert item_grams("A b c", 13) == {("a", "b", "c")}
    run_eval(EvalConfig(model=str(run), tasks=[f"jsonl:{spec}"], out=str(tmp_path / "o"), protocol="likelihood",
                        contamination=str(train), ngram=8, decontaminate=True))
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    acc = res["results"][0]
    assert acc["n"] == len(QUESTIONS) - 1 and acc["settings"]["contaminated"] == 1
    ids = [json.loads(x)["id"] for x in (tmp_path / "o" / "items-qa.jsonl").read_text().splitlines()]
    assert "qa/3" not in ids and len(ids) == 5
    with pytest.raises(UsageError, match="--decontaminate needs"):
        run_eval(EvalConfig(model=str(run), tasks=[f"jsonl:{spec}"], out=str(tmp_path / "o9"), decontaminate=True))
    # a source that is not training data, or holds no text, is refused rather than reported clean
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for source, msg in ((run, "is a 'pretrain' artifact; give the training data"), (empty, "holds no text"),
                        (spec, "not Parquet, .txt or .jsonl")):
        with pytest.raises(UsageError, match=re.escape(msg)):
            find_contaminated([x.text() for x in task.items], source, n=8)


def test_contamination_against_a_tokens_artifact(models, tmp_path):
    """Training data given as a tokenize-encode artifact: its documents are decoded one by one
    (split at BOS/EOS), so an n-gram inside one document is found and one that only exists across
    two neighbouring documents is not."""
    from llmctl.tokenizer import EncodeConfig, encode

    run = models[0]
    spec = write_task(tmp_path / "t", qa_rows())
    items = [x.text() for x in load_task(f"jsonl:{spec}").items]
    filler = [{"text": f"Unrelated document number {i} about bees, dogs and the weather."} for i in range(6)]

    def tokens(name: str, docs: list[dict]) -> Path:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        encode(EncodeConfig(docs=[str(tmp_path / f"{name}.jsonl")], tokenizer=str(run / "tokenizer.model"),
                            out=str(tmp_path / name), val_fraction=0.3, threads=1))
        return tmp_path / name

    # the item "Question: The capital of France is / Answer: Berlin Madrid Paris" cut in two documents
    split = tokens("split", [*filler[:3], {"text": "Question: The capital of France"},
                             {"text": "-is Answer: Berlin Madrid Paris"}, *filler[3:]])
    # … that lie side by side in the token stream: decoded without the separators they would match
    from llmctl.tokens import TokenArtifact

    art = TokenArtifact(split)
    stream = " ".join(art.tokenizer().decode([int(i) for i in sh[:]]) for sp in art.splits for sh in art.shards(sp))
    assert item_grams(items[3], 8) & item_grams(stream, 8)
    leak = tokens("leak", [*filler[:3], {"text": "Question: The capital of France is\nAnswer: Berlin Madrid Paris!"},
                           *filler[3:]])
    hit, stats = find_contaminated(items, split, n=8)
    assert hit == [False] * 6 and stats["training_docs"] == 8
    hit, stats = find_contaminated(items, leak, n=8)
    assert hit == [False, False, False, True, False, False] and stats["training_docs"] == 7
    run_eval(EvalConfig(model=str(run), tasks=[f"jsonl:{spec}"], out=str(tmp_path / "o"), protocol="likelihood",
                        contamination=str(leak), ngram=8, decontaminate=True))
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["results"][0]["n"] == 5 and res["results"][0]["settings"]["contaminated"] == 1
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["params"]["contamination"] == str(leak)


def test_fewshot_is_seeded_and_never_the_item_itself(models, tmp_path):
    from llmctl.eval.runner import fewshot

    task = load_task(f"jsonl:{write_task(tmp_path / 't', qa_rows())}")
    for it in task.items:
        a = fewshot(it, task.items, 3, seed=7)
        assert a == fewshot(it, task.items, 3, seed=7) and it not in a and len(a) == 3
    draws = {tuple(x.id for x in fewshot(task.items[0], task.items, 3, seed=s)) for s in range(10)}
    assert len(draws) > 1
    with pytest.raises(UsageError, match="only 5 other items"):
        fewshot(task.items[0], task.items, 6, seed=0)


def test_shared_loaders_read_the_real_files(shared_data):
    ev = shared_data / "eval"
    mmlu = load_mmlu(ev / "mmlu-dev")
    assert len(mmlu.items) == 285 and not mmlu.skipped
    it = mmlu.items[0]
    assert it.choices == ["A", "B", "C", "D"] and it.context.endswith("\nAnswer:") and "\nD. " in it.context
    assert it.description.startswith("The following are multiple choice questions (with answers) about abstract algebra")
    piqa = load_task(f"piqa:{ev / 'piqa-valid.jsonl'}")
    assert len(piqa.items) == 1838 and {x.gold for x in piqa.items} == {0, 1}
    assert piqa.items[0].context.startswith("Question: How do I ready a guinea pig cage")
    lam = load_task(f"lambada:{ev / 'lambada-test.jsonl'}")
    assert len(lam.items) == 5153 and all(x.target.startswith(" ") and " " not in x.target[1:] for x in lam.items[:50])

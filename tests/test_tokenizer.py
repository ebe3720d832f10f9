"""The tokenizer: lossless BPE training on real text, and encoding documents into token shards."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from llmctl import tokenizer as tk
from llmctl.artifacts import read_manifest
from llmctl.errors import UsageError
from llmctl.tokenizer import EncodeConfig, TrainConfig, load_tokenizer, token_dtype
from llmctl.tokens import TokenArtifact, check_compatible

TRAIN_CHARS = 300_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: the head of tinyshakespeare and most of code-alpaca's outputs for training, the
    rest held out (never seen by the tokenizer)."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    d = tmp_path_factory.mktemp("corpus")
    shakes = (SHARED_DATA / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = shakes.index("\n\n", TRAIN_CHARS) + 2
    code = [r["output"] for r in json.loads((SHARED_DATA / "sft" / "code-alpaca-2k.json").read_text(encoding="utf-8"))]
    (d / "shakes.txt").write_text(shakes[:cut], encoding="utf-8")
    with open(d / "code.jsonl", "w", encoding="utf-8") as f:
        for i, c in enumerate(code[:1500]):
            f.write(json.dumps({"id": f"code-{i}", "text": c}) + "\n")
    return {
        "dir": d,
        "heldout_lines": [ln for ln in shakes[cut : cut + 200_000].split("\n") if ln],
        "heldout_paragraphs": shakes[cut : cut + 200_000].split("\n\n"),
        "heldout_code": code[1500:],
    }


@pytest.fixture(scope="module")
def tok_dir(corpus):
    out = corpus["dir"] / "tok"
    tk.train(TrainConfig(docs=[str(corpus["dir"] / "shakes.txt"), str(corpus["dir"] / "code.jsonl")], out=str(out), vocab_size=512, threads=1))
    return out


def test_train_manifest_and_reserved_ids(tok_dir):
    m = read_manifest(tok_dir)
    assert m["stage"] == "tokenize-train" and m["vocab_size"] == 512
    assert m["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "system": 4, "user": 5, "assistant": 6, "end": 7}
    s = m["stats"]
    assert s["heldout_bytes"] > 0 and 1.5 < s["bytes_per_token"] < 4.0
    assert s["heldout_roundtrip_exact"].split("/")[0] == s["heldout_roundtrip_exact"].split("/")[1]
    assert m["params"]["sample_bytes"] == 100_000_000 and m["params"]["seed"] == 0  # defaults recorded
    tok = load_tokenizer(tok_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.role_ids == {"system": 4, "user": 5, "assistant": 6, "end": 7}
    assert tok.encode("<|user|>hi<|end|>")[0] == 5 and tok.encode("<|user|>hi<|end|>")[-1] == 7
    assert tok.decode(tok.encode("<|assistant|>ok")) == "<|assistant|>ok"
    assert tok.encode("hi", add_bos=True, add_eos=True)[0] == 1 and tok.encode("hi", add_bos=True, add_eos=True)[-1] == 2
    assert m["tokenizer_fingerprint"] == tok.fingerprint


def test_roundtrip_exact_on_heldout_text_and_code(tok_dir, corpus):
    tok = load_tokenizer(tok_dir)
    code = corpus["heldout_code"]
    assert any("\t" in c for c in code) and any("\n    " in c for c in code) and any("  " in c for c in code)
    samples = corpus["heldout_lines"] + corpus["heldout_paragraphs"] + code
    samples += [" leading space", "trailing  \n\n", "\n", "a\t\tb   c\r\nd", "   "]
    ids = tok.encode(samples)
    bad = [s for s, i in zip(samples, ids, strict=True) if tok.decode(i) != s]
    assert not bad, f"{len(bad)} of {len(samples)} did not round-trip, e.g. {bad[:2]!r}"
    assert len(samples) > 3000
    # the one documented exception: sentencepiece's own space symbol U+2581 comes back as a space
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_long_documents_encode_exactly_as_sentencepiece_does(tok_dir, corpus):
    tok = load_tokenizer(tok_dir)
    long_text = "\n\n".join(corpus["heldout_paragraphs"]) + "  x" + " " * 9000 + "y\n" + "z" * 10_000 + " end"
    assert len(long_text) > 20 * tk.LONG_CHARS
    ids = tok.encode(long_text, add_bos=True, add_eos=True)
    assert ids == tok.sp.encode(long_text, add_bos=True, add_eos=True)
    assert tok.decode(ids) == long_text
    batch = tok.encode(["short one", long_text, "code:\n\tx = 1"])
    assert batch == tok.sp.encode(["short one", long_text, "code:\n\tx = 1"])


def test_digits_are_split_one_by_one(tok_dir):
    tok = load_tokenizer(tok_dir)
    pieces = [tok.id_to_piece(i) for i in tok.encode("In 1599, 31415926 people paid 2.50 each")]
    assert all(len(re.findall(r"\d", p)) <= 1 for p in pieces)
    assert [p for p in pieces if p.isdigit()] == list("159931415926250")


def test_byte_fallback_for_unseen_characters(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "emoji 😀🚀, CJK 漢字テスト, Ωμέγα"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces  # first byte of the 4-byte emoji
    assert tok.decode(ids) == text


def test_token_dtype_boundary():
    assert token_dtype(512) == np.dtype("<u2") and token_dtype(65_535) == np.dtype("<u2")
    assert token_dtype(65_536) == np.dtype("<u4")


def _encode(corpus, tok_dir, out, **kw):
    cfg = EncodeConfig(docs=kw.pop("docs", [str(corpus["dir"] / "shakes.txt"), str(corpus["dir"] / "code.jsonl")]),
                       tokenizer=str(tok_dir), out=str(out), **kw)
    return tk.encode(cfg, force=kw.get("force", False))


def _bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.bin"))}


def test_encode_boundaries_dtype_and_manifest(corpus, tok_dir, tmp_path):
    m = _encode(corpus, tok_dir, tmp_path / "t", shard_tokens=20_000)
    assert m["dtype"] == "uint16" and (m["bos_id"], m["eos_id"], m["pad_id"]) == (1, 2, 3)
    art = TokenArtifact(tmp_path / "t")
    train = art.split("train").to_numpy()
    assert len(art.split("train").shards) > 3 and all(len(s) == 20_000 for s in art.split("train").shards[:-1])
    assert train.dtype == np.dtype("<u2") and len(train) == m["train_tokens"]
    assert (train == 1).sum() == m["splits"]["train"]["docs"] == (train == 2).sum()
    assert train[0] == 1 and train[-1] == 2
    starts, ends = np.flatnonzero(train == 1), np.flatnonzero(train == 2)
    assert np.all(starts[1:] == ends[:-1] + 1)  # EOS of one document, then BOS of the next
    tok = load_tokenizer(art.tokenizer_path)
    docs = [d for d in tk.iter_docs(tk.resolve_sources([corpus["dir"] / "shakes.txt"])[0])]
    val_ids = {d[0] for d in docs if tk._unit(0, "val", d[0]) < 0.01}
    first_train = next(d for d in docs if d[0] not in val_ids)
    assert tok.decode(train[1 : ends[0]].tolist()) == first_train[1]
    n_bytes = m["train_bytes"] + m["val_bytes"]
    text_tokens = m["train_tokens"] + m["val_tokens"] - 2 * (m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"])
    assert m["bytes_per_token"] == pytest.approx(n_bytes / text_tokens, abs=1e-3)
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    check_compatible(art, load_tokenizer(tok_dir))
    check_compatible(art, 512)


def test_val_split_is_deterministic_by_seed(corpus, tok_dir, tmp_path):
    a = _encode(corpus, tok_dir, tmp_path / "a", val_fraction=0.05, seed=3)
    _encode(corpus, tok_dir, tmp_path / "b", val_fraction=0.05, seed=3)
    c = _encode(corpus, tok_dir, tmp_path / "c", val_fraction=0.05, seed=4)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert _bytes(tmp_path / "a")["val-00000.bin"] != _bytes(tmp_path / "c")["val-00000.bin"]
    docs = a["splits"]["train"]["docs"] + a["splits"]["val"]["docs"]
    assert 0.03 * docs < a["splits"]["val"]["docs"] < 0.07 * docs
    assert a["val_bytes"] > 0 and a["val_tokens"] > 0 and c["splits"]["val"]["docs"] > 0


def test_exact_val_documents(corpus, tok_dir, tmp_path):
    heldout = "\n\n".join(corpus["heldout_paragraphs"][:50])
    (tmp_path / "val.txt").write_text(heldout, encoding="utf-8")
    m = _encode(corpus, tok_dir, tmp_path / "t", val=[str(tmp_path / "val.txt")], txt_split="file")
    tok = load_tokenizer(tok_dir)
    val = TokenArtifact(tmp_path / "t").split("val").to_numpy()
    assert val[0] == 1 and val[-1] == 2 and m["splits"]["val"]["docs"] == 1
    assert tok.decode(val[1:-1].tolist()) == heldout
    assert m["val_bytes"] == len(heldout.encode("utf-8"))
    # the same file given as training documents too: its documents go to val only
    m2 = _encode(corpus, tok_dir, tmp_path / "t2", docs=[str(corpus["dir"] / "code.jsonl"), str(tmp_path / "val.txt")],
                 val=[str(tmp_path / "val.txt")], txt_split="file")
    assert m2["stats"]["train_docs_excluded_as_val"] == 1 and m2["splits"]["val"]["docs"] == 1
    with pytest.raises(UsageError, match="--val and --val-fraction"):
        _encode(corpus, tok_dir, tmp_path / "t3", val=[str(tmp_path / "val.txt")], val_fraction=0.2)


def test_domain_weights_upsample_by_epochs(corpus, tok_dir, tmp_path):
    from llmctl.data.docs import schema, write_table

    shakes = [p for p in (corpus["dir"] / "shakes.txt").read_text().split("\n\n") if p.strip()][:400]
    code = [json.loads(ln)["text"] for ln in (corpus["dir"] / "code.jsonl").read_text().splitlines()][:400]
    rows = [(f"w{i}", t, "web") for i, t in enumerate(shakes)] + [(f"c{i}", t, "code") for i, t in enumerate(code)]
    table = pa.table(
        {"id": [r[0] for r in rows], "url": [None] * len(rows), "text": [r[1] for r in rows],
         "timestamp": pa.array([None] * len(rows), pa.timestamp("us", tz="UTC")), "domain": [r[2] for r in rows]},
        schema=schema([pa.field("domain", pa.string())]),
    )
    docs = tmp_path / "docs"
    docs.mkdir()
    write_table(table, docs / "docs-00000.parquet")
    m = _encode(corpus, tok_dir, tmp_path / "w", docs=[str(docs)], val_fraction=0.0, domain_weights={"web": 1.0, "code": 2.5})
    base = _encode(corpus, tok_dir, tmp_path / "b", docs=[str(docs)], val_fraction=0.0)
    d = m["stats"]["domains"]
    assert d["web"]["effective_epochs"] == 1.0 and d["web"]["tokens"] == base["stats"]["domains"]["web"]["tokens"]
    assert 2.3 < d["code"]["effective_epochs"] < 2.7 and d["code"]["weight"] == 2.5
    assert d["code"]["unique_tokens"] == base["stats"]["domains"]["code"]["tokens"]
    assert m["train_tokens"] == d["web"]["tokens"] + d["code"]["tokens"]
    train = TokenArtifact(tmp_path / "w").split("train").to_numpy()
    assert len(train) == m["train_tokens"] and (train == 1).sum() == d["web"]["copies"] + d["code"]["copies"]
    assert d["code"]["copies"] in range(2 * 400, 3 * 400 + 1)
    drop = _encode(corpus, tok_dir, tmp_path / "d", docs=[str(docs)], val_fraction=0.0, domain_weights={"web": 0.0})
    assert drop["stats"]["domains"]["web"]["tokens"] == 0
    assert drop["splits"]["train"]["docs"] == base["stats"]["domains"]["code"]["docs"] == 400 - base["stats"]["bad_records"].get("empty_text", 0)


def test_worker_count_does_not_change_output(corpus, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "BLOCK_BYTES", 40_000)  # many blocks, so two workers really share them
    m1 = _encode(corpus, tok_dir, tmp_path / "w1", workers=1, shard_tokens=30_000)
    m2 = _encode(corpus, tok_dir, tmp_path / "w2", workers=2, threads=1, shard_tokens=30_000)
    assert m1["stats"]["blocks"] > 8
    assert _bytes(tmp_path / "w1") == _bytes(tmp_path / "w2")
    assert m1["splits"] == m2["splits"]


def test_resume_after_interruption_equals_uninterrupted(corpus, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "BLOCK_BYTES", 40_000)
    ref = _encode(corpus, tok_dir, tmp_path / "ref", shard_tokens=30_000)
    real = tk._encode_block

    def crash_at_block_5(job):
        if job["block"] == 5:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(tk, "_encode_block", crash_at_block_5)
    with pytest.raises(KeyboardInterrupt):
        _encode(corpus, tok_dir, tmp_path / "out", shard_tokens=30_000)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(tk, "_encode_block", real)
    m = _encode(corpus, tok_dir, tmp_path / "out", shard_tokens=30_000)
    assert m["resumed"] and m["stats"]["blocks_resumed"] == 5
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "ref") and m["splits"] == ref["splits"]
    # a finished run is a no-op; --force redoes it
    again = _encode(corpus, tok_dir, tmp_path / "out", shard_tokens=30_000)
    assert again["created"] == m["created"] and again["stats"] == m["stats"]
    forced = tk.encode(EncodeConfig(docs=[str(corpus["dir"] / "shakes.txt"), str(corpus["dir"] / "code.jsonl")],
                                    tokenizer=str(tok_dir), out=str(tmp_path / "out"), shard_tokens=30_000), force=True)
    assert not forced["resumed"] and forced["stats"]["blocks_resumed"] == 0


def test_mismatched_tokenizer_is_refused(corpus, tok_dir, tmp_path):
    other = tmp_path / "tok2"
    tk.train(TrainConfig(docs=[str(corpus["dir"] / "shakes.txt")], out=str(other), vocab_size=400, threads=1))
    _encode(corpus, tok_dir, tmp_path / "t")
    with pytest.raises(UsageError, match="another tokenizer"):
        check_compatible(tmp_path / "t", load_tokenizer(other))
    with pytest.raises(UsageError, match="another tokenizer"):
        check_compatible(tmp_path / "t", other)
    with pytest.raises(UsageError, match="vocab size 512 but the model has 400"):
        check_compatible(tmp_path / "t", 400)


def test_cli_train_encode_stats_and_bad_input(corpus, tok_dir, tmp_path, llmctl):
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"text": "fine doc 1"}\nnot json\n{"title": "no text"}\n{"text": "fine doc 2"}\n', encoding="utf-8")
    r = llmctl("tokenize", "train", corpus["dir"] / "shakes.txt", bad, "--vocab-size", "400", "--out", tmp_path / "tok", "--threads", "1")
    assert r.code == 0, r.err
    assert read_manifest(tmp_path / "tok")["stats"]["bad_records"] == {"bad_json": 1, "no_text_field": 1}
    r = llmctl("tokenize", "train", corpus["dir"] / "shakes.txt", bad, "--vocab-size", "400", "--out", tmp_path / "tok", "--threads", "1")
    assert r.code == 0 and "already complete" in r.err
    r = llmctl("tokenize", "encode", bad, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "toks", "--val-fraction", "0")
    assert r.code == 0, r.err
    assert "val split is empty" in r.err
    r = llmctl("tokenize", "stats", tmp_path / "toks", "--show", "10")
    assert r.code == 0 and "fine doc" in r.err
    (tmp_path / "a.csv").write_text("x")
    r = llmctl("tokenize", "train", tmp_path / "a.csv", "--out", tmp_path / "x")
    assert r.code == 2 and "unknown document file type" in r.err and not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="no such file"):
        tk.train(TrainConfig(docs=[str(tmp_path / "nope.txt")], out=str(tmp_path / "x")))
    with pytest.raises(UsageError, match="--vocab-size 200000: too large for this sample.*lower it"):
        tk.train(TrainConfig(docs=[str(corpus["dir"] / "code.jsonl")], out=str(tmp_path / "x"), vocab_size=200_000))
    # more distinct characters than the vocabulary can hold besides bytes and specials: the fix is the other way
    many = tmp_path / "many-chars.txt"
    many.write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 120)) * 40 + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--vocab-size 300: too small for this sample's characters.*raise it"):
        tk.train(TrainConfig(docs=[str(many)], out=str(tmp_path / "x"), vocab_size=300))
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    with pytest.raises(UsageError, match="no such tokenizer"):
        tk.encode(EncodeConfig(docs=[str(bad)], tokenizer=str(tmp_path / "nope"), out=str(tmp_path / "y")))
    # an empty train split says which option emptied it
    for kw, msg in (({"val": [str(bad)]}, "documents are also in --val"),
                    ({"text_field": "body", "val_fraction": 0.0}, "records have no 'body' field; set --text-field")):
        with pytest.raises(UsageError, match=re.escape(msg)):
            tk.encode(EncodeConfig(docs=[str(bad)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "y"), **kw))
        assert not (tmp_path / "y").exists()
    with pytest.raises(UsageError, match="--domain-weights"):
        tk.parse_domain_weights("web=x")
    assert tk.parse_domain_weights("web=1, code=2.5") == {"web": 1.0, "code": 2.5}
    r = llmctl("tokenize", "train", "--help")
    assert r.code == 0 and "Example" in r.out


def test_txt_splitting_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\nstill one\n\n  \n\ntwo\n   indented\n\n\nthree", encoding="utf-8")
    src, _ = tk.resolve_sources([f])
    assert [d[1] for d in tk.iter_docs(src)] == ["one\nstill one", "two\n   indented", "three"]
    assert [d[1] for d in tk.iter_docs(src, txt_split="lines")] == ["one", "still one", "two", "   indented", "three"]
    assert [d[1] for d in tk.iter_docs(src, txt_split="file")] == [f.read_text()]
    assert [d[0] for d in tk.iter_docs(src)] == ["a.txt#0", "a.txt#1", "a.txt#2"]

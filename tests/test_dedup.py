"""llmctl dedup: normalisation, signatures, planted near-duplicates, exact copies, boilerplate lines,
determinism across workers, resume, the Redis-shared index, the CLI and bad inputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from llmctl.data import dedup as D
from llmctl.data.dedup_minhash import Signer
from llmctl.data.docs import doc_id, schema, write_table
from llmctl.data.text import jaccard, ngrams, normalize, shingles, words
from llmctl.errors import UsageError

LEVELS = [0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
PAIRS_PER_LEVEL = 40
LENGTH = 200  # words per planted document


def _write_docs(folder: Path, shards: list[list[tuple[str, str]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, docs in enumerate(shards):
        t = pa.table(
            {
                "id": [i for i, _ in docs],
                "url": [f"https://example.org/{i}" for i, _ in docs],
                "text": [x for _, x in docs],
                "timestamp": pa.array([None] * len(docs), pa.timestamp("us", tz="UTC")),
            },
            schema=schema(),
        )
        write_table(t, folder / f"docs-{k:05d}.parquet")


def _ids(path: Path, prefix: str = "docs") -> list[str]:
    out = []
    for f in sorted(path.glob(f"{prefix}-*.parquet")):
        out.extend(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return out


def _rejected(path: Path) -> dict[str, tuple[str, str | None]]:
    out = {}
    for f in sorted(path.glob("rejected-*.parquet")):
        t = pq.read_table(f, columns=["id", "reason", "duplicate_of"]).to_pylist()
        out.update({r["id"]: (r["reason"], r["duplicate_of"]) for r in t})
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Pairs whose word 5-gram shingle sets have a known Jaccard similarity, plus exact copies.

    Every word is a random 7-letter string, so unrelated documents share no shingle. Document B of a
    pair repeats the first m words of A and continues with fresh words: the two share exactly the
    m - 4 shingles inside that prefix, so J = (m - 4) / (2 (L - 4) - (m - 4)), computed exactly below.
    """
    rng = random.Random(1234)

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7))

    docs: list[tuple[str, str]] = []
    pairs = []  # (id_a, id_b, jaccard)
    t = LENGTH - 4
    for level in LEVELS:
        inter = round(2 * level * t / (1 + level))
        m = inter + 4
        for j in range(PAIRS_PER_LEVEL):
            a = [word() for _ in range(LENGTH)]
            b = a[:m] + [word() for _ in range(LENGTH - m)]
            ia, ib = f"p{level}-{j}-a", f"p{level}-{j}-b"
            docs += [(ia, " ".join(a)), (ib, " ".join(b))]
            pairs.append((ia, ib, inter / (2 * t - inter)))
    singles = [(f"s{j}", " ".join(word() for _ in range(LENGTH))) for j in range(60)]
    docs += singles
    # exact copies after normalisation: case, punctuation, digits and accents differ
    exact = []
    for j in range(15):
        base = " ".join(word() for _ in range(80))
        orig, copy = (f"e{j}-orig", f"Title {j}: " + base + "."), (f"e{j}-copy", f"TITLE {j + 7}  — " + base.upper() + "!")
        docs += [orig, copy]
        exact.append((orig[0], copy[0]))
    rng.shuffle(docs)
    # three shards; remember each document's global (shard, row) position
    shards = [docs[i::3] for i in range(3)]
    position = {d[0]: (k, r) for k, sh in enumerate(shards) for r, d in enumerate(sh)}
    folder = tmp_path_factory.mktemp("planted") / "docs"
    _write_docs(folder, shards)
    text = dict(docs)
    return {"folder": folder, "pairs": pairs, "exact": exact, "position": position, "text": text}


def _run(src, out, **kw) -> dict:
    cfg = D.DedupConfig(inputs=[Path(src)], out=Path(out), **kw)
    return D.run(cfg)


# ---- normalisation and signatures -------------------------------------------------------------
def test_normalize_folds_case_punctuation_digits_and_accents():
    assert normalize("Héllo, WÖRLD!  It's 2024-05-01.") == "hello world it s 0 0 0"
    assert normalize("naïve café\tﬁne") == "naive cafe fine"
    assert normalize("Ｆｕｌｌ　ｗｉｄｔｈ ９９") == "full width 0"
    assert normalize("a\u00a0b\n\nc") == "a b c"
    assert normalize("¡¿…!!") == ""
    assert words("Don't STOP") == ["don", "t", "stop"]
    assert shingles("a b c d e f", 5) == {"a b c d e", "b c d e f"}
    assert shingles("a b", 5) == {"a b"}
    assert jaccard({"x", "y"}, {"y", "z"}) == pytest.approx(1 / 3)


def test_vectorised_signatures_equal_datasketch_minhash():
    signer = Signer(112, 7, 5)
    texts = ["the quick brown fox jumps over the lazy dog again and again", "too short", ""]
    toks = [words(t) for t in texts]
    sig, has = signer.signatures(toks)
    assert has.tolist() == [True, True, False]
    for i, tk in enumerate(toks[:2]):
        ref = MinHash(num_perm=112, seed=7, scheme="affine64", hashfunc=signer.shingler.hash_of)
        ref.update_batch(ngrams(tk, 5))
        assert np.array_equal(ref.hashvalues, sig[i])
    assert (sig[2] == np.iinfo(np.uint64).max).all()


# ---- planted pairs ------------------------------------------------------------------------------
def test_planted_pairs_recall_precision_and_exact(planted, tmp_path):
    m = _run(planted["folder"], tmp_path / "out", keep_rejected=tmp_path / "rej", methods=["exact", "near"])
    rej = _rejected(tmp_path / "rej")
    kept = set(_ids(tmp_path / "out"))
    assert len(kept) + len(rej) == len(planted["text"])
    assert m["stats"]["docs_in"] == len(planted["text"])

    by_level: dict[float, list[bool]] = {}
    partner_sim = {}
    for a, b, s in planted["pairs"]:
        hit = a in rej or b in rej
        assert not (a in rej and b in rej)
        level = min(LEVELS, key=lambda x: abs(x - s))
        by_level.setdefault(level, []).append(hit)
        partner_sim[a] = partner_sim[b] = level
        if hit:  # the survivor is the pair's first document in (shard, row) order
            first, second = sorted((a, b), key=planted["position"].get)
            assert second in rej and rej[second] == ("near", first)
    rate = {lv: sum(h) / len(h) for lv, h in by_level.items()}
    assert rate[0.9] >= 0.95 and rate[0.95] >= 0.95, rate
    assert rate[0.3] == 0 and rate[0.5] == 0, rate
    high = [h for lv, hs in by_level.items() if lv >= 0.85 for h in hs]
    assert sum(high) / len(high) >= 0.9, rate
    near_removed = [i for i, (r, _) in rej.items() if r == "near"]
    # precision: a removal is right when the document has a planted partner at J ≈ 0.7 or more
    true_pos = [i for i in near_removed if partner_sim.get(i, 0) >= 0.7]
    assert len(true_pos) / len(near_removed) >= 0.99
    # exact copies (differing in case, punctuation, digits) are always removed, the first one kept
    for orig, copy in planted["exact"]:
        first, second = sorted((orig, copy), key=planted["position"].get)
        assert rej.get(second) == ("exact", first) and first in kept
    assert m["stats"]["exact_clusters"] == len(planted["exact"])
    assert m["stats"]["near_clusters"] == len(near_removed)


def test_survivors_identical_across_runs_and_worker_counts(planted, tmp_path):
    a = _run(planted["folder"], tmp_path / "a", keep_rejected=tmp_path / "ra", workers=1)
    b = _run(planted["folder"], tmp_path / "b", keep_rejected=tmp_path / "rb", workers=2)
    assert _ids(tmp_path / "a") == _ids(tmp_path / "b")
    assert _rejected(tmp_path / "ra") == _rejected(tmp_path / "rb")
    assert a["stats"]["removed"] == b["stats"]["removed"]
    for f in sorted((tmp_path / "a").glob("docs-*.parquet")):
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "b" / f.name))


# ---- boilerplate lines ------------------------------------------------------------------------
def test_boilerplate_lines_removed_above_document_frequency(tmp_path):
    rng = random.Random(5)

    def sentence(n=30):
        return " ".join("".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(n))

    docs = []
    for i in range(40):
        lines = []
        if i < 12:
            lines.append("Accept all cookies | Privacy policy © 2021")
        if i < 9:
            lines.append("Share this article")
        lines.append(sentence())
        if i < 30:
            lines.append(f"Copyright {2000 + i} Example Corp.")  # digits normalise: one line, 30 documents
        docs.append((f"d{i}", "\n".join(lines)))
    docs.append(("only-boiler", "Accept all Cookies | privacy policy © 1999\nCOPYRIGHT 1990 example corp"))
    _write_docs(tmp_path / "in", [docs[:20], docs[20:]])
    m = _run(tmp_path / "in", tmp_path / "out", keep_rejected=tmp_path / "rej", line_min_docs=10)
    out = {}
    for f in sorted((tmp_path / "out").glob("docs-*.parquet")):
        out.update(dict(zip(*pq.read_table(f, columns=["id", "text"]).to_pydict().values(), strict=True)))
    assert "only-boiler" not in out and _rejected(tmp_path / "rej")["only-boiler"] == ("boilerplate", None)
    assert m["stats"]["removed"]["boilerplate"] == 1
    for i in range(40):
        t = out[f"d{i}"]
        assert "cookies" not in t.lower() and "Copyright" not in t
        assert ("Share this article" in t) == (i < 9)  # 9 documents: below the threshold of 10
    assert m["stats"]["boilerplate_distinct_lines"] == 2
    assert m["stats"]["lines_removed"] == 12 + 30 + 2
    # a fraction threshold on top: 12/41 of documents < 0.5, so only the copyright line goes
    m2 = _run(tmp_path / "in", tmp_path / "out2", line_min_docs=10, line_min_frac=0.5)
    assert m2["stats"]["boilerplate_distinct_lines"] == 1
    assert m2["stats"]["lines_removed"] == 31


# ---- resume -----------------------------------------------------------------------------------
def test_interrupted_run_resumes_and_equals_uninterrupted(planted, tmp_path, monkeypatch):
    full = _run(planted["folder"], tmp_path / "full")
    real = D.write_shard
    calls = []

    def flaky(task):
        calls.append(task["k"])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(task)

    monkeypatch.setattr(D, "write_shard", flaky)
    with pytest.raises(RuntimeError):
        _run(planted["folder"], tmp_path / "part")
    assert not (tmp_path / "part").exists()
    monkeypatch.setattr(D, "write_shard", lambda t: calls.append(t["k"]) or real(t))
    calls.clear()
    again = _run(planted["folder"], tmp_path / "part")
    assert again["resumed"] is True and len(calls) == 2  # the committed shard was not redone
    assert _ids(tmp_path / "part") == _ids(tmp_path / "full")
    assert again["stats"]["removed"] == full["stats"]["removed"]
    assert _run(planted["folder"], tmp_path / "part").get("already_complete") is True


# ---- Redis-shared index -----------------------------------------------------------------------
@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (.ci/run installs it with apt-get)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_index_shared_by_job_array_equals_global_run(planted, tmp_path, redis_url, llmctl):
    _run(planted["folder"], tmp_path / "local", keep_rejected=tmp_path / "rl")
    # two tasks of a job array, started together, each with its own --out, sharing one Redis index
    env = {**os.environ, "LLMCTL_PROGRESS": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llmctl", "dedup", str(planted["folder"]), "--out", str(tmp_path / f"t{i}"),
             "--shard", f"{i}/2", "--lsh-storage", redis_url, "--keep-rejected", str(tmp_path / f"r{i}"),
             "--wait-timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    kept = sorted(_ids(tmp_path / "t0") + _ids(tmp_path / "t1"))
    assert kept == sorted(_ids(tmp_path / "local"))
    rej = {**_rejected(tmp_path / "r0"), **_rejected(tmp_path / "r1")}
    assert rej == _rejected(tmp_path / "rl")
    # one process, two workers writing into the shared index: the same result again
    code = llmctl("dedup", planted["folder"], "--out", tmp_path / "w2", "--workers", "2", "--lsh-storage", redis_url,
                  "--run-id", "second-run")
    assert code.code == 0, code.err
    assert _ids(tmp_path / "w2") == _ids(tmp_path / "local")


# ---- CLI and bad inputs -----------------------------------------------------------------------
def test_cli_end_to_end_and_noop_rerun(planted, tmp_path, llmctl):
    r = llmctl("dedup", planted["folder"], "--out", tmp_path / "out", "--num-perm", "128", "--bands", "16",
               "--rows", "8", "--keep-rejected", tmp_path / "rej")
    assert r.code == 0, r.err
    assert "near duplicates" in r.out and "docs out" in r.out and "cluster sizes" in r.out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["stage"] == "dedup" and m["params"]["num_perm"] == 128 and m["params"]["bands"] == 16
    assert m["params"]["line_min_docs"] == 10 and m["params"]["lsh_storage"] == "memory"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "docs-00000.parquet", "docs-00001.parquet", "docs-00002.parquet", "manifest.json"]
    again = llmctl("dedup", planted["folder"], "--out", tmp_path / "out", "--num-perm", "128", "--bands", "16",
                   "--rows", "8", "--keep-rejected", tmp_path / "rej")
    assert again.code == 0 and "already complete" in again.out
    h = llmctl("dedup", "--help")
    assert h.code == 0 and "Example" in h.out and "--lsh-storage" in h.out


def _one_line_error(r, *needles):
    assert r.code == 2, (r.out, r.err)
    lines = [x for x in r.err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, r.err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_fail_with_one_line_before_any_work(tmp_path, llmctl):
    (tmp_path / "nocol").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "nocol" / "docs-00000.parquet")
    _one_line_error(llmctl("dedup", tmp_path / "nocol", "--out", tmp_path / "o1"), "missing column", "text")
    _write_docs(tmp_path / "ok", [[(doc_id("a"), "some words here for a document")]])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _one_line_error(
        llmctl("dedup", tmp_path / "ok", "--out", tmp_path / "o2", "--lsh-storage", f"redis://127.0.0.1:{port}"),
        "cannot reach Redis", str(port))
    _write_docs(tmp_path / "empty", [[]])
    cases = [
        (tmp_path / "empty", {}, "no documents"),
        (tmp_path / "ok", {"bands": 20, "rows": 8}, "exceeds --num-perm"),
        (tmp_path / "ok", {"lsh_storage": "mongo://x"}, "redis://"),
        (tmp_path / "missing", {}, "missing"),
        (tmp_path / "ok", {"methods": ["fuzzy"]}, "--methods"),
        (tmp_path / "ok", {"jaccard_threshold": 1.5}, "--jaccard-threshold"),
    ]
    for i, (src, kw, needle) in enumerate(cases, start=3):
        with pytest.raises(UsageError, match=needle) as e:
            _run(src, tmp_path / f"o{i}", **kw)
        assert "\n" not in str(e.value)
    for i in range(1, 3 + len(cases)):
        assert not (tmp_path / f"o{i}").exists()
        assert not list(tmp_path.glob(f".o{i}.tmp-*"))

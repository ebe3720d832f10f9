"""llmctl dedup: normalisation, signatures, planted near-duplicates, exact copies, boilerplate lines,
determinism across workers, resume, the Redis-shared index, the CLI and bad inputs.

Kept fast on a shared 2-core machine: one global reference run (module scope) is shared by the tests
that compare against it, the CLI runs in-process through ``llmctl.cli.main`` except for one
console-script exit code, and the tasks of the Redis job array run as threads of this process, each
with its own Redis connection and its own output, meeting at the shared index's barrier."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash, MinHashLSH

from llmctl.cli import main as llmctl_main
from llmctl.data import dedup as D
from llmctl.data import dedup_lsh as L
from llmctl.data.dedup_minhash import Signer, permutations
from llmctl.data.docs import doc_id, schema, write_table
from llmctl.data.text import jaccard, ngrams, normalize, normalize_lines, shingles, words
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


@pytest.fixture(scope="module")
def reference(planted, tmp_path_factory) -> dict:
    """One global in-memory run over the planted docs (all methods, one worker), shared by the tests
    that compare other runs (workers, resume, Redis) with it."""
    d = tmp_path_factory.mktemp("reference")
    m = _run(planted["folder"], d / "out", keep_rejected=d / "rej")
    return {"manifest": m, "out": d / "out", "rej": d / "rej", "kept": _ids(d / "out"), "rejected": _rejected(d / "rej")}


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``llmctl ARGS`` in this process (the console script's main); returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        llmctl_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


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
    for n, seed in ((112, 7), (128, 1), (3, 12345)):
        assert np.array_equal(permutations(n, seed), MinHash(num_perm=n, seed=seed, scheme="affine64").permutations)


def test_normalize_lines_equals_normalize_of_each_line():
    rng = random.Random(3)
    alphabet = list("abcXYZ 019\n\n\t\r,.!é\u0301ÉΣσς\u00a0\u2028\x00\x1c\x85ﬁ０９Ａ—…'ǅİß")
    for _ in range(3000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert normalize_lines(t) == [normalize(x) for x in t.split("\n")], repr(t)


def test_batched_shingles_and_line_hashes_match_per_document():
    rng = random.Random(4)
    signer = Signer(16, 1, 5)
    docs = [[f"w{rng.randint(0, 30)}" for _ in range(rng.choice([0, 1, 4, 5, 6, 50]))] for _ in range(300)]
    w = signer.shingler.word_hashes([x for d in docs for x in d])
    hv, counts = signer.shingler.batch_hashes(w, np.array([len(d) for d in docs]))
    assert np.array_equal(hv, np.concatenate([signer.shingler.hashes(d) for d in docs]))
    assert counts.tolist() == [len(signer.shingler.hashes(d)) for d in docs]
    # a line's hash depends on its normalised words only, not on where it stands
    lines = ["Accept all cookies!", "", "ACCEPT  all cookies", "all cookies accept", "x"]
    toks = [words(x) for x in lines]
    h = D._line_hashes(signer.shingler.word_hashes([x for t in toks for x in t]), np.array([len(t) for t in toks]))
    assert h[0] == h[2] and h[1] == 0 and len({int(h[0]), int(h[3]), int(h[4])}) == 3 and (h[[0, 3, 4]] != 0).all()


def test_memory_buckets_equal_datasketch_lsh_buckets():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**63, size=(200, 16), dtype=np.uint64)
    sig[1, :4] = sig[0, :4]  # share band 0
    sig[7, 4:8] = sig[0, 4:8]  # share band 1
    sig[9] = sig[3]  # share every band
    sig[150:160, 8:12] = sig[149, 8:12]  # a bucket of 11
    keys = np.arange(200, dtype=np.int64) + (5 << 32)
    lsh = MinHashLSH(num_perm=16, params=(4, 4), prepickle=False)
    with lsh.insertion_session() as s:
        for k, row in zip(keys.tolist(), sig, strict=True):
            s.insert(L.key_bytes(k), MinHash(num_perm=16, hashvalues=row, scheme="affine64"), check_duplication=False)
    ref = sorted(L.band_buckets(lsh))

    def values(pos, b):
        return [sig[p, 4 * b : 4 * b + 4] for p in pos.tolist()]

    ours = sorted(L.memory_buckets(keys, L.band_hashes(sig, 4, 4), values))
    assert ours == ref and len(ref) == 4 + 3
    # equal hashes with different band values (a forced collision) never merge two buckets
    assert sorted(L.memory_buckets(keys, np.zeros((200, 4), dtype=np.uint64), values)) == ref


# ---- planted pairs ------------------------------------------------------------------------------
def test_planted_pairs_recall_precision_and_exact(planted, reference):
    m, rej, kept = reference["manifest"], reference["rejected"], set(reference["kept"])
    assert len(kept) + len(rej) == len(planted["text"])
    assert m["stats"]["docs_in"] == len(planted["text"])
    assert m["stats"]["removed"]["boilerplate"] == 0  # every planted line is unique: only exact + near act

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


def test_survivors_identical_across_runs_and_worker_counts(planted, reference, tmp_path):
    a = reference["manifest"]  # one worker, in this process
    b = _run(planted["folder"], tmp_path / "b", keep_rejected=tmp_path / "rb", workers=2)  # a second run, 2 processes
    assert reference["kept"] == _ids(tmp_path / "b")
    assert reference["rejected"] == _rejected(tmp_path / "rb")
    assert a["stats"]["removed"] == b["stats"]["removed"]
    for f in sorted(reference["out"].glob("docs-*.parquet")):
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
        if i < 20:  # a frequent line inside the text (code), not at its edges
            lines += ["fn main() {", sentence(8), "} else {", sentence(8)]
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
        assert ("fn main() {\n" in t) == ("} else {\n" in t) == (i < 20)  # inside the text: kept
    # the two code lines are in 20 documents too, but never at an edge (default --line-scope edges)
    assert m["stats"]["boilerplate_distinct_lines"] == 4
    assert m["stats"]["lines_removed"] == 12 + 30 + 2
    # a fraction threshold on top: 12/41 of documents < 0.5, so only the copyright line goes
    m2 = _run(tmp_path / "in", tmp_path / "out2", line_min_docs=10, line_min_frac=0.5)
    assert m2["stats"]["boilerplate_distinct_lines"] == 1
    assert m2["stats"]["lines_removed"] == 31
    # --line-scope all: frequent lines go wherever they are, code included
    m3 = _run(tmp_path / "in", tmp_path / "out3", line_min_docs=10, line_scope="all")
    assert m3["stats"]["lines_removed"] == 12 + 30 + 2 + 2 * 20
    with pytest.raises(UsageError, match="--line-scope 'middle': choose one of edges, all"):
        _run(tmp_path / "in", tmp_path / "out4", line_scope="middle")


def test_duplicate_of_names_the_document_kept_in_its_place(tmp_path):
    """An exact copy of a near duplicate names the near cluster's survivor, which is in the output,
    not its exact group's survivor, which the near step removed."""
    rng = random.Random(9)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(7)) for _ in range(LENGTH)]
    a = " ".join(words)
    b = " ".join(words[:-1] + ["different"])  # Jaccard ≈ 0.99 with a
    _write_docs(tmp_path / "in", [[("a", a), ("b", b)], [("c", b.upper())]])  # c: b normalised
    _run(tmp_path / "in", tmp_path / "out", keep_rejected=tmp_path / "rej")
    assert _ids(tmp_path / "out") == ["a"]
    assert _rejected(tmp_path / "rej") == {"b": ("near", "a"), "c": ("exact", "a")}


# ---- resume -----------------------------------------------------------------------------------
def test_interrupted_run_resumes_and_equals_uninterrupted(planted, reference, tmp_path, monkeypatch):
    full = reference["manifest"]
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
    assert _ids(tmp_path / "part") == reference["kept"]
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


def test_redis_index_shared_by_job_array_equals_global_run(planted, reference, tmp_path, redis_url):
    """Two tasks of a job array, started together, each with its own --out, sharing one Redis index.

    They run as threads of this process (each its own Redis connection, its own StageRun, the barrier
    on the shared index in between); task 0 takes input shards 0 and 2 with two worker processes, so
    pool processes insert into Redis too. Together the outputs must equal the global in-memory run."""
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def task(i: int) -> None:
        try:
            results[i] = _run(planted["folder"], tmp_path / f"t{i}", shard=f"{i}/2", lsh_storage=redis_url,
                              keep_rejected=tmp_path / f"r{i}", wait_timeout=120, workers=2 - i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(e)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert results[0]["run_id"] == results[1]["run_id"]  # one shared index, derived by both tasks
    assert results[0]["stats"]["shards"] == 2 and results[1]["stats"]["shards"] == 1
    kept = sorted(_ids(tmp_path / "t0") + _ids(tmp_path / "t1"))
    assert kept == sorted(reference["kept"])
    rej = {**_rejected(tmp_path / "r0"), **_rejected(tmp_path / "r1")}
    assert rej == reference["rejected"]
    # the plan's cluster statistics are global in every task, equal to the in-memory run's
    for key in ("exact_clusters", "near_clusters", "candidate_pairs", "verified_pairs"):
        assert results[0]["stats"][key] == results[1]["stats"][key] == reference["manifest"]["stats"][key], key


# ---- CLI and bad inputs -----------------------------------------------------------------------
def test_cli_end_to_end_and_noop_rerun(planted, tmp_path, capsys):
    args = ["dedup", planted["folder"], "--out", tmp_path / "out", "--num-perm", "128", "--bands", "16",
            "--rows", "8", "--keep-rejected", tmp_path / "rej"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    assert "near duplicates" in out and "docs out" in out and "cluster sizes" in out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["stage"] == "dedup" and m["params"]["num_perm"] == 128 and m["params"]["bands"] == 16
    assert m["params"]["line_min_docs"] == 10 and m["params"]["lsh_storage"] == "memory"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "docs-00000.parquet", "docs-00001.parquet", "docs-00002.parquet", "manifest.json"]
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and "already complete" in out
    code, out, _ = _cli(capsys, "dedup", "--help")
    assert code == 0 and "Example" in out and "--lsh-storage" in out


def _one_line_error(r, *needles):
    code, out, err = (r.code, r.out, r.err) if hasattr(r, "code") else r
    assert code == 2, (out, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_fail_with_one_line_before_any_work(tmp_path, llmctl, capsys):
    (tmp_path / "nocol").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "nocol" / "docs-00000.parquet")
    # the console script's exit status and stderr, across a real process boundary (the one subprocess here)
    _one_line_error(llmctl("dedup", tmp_path / "nocol", "--out", tmp_path / "o1"), "missing column", "text")
    _write_docs(tmp_path / "ok", [[(doc_id("a"), "some words here for a document")]])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _one_line_error(
        _cli(capsys, "dedup", tmp_path / "ok", "--out", tmp_path / "o2", "--lsh-storage", f"redis://127.0.0.1:{port}"),
        "cannot reach Redis", str(port))
    _write_docs(tmp_path / "empty", [[]])
    cases = [
        (tmp_path / "empty", {}, "no documents"),
        (tmp_path / "ok", {"bands": 20, "rows": 8}, "exceeds --num-perm"),
        (tmp_path / "ok", {"lsh_storage": "mongo://x"}, "redis://"),
        (tmp_path / "missing", {}, "missing"),
        (tmp_path / "ok", {"methods": ["fuzzy"]}, "--methods"),
        (tmp_path / "ok", {"jaccard_threshold": 1.5}, "--jaccard-threshold"),
        # --keep-rejected is a directory of its own: never the input (a later run would read the
        # rejected docs back), another artifact, or a folder of other files
        (tmp_path / "ok", {"keep_rejected": tmp_path / "ok"}, "overlaps the input"),
        (tmp_path / "ok", {"keep_rejected": tmp_path / "ok" / "rej"}, "overlaps the input"),
        (tmp_path / "ok", {"keep_rejected": tmp_path / "nocol"}, "holds other files"),
    ]
    for i, (src, kw, needle) in enumerate(cases, start=3):
        with pytest.raises(UsageError, match=needle) as e:
            _run(src, tmp_path / f"o{i}", **kw)
        assert "\n" not in str(e.value)
    for i in range(1, 3 + len(cases)):
        assert not (tmp_path / f"o{i}").exists()
        assert not list(tmp_path.glob(f".o{i}.tmp-*"))
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["docs-00000.parquet"]
    artifact = tmp_path / "o-done"
    _run(tmp_path / "ok", artifact)
    with pytest.raises(UsageError, match="is an llmctl artifact"):
        _run(tmp_path / "ok", tmp_path / "o-x", keep_rejected=artifact)


def test_rejected_documents_are_an_artifact_that_another_run_cannot_overwrite(reference, planted, tmp_path):
    """--keep-rejected publishes a dedup-rejected artifact (manifest with the counts, atomically);
    a second run with other options pointed at it is refused instead of replacing its documents."""
    from llmctl.artifacts import read_manifest

    rej = reference["rej"]
    m = read_manifest(rej)
    removed = reference["manifest"]["stats"]["removed"]
    assert m["stage"] == "dedup-rejected" and m["stats"]["removed"] == removed
    assert m["stats"]["docs"] == sum(removed.values()) == len(reference["rejected"])
    assert m["rejected_from"] == str(reference["out"].absolute())
    assert reference["manifest"]["rejected"] == str(rej.absolute())
    before = sorted(p.name for p in rej.iterdir())
    with pytest.raises(UsageError, match=r"holds a finished dedup-rejected run with other options \(--methods, --out\); pass --force to replace it or choose another --keep-rejected"):
        _run(planted["folder"], tmp_path / "other", keep_rejected=rej, methods=["exact"])
    assert sorted(p.name for p in rej.iterdir()) == before and _rejected(rej) == reference["rejected"]
    assert not list(tmp_path.iterdir())  # nothing half-made for the refused run's --out


def test_a_finished_run_whose_rejected_documents_are_gone_or_taken_is_not_a_no_op(planted, tmp_path):
    """A finished dedup is a no-op only while its --keep-rejected artifact is its own: deleted, the
    rerun rebuilds it; taken over by another run (with --force), the rerun is refused naming it."""
    import shutil

    from llmctl.artifacts import read_manifest

    out, rej = tmp_path / "out", tmp_path / "rej"
    first = _run(planted["folder"], out, keep_rejected=rej)
    assert _run(planted["folder"], out, keep_rejected=rej).get("already_complete")
    shutil.rmtree(rej)
    again = _run(planted["folder"], out, keep_rejected=rej)
    assert not again.get("already_complete") and again["stats"]["removed"] == first["stats"]["removed"]
    assert read_manifest(rej)["rejected_from"] == str(out.absolute())
    _run(planted["folder"], tmp_path / "other", keep_rejected=rej, methods=["exact"], force=True)  # takes it over
    with pytest.raises(UsageError, match="choose another --keep-rejected"):
        _run(planted["folder"], out, keep_rejected=rej)
    assert read_manifest(out)["stats"] == again["stats"]  # the finished output is untouched

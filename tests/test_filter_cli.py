"""llmctl filter end to end: chain, stats, --keep-rejected, --config, rerun no-op, workers, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmctl.data.docs import schema, write_table

SENTENCES = [
    "The river runs past the old mill and into the valley below the town.",
    "Farmers have worked these fields for generations, and the soil is rich with their labour.",
    "In the spring the orchards bloom, and visitors come from the city to see them.",
    "The school at the edge of the village was built with stone from the nearby quarry.",
    "Every market day the square fills with stalls that sell bread, cheese and fresh fruit.",
    "Historians say that the bridge was rebuilt twice after floods in the last century.",
    "A small museum keeps the tools and letters of the families who settled here first.",
    "Children walk to the library after lessons to read and to do their homework together.",
]


def good_doc(rng: random.Random) -> str:
    s = rng.sample(SENTENCES, len(SENTENCES))  # every sentence once: no repetition
    return "\n".join([" ".join(s[:3]), " ".join(s[3:6]), " ".join(s[6:])])


def make_docs(path: Path, n_good: int = 20, seed: int = 0, with_language: bool = True) -> dict:
    rng = random.Random(seed)
    rows = []
    kinds = {}
    for i in range(n_good):
        rows.append(("good", f"https://www.village-news.org/a/{i}", good_doc(rng)))
    rows.append(("short", "https://example.org/s", "Too short to keep."))
    rows.append(("menu", "https://example.org/m", "\n".join(["Home", "About", "Contact", "Shop"] * 10)))
    rows.append(("blocked", "https://sub.bad-site.com/page", good_doc(rng)))
    rows.append(("curly", "https://example.org/c", good_doc(rng) + "\nfunction f() { return the value of x; }"))
    rows.append(("pii", "https://example.org/p", good_doc(rng) + "\nWrite to jane@example.com or call 212-555-0198."))
    rows.append(("french", "https://example.fr/f", good_doc(rng)))
    fields = [pa.field("language", pa.string()), pa.field("language_score", pa.float64())] if with_language else []
    cols = {"id": [], "url": [], "text": [], "timestamp": []}
    if with_language:
        cols["language"], cols["language_score"] = [], []
    for i, (kind, url, text) in enumerate(rows):
        cols["id"].append(f"d{i:03d}")
        cols["url"].append(url)
        cols["text"].append(text)
        cols["timestamp"].append(None)
        if with_language:
            cols["language"].append("fr" if kind == "french" else "en")
            cols["language_score"].append(0.99)
        kinds[f"d{i:03d}"] = kind
    path.mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pydict(cols, schema=schema(fields)), path / "docs-00000.parquet")
    return kinds


def cli(*args) -> int:
    """The real CLI entry point, in-process (subprocess start-up is slow on a shared machine)."""
    from llmctl.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def read_dir(path: Path, prefix: str = "docs") -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(path.glob(f"{prefix}-*.parquet"))])


def test_filter_end_to_end(tmp_path, llmctl):
    kinds = make_docs(tmp_path / "in")
    (tmp_path / "block").write_text("# UT1-style list\nbad-site.com\n", encoding="utf-8")
    out, rej = tmp_path / "out", tmp_path / "rej"
    r = llmctl("filter", tmp_path / "in", "--out", out, "--blocklist", tmp_path / "block", "--keep-rejected", rej)
    assert r.code == 0, r.err
    assert "gopher_quality" in r.out and "docs in" in r.out
    m = json.loads((out / "manifest.json").read_text())
    s = m["stats"]
    assert s["docs_in"] == len(kinds)
    kept = read_dir(out)
    rejected = read_dir(rej, "rejected")
    assert kept.num_rows + rejected.num_rows == len(kinds) == s["docs_in"]
    assert kept.num_rows == s["docs_out"] == 21  # 20 good + the PII doc (redacted)
    reasons = dict(zip(rejected.column("id").to_pylist(), rejected.column("reason").to_pylist(), strict=True))
    by_kind = {kinds[i]: r for i, r in reasons.items()}
    assert by_kind["blocked"] == "url:blocked_domain"
    assert by_kind["french"] == "language:other_language"
    assert by_kind["short"].startswith("gopher_quality:short_doc")
    assert by_kind["curly"] == "c4:curly_bracket"
    assert by_kind["menu"].split(":")[0] in ("gopher_repetition", "gopher_quality")
    pii_text = [t for i, t in zip(kept.column("id").to_pylist(), kept.column("text").to_pylist(), strict=True)
                if kinds[i] == "pii"][0]
    assert "<EMAIL>" in pii_text and "<PHONE>" in pii_text and "jane@" not in pii_text
    assert s["filters"]["pii"]["counters"]["email"] == 1
    # per-filter in/out chain adds up
    chain = m["params"]["chain"]
    assert chain[0] == "url" and "quality" not in chain  # no model given → not run
    for a, b in zip(chain, chain[1:], strict=False):
        assert s["filters"][a]["docs_out"] == s["filters"][b]["docs_in"]
    assert set(kept.column("domain").to_pylist()) == {"web"}
    assert s["mixture"]["web"]["docs"] == 21
    assert m["params"]["filters"]["gopher_quality"]["min_doc_words"] == 50  # defaults recorded
    # rerun: a no-op
    r2 = llmctl("filter", tmp_path / "in", "--out", out, "--blocklist", tmp_path / "block", "--keep-rejected", rej)
    assert r2.code == 0 and "already complete" in r2.out
    # other parameters without --force: refused, one line
    r3 = llmctl("filter", tmp_path / "in", "--out", out, "--set", "gopher_quality.min_doc_words=10")
    assert r3.code == 2 and "--force" in r3.err


def test_config_toml_tables_and_workers_equal(tmp_path, llmctl):
    make_docs(tmp_path / "in", n_good=30)
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        'chain = ["gopher_quality", "c4", "pii"]\nunit_rows = 8\n'
        '[gopher_quality]\nmin_doc_words = 3\ndisable = ["min_stop_words"]\n'
        '[c4]\nmin_sentences = 1\nfilter_curly_bracket = false\n'
        '[pii]\nemail_placeholder = "[mail]"\n',
        encoding="utf-8",
    )
    r = llmctl("filter", tmp_path / "in", "--out", tmp_path / "o1", "--config", cfg)
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert m["params"]["chain"] == ["gopher_quality", "c4", "pii"]
    assert m["params"]["filters"]["gopher_quality"]["min_stop_words"] is None
    assert m["params"]["filters"]["gopher_quality"]["min_doc_words"] == 3
    t1 = read_dir(tmp_path / "o1")
    assert any("[mail]" in t for t in t1.column("text").to_pylist())
    assert "c4:curly_bracket" not in m["stats"]["removed_by"]
    # command line beats the file; 2 workers give the same result as 1
    assert cli("filter", tmp_path / "in", "--out", tmp_path / "o2", "--config", cfg, "--workers", "2") == 0
    t2 = read_dir(tmp_path / "o2")
    assert t1.equals(t2)
    assert len(list((tmp_path / "o2").glob("docs-*.parquet"))) >= 4  # 37 docs in units of 8


def test_shard_parts_cover_the_input(tmp_path):
    make_docs(tmp_path / "in", n_good=30)
    ids = []
    for i in range(2):
        code = cli("filter", tmp_path / "in", "--out", tmp_path / f"p{i}", "--shard", f"{i}/2", "--unit-rows", "8",
                   "--chain", "gopher_quality", "--keep-rejected", tmp_path / f"r{i}")
        assert code == 0
        ids += read_dir(tmp_path / f"p{i}").column("id").to_pylist()
        ids += read_dir(tmp_path / f"r{i}", "rejected").column("id").to_pylist()
    assert sorted(ids) == sorted(pq.read_table(tmp_path / "in" / "docs-00000.parquet").column("id").to_pylist())


@pytest.mark.parametrize("case", ["missing_blocklist", "binary_blocklist", "no_language", "empty", "bad_chain",
                                  "bad_param", "bad_toml_table"])
def test_bad_input_one_line_before_work(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("COLUMNS", "300")
    make_docs(tmp_path / "in", with_language=case != "no_language")
    args = ["filter", tmp_path / "in", "--out", tmp_path / "out"]
    if case == "missing_blocklist":
        args += ["--blocklist", tmp_path / "nope.txt"]
    elif case == "binary_blocklist":
        (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02garbage\xff")
        args += ["--blocklist", tmp_path / "b.bin"]
    elif case == "empty":
        empty = tmp_path / "empty"
        empty.mkdir()
        lang = [pa.field("language", pa.string()), pa.field("language_score", pa.float64())]
        write_table(schema(lang).empty_table(), empty / "docs-00000.parquet")
        args[1] = empty
    elif case == "bad_chain":
        args += ["--chain", "gopher_quality,nonsense"]
    elif case == "bad_param":
        args += ["--set", "gopher_quality.min_doc_words=lots"]
    elif case == "bad_toml_table":
        (tmp_path / "c.toml").write_text("[gopher_qualty]\nmin_doc_words = 3\n", encoding="utf-8")
        args += ["--config", tmp_path / "c.toml"]
    # in-process through the real CLI entry point (a subprocess per case is slow on a shared machine)
    from llmctl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    expected = {"missing_blocklist": "not found", "binary_blocklist": "not a text file", "no_language": "language",
                "empty": "no documents", "bad_chain": "nonsense", "bad_param": "min_doc_words",
                "bad_toml_table": "gopher_qualty"}[case]
    assert expected in err

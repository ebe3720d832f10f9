"""llmctl filter end to end: chain, stats, --keep-rejected, --config, rerun no-op, workers, a run
killed halfway and resumed, bad input.

The real console script runs in a subprocess only where the process boundary is the point (its
exit codes, a SIGKILL); everything else goes through the same entry point in-process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli

from llmctl.data.docs import schema, shard_filename, write_table

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




def read_dir(path: Path, prefix: str = "docs") -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(path.glob(f"{prefix}-*.parquet"))])


@pytest.fixture(scope="module")
def docs37(tmp_path_factory) -> tuple[Path, dict]:
    """37 docs (30 good + one of each bad kind), shared by the tests that do not modify them."""
    d = tmp_path_factory.mktemp("docs37") / "in"
    return d, make_docs(d, n_good=30)


def test_filter_end_to_end(tmp_path, llmctl, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    kinds = make_docs(tmp_path / "in")
    (tmp_path / "block").write_text("# UT1-style list\nbad-site.com\n", encoding="utf-8")
    out, rej = tmp_path / "out", tmp_path / "rej"
    args = ("filter", tmp_path / "in", "--out", out, "--blocklist", tmp_path / "block", "--keep-rejected", rej)
    # the real console script, once: exit code 0 and the summary on stdout
    r = llmctl(*args)
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
    # FineWeb's order runs repetition first: a 4-word text's first 2-gram is > 20% of it (as in datatrove)
    assert by_kind["short"] == "gopher_repetition:top_2_gram"
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
    # rerun (in-process, same entry point): a no-op
    capsys.readouterr()
    assert cli(*args) == 0
    assert "already complete" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["created"] == m["created"]
    # other parameters without --force: refused, one line, exit code 2 from the real console script
    r3 = llmctl("filter", tmp_path / "in", "--out", out, "--set", "gopher_quality.min_doc_words=10")
    assert r3.code == 2 and "--force" in r3.err
    assert len([ln for ln in r3.err.strip().splitlines() if ln.strip()]) == 1, r3.err


def test_config_toml_tables_and_workers_equal(tmp_path, docs37):
    docs, _ = docs37
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        'chain = ["gopher_quality", "c4", "pii"]\nunit_rows = 8\n'
        '[gopher_quality]\nmin_doc_words = 3\ndisable = ["min_stop_words"]\n'
        '[c4]\nmin_sentences = 1\nfilter_curly_bracket = false\n'
        '[pii]\nemail_placeholder = "[mail]"\n',
        encoding="utf-8",
    )
    assert cli("filter", docs, "--out", tmp_path / "o1", "--config", cfg) == 0
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert m["params"]["chain"] == ["gopher_quality", "c4", "pii"]
    assert m["params"]["filters"]["gopher_quality"]["min_stop_words"] is None
    assert m["params"]["filters"]["gopher_quality"]["min_doc_words"] == 3
    assert m["params"]["unit_rows"] == 8
    t1 = read_dir(tmp_path / "o1")
    assert any("[mail]" in t for t in t1.column("text").to_pylist())
    assert "c4:curly_bracket" not in m["stats"]["removed_by"]
    # command line beats the file; 2 workers give the same result as 1
    assert cli("filter", docs, "--out", tmp_path / "o2", "--config", cfg, "--workers", "2") == 0
    t2 = read_dir(tmp_path / "o2")
    assert t1.equals(t2)
    assert len(list((tmp_path / "o2").glob("docs-*.parquet"))) >= 4  # 37 docs in units of 8


def test_shard_parts_cover_the_input(tmp_path, docs37):
    docs, _ = docs37
    ids = []
    for i in range(2):
        code = cli("filter", docs, "--out", tmp_path / f"p{i}", "--shard", f"{i}/2", "--unit-rows", "8",
                   "--chain", "gopher_quality", "--keep-rejected", tmp_path / f"r{i}")
        assert code == 0
        ids += read_dir(tmp_path / f"p{i}").column("id").to_pylist()
        ids += read_dir(tmp_path / f"r{i}", "rejected").column("id").to_pylist()
    assert sorted(ids) == sorted(pq.read_table(docs / "docs-00000.parquet").column("id").to_pylist())


#: runs the stage as a user would, then dies by SIGKILL at the moment unit KILL_AT's docs shard is
#: written but not yet committed (its rejected shard is committed already, its stats file is not)
KILLED_RUN = r"""
import os, signal, sys
from llmctl.artifacts import StageRun
from llmctl.data.filter import FilterConfig, run
docs, out, rej, kill_at = sys.argv[1:5]
commit = StageRun.commit
def dying_commit(self, name):
    if name == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self, name)
StageRun.commit = dying_commit
run(FilterConfig(docs=docs, out=out, keep_rejected=rej, unit_rows=8))
"""

_TIMING = ("process_seconds", "docs_per_second", "filter_seconds", "wall_seconds", "units_processed_now")


def test_killed_run_resumes_to_the_same_output(tmp_path, docs37):
    from llmctl.data.filter import FilterConfig, run

    docs, kinds = docs37
    out, rej = tmp_path / "out", tmp_path / "rej"
    p = subprocess.run([sys.executable, "-c", KILLED_RUN, str(docs), str(out), str(rej), shard_filename(2)],
                       env={**os.environ, "LLMCTL_PROGRESS": "0"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    work = tmp_path / ".out.tmp-filter"
    assert not out.exists() and work.is_dir()
    assert sorted(x.name for x in (work / "stats").glob("*.json")) == ["unit-00000.json", "unit-00001.json"]
    assert (work / f"{shard_filename(2)}.partial").exists()  # killed mid-unit
    assert (tmp_path / ".rej.tmp-filter-rejected" / shard_filename(2, "rejected")).exists()

    m = run(FilterConfig(docs=str(docs), out=str(out), keep_rejected=str(rej), unit_rows=8))
    assert m["resumed"] and m["stats"]["units"] == 5 and m["stats"]["units_processed_now"] == 3
    assert not work.exists() and not list(out.rglob("*.partial"))
    ref = run(FilterConfig(docs=str(docs), out=str(tmp_path / "ref"), keep_rejected=str(tmp_path / "ref-rej"),
                           unit_rows=8))
    assert not ref["resumed"] and ref["stats"]["units_processed_now"] == 5
    assert read_dir(out).equals(read_dir(tmp_path / "ref"))
    assert read_dir(rej, "rejected").equals(read_dir(tmp_path / "ref-rej", "rejected"))
    assert sorted(x.name for x in out.iterdir()) == sorted(x.name for x in (tmp_path / "ref").iterdir())
    strip = lambda st: {k: v for k, v in st.items() if k not in _TIMING}  # noqa: E731
    assert strip(m["stats"]) == strip(ref["stats"])
    assert m["stats"]["docs_in"] == len(kinds) and m["files"] == ref["files"]


@pytest.mark.parametrize("case", ["missing_blocklist", "binary_blocklist", "no_language", "empty", "bad_chain",
                                  "bad_param", "bad_toml_table", "language_score_range", "top_percent_no_model"])
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
    elif case == "language_score_range":
        args += ["--min-language-score", "5"]
    elif case == "top_percent_no_model":  # it would be ignored: the quality filter needs its model
        args += ["--quality-top-percent", "50"]
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
                "bad_toml_table": "gopher_qualty", "language_score_range": "min_score=5.0",
                "top_percent_no_model": "--quality-top-percent needs --quality-model"}[case]
    assert expected in err

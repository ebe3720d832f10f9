"""llmctl extract: real WARC files in, Parquet documents out, every problem counted by reason."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from llmctl.data.docs import read_docs
from llmctl.data.extract import ExtractConfig, run
from llmctl.data.warc import Problem, iter_records

ROOT = Path(__file__).resolve().parents[1]

ARTICLE = (
    "<p>The harbour town woke slowly under a low grey sky, and the fishing boats came back one by one "
    "with their nets folded and their decks washed clean by the morning rain.</p>"
    "<p>Along the quay the market stalls opened their shutters, and the smell of bread and coffee drifted "
    "over the water while the gulls argued about the remains of yesterday's catch.</p>"
    "<p>By noon the sun had broken through, the tourists had arrived with their cameras, and the old "
    "lighthouse keeper sat on his bench telling the same stories he had told for forty years.</p>"
)
LATIN1_TEXT = (
    "<p>Der Bäcker Müller öffnet seinen Laden jeden Morgen um fünf Uhr, und die Straße riecht dann nach "
    "frischem Brot und süßem Gebäck, während die Nachbarn noch schlafen.</p>"
    "<p>Im Café gegenüber trinken die Arbeiter ihren Kaffee, lesen die Zeitung und sprechen über das "
    "Wetter, über Fußball und über die Preise auf dem Wochenmarkt.</p>"
    "<p>Später am Tag kommen die Schüler vorbei, kaufen Brötchen für die Pause und grüßen den alten "
    "Müller, der ihnen manchmal ein Stück Kuchen schenkt.</p>"
)


def page(title: str, body: str, head: str = "") -> str:
    return f"<!DOCTYPE html><html><head>{head}<title>{title}</title></head><body><article>{body}</article></body></html>"


def add_response(w: WARCWriter, url: str, body: bytes, status: str = "200 OK", headers=None, date=None, target=None):
    headers = headers if headers is not None else [("Content-Type", "text/html; charset=utf-8")]
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    req = w.create_warc_record(
        target or url, "request",
        http_headers=StatusAndHeaders(f"GET {url} HTTP/1.1", [("Host", "example.org")], is_http_request=True),
    )
    extra = {"WARC-Date": date} if date else None
    resp = w.create_warc_record(target or url, "response", payload=io.BytesIO(body), http_headers=http,
                                warc_headers_dict=extra)
    w.write_record(req)
    w.write_record(resp)


def member(w_fn) -> bytes:
    """The bytes one or more records make when written on their own (gzip members)."""
    buf = io.BytesIO()
    w_fn(WARCWriter(buf, gzip=True))
    return buf.getvalue()


def build_test_warc(path: Path, huge: bool = True) -> None:
    """A crawl-like WARC with one case of every kind of page extract must handle."""
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    w.write_record(w.create_warcinfo_record(path.name, {"software": "llmctl-test"}))
    add_response(w, "http://example.org/article", page("Harbour morning", ARTICLE).encode(),
                 date="2024-05-06T07:08:09Z")
    # latin-1 page, charset declared only in <meta>
    latin = page("Bäckerei", LATIN1_TEXT, head='<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">')
    add_response(w, "http://example.org/latin1", latin.encode("latin-1"), headers=[("Content-Type", "text/html")])
    add_response(w, "http://example.org/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
                 headers=[("Content-Type", "image/png")])
    add_response(w, "http://example.org/missing", page("Not found", ARTICLE).encode(), status="404 Not Found")
    add_response(w, "http://example.org/moved", b"", status="301 Moved Permanently",
                 headers=[("Location", "http://example.org/article")])
    add_response(w, "http://example.org/gzipped", gzip.compress(page("Gzipped", ARTICLE).encode()),
                 headers=[("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip")])
    raw = page("Chunked", ARTICLE).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(raw[i:i + 700]), raw[i:i + 700]) for i in range(0, len(raw), 700)) + b"0\r\n\r\n"
    add_response(w, "http://example.org/chunked", chunked,
                 headers=[("Content-Type", "text/html"), ("Transfer-Encoding", "chunked")])
    add_response(w, "http://example.org/binary", b"<html><body>" + bytes((i * 7919) % 256 for i in range(6000)),
                 headers=[("Content-Type", "text/html; charset=x-no-such-charset")])
    add_response(w, "http://example.org/empty", b"<html><head><script>var x = 1;</script></head><body></body></html>")
    add_response(w, "http://example.org/wget", page("Wget", ARTICLE).encode(), target="<http://example.org/wget>")
    if huge:  # trafilatura needs many seconds on this: the timeout must cut it off
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
        paras = "".join(f"<div><p>{' '.join(words[(i + k) % 11] for k in range(40))}.</p></div>" for i in range(20000))
        add_response(w, "http://example.org/huge", page("Huge", paras).encode())
    good = buf.getvalue()
    # a gzip member that is corrupt in the middle, followed by a good record
    bad = bytearray(member(lambda w2: add_response(w2, "http://example.org/corrupt", page("Corrupt", ARTICLE).encode())))
    # the request is its own member; break the response member (the second one)
    second = bad.find(b"\x1f\x8b\x08", 10)
    for i in range(second + 40, second + 80):
        bad[i] = 0xFF
    after = member(lambda w2: add_response(w2, "http://example.org/after-corrupt", page("After", ARTICLE).encode()))
    # a final record cut short: the file ends inside its gzip member
    cut = member(lambda w2: add_response(w2, "http://example.org/cut", page("Cut", ARTICLE * 3).encode()))
    path.write_bytes(good + bytes(bad) + after + cut[: len(cut) - 200])


ARC_HTML = page("Archive", ARTICLE).encode()


def build_arc(path: Path) -> None:
    """A version-1 ARC file (the pre-WARC format) with one HTTP capture, written by hand."""
    desc = b"1 0 LLMCTL\nURL IP-address Archive-date Content-type Archive-length\n"
    http = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n" + ARC_HTML
    data = (
        b"filedesc://test.arc 0.0.0.0 20200101000000 text/plain %d\n%s\n" % (len(desc), desc)
        + b"http://arc.example.org/page 192.0.2.1 20200102030405 text/html %d\n%s\n" % (len(http), http)
    )
    path.write_bytes(data)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("built")
    warc = d / "crawl.warc.gz"
    arc = d / "old.arc"
    build_test_warc(warc)
    build_arc(arc)
    out = d / "docs"
    manifest = run(ExtractConfig(inputs=[str(warc), str(arc)], out=str(out), workers=2, timeout=2.0))
    return {"warc": warc, "arc": arc, "out": out, "manifest": manifest, "docs": read_docs(out).to_pylist()}


def test_reader_sees_every_problem(tmp_path):
    warc = tmp_path / "t.warc.gz"
    build_test_warc(warc, huge=False)
    items = list(iter_records(warc))
    problems = [i.reason for i in items if isinstance(i, Problem)]
    records = [i for i in items if not isinstance(i, Problem)]
    assert problems == ["broken_gzip"]
    urls = [r.url for r in records if r.rec_type == "response"]
    assert "http://example.org/corrupt" not in urls  # lost with its member
    assert urls[-2:] == ["http://example.org/after-corrupt", "http://example.org/cut"]
    assert [r.truncated for r in records if r.rec_type == "response"][-2:] == [False, True]
    wget = next(r for r in records if r.url == "http://example.org/wget")
    assert wget.uri_fixed


def test_reader_streams_large_files_in_every_layout(tmp_path):
    """Several MiB through the reader: gzip per record, plain, and one gzip stream for the whole file."""
    per_member = io.BytesIO()
    plain = io.BytesIO()
    for buf, gz in ((per_member, True), (plain, False)):
        w = WARCWriter(buf, gzip=gz)
        for i in range(300):
            add_response(w, f"http://example.org/big/{i}", page(f"P{i}", ARTICLE * 20).encode() + b"%05d" % i)
    files = {"member.warc.gz": per_member.getvalue(), "plain.warc": plain.getvalue(),
             "stream.warc.gz": gzip.compress(plain.getvalue())}
    assert len(plain.getvalue()) > 3 << 20
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        items = list(iter_records(tmp_path / name))
        assert not [i for i in items if isinstance(i, Problem)], name
        resp = [r for r in items if r.rec_type == "response"]
        assert [r.url for r in resp] == [f"http://example.org/big/{i}" for i in range(300)], name
        assert all(not r.truncated and r.block.endswith(b"%05d" % i) for i, r in enumerate(resp)), name


def test_built_warc_counts_every_reason(built):
    st = built["manifest"]["stats"]
    warc_stats = st["per_file"]["crawl.warc.gz"]
    assert warc_stats["dropped"] == {
        "non_html": 1, "non_200": 2, "undecodable": 1, "empty": 1, "timeout": 1, "truncated": 1,
    }
    assert warc_stats["problems"] == {"broken_gzip": 1}
    assert warc_stats["responses"] == 13  # 12 written whole + the cut one; the corrupt one is lost
    assert warc_stats["docs"] == 6
    assert warc_stats["uri_fixed"] == 2  # request and response of the wget-style capture
    assert st["per_file"]["old.arc"]["docs"] == 1
    assert st["per_file"]["old.arc"]["record_types"] == {"warcinfo": 1, "response": 1}
    assert st["docs"] == 7 and st["worker_restarts"] == 1


def test_built_warc_documents(built):
    docs = {d["url"]: d for d in built["docs"]}
    assert sorted(docs) == sorted([
        "http://example.org/article", "http://example.org/latin1", "http://example.org/gzipped",
        "http://example.org/chunked", "http://example.org/wget", "http://example.org/after-corrupt",
        "http://arc.example.org/page",
    ])
    assert len(built["docs"]) == 7
    art = docs["http://example.org/article"]
    assert "fishing boats came back" in art["text"] and "lighthouse keeper" in art["text"]
    assert art["title"] == "Harbour morning"
    assert art["language"] == "en" and art["language_score"] > 0.9
    assert art["timestamp"].isoformat() == "2024-05-06T07:08:09+00:00"
    assert art["content_type"] == "text/html" and art["charset"] == "utf_8"
    assert art["domain"] == "example.org" and art["warc_file"] == "crawl.warc.gz"
    assert art["warc_record_id"].startswith("<urn:uuid:")
    lat = docs["http://example.org/latin1"]
    assert "Der Bäcker Müller öffnet" in lat["text"] and "Fußball" in lat["text"]
    assert lat["title"] == "Bäckerei" and lat["language"] == "de"
    assert lat["charset"] == "cp1252"  # ISO-8859-1 is decoded as its superset, as browsers do
    for u in ("gzipped", "chunked", "wget", "after-corrupt"):
        assert "lighthouse keeper" in docs[f"http://example.org/{u}"]["text"], u
    arc = docs["http://arc.example.org/page"]
    assert arc["timestamp"].isoformat() == "2020-01-02T03:04:05+00:00" and "harbour" in arc["text"].lower()
    ids = [d["id"] for d in built["docs"]]
    assert len(set(ids)) == len(ids)


def test_a_file_cut_in_the_first_bytes_of_its_last_member_counts_that_record(shared_data, tmp_path):
    """Cut a real WARC 30 bytes into its last gzip member (the header and almost none of the deflate
    stream): nothing of that record inflates, so it must be counted as broken, not lost silently."""
    import zlib

    data = (shared_data / "warc" / "cc-sample.warc.gz").read_bytes()
    starts, rest = [], data
    while rest:  # member boundaries, from the inflater itself
        starts.append(len(data) - len(rest))
        d = zlib.decompressobj(31)
        d.decompress(rest)
        rest = d.unused_data
    whole = [i for i in iter_records(shared_data / "warc" / "cc-sample.warc.gz") if not isinstance(i, Problem)]
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: starts[-1] + 30])
    items = list(iter_records(cut))
    problems = [(i.reason, i.offset) for i in items if isinstance(i, Problem)]
    assert problems == [("broken_gzip", starts[-1])]
    assert len([i for i in items if not isinstance(i, Problem)]) == len(whole) - 1


def test_shared_warcs(shared_data, tmp_path, llmctl):
    """Every real file in ../shared/data/warc: exact counts per file, nothing crashes."""
    out = tmp_path / "docs"
    r = llmctl("extract", shared_data / "warc", "--out", out, "--workers", "2")
    assert r.code == 0, r.err
    assert "documents" in r.out and "dropped: truncated" in r.out
    m = json.loads((out / "manifest.json").read_text())
    pf = m["stats"]["per_file"]
    expect = {  # responses, docs, drops, record types — established by reading each file
        "cc-sample.warc.gz": (16, 15, {"empty": 1}, {"warcinfo": 1, "request": 17, "response": 16, "metadata": 16}),
        "truncated-record.warc.gz": (1, 0, {"truncated": 1}, {"response": 1}),
        "warcio-example.warc.gz": (1, 1, {}, {"warcinfo": 2, "response": 1, "request": 2, "revisit": 1}),
        "warcio-example-bad-non-chunked.warc.gz": (1, 1, {}, {"warcinfo": 2, "response": 1, "request": 2, "revisit": 1}),
        # a whole WARC record whose HTTP body is 2 bytes short of its Content-Length (606): cut in transfer
        "warcio-example-trunc.warc": (1, 0, {"truncated": 1}, {"warcinfo": 2, "response": 1, "request": 1}),
        "warcio-example-digest.warc": (0, 0, {}, {"request": 4}),
        "warcio-example-wget-bad-target-uri.warc.gz": (
            1, 1, {}, {"warcinfo": 1, "request": 1, "response": 1, "metadata": 1, "resource": 2}),
    }
    assert set(pf) == set(expect)
    for name, (responses, docs, dropped, types) in expect.items():
        assert (pf[name]["responses"], pf[name]["docs"], pf[name]["dropped"], pf[name]["record_types"]) == (
            responses, docs, dropped, types), name
        assert pf[name]["problems"] == {}, name
    assert pf["warcio-example-wget-bad-target-uri.warc.gz"]["uri_fixed"] == 5
    assert m["stats"]["docs"] == 18
    table = read_docs(out)
    rows = table.to_pylist()
    assert len(rows) == 18
    assert table.column_names[:4] == ["id", "url", "text", "timestamp"]
    urls = [d["url"] for d in rows]
    assert not any(u.startswith("<") for u in urls)
    assert urls.count("http://example.com/") == 3  # the warcio examples, less the one cut in transfer
    cc = {d["url"]: d for d in rows if d["warc_file"] == "cc-sample.warc.gz"}
    assert "http://096355.com/video/11073.html?11073-0-2" not in cc  # trafilatura finds no main text
    ru = cc["http://01spb.ru/company/"]
    assert ru["charset"] == "cp1251" and ru["language"] == "ru"
    cn = cc["http://0760.jxtdw.com/area/sanxiang/"]  # declared gb2312, decoded as its superset GB18030
    assert cn["charset"] == "gb18030" and cn["language"] == "zh" and cn["title"].startswith("三乡招聘")
    assert cc["http://037426.cn/"]["charset"] == "gb18030"
    nl = cc["http://0900-hovenier.nl/gelderland/oosterbeek/"]
    assert nl["language"] == "nl" and nl["timestamp"].isoformat() == "2020-08-08T18:02:09+00:00"


def _frame(path: Path):
    return read_docs(path).to_pandas().reset_index(drop=True)


def _counts(manifest: dict) -> dict:
    st = dict(manifest["stats"])
    for k in ("wall_seconds", "docs_per_second", "shards_resumed", "worker_restarts", "responses_processed"):
        st.pop(k)
    return st


def test_rerun_noop_force_and_resume_after_kill(tmp_path, llmctl):
    warc = tmp_path / "many.warc.gz"
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for i in range(40):
        body = page(f"Page {i}", ARTICLE.replace("harbour", f"harbour number {i}")).encode()
        add_response(w, f"http://example.org/p{i}", body)
    warc.write_bytes(buf.getvalue())
    args = [warc, "--workers", "2", "--records-per-shard", "4", "--batch-size", "1"]

    clean = tmp_path / "clean"
    r = llmctl("extract", *args, "--out", clean)
    assert r.code == 0, r.err
    m1 = json.loads((clean / "manifest.json").read_text())
    assert m1["stats"]["shards"] == 20 and m1["stats"]["docs"] == 40

    # rerun: a no-op that says so, manifest untouched
    r = llmctl("extract", *args, "--out", clean)
    assert r.code == 0 and "already complete" in r.err
    assert json.loads((clean / "manifest.json").read_text()) == m1

    expected = _frame(clean)

    # kill -9 an extract once its first shard is committed, then rerun the same command
    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.tmp-extract"
    env = {**os.environ, "LLMCTL_PROGRESS": "0"}
    p = subprocess.Popen([sys.executable, "-m", "llmctl", "extract", *map(str, args), "--out", str(out)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob("docs-*.parquet")) and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    committed = list(work.glob("docs-*.parquet"))
    assert 1 <= len(committed) < 20 and not out.exists()
    resume_args = [a if a != "2" else "1" for a in map(str, args)]  # resuming with other --workers is fine
    r = llmctl("extract", *resume_args, "--out", out)
    assert r.code == 0, r.err
    m3 = json.loads((out / "manifest.json").read_text())
    assert m3["resumed"] is True and m3["stats"]["shards_resumed"] >= 1
    assert _counts(m3) == _counts(m1)
    got = _frame(out)
    assert got.equals(expected)
    assert sorted(p.name for p in out.glob("docs-*.parquet")) == sorted(p.name for p in clean.glob("docs-*.parquet"))
    for a in sorted(out.glob("docs-*.parquet")):
        assert pq.read_table(a).equals(pq.read_table(clean / a.name)), a.name


def test_bad_inputs_exit_2_with_one_line(tmp_path, llmctl):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not an archive\n")
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    junk_gz = tmp_path / "junk.warc.gz"
    junk_gz.write_bytes(gzip.compress(b"<html>not a warc</html>"))
    nowarcs = tmp_path / "nothing"
    nowarcs.mkdir()
    cases = [
        (tmp_path / "missing.warc.gz", "no such file"),
        (empty, "empty file"),
        (text, "not a WARC or ARC file"),
        (junk_gz, "not a WARC or ARC file"),
        (nowarcs, "holds no .warc"),
    ]
    for bad, words in cases:
        out = tmp_path / f"out-{bad.name}"
        r = llmctl("extract", bad, "--out", out)
        assert r.code == 2, (bad, r.err)
        lines = [ln for ln in r.err.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0] and str(bad.name) in lines[0], r.err
        assert "Traceback" not in r.err
        assert not out.exists() and not (tmp_path / f".out-{bad.name}.tmp-extract").exists()
    r = llmctl("extract", text, "--out", tmp_path / "x", "--shard", "5/2")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1


def test_force_redoes_a_finished_extract(built):
    cfg = ExtractConfig(inputs=[str(built["warc"]), str(built["arc"])], out=str(built["out"]), workers=2, timeout=2.0)
    again = run(cfg)
    assert again["already_done"] is True and again["created"] == built["manifest"]["created"]
    cfg.force = True
    redone = run(cfg)
    assert redone["already_done"] is False and redone["resumed"] is False
    assert _counts(redone) == _counts(built["manifest"])
    assert read_docs(built["out"]).to_pylist() == built["docs"]


def test_streaming_keeps_order_with_drops_in_flight(tmp_path):
    """More documents than the pool holds, worker-side drops interleaved: rows stay in file order."""
    warc = tmp_path / "stream.warc.gz"
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for i in range(90):
        body = b"<html><body><script>1</script></body></html>" if i % 3 == 1 else page(f"S{i}", ARTICLE).encode()
        add_response(w, f"http://example.org/s{i}", body)
    warc.write_bytes(buf.getvalue())
    m = run(ExtractConfig(inputs=[str(warc)], out=str(tmp_path / "o"), workers=1, batch_size=2))
    assert m["stats"]["docs"] == 60 and m["stats"]["dropped"] == {"empty": 30}
    urls = read_docs(tmp_path / "o").column("url").to_pylist()
    assert urls == [f"http://example.org/s{i}" for i in range(90) if i % 3 != 1]


def test_shard_subset_of_files(built, tmp_path):
    out = tmp_path / "part"
    m = run(ExtractConfig(inputs=[str(built["warc"]), str(built["arc"])], out=str(out), workers=1, shard="1/2"))
    assert m["stats"]["files"] == 1 and list(m["stats"]["per_file"]) == ["old.arc"]
    assert [p.name for p in out.glob("docs-*.parquet")] == ["docs-00001-00000.parquet"]
    assert read_docs(out).column("url").to_pylist() == ["http://arc.example.org/page"]


def test_mislabelled_and_undeclared_charsets_decode_to_the_real_text():
    """Valid UTF-8 beats a wrong Western label (a server default of ISO-8859-1 in front of UTF-8
    pages); labels still win for bytes that are not UTF-8; undeclared Western text is windows-1252."""
    from llmctl.data.extract import decode_html

    text = "Müller’s café serves crème brûlée to naïve guests, déjà vu. Straße – “quotes”."
    assert decode_html(text.encode(), "iso-8859-1")[:2] == (text, "utf_8")
    meta = '<meta charset="iso-8859-1"><p>' + text
    assert decode_html(meta.encode(), None)[:2] == (meta, "utf_8")
    assert decode_html(f"<p>{text}</p>".encode("cp1252"), None)[:2] == (f"<p>{text}</p>", "cp1252")
    polish = "Zażółć gęślą jaźń. Wczoraj byłem w sklepie i kupiłem chleb, masło oraz świeże jabłka dla całej rodziny."
    assert decode_html(polish.encode("cp1250"), None)[0] == polish
    russian = "Привет, как дела? Это тестовая страница на русском языке."
    assert decode_html(russian.encode("cp1251"), "windows-1251") == (russian, "cp1251", "header")
    assert decode_html(b"plain ascii", "iso-8859-1") == ("plain ascii", "cp1252", "header")

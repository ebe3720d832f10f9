"""The crawl stage against real HTTP servers on 127.0.0.1 and real WARC files read back by warcio."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator

from llmctl.artifacts import read_manifest
from llmctl.data.crawl import CrawlConfig, run
from llmctl.data.crawl_net import (
    GuardedResolver,
    PrivateAddressError,
    Scope,
    extract_links,
    is_public_address,
    normalize_url,
)
from llmctl.data.robots import Robots
from llmctl.errors import StageError, UsageError

LATIN = (
    '<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
    "<title>Caf\xe9</title></head><body><p>D\xe9j\xe0 vu \xe0 la caf\xe9t\xe9ria.</p>"
    '<a href="/caf\xe9.html">caf\xe9</a></body></html>'
).encode("latin-1")


def page(*links: str, text: str = "hello") -> bytes:
    body = "".join(f'<a href="{u}">{u}</a> ' for u in links)
    return f"<html><head><title>t</title></head><body><p>{text}</p>{body}</body></html>".encode()


class Site:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose routes are (status, headers, body) or callables,
    logging the monotonic time and path of every request it receives."""

    def __init__(self, routes: dict, delay: float = 0.0):
        self.routes = routes
        self.log: list[tuple[float, str]] = []
        self.hits: Counter = Counter()
        self.delay = delay
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                site.log.append((time.monotonic(), self.path))
                site.hits[self.path] += 1
                if site.delay:
                    time.sleep(site.delay)
                route = site.routes.get(self.path)
                if callable(route):
                    route = route(site.hits[self.path])
                if route is None:
                    route = (404, {"Content-Type": "text/html"}, b"<html><body>not found</body></html>")
                status, headers, body = route
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [p for _, p in self.log]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


HTML = {"Content-Type": "text/html; charset=utf-8"}


def main_routes() -> dict:
    def flaky(n):
        return (500, HTML, b"<html>oops</html>") if n == 1 else (200, HTML, page("/", text="flaky ok"))

    def busy(n):
        return (429, {**HTML, "Retry-After": "1"}, b"slow down") if n == 1 else (200, HTML, page(text="busy ok"))

    return {
        "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\nCrawl-delay: 0.2\n"),
        "/": (200, HTML, page(
            "/a.html", "/redir1", "/missing.html", "/flaky.html", "/busy.html", "/file.bin", "/latin.html",
            "/private/secret.html", "http://offsite.example/page.html", "/loop1.html", "/big.html",
        )),
        # the same page spelled five ways, and a fragment
        "/a.html": (200, HTML, page("/a.html#top", "/./a.html", "/b/../a.html", "HTTP://127.0.0.1:{port}/a.html", "/")),
        "/redir1": (301, {"Location": "/redir2"}, b""),
        "/redir2": (302, {"Location": "/target.html"}, b""),
        "/target.html": (200, HTML, page(text="end of the chain")),
        "/flaky.html": flaky,
        "/busy.html": busy,
        "/file.bin": (200, {"Content-Type": "application/octet-stream"}, bytes(range(256)) * 64),
        "/latin.html": (200, {"Content-Type": "text/html"}, LATIN),
        "/caf%C3%A9.html": (200, HTML, page(text="café")),
        "/private/secret.html": (200, HTML, page(text="secret")),
        "/loop1.html": (200, HTML, page("/loop2.html")),
        "/loop2.html": (200, HTML, page("/loop1.html", "/")),
        "/big.html": (200, HTML, page(text="x" * 50_000)),
    }


def read_warcs(out: Path) -> list[tuple[str, str, str | None, bool]]:
    """(type, target URI, HTTP status, truncated) of every record, reading each payload fully."""
    rows = []
    for f in sorted(out.glob("*.warc.gz")):
        with open(f, "rb") as fh:
            for rec in ArchiveIterator(fh, check_digests=True):
                rec.content_stream().read()
                status = rec.http_headers.get_statuscode() if rec.http_headers and rec.rec_type == "response" else None
                rows.append((
                    rec.rec_type, rec.rec_headers.get_header("WARC-Target-URI") or "", status,
                    rec.rec_headers.get_header("WARC-Truncated") == "length",
                ))
    return rows


def warcio_check(out: Path) -> subprocess.CompletedProcess:
    """`warcio check` (digests, structure) over every WARC file of a crawl, in one process."""
    code = "import sys; from warcio.cli import main; sys.exit(main(sys.argv[1:]))"
    files = [str(f) for f in sorted(out.glob("*.warc.gz"))]
    return subprocess.run([sys.executable, "-c", code, "check", "-v", *files], capture_output=True, text=True)


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the llmctl CLI in this process (fast) and return (exit code, stdout, stderr)."""
    from llmctl.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.fixture
def site():
    routes = main_routes()
    s = Site(routes)
    a = routes["/a.html"]
    routes["/a.html"] = (a[0], a[1], a[2].replace(b"{port}", str(s.port).encode()))
    yield s
    s.close()


def test_crawl_site_records_exactly_what_it_should(site, tmp_path):
    out = tmp_path / "crawl"
    cfg = CrawlConfig(
        seeds=[site.base + "/"], out=out, allow_private=True, delay=0.0, per_host=2, backoff=0.05,
        max_bytes=20_000, warc_size_mb=0.004,
    )
    m = run(cfg)
    b = site.base
    fetched = site.paths()
    # exactly these requests, each once except the two retried ones
    assert Counter(fetched) == Counter({
        "/robots.txt": 1, "/": 1, "/a.html": 1, "/redir1": 1, "/redir2": 1, "/target.html": 1,
        "/missing.html": 1, "/flaky.html": 2, "/busy.html": 2, "/file.bin": 1, "/latin.html": 1,
        "/caf%C3%A9.html": 1, "/loop1.html": 1, "/loop2.html": 1, "/big.html": 1,
    })
    assert "/private/secret.html" not in fetched
    # Crawl-delay 0.2 spaces every request to the host, retries included; Retry-After: 1 is honoured
    times = [t for t, _ in site.log]
    gaps = [b2 - a2 for a2, b2 in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.2 - 0.02, gaps
    busy = [t for t, p in site.log if p == "/busy.html"]
    assert busy[1] - busy[0] >= 1.0 - 0.02

    rows = read_warcs(out)
    assert len(list(out.glob("*.warc.gz"))) > 1  # rotated at 4 KB
    assert Counter(r[0] for r in rows)["warcinfo"] == len(list(out.glob("*.warc.gz")))
    responses = {r[1]: r[2] for r in rows if r[0] == "response"}
    requests = Counter(r[1] for r in rows if r[0] == "request")
    assert responses == {
        f"{b}/robots.txt": "200", f"{b}/": "200", f"{b}/a.html": "200", f"{b}/redir1": "301",
        f"{b}/redir2": "302", f"{b}/target.html": "200", f"{b}/missing.html": "404",
        f"{b}/flaky.html": "200", f"{b}/busy.html": "200", f"{b}/latin.html": "200",
        f"{b}/caf%C3%A9.html": "200", f"{b}/loop1.html": "200", f"{b}/loop2.html": "200", f"{b}/big.html": "200",
    }
    assert set(requests) == set(responses) and set(requests.values()) == {1}  # one request per response
    assert [r[1] for r in rows if r[3]] == [f"{b}/big.html"]  # truncated at --max-bytes
    with open(next(f for f in sorted(out.glob("*.warc.gz"))), "rb") as fh:
        info = next(iter(ArchiveIterator(fh)))
        assert info.rec_type == "warcinfo" and b"robots: obey" in info.content_stream().read()
    res = warcio_check(out)
    assert res.returncode == 0 and res.stdout.count("digest pass") == len(rows)
    assert "fail" not in res.stdout.lower(), res.stdout

    s = m["stats"]
    assert s["pages"] == 13 and s["robots_disallowed"] == 1 and s["refused"] == {"robots": 1}
    assert s["by_status"] == {"200": 10, "301": 1, "302": 1, "404": 1}
    assert s["skipped"] == {"content-type": 1} and s["retries"] == 2 and s["truncated"] == 1
    assert s["links_out_of_scope"] == {"off-host": 1} and s["robots_fetched"] == 1
    assert m["params"]["delay"] == 0.0 and m["params"]["content_types"] == ["text/html", "application/xhtml+xml"]
    assert read_manifest(out)["files"][-1] == "journal.jsonl"
    assert not list(tmp_path.glob(".crawl.tmp-*"))


def test_rerun_is_noop_and_force_redoes(site, tmp_path, capsys):
    out = tmp_path / "crawl"
    args = [site.base + "/", "--out", out, "--allow-private", "--delay", "0", "--backoff", "0.05", "--max-depth", "1",
            "--no-robots", "--deny", "busy"]
    code, out_, err = cli(capsys, "crawl", *args)
    assert code == 0, err
    n = len(site.log)
    first = read_manifest(out)["created"]
    code, out_, err = cli(capsys, "crawl", *args)
    assert code == 0 and "already complete" in err
    assert len(site.log) == n and read_manifest(out)["created"] == first
    code, out_, err = cli(capsys, "crawl", *args, "--force")
    assert code == 0, err
    assert len(site.log) > n and "/" in site.paths()[n:]
    assert "pages fetched" in out_


def test_private_addresses_refused_without_allow_private(site, tmp_path, llmctl):
    out = tmp_path / "crawl"
    r = llmctl("crawl", site.base + "/", "--out", out, "--delay", "0")
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "private-address" in lines[0] and "--allow-private" in lines[0]
    assert site.log == []  # not even robots.txt was requested
    assert not out.exists() and not list(tmp_path.glob(".crawl.tmp-*"))
    # a *name* that resolves to loopback is refused after DNS resolution, literals by address
    async def resolve(allow: bool):
        return await GuardedResolver(allow).resolve("localhost", 80)

    with pytest.raises(PrivateAddressError):
        asyncio.run(resolve(False))
    assert asyncio.run(resolve(True))
    for addr in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "100.64.0.1", "::1", "fe80::1",
                 "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1"):
        assert not is_public_address(addr), addr
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1::1")


def test_scope_depth_pages_and_regexes(site, tmp_path):
    b = site.base
    m = run(CrawlConfig(seeds=[b + "/"], out=tmp_path / "d1", allow_private=True, delay=0, max_depth=0, robots=False))
    assert m["stats"]["pages"] == 1 and site.paths() == ["/"]
    site.log.clear()
    m = run(CrawlConfig(
        seeds=[b + "/"], out=tmp_path / "deny", allow_private=True, delay=0, robots=False, backoff=0.05,
        deny=[r"loop|redir|busy"], max_depth=1,
    ))
    got = set(site.paths())
    assert "/" in got and "/a.html" in got and "/private/secret.html" in got  # robots off
    assert not any(("loop" in p or "redir" in p or "busy" in p) for p in got)
    site.log.clear()
    m = run(CrawlConfig(seeds=[b + "/"], out=tmp_path / "all", allow_private=True, delay=0, robots=False, max_depth=1,
                        content_types=["*/*"], deny=["busy|flaky"]))
    assert m["stats"]["skipped"] == {} and ("response", f"{b}/file.bin", "200", False) in read_warcs(tmp_path / "all")
    site.log.clear()
    m = run(CrawlConfig(seeds=[b + "/"], out=tmp_path / "cap", allow_private=True, delay=0, robots=False, max_pages=3))
    assert m["stats"]["pages"] + sum(m["stats"]["skipped"].values()) == 3 and len(site.log) <= 4


def test_bad_seeds_are_usage_errors(tmp_path, capsys):
    code, out_, err = cli(capsys, "crawl", "example.com", "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not an http(s) URL" in err
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("# my seeds\nhttps://example.com/\nftp://nope\n")
    code, out_, err = cli(capsys, "crawl", seeds, "--out", tmp_path / "o")
    assert code == 2 and f"{seeds}:3" in err and len(err.strip().splitlines()) == 1
    seeds.write_text("https://example.com/ https://example.org/\n")  # two URLs on one line
    code, out_, err = cli(capsys, "crawl", seeds, "--out", tmp_path / "o")
    assert code == 2 and f"{seeds}:1" in err and "not an http(s) URL" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, out_, err = cli(capsys, "crawl", empty, "--out", tmp_path / "o")
    assert code == 2 and "empty" in err
    code, out_, err = cli(capsys, "crawl", "https://example.com/", "--out", tmp_path / "o", "--scope", "planet")
    assert code == 2 and "--scope" in err
    for opt, value, msg in (("--delay", "-1", "--delay -1.0: must be ≥ 0"), ("--per-host", "0", "--per-host 0: must be ≥ 1"),
                            ("--timeout", "0", "--timeout 0.0: must be > 0")):
        code, out_, err = cli(capsys, "crawl", "https://example.com/", "--out", tmp_path / "o", opt, value)
        assert code == 2 and msg in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="--deny"):
        run(CrawlConfig(seeds=["https://example.com/"], out=tmp_path / "o", deny=["("]))


def test_seeds_file_and_rootless_run(site, tmp_path):
    seeds = tmp_path / "seeds.txt"
    # comments: whole lines, and after whitespace at a line's end (a URL's own "#" is its fragment)
    seeds.write_text(f"# local\n{site.base}/loop1.html   # the loop\n\n{site.base}/target.html#top\n")
    m = run(CrawlConfig(seeds=[str(seeds)], out=tmp_path / "o", allow_private=True, delay=0, max_depth=1))
    assert m["seeds"] == [f"{site.base}/loop1.html", f"{site.base}/target.html"]
    assert m["inputs"][0]["path"] == str(seeds.resolve())
    assert set(site.paths()) == {"/robots.txt", "/loop1.html", "/target.html", "/loop2.html"}
    with pytest.raises(StageError, match="no page"):
        run(CrawlConfig(seeds=[site.base + "/private/x"], out=tmp_path / "p", allow_private=True, delay=0))


# -- kill -9 and resume ----------------------------------------------------------------------------


def chain_site(n: int) -> dict:
    routes = {"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow:\n")}
    for i in range(n):
        links = [f"/p{(i + 1) % n}.html", f"/p{(i * 7 + 3) % n}.html", f"/r{i}"]
        routes[f"/p{i}.html"] = (200, HTML, page(*links, text=f"page {i} " + "lorem " * 200))
        routes[f"/r{i}"] = (301, {"Location": f"/p{(i * 3 + 1) % n}.html"}, b"")
    routes["/"] = (200, HTML, page("/p0.html"))
    return routes


def _record_set(out: Path) -> Counter:
    return Counter((t, u, s) for t, u, s, _ in read_warcs(out) if t != "warcinfo")


def test_kill_minus_nine_then_resume_matches_uninterrupted(tmp_path):
    n = 40
    site = Site(chain_site(n), delay=0.015)
    try:
        args = ["--allow-private", "--delay", "0", "--per-host", "3", "--warc-size-mb", "0.01"]
        env = {**os.environ, "LLMCTL_PROGRESS": "0"}
        cmd = [sys.executable, "-m", "llmctl", "crawl", site.base + "/", "--out", str(tmp_path / "killed"), *args]
        journal = tmp_path / ".killed.tmp-crawl" / "journal.jsonl"
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if journal.exists() and journal.read_bytes().count(b'"kind":"page"') >= n // 2:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "killed").exists()
        before = {json.loads(x)["url"] for x in journal.read_text().splitlines()
                  if x.endswith("}") and '"url"' in x and '"kind":"robots"' not in x}
        assert 0 < len(before) < 2 * n + 1
        seen_before_resume = len(site.log)

        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "resuming" in r.stderr
        refetched = {site.base + p for _, p in site.log[seen_before_resume:]} & before
        assert not refetched  # journalled pages are not fetched again
        assert "/robots.txt" not in [p for _, p in site.log[seen_before_resume:]]

        run(CrawlConfig(seeds=[site.base + "/"], out=tmp_path / "whole", allow_private=True, delay=0, per_host=3))
        killed, whole = _record_set(tmp_path / "killed"), _record_set(tmp_path / "whole")
        assert killed == whole
        assert len(whole) == 2 * (1 + 1 + 2 * n)  # request+response: robots, /, n pages, n redirects
        assert max(whole.values()) == 1  # nothing duplicated
        mk, mw = read_manifest(tmp_path / "killed"), read_manifest(tmp_path / "whole")
        assert mk["resumed"] and mk["stats"]["pages"] == mw["stats"]["pages"] == 1 + 2 * n
        assert mk["stats"]["by_status"] == mw["stats"]["by_status"]
        assert warcio_check(tmp_path / "killed").returncode == 0
    finally:
        site.close()


# -- pure functions --------------------------------------------------------------------------------


def test_normalize_url():
    assert normalize_url("HTTP://Example.COM:80/a/./b/../c?q=1#frag") == "http://example.com/a/c?q=1"
    assert normalize_url("https://example.com") == "https://example.com/"
    assert normalize_url("https://example.com:8443/%7euser/a b") == "https://example.com:8443/~user/a%20b"
    assert normalize_url("/caf\xe9.html", "http://h/x/") == "http://h/caf%C3%A9.html"
    assert normalize_url("../up?x=%2f", "http://h/a/b/") == "http://h/a/up?x=%2F"
    assert normalize_url("http://bücher.example/") == "http://xn--bcher-kva.example/"
    for bad in ("mailto:a@b.c", "javascript:void(0)", "ftp://h/", "http://", "http://h:99999/"):
        assert normalize_url(bad) is None, bad


def test_robots_rules():
    txt = (
        "User-agent: otherbot\nDisallow: /\n\n"
        "User-agent: *\nDisallow: /private/\nAllow: /private/open\nDisallow: /*.pdf$\nCrawl-delay: 0.5\n"
    )
    r = Robots.parse(txt, "llmctl-crawler/0.1")
    assert r.delay == 0.5
    assert not r.allows("http://h/private/x") and r.allows("http://h/private/open/y")
    assert not r.allows("http://h/doc.pdf") and r.allows("http://h/doc.pdf?x=1") and r.allows("http://h/")
    assert r.allows("http://h/robots.txt")
    other = Robots.parse(txt, "OtherBot/2.0")
    assert not other.allows("http://h/anything") and other.delay is None
    assert Robots.parse("", "x").allows("http://h/a")
    # a byte-order mark before the first key, and our token with a version, still name us
    assert not Robots.parse("\ufeffUser-agent: *\nDisallow: /x\n", "llmctl-crawler/0.1").allows("http://h/x/1")
    versioned = "User-agent: *\nAllow: /\n\nUser-agent: LLMctl-Crawler/0.1.0\nDisallow: /secret\n"
    assert not Robots.parse(versioned, "llmctl-crawler/0.2").allows("http://h/secret")
    assert Robots.parse(versioned, "llmctl-crawlerx/0.2").allows("http://h/secret")


def test_pages_served_without_a_content_type_are_sniffed(tmp_path):
    site = Site({"/robots.txt": (404, HTML, b""), "/": (200, HTML, page("/untyped", "/blob")),
                 "/untyped": (200, {}, page("/deep.html")), "/blob": (200, {}, bytes(range(256)) * 4),
                 "/deep.html": (200, HTML, page())})
    try:
        m = run(CrawlConfig(seeds=[site.base + "/"], out=tmp_path / "o", allow_private=True, delay=0))
        assert sorted(site.paths()) == ["/", "/blob", "/deep.html", "/robots.txt", "/untyped"]
        s = m["stats"]
        assert s["pages"] == 3 and s["skipped"] == {"content-type": 1}  # the HTML kept (its link followed), the bytes not
        assert {u for _, u, _, _ in read_warcs(tmp_path / "o")} >= {site.base + "/untyped", site.base + "/deep.html"}
    finally:
        site.close()


def test_robots_redirect_hops_keep_the_delay_and_long_crawl_delays_skip_the_host(tmp_path):
    txt = {"Content-Type": "text/plain"}
    a = Site({"/robots.txt": (301, {"Location": "/r2.txt"}, b""), "/r2.txt": (302, {"Location": "/r3.txt"}, b""),
              "/r3.txt": (200, txt, b"User-agent: *\nDisallow: /private\n"),
              "/": (200, HTML, page("/private/x.html", "/ok.html")), "/ok.html": (200, HTML, page())})
    b = Site({"/robots.txt": (200, txt, b"User-agent: *\nCrawl-delay: 86400\n"), "/": (200, HTML, page())})
    try:
        m = run(CrawlConfig(seeds=[a.base + "/", b.base + "/"], out=tmp_path / "o", allow_private=True, delay=0.2,
                            max_crawl_delay=60))
        t = [x for x, _ in a.log]
        assert a.paths() == ["/robots.txt", "/r2.txt", "/r3.txt", "/", "/ok.html"]
        assert min(y - x for x, y in zip(t, t[1:], strict=False)) >= 0.2 - 0.02  # redirect hops too
        assert b.paths() == ["/robots.txt"]  # a day between requests: skipped, not crawled faster
        s = m["stats"]
        assert s["refused"] == {"robots": 1, "crawl-delay-too-long": 1} and s["pages"] == 2
    finally:
        a.close()
        b.close()


def test_link_extraction_and_scope():
    links, nofollow = extract_links(LATIN, "http://h/dir/latin.html", "text/html")
    assert links == ["http://h/caf%C3%A9.html"] and not nofollow
    html = b'<html><head><base href="http://h/base/"><meta name="ROBOTS" content="noindex"></head>' \
           b'<body><a href="x.html">x</a><a href="mailto:a@b">m</a><a href="x.html#y">x</a></body></html>'
    assert extract_links(html, "http://h/", "text/html") == (["http://h/base/x.html"], False)
    assert extract_links(b'<meta name="robots" content="nofollow"><a href="/a">', "http://h/", "text/html") == ([], True)
    s = Scope("domain")
    s.add_root("https://www.example.co.uk/")
    assert s.reason_out("http://blog.example.co.uk/x") is None
    assert s.reason_out("http://example.com/") == "off-domain"
    s = Scope("host")
    s.add_root("https://www.example.co.uk/")
    assert s.reason_out("http://blog.example.co.uk/x") == "off-host"


def test_store_discards_half_written_record_and_torn_journal_line(tmp_path):
    """What a kill -9 can leave behind (a partial gzip member, a torn journal line) is cut away."""
    from llmctl.artifacts import StageRun
    from llmctl.data.crawl_store import Exchange, WarcStore

    def ex(i: int) -> Exchange:
        return Exchange(f"http://h/{i}", time.time(), f"GET /{i} HTTP/1.1", [("Host", "h")], "HTTP/1.1", 200, "OK",
                        [("Content-Type", "text/html"), ("Transfer-Encoding", "chunked")], b"<p>%d</p>" % i)

    out = tmp_path / "c"
    st = StageRun.open(out, "crawl", {"x": 1})
    store = WarcStore(st, shard_bytes=1500, info={"software": "test"})
    for i in range(5):
        store.record({"kind": "page", "url": f"http://h/{i}"}, [ex(i)])
    store.abort()  # the process dies here ...
    partial = next(st.work.glob("*.partial"))
    good_size = partial.stat().st_size
    with open(partial, "ab") as f:  # ... in the middle of writing page 5's records
        f.write(b"\x1f\x8b\x08\x00garbage")
    with open(st.path("journal.jsonl"), "a") as f:
        f.write('{"kind":"page","url":"http://h/5","warc":["')
    st2 = StageRun.open(out, "crawl", {"x": 1})
    assert st2.resumed
    store2 = WarcStore(st2, shard_bytes=1500, info={"software": "test"})
    entries = store2.replay()
    assert [e["url"] for e in entries] == [f"http://h/{i}" for i in range(5)]
    assert partial.stat().st_size == good_size
    for i in range(5, 8):
        store2.record({"kind": "page", "url": f"http://h/{i}"}, [ex(i)])
    shards = store2.close()
    st2.finish({}, files=shards)
    rows = read_warcs(out)
    assert [u for t, u, _, _ in rows if t == "response"] == [f"http://h/{i}" for i in range(8)]
    assert len(shards) >= 2 and warcio_check(out).returncode == 0
    with open(out / shards[0], "rb") as fh:
        resp = [r for r in ArchiveIterator(fh) if r.rec_type == "response"][0]
        assert resp.http_headers.get_header("X-Crawler-Transfer-Encoding") == "chunked"
        assert resp.http_headers.get_header("Content-Length") == str(len(b"<p>0</p>"))


def test_hosts_proceed_at_once_each_at_its_own_pace_and_timeouts_count(tmp_path):
    """Two origins with Crawl-delay 0.25 each: every host keeps its spacing, yet their requests
    interleave (async across hosts). A page slower than --timeout fails as 'timeout' after retries."""
    def slow(n):
        time.sleep(1.0)
        return 200, HTML, page()

    def routes(extra=None):
        r = {"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nCrawl-delay: 0.25\n"),
             "/": (200, HTML, page(*[f"/p{i}.html" for i in range(4)]))}
        r.update({f"/p{i}.html": (200, HTML, page()) for i in range(4)})
        r.update(extra or {})
        return r

    a, b = Site(routes()), Site(routes({"/": (200, HTML, page("/p0.html", "/p1.html", "/p2.html", "/p3.html",
                                                               "/slow.html")), "/slow.html": slow}))
    try:
        m = run(CrawlConfig(seeds=[a.base + "/", b.base + "/"], out=tmp_path / "o", allow_private=True, delay=0,
                            per_host=2, timeout=0.4, retries=1, backoff=0.05))
        for s in (a, b):
            t = [x for x, _ in s.log]
            assert min(y - x for x, y in zip(t, t[1:], strict=False)) >= 0.25 - 0.02
        ta, tb = [x for x, _ in a.log], [x for x, _ in b.log]
        assert ta[0] < tb[-1] and tb[0] < ta[-1]  # the two hosts' crawls overlap in time
        s = m["stats"]
        assert s["hosts"] == 2 and s["pages"] == 10 and s["errors"] == {"timeout": 1} and s["retries"] == 1
        assert b.hits["/slow.html"] == 2
    finally:
        a.close()
        b.close()


def test_store_writes_the_bytes_warcio_would(tmp_path, monkeypatch):
    """Our own record writer (level-6 gzip members from a writer thread) produces, once
    decompressed, exactly what warcio's WARCWriter writes for the same records: header order,
    digests, percent-encoding of a non-ASCII HTTP header, WARC-Truncated, the warcinfo record."""
    import base64
    import gzip
    import hashlib
    import itertools
    from io import BytesIO

    from warcio.recordbuilder import RecordBuilder
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from llmctl.artifacts import StageRun
    from llmctl.data import crawl_store as cs

    date = "2026-01-02T03:04:05.250000Z"
    ours_ids = itertools.count()
    monkeypatch.setattr(cs, "_record_id", lambda: f"<urn:uuid:{next(ours_ids)}>")
    monkeypatch.setattr(cs, "warc_date", lambda ts: date)
    ex = cs.Exchange("http://h/caf%C3%A9?q=1", 0.0, "GET /caf%C3%A9?q=1 HTTP/1.1", [("Host", "h"), ("Accept", "*/*")],
                     "HTTP/1.1", 200, "OK", [("Content-Type", "text/html"), ("Content-Encoding", "gzip"),
                                             ("Content-Length", "17"), ("X-Odd", "caf\xe9")],
                     b"<p>payload</p>" * 300, truncated=True, ip="127.0.0.1")
    info = {"software": "test", "robots": "obey", "empty": ""}
    st = StageRun.open(tmp_path / "c", "crawl", {"x": 1})
    store = cs.WarcStore(st, shard_bytes=1 << 20, info=info)
    store.record({"kind": "page", "url": ex.url}, [ex])
    shards = store.close()
    ours = gzip.decompress(st.path(shards[0]).read_bytes())

    # the reference: warcio, fed the same record ids (warcinfo 0, response 1, request 2) and date
    ref_ids = iter(["<urn:uuid:0>", "<urn:uuid:2>"])
    monkeypatch.setattr(RecordBuilder, "_make_warc_id", classmethod(lambda cls: next(ref_ids)))
    monkeypatch.setattr(RecordBuilder, "_make_warc_date", classmethod(lambda cls, use_micros=False: date))
    buf = BytesIO()
    w = WARCWriter(buf, gzip=False, warc_version="1.1")
    w.write_record(w.create_warcinfo_record(shards[0], info))
    common = {"WARC-Date": date, "WARC-Warcinfo-ID": "<urn:uuid:0>", "WARC-IP-Address": "127.0.0.1"}
    req_http = StatusAndHeaders(ex.request_line, ex.request_headers, is_http_request=True)
    req_http.compute_headers_buffer()
    resp_http = StatusAndHeaders("200 OK", cs.stored_headers(ex.headers, len(ex.body)), protocol="HTTP/1.1")
    resp_http.compute_headers_buffer()

    def sha1(data: bytes) -> str:
        return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()

    w.write_record(w.create_warc_record(ex.url, "request", payload=BytesIO(b""), length=0, http_headers=req_http,
                                        warc_headers_dict={**common, "WARC-Concurrent-To": "<urn:uuid:1>",
                                                           "WARC-Block-Digest": sha1(req_http.headers_buff),
                                                           "WARC-Payload-Digest": sha1(b"")}))
    w.write_record(w.create_warc_record(ex.url, "response", payload=BytesIO(ex.body), length=len(ex.body),
                                        http_headers=resp_http,
                                        warc_headers_dict={**common, "WARC-Record-ID": "<urn:uuid:1>",
                                                           "WARC-Block-Digest": sha1(resp_http.headers_buff + ex.body),
                                                           "WARC-Payload-Digest": sha1(ex.body),
                                                           "WARC-Truncated": "length"}))
    assert b"X-Odd: caf%C3%A9" in ours and b"X-Crawler-Content-Encoding: gzip" in ours
    assert ours == buf.getvalue()


def test_record_ids_are_distinct_version_4_uuids():
    import uuid

    from llmctl.data.crawl_store import _record_id

    ids = [_record_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for r in ids[:2000]:
        assert r.startswith("<urn:uuid:") and r.endswith(">")
        u = uuid.UUID(r[10:-1])
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == r[10:-1]


def test_a_write_failure_stops_the_crawl_resumably(site, tmp_path, monkeypatch, caplog):
    """The writer thread failing (here: the disk is full at the fourth page) stops the crawl with
    one StageError line; nothing is committed, and the rerun completes it, fetching only what
    was not journalled."""
    import gc

    from llmctl.data import crawl_store as cs

    members = cs._exchange_members
    calls = {"n": 0}

    def full_disk(ex, warcinfo_id):  # (runs in the builder process, forked after this patch)
        calls["n"] += 1
        if calls["n"] >= 4:
            raise OSError(28, "No space left on device")
        return members(ex, warcinfo_id)

    monkeypatch.setattr(cs, "_exchange_members", full_disk)
    out = tmp_path / "crawl"
    cfg = dict(seeds=[site.base + "/"], out=out, allow_private=True, delay=0, backoff=0.05, robots=False)
    with pytest.raises(StageError, match="cannot write the WARC or journal .*No space left"):
        run(CrawlConfig(**cfg))
    assert not out.exists()
    gc.collect()  # (asyncio reports a task left pending or its exception unretrieved when it is freed)
    assert not [r for r in caplog.records if r.name == "asyncio"]
    journal = next(tmp_path.glob(".crawl.tmp-*")) / "journal.jsonl"
    done = {json.loads(x)["url"] for x in journal.read_text().splitlines() if '"kind":"page"' in x}
    assert 1 <= len(done) <= 3  # (pages written in one batch with the failing one are not journalled)
    monkeypatch.setattr(cs, "_exchange_members", members)
    n = len(site.log)
    m = run(CrawlConfig(**cfg))
    refetched = {site.base + p for p in site.paths()[n:]}
    assert not refetched & done and m["stats"]["pages"] > 3
    assert warcio_check(out).returncode == 0


def test_fast_crawl_rotating_often_keeps_each_file_consistent(tmp_path):
    """Many pages written in batches while shards rotate every few records: every record names
    the warcinfo record of its own file, nothing is lost or doubled, and warcio checks them all."""
    n = 120
    routes = {"/": (200, HTML, page("/p0.html"))}
    for i in range(n):
        routes[f"/p{i}.html"] = (200, HTML, page(*(f"/p{(i * 7 + k) % n}.html" for k in range(1, 6)), text="x" * 800))
    s = Site(routes)
    try:
        out = tmp_path / "crawl"
        m = run(CrawlConfig(seeds=[s.base + "/"], out=out, allow_private=True, delay=0.0, robots=False,
                            per_host=8, warc_size_mb=0.01))
    finally:
        s.close()
    files = sorted(out.glob("*.warc.gz"))
    assert len(files) > 10 and m["stats"]["pages"] == n + 1
    urls = []
    for f in files:
        with open(f, "rb") as fh:
            recs = list(ArchiveIterator(fh))
        assert recs[0].rec_type == "warcinfo"
        info_id = recs[0].rec_headers.get_header("WARC-Record-ID")
        assert {r.rec_headers.get_header("WARC-Warcinfo-ID") for r in recs[1:]} == {info_id}, f
        urls += [r.rec_headers.get_header("WARC-Target-URI") for r in recs if r.rec_type == "response"]
    assert sorted(urls) == sorted({s.base + "/", *(f"{s.base}/p{i}.html" for i in range(n))})
    assert warcio_check(out).returncode == 0


def test_losing_the_builder_process_falls_back_to_the_writer_thread(tmp_path, monkeypatch):
    """The builder process dying mid-crawl (here: at its third page) costs nothing: the writer
    thread builds that batch and the rest itself; every page is in the WARC once."""
    from llmctl.data import crawl_store as cs

    members = cs._exchange_members
    parent, calls = os.getpid(), {"n": 0}

    def dies(ex, warcinfo_id):  # (inherited by the builder process, forked after this patch)
        if os.getpid() != parent:
            calls["n"] += 1
            if calls["n"] == 3:
                os._exit(1)
        return members(ex, warcinfo_id)

    monkeypatch.setattr(cs, "_exchange_members", dies)
    lost = []
    shutdown = cs.WarcStore._prebuild

    def watch(self, items):
        had = self._pool is not None
        out = shutdown(self, items)
        if had and self._pool is None:
            lost.append(len(items))
        return out

    monkeypatch.setattr(cs.WarcStore, "_prebuild", watch)
    n = 40
    routes = {"/": (200, HTML, page(*(f"/p{i}.html" for i in range(n))))}
    routes.update({f"/p{i}.html": (200, HTML, page("/", text="y" * 500)) for i in range(n)})
    s = Site(routes)
    try:
        out = tmp_path / "crawl"
        m = run(CrawlConfig(seeds=[s.base + "/"], out=out, allow_private=True, delay=0.0, robots=False, per_host=1))
    finally:
        s.close()
    assert len(lost) == 1  # the builder was used, then lost once
    rows = read_warcs(out)
    assert m["stats"]["pages"] == n + 1
    assert sorted(r[1] for r in rows if r[0] == "response") == sorted([s.base + "/", *(f"{s.base}/p{i}.html" for i in range(n))])
    assert warcio_check(out).returncode == 0

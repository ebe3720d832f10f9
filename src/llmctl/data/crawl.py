"""The crawl stage: seed URLs in, gzip WARC/1.1 files out, politely and resumably.

One asyncio loop drives every host at once. Each origin (scheme://host:port) has its own priority
queue (shallowest first), its own concurrency limit and its own clock: a request may start only
when the previous one to that origin started at least ``delay`` seconds earlier, where the delay is
the larger of ``--delay`` and robots.txt's Crawl-delay. Across origins only ``--concurrency``
limits the number of requests in flight.

The work is split three ways: the event loop thread does HTTP (crawl_http, a small keep-alive
client) and the frontier; a builder process extracts each HTML page's links and builds, digests
and compresses its WARC records; the writer thread (crawl_store) ships pages to the builder in
batches, writes the records and then the journal lines, and hands the links back to the loop.
The loop thread so has the GIL nearly to itself. A request's slots are freed once its
response is read; at most 4x ``--concurrency`` pages may be fetched but not yet written.

Decisions worth knowing:

- Redirects are not followed inside one request: a 3xx response is recorded (request and response
  records) and its target is queued like a link, at the same depth, through the same scope,
  robots and politeness checks, at most ``--max-redirects`` hops. So every hop of a chain is in
  the WARC, and a target fetched before is not fetched again.
- A URL is fetched at most once. Retried attempts (429, 5xx, connection errors; exponential
  backoff, Retry-After honoured up to ``--max-retry-after``) are not recorded; only the final
  response is, so the WARC holds one response per URL.
- 2xx responses whose Content-Type is not in ``--content-type`` are not recorded (the body is not
  even read); they are counted as skipped. Non-2xx responses are always recorded.
- The payload is stored decoded (no Content-Encoding, no chunking); see crawl_store.
- Depth is the shortest link distance from a seed; a page first reached by a longer path has its
  depth lowered (and its outlinks re-examined) when a shorter one turns up, so ``--max-depth``
  selects the same pages whatever order the fetches finish in.
- Non-public addresses are refused after DNS resolution, unless ``--allow-private``.
"""

from __future__ import annotations

import asyncio
import heapq
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import __version__
from ..artifacts import StageRun
from ..console import console, progress
from ..errors import StageError, UsageError
from .crawl_http import FetchError, HttpClient, Response
from .crawl_net import (
    SCOPES,
    Scope,
    extract_links,
    ip_literal,
    is_public_address,
    normalize_url,
    origin,
)
from .crawl_store import JOURNAL, Exchange, WarcStore
from .robots import Robots
from .warc import looks_like_html

DEFAULT_USER_AGENT = f"llmctl-crawler/{__version__} (+https://github.com/llmctl/llmctl)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class CrawlConfig:
    """Every option of ``llmctl crawl``; all but ``out`` and ``force`` go into the manifest."""

    seeds: list[str]
    out: Path
    scope: str = "host"
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    max_depth: int = 10
    max_pages: int = 10_000
    max_bytes: int = 10 * 1024 * 1024
    content_types: list[str] = field(default_factory=lambda: list(HTML_TYPES))
    user_agent: str = DEFAULT_USER_AGENT
    robots: bool = True
    delay: float = 1.0
    per_host: int = 2
    concurrency: int = 64
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    max_retry_after: float = 60.0
    max_crawl_delay: float = 60.0
    max_redirects: int = 5
    allow_private: bool = False
    warc_size_mb: float = 1000.0
    force: bool = False

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("out")
        d.pop("force")
        return d


# -- seeds and options --------------------------------------------------------------------------


def load_seeds(seeds: list[str]) -> tuple[list[str], list[Path]]:
    """Normalised seed URLs (in order, de-duplicated) and the seed files they came from."""
    urls: dict[str, None] = {}
    files: list[Path] = []
    if not seeds:
        raise UsageError("no seeds: give one or more URLs (https://example.com/) or a seeds file")
    for s in seeds:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s):
            n = normalize_url(s)
            if n is None:
                raise UsageError(f"seed {s!r}: not a fetchable http(s) URL; give e.g. https://example.com/")
            urls[n] = None
            continue
        p = Path(s)
        if not p.is_file():
            raise UsageError(
                f"seed {s!r}: not an http(s) URL and not a seeds file; "
                "give URLs like https://example.com/ or a file with one URL per line"
            )
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{p}: cannot read the seeds file ({e}); give a UTF-8 text file") from e
        n_before = len(urls)
        for i, line in enumerate(lines, 1):
            # a comment is a line starting with "#" or a "#" after whitespace (a URL's own "#" is a fragment)
            line = re.split(r"(?:^|\s)#", line.strip(), maxsplit=1)[0].strip()
            if not line:
                continue
            ok = re.match(r"^https?://\S+$", line, re.IGNORECASE)
            n = normalize_url(line) if ok else None
            if n is None:
                raise UsageError(f"{p}:{i}: {line!r} is not an http(s) URL; fix or remove that line")
            urls[n] = None
        if len(urls) == n_before and not any(line.strip() for line in lines):
            raise UsageError(f"{p}: the seeds file is empty; put one URL per line")
        files.append(p)
    return list(urls), files


def validate(cfg: CrawlConfig) -> None:
    if cfg.scope not in SCOPES:
        raise UsageError(f"--scope {cfg.scope!r}: choose one of {', '.join(SCOPES)}")
    for opt, pats in (("--allow", cfg.allow), ("--deny", cfg.deny)):
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise UsageError(f"{opt} {p!r}: not a valid regular expression ({e})") from e
    # (option, value, smallest allowed, whether the bound itself is allowed)
    bounds = [
        ("--max-depth", cfg.max_depth, 0, True), ("--max-pages", cfg.max_pages, 0, True),
        ("--max-bytes", cfg.max_bytes, 0, False), ("--delay", cfg.delay, 0, True), ("--per-host", cfg.per_host, 1, True),
        ("--concurrency", cfg.concurrency, 1, True), ("--timeout", cfg.timeout, 0, False), ("--retries", cfg.retries, 0, True),
        ("--backoff", cfg.backoff, 0, True), ("--max-retry-after", cfg.max_retry_after, 0, True),
        ("--max-crawl-delay", cfg.max_crawl_delay, 0, True),
        ("--max-redirects", cfg.max_redirects, 0, True), ("--warc-size-mb", cfg.warc_size_mb, 0, False),
    ]
    for name, value, low, inclusive in bounds:
        if value < low or (value == low and not inclusive):
            raise UsageError(f"{name} {value}: must be {'≥' if inclusive else '>'} {low}")
    if not cfg.content_types:
        raise UsageError("--content-type: give at least one type to keep, e.g. text/html")
    if not cfg.user_agent.strip():
        raise UsageError("--user-agent: must not be empty; name your crawler, e.g. mybot/1.0")


# -- the engine ---------------------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


@dataclass
class _Skip:
    reason: str
    content_type: str
    status: int


@dataclass
class _Host:
    origin: str
    slots: asyncio.Semaphore
    delay: float
    heap: list[tuple[int, int, str]] = field(default_factory=list)
    next_start: float = 0.0
    last_start: float = 0.0
    robots: Robots | None = None
    refused: str | None = None
    task: asyncio.Task | None = None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # an HTTP date: rare

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def links_fields(body: bytes, url: str, ctype: str, scope: Scope) -> dict[str, Any]:
    """The journal fields for an HTML page's outlinks: kept links, out-of-scope counts, nofollow.
    (Runs in the WARC builder process, or the writer thread.)"""
    links, nofollow = extract_links(body, url, ctype)
    kept, off = [], Counter()
    reason_out = scope.reason_out
    for link in links:
        why = reason_out(link)
        if why is None:
            kept.append(link)
        else:
            off[why] += 1
    out: dict[str, Any] = {"links": kept}
    if off:
        out["offscope"] = dict(off)
    if nofollow:
        out["nofollow"] = True
    return out


def _settle(fut: asyncio.Future, entry: dict[str, Any] | None, exc: BaseException | None) -> None:
    if not fut.done():
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(entry)


def _mime(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


@dataclass
class CrawlStats:
    pages: int = 0  # URLs whose response is in the WARC (robots.txt not included)
    bytes: int = 0  # payload bytes of those responses
    by_status: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    links_out_of_scope: Counter = field(default_factory=Counter)
    redirects_not_followed: Counter = field(default_factory=Counter)
    retries: int = 0
    truncated: int = 0
    robots_fetched: int = 0
    hosts: set = field(default_factory=set)

    def absorb(self, e: dict[str, Any]) -> None:
        kind = e["kind"]
        self.retries += e.get("retries", 0)
        if kind == "robots":
            self.robots_fetched += 1 if e.get("status") is not None else 0
            return
        self.hosts.add(origin(e["url"]))
        if kind == "page":
            self.pages += 1
            self.bytes += e["bytes"]
            self.by_status[str(e["status"])] += 1
            self.truncated += bool(e.get("truncated"))
            self.links_out_of_scope.update(e.get("offscope", {}))
            if e.get("redirect_dropped"):
                self.redirects_not_followed[e["redirect_dropped"]] += 1
        elif kind == "refused":
            self.refused[e["reason"]] += 1
        elif kind == "skipped":
            self.skipped[e["reason"]] += 1
        elif kind == "error":
            self.errors[e["reason"]] += 1


class Crawler:
    def __init__(self, cfg: CrawlConfig, store: WarcStore, seeds: list[str]):
        self.cfg = cfg
        self.store = store
        self.seeds = seeds
        self.scope = Scope(
            cfg.scope, [re.compile(p) for p in cfg.allow], [re.compile(p) for p in cfg.deny]
        )
        for s in seeds:
            self.scope.add_root(s)
        self.keep_types = {t.lower() for t in cfg.content_types}
        self.depth: dict[str, int] = {}
        self.hops: dict[str, int] = {}
        self.started: set[str] = set()
        self.done: set[str] = set()
        self.links: dict[str, list[str]] = {}
        self.redirects: dict[str, str] = {}
        self.hosts: dict[str, _Host] = {}
        self.stats = CrawlStats()
        self.pending = 0
        self.seq = 0
        self.fetches = 0  # URLs we sent a request for (the --max-pages budget)
        self._inflight = 0
        self.seeds_set = set(seeds)
        self.session_pages = 0
        self.idle = asyncio.Event()
        self.global_slots = asyncio.Semaphore(cfg.concurrency)
        # URLs being fetched or whose page waits for the writer thread (its links, its records):
        # bounds the memory held by pages read faster than they are written
        self.backlog = asyncio.Semaphore(max(64, 4 * cfg.concurrency))
        self.tasks: set[asyncio.Task] = set()  # process() of each URL under way
        self._settled: list[tuple[asyncio.Future, dict[str, Any] | None, BaseException | None]] = []
        self._settled_lock = threading.Lock()
        self.loop = asyncio.get_running_loop()
        self.http: HttpClient | None = None
        self.bar: Any = None
        self.bar_task: Any = None
        self.failure: BaseException | None = None
        self.stopping = False  # interrupted (Ctrl-C): start no task

    # -- frontier -------------------------------------------------------------------------------
    def host(self, org: str) -> _Host:
        h = self.hosts.get(org)
        if h is None:
            h = self.hosts[org] = _Host(org, asyncio.Semaphore(self.cfg.per_host), self.cfg.delay)
        return h

    def discover(self, url: str, depth: int, hops: int = 0) -> None:
        """Note that ``url`` is reachable at ``depth``; queue it, or lower a known page's depth."""
        stack = [(url, depth, hops)]
        while stack:
            u, d, h = stack.pop()
            old = self.depth.get(u)
            if old is not None and old <= d:
                continue
            self.depth[u] = d
            self.hops[u] = min(h, self.hops.get(u, h))
            if u in self.done:
                stack.extend((link, d + 1, 0) for link in self.links.get(u, ()))
                if u in self.redirects:
                    stack.append((self.redirects[u], d, self.hops[u] + 1))
            elif u not in self.started and d <= self.cfg.max_depth:
                host = self.host(origin(u))
                heapq.heappush(host.heap, (d, self.seq, u))
                self.seq += 1
                self.pending += 1
                if host.task is None and self.running:
                    host.task = self.loop.create_task(self.host_loop(host))

    def absorb(self, e: dict[str, Any], live: bool) -> None:
        """Fold a journal entry into the crawl's state (live, or replayed on resume)."""
        self.stats.absorb(e)
        if e["kind"] == "robots":
            host = self.host(e["host"])
            self._set_robots(host, e)
            return
        url = e["url"]
        self.started.add(url)
        self.done.add(url)
        if e["kind"] in ("page", "skipped", "error"):
            self.fetches += 1
        if e["kind"] == "page":
            self.links[url] = e.get("links", [])
            if e.get("redirect"):
                self.redirects[url] = e["redirect"]
                if e.get("root"):
                    self.scope.add_root(e["redirect"])
            if live:
                self.session_pages += 1
        if live and self.bar is not None:
            self._advance_bar()

    def _advance_bar(self) -> None:
        """Advance the bar; raise its total (the frontier grows as pages are read) only in steps,
        because rich forgets the measured rate, and so the ETA, whenever the total changes."""
        known = len(self.done) + self.pending
        task = self.bar.tasks[0] if self.bar.tasks else None
        total = task.total if task is not None else None
        if total is None or known > total:
            total = int(known * 1.25) + 1
            if self.cfg.max_pages:
                total = min(total, max(self.cfg.max_pages, len(self.done) + 1))
            self.bar.update(self.bar_task, advance=1, total=total)
        else:
            self.bar.update(self.bar_task, advance=1)

    def _set_robots(self, host: _Host, e: dict[str, Any]) -> None:
        if e.get("refused"):
            host.refused = e["refused"]
            return
        status = e.get("status")
        if status is not None and 200 <= status < 300:
            host.robots = Robots.parse(e.get("body", ""), self.cfg.user_agent)
        elif status is not None and (400 <= status < 500 or 300 <= status < 400):
            # 4xx: no robots.txt; a redirect chain longer than five hops counts as unavailable too
            host.robots = Robots.allowing_all()
        else:
            host.robots = Robots.disallowing_all()
            host.refused = "robots-unreachable"
        if (host.robots.delay or 0.0) > self.cfg.max_crawl_delay:
            # crawling it faster than it asks would be rude, as slowly as it asks may take days
            host.refused = "crawl-delay-too-long"
        host.delay = max(self.cfg.delay, host.robots.delay or 0.0)

    # -- scheduling -----------------------------------------------------------------------------
    def _refusal(self, host: _Host, url: str) -> str | None:
        if host.refused:
            return host.refused
        if not self.cfg.allow_private:
            lit = ip_literal(urlsplit(url).hostname or "")
            if lit is not None and not is_public_address(lit):
                return "private-address"
        if host.robots is not None and not host.robots.allows(url):
            return "robots"
        return None

    async def _take_turn(self, host: _Host) -> None:
        """Wait until ``host`` may receive a request and a global slot is free, then claim both."""
        while True:
            wait = host.next_start - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self.global_slots.acquire()
            now = self.loop.time()
            if now >= host.next_start:
                host.next_start = now + host.delay
                host.last_start = now
                return
            self.global_slots.release()

    def _budget_left(self) -> bool:
        return not self.cfg.max_pages or self.fetches + self._inflight < self.cfg.max_pages

    async def host_loop(self, host: _Host) -> None:
        try:
            if self.cfg.robots and host.robots is None and host.refused is None:
                await self.load_robots(host)
            while host.heap:
                d, _, url = host.heap[0]
                if url in self.started:
                    heapq.heappop(host.heap)
                    self.pending -= 1
                    continue
                reason = self._refusal(host, url)
                if reason is not None:
                    heapq.heappop(host.heap)
                    self.started.add(url)
                    entry = {"kind": "refused", "url": url, "depth": d, "reason": reason}
                    self.store.record(entry)
                    self.absorb(entry, live=True)
                    self.pending -= 1
                    continue
                if not self._budget_left():
                    self.pending -= len(host.heap)
                    host.heap.clear()
                    break
                await self.backlog.acquire()
                await host.slots.acquire()
                await self._take_turn(host)
                # while we waited, a shallower URL may have gone on top: it has not been checked
                if not host.heap or host.heap[0][2] != url or not self._budget_left():
                    host.slots.release()
                    self.global_slots.release()
                    self.backlog.release()
                    continue
                if not self.running:  # failed or interrupted: start nothing new
                    host.slots.release()
                    self.global_slots.release()
                    self.backlog.release()
                    break
                d, _, url = heapq.heappop(host.heap)
                self.started.add(url)
                self._inflight += 1
                task = self.loop.create_task(self.process(host, url))
                self.tasks.add(task)
                task.add_done_callback(self._released(host))
        except Exception as e:  # a bug must stop the crawl, not hang it
            self.failure = e
            self.idle.set()
        finally:
            host.task = None
            self._check_idle()

    @property
    def running(self) -> bool:
        """New tasks may start: nothing failed and no interrupt is stopping the crawl."""
        return self.failure is None and not self.stopping

    def _free_turn(self, host: _Host) -> None:
        """The request is over (its response read): give back its host and global slots."""
        host.slots.release()
        self.global_slots.release()
        if host.heap and host.task is None and self.running:
            host.task = self.loop.create_task(self.host_loop(host))

    def _released(self, host: _Host):
        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            self.backlog.release()
            self.pending -= 1
            if not t.cancelled() and t.exception() is not None:
                self.failure = t.exception()
                self.idle.set()
            if host.heap and host.task is None and self.running:
                host.task = self.loop.create_task(self.host_loop(host))
            self._check_idle()

        return done

    def _check_idle(self) -> None:
        if self.pending <= 0 and not any(h.task for h in self.hosts.values()):
            self.idle.set()

    @property
    def _sniffs_html(self) -> bool:
        """A 2xx response without a Content-Type is kept when it looks like HTML and HTML is kept
        (as browsers and ``llmctl extract`` sniff it)."""
        return any(self._keep(t) for t in HTML_TYPES)

    def _keep(self, content_type: str) -> bool:
        mime = _mime(content_type)
        return mime in self.keep_types or "*/*" in self.keep_types or f"{mime.split('/')[0]}/*" in self.keep_types

    # -- fetching -------------------------------------------------------------------------------
    async def _fetch(self, url: str, keep_any: bool, attempt_last: bool) -> Exchange | _Skip:
        assert self.http is not None
        started = time.time()
        skip: _Skip | None = None

        def decide(resp: Response) -> int | None:
            """Seen the status and headers: retry, skip without reading the body, or read it."""
            nonlocal skip
            status = resp.status
            if status in RETRY_STATUSES and not attempt_last:
                raise _Failure(f"http-{status}", True, _retry_after(resp.header("Retry-After")))
            ctype = resp.header("Content-Type") or ""
            if not keep_any and 200 <= status < 300 and not self._keep(ctype):
                if not ctype.strip() and self._sniffs_html:
                    return self.cfg.max_bytes  # no type given: read it and look (below)
                skip = _Skip("content-type", _mime(ctype) or "none", status)
                return None
            return self.cfg.max_bytes

        try:
            resp, body, truncated = await self.http.get(url, decide)
        except FetchError as e:
            raise _Failure(e.reason, e.retryable) from e
        if skip is not None:
            return skip
        if (not keep_any and 200 <= resp.status < 300 and not (resp.header("Content-Type") or "").strip()
                and not looks_like_html(body)):
            return _Skip("content-type", "none", resp.status)
        return Exchange(
            url=url,
            started=started,
            request_line=resp.request_line,
            request_headers=resp.request_headers,
            protocol=resp.protocol,
            status=resp.status,
            reason=resp.reason,
            headers=resp.headers,
            body=body,
            truncated=truncated,
            ip=resp.ip,
        )

    async def _fetch_with_retries(
        self, host: _Host, url: str, keep_any: bool
    ) -> tuple[Exchange | _Skip | _Failure, int]:
        """Fetch with retries; the caller holds a turn on ``host`` (released and retaken between)."""
        attempt = 0
        while True:
            try:
                return await self._fetch(url, keep_any, attempt >= self.cfg.retries), attempt
            except _Failure as f:
                if not f.retryable or attempt >= self.cfg.retries:
                    return f, attempt
                wait = self.cfg.backoff * (2**attempt)
                if f.retry_after is not None:
                    wait = max(wait, min(f.retry_after, self.cfg.max_retry_after))
                host.next_start = max(host.next_start, self.loop.time() + wait)
                self.global_slots.release()
                await self._take_turn(host)
                attempt += 1

    async def load_robots(self, host: _Host) -> None:
        url = host.origin + "/robots.txt"
        reason = self._refusal(host, url)
        if reason is not None:
            host.refused = reason
            self.store.record({"kind": "robots", "host": host.origin, "url": url, "refused": reason})
            return
        await self._take_turn(host)
        exchanges: list[Exchange] = []
        entry: dict[str, Any] = {"kind": "robots", "host": host.origin, "url": url}
        retries = 0
        held = True  # a global slot (and the host's turn)
        try:
            target = url
            for _ in range(5 + 1):  # RFC 9309: follow at least five redirects
                res, n = await self._fetch_with_retries(host, target, keep_any=True)
                retries += n
                if isinstance(res, _Failure):
                    if res.reason == "private-address":
                        entry["refused"] = "private-address"
                    else:
                        entry["error"] = res.reason
                    break
                assert isinstance(res, Exchange)
                exchanges.append(res)
                entry["status"] = res.status
                loc = dict((k.lower(), v) for k, v in res.headers).get("location")
                nxt = normalize_url(loc, target) if (res.status in REDIRECT_STATUSES and loc) else None
                if nxt is None:
                    if 200 <= res.status < 300:
                        entry["body"] = res.body.decode("utf-8", errors="replace")
                    break
                target = nxt
                self.global_slots.release()  # the next hop waits for the host's delay like any request
                held = False
                await self._take_turn(host)
                held = True
        finally:
            if held:
                self.global_slots.release()
        entry["retries"] = retries
        self.store.record(entry, exchanges)
        self.absorb(entry, live=True)
        host.next_start = max(host.next_start, host.last_start + host.delay)

    async def process(self, host: _Host, url: str) -> None:
        depth = self.depth[url]
        try:
            res, retries = await self._fetch_with_retries(host, url, keep_any=False)
        finally:
            self._free_turn(host)  # before the links are extracted: the request is no longer in flight
        entry: dict[str, Any] = {"url": url, "depth": depth, "retries": retries}
        exchanges: list[Exchange] = []
        prepare = None
        if isinstance(res, _Failure):
            if res.reason == "private-address":
                entry.update(kind="refused", reason="private-address")
            else:
                entry.update(kind="error", reason=res.reason)
        elif isinstance(res, _Skip):
            entry.update(kind="skipped", reason=res.reason, content_type=res.content_type, status=res.status)
        else:
            exchanges.append(res)
            entry.update(kind="page", status=res.status, bytes=len(res.body), truncated=res.truncated)
            hdrs = {k.lower(): v for k, v in res.headers}
            ctype = hdrs.get("content-type", "")
            if res.status in REDIRECT_STATUSES and hdrs.get("location"):
                self._redirect(entry, url, depth, hdrs["location"])
            elif 200 <= res.status < 300 and (_mime(ctype) in HTML_TYPES or (not ctype.strip() and looks_like_html(res.body))):
                prepare = partial(links_fields, res.body, url, ctype, self.scope)
        if prepare is None:
            self.store.record(entry, exchanges)
        else:  # links are extracted in the writer thread, beside this loop; wait for them
            fut = self.loop.create_future()
            self.store.record(entry, exchanges, prepare, partial(self._from_writer, fut))
            entry = await fut
        self._inflight -= 1  # now counted in self.fetches instead
        self.absorb(entry, live=True)
        d = self.depth[url] + 1
        known = self.depth.get
        for link in entry.get("links", ()):
            old = known(link)
            if old is None or old > d:  # (discover's own first test, saving a call for known pages)
                self.discover(link, d)
        if entry.get("redirect"):
            self.discover(entry["redirect"], self.depth[url], self.hops.get(url, 0) + 1)

    def _from_writer(self, fut: asyncio.Future, entry: dict[str, Any] | None, exc: BaseException | None) -> None:
        """(writer thread) A page is written: hand its entry to the loop, one wake-up per batch."""
        with self._settled_lock:
            self._settled.append((fut, entry, exc))
            first = len(self._settled) == 1
        if first:
            self.loop.call_soon_threadsafe(self._settle_all)

    def _settle_all(self) -> None:
        with self._settled_lock:
            settled, self._settled = self._settled, []
        for fut, entry, exc in settled:
            _settle(fut, entry, exc)

    def _redirect(self, entry: dict[str, Any], url: str, depth: int, location: str) -> None:
        target = normalize_url(location, url)
        if target is None:
            entry["redirect_dropped"] = "bad-location"
            return
        if self.hops.get(url, 0) + 1 > self.cfg.max_redirects:
            entry["redirect_dropped"] = "too-many-redirects"
            return
        root = depth == 0 and url in self.seeds_set
        if root:
            entry["root"] = True
            self.scope.add_root(target)
        why = self.scope.reason_out(target)
        if why is not None:
            entry["redirect_dropped"] = why
            return
        entry["redirect"] = target

    # -- the run --------------------------------------------------------------------------------
    async def _stop_tasks(self) -> None:
        tasks = [*self.tasks, *(h.task for h in self.hosts.values() if h.task)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def crawl(self, replayed: list[dict[str, Any]]) -> None:
        for e in replayed:
            self.absorb(e, live=False)
        self.http = HttpClient(
            self.cfg.user_agent,
            accept="text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            allow_private=self.cfg.allow_private,
            timeout=self.cfg.timeout,
            connect_timeout=min(10.0, self.cfg.timeout),
            per_origin_idle=self.cfg.per_host + 1,
        )
        with progress() as bar:
            self.bar = bar
            resumed_from = len(self.done)
            self.bar_task = bar.add_task("crawl", total=None, unit="URLs", completed=resumed_from)
            try:
                for s in self.seeds:
                    self.discover(s, 0)
                self._check_idle()
                await self.idle.wait()
                if self.failure is not None:  # stop everything, collecting what it raised
                    await self._stop_tasks()
                    raise self.failure
            except asyncio.CancelledError:  # interrupted: end every task here, none left pending
                self.stopping = True
                await self._stop_tasks()
                raise
            finally:
                self.http.close()
            task = bar.tasks[0]
            rate = (len(self.done) - resumed_from) / max(task.elapsed or 0.0, 1e-9)
            bar.update(self.bar_task, total=len(self.done), completed=len(self.done))
            task.finished_speed = rate  # changing the total made rich forget its measured rate


def run(cfg: CrawlConfig) -> dict[str, Any]:
    """Crawl ``cfg.seeds`` into the WARC artifact ``cfg.out``; return its manifest."""
    validate(cfg)
    seeds, seed_files = load_seeds(cfg.seeds)
    stage = StageRun.open(cfg.out, "crawl", cfg.params(), inputs=seed_files, force=cfg.force)
    if stage.done:
        console.print(f"{cfg.out}: crawl already complete with these options; pass --force to redo it", soft_wrap=True)
        return stage.manifest
    info = {
        "software": f"llmctl/{__version__}",
        "format": "WARC File Format 1.1",
        "conformsTo": "https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/",
        "robots": "obey" if cfg.robots else "ignore",
        "http-header-user-agent": cfg.user_agent,
        "isPartOf": Path(cfg.out).name,
    }
    store = WarcStore(stage, int(cfg.warc_size_mb * 1024 * 1024), info)
    replayed = store.replay() if stage.resumed else []
    store.start_builder()  # (forks: before any thread starts)
    if stage.resumed:
        console.print(f"resuming: {sum(1 for e in replayed if 'url' in e and e['kind'] != 'robots'):,} URLs already done")
    t0 = time.perf_counter()
    crawler: Crawler | None = None

    async def main() -> None:
        nonlocal crawler
        crawler = Crawler(cfg, store, seeds)
        await crawler.crawl(replayed)

    # The event loop thread gives up the GIL at every socket call and must get it back from the
    # writer thread, which may keep it up to the switch interval (5 ms by default): 0.5 ms bounds
    # that wait (on the 2,000-page bench site: 1.64 s -> 1.50 s in the loop, 3 runs each)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, 0.0005))
    try:
        asyncio.run(main())
    except BaseException:
        store.abort()
        raise
    finally:
        sys.setswitchinterval(switch)
    elapsed = time.perf_counter() - t0
    shards = store.close()
    assert crawler is not None
    st = crawler.stats
    if st.pages == 0:
        stage.abandon()
        why = ", ".join(f"{n} {r}" for r, n in (st.refused + st.errors + st.skipped).most_common()) or "nothing to fetch"
        hint = "; pass --allow-private to crawl local sites" if st.refused.get("private-address") else ""
        raise StageError(f"crawl fetched no page ({why}){hint}")
    stats = {
        "pages": st.pages,
        "bytes": st.bytes,
        "by_status": dict(sorted(st.by_status.items())),
        "refused": dict(st.refused.most_common()),
        "robots_disallowed": st.refused.get("robots", 0),
        "skipped": dict(st.skipped.most_common()),
        "errors": dict(st.errors.most_common()),
        "retries": st.retries,
        "truncated": st.truncated,
        "robots_fetched": st.robots_fetched,
        "hosts": len(st.hosts),
        "links_out_of_scope": dict(st.links_out_of_scope.most_common()),
        "redirects_not_followed": dict(st.redirects_not_followed.most_common()),
        "warc_files": len(shards),
        "pages_this_session": crawler.session_pages,
        "crawl_seconds": round(elapsed, 3),
        "pages_per_second": round(crawler.session_pages / elapsed, 2) if elapsed > 0 else 0.0,
    }
    return stage.finish(stats, files=[*shards, JOURNAL], seeds=seeds)

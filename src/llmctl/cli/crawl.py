"""`llmctl crawl SEEDS --out DIR`: fetch web pages politely into gzip WARC/1.1 files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import summary, table
from . import app
from .common import ConfigOpt, ForceOpt

EPILOG = (
    "Example: llmctl crawl https://docs.python.org/3/ --max-pages 500 --out crawl/  "
    "·  llmctl crawl seeds.txt --scope domain --deny '\\?' --delay 2 --out crawl/  "
    "·  local sites: llmctl crawl http://127.0.0.1:8000/ --allow-private --delay 0 --out crawl/"
)


@app.command("crawl", epilog=EPILOG)
def crawl_cmd(
    seeds: Annotated[list[str], typer.Argument(help="Seed URLs, or files with one URL per line ('#' comments).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Crawl artifact directory to write.")],
    scope: Annotated[
        str, typer.Option("--scope", help="Follow links on the seeds' hosts (host), registered domains (domain), or anywhere (any).")
    ] = "host",
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="Follow only URLs matching one of these regexes (repeatable).")
    ] = None,
    deny: Annotated[list[str] | None, typer.Option("--deny", help="Never follow URLs matching these regexes (repeatable).")] = None,
    max_depth: Annotated[int, typer.Option("--max-depth", help="Link hops from a seed (redirects do not count).")] = 10,
    max_pages: Annotated[int, typer.Option("--max-pages", help="Stop after requesting this many URLs (0 = no limit).")] = 10_000,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", help="Keep at most this many bytes of a response (marked WARC-Truncated).")
    ] = 10 * 1024 * 1024,
    content_type: Annotated[
        list[str] | None,
        typer.Option("--content-type", help="MIME types of 2xx responses to keep (repeatable; text/* or */* allowed); default text/html and XHTML."),
    ] = None,
    user_agent: Annotated[str, typer.Option("--user-agent", help="User-Agent sent and matched against robots.txt.")] = (
        "llmctl-crawler/0.1.0 (+https://github.com/llmctl/llmctl)"
    ),
    robots: Annotated[bool, typer.Option("--robots/--no-robots", help="Obey robots.txt (and its Crawl-delay).")] = True,
    delay: Annotated[float, typer.Option("--delay", help="Seconds between request starts to one host (robots Crawl-delay wins if larger).")] = 1.0,
    per_host: Annotated[int, typer.Option("--per-host", help="Requests in flight per host.")] = 2,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight over all hosts.")] = 64,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds allowed for one request.")] = 30.0,
    retries: Annotated[int, typer.Option("--retries", help="Retries after 429, 5xx or a connection error.")] = 3,
    backoff: Annotated[float, typer.Option("--backoff", help="First retry waits this many seconds, doubling each time.")] = 1.0,
    max_retry_after: Annotated[float, typer.Option("--max-retry-after", help="Cap on a server's Retry-After, seconds.")] = 60.0,
    max_crawl_delay: Annotated[float, typer.Option("--max-crawl-delay", help="Skip hosts whose robots.txt Crawl-delay is longer than this many seconds (counted as refused: crawl-delay-too-long) rather than crawl them faster than they ask.")] = 60.0,
    max_redirects: Annotated[int, typer.Option("--max-redirects", help="Redirect hops followed from one URL.")] = 5,
    allow_private: Annotated[
        bool, typer.Option("--allow-private", help="Allow private, loopback and link-local addresses (local sites).")
    ] = False,
    warc_size_mb: Annotated[float, typer.Option("--warc-size-mb", help="Start a new WARC file after this many MB.")] = 1000.0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Crawl from SEEDS into gzip WARC/1.1 files (request + response records, payload digests).

    Polite by default: robots.txt obeyed, one request per second per host, private addresses
    refused. Kill it at any time and rerun the same command to continue where it stopped.
    """
    from ..data.crawl import HTML_TYPES, CrawlConfig, run

    cfg = CrawlConfig(
        seeds=list(seeds), out=out, scope=scope, allow=list(allow or []), deny=list(deny or []),
        max_depth=max_depth, max_pages=max_pages, max_bytes=max_bytes,
        content_types=list(content_type or HTML_TYPES), user_agent=user_agent, robots=robots, delay=delay,
        per_host=per_host, concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff,
        max_retry_after=max_retry_after, max_crawl_delay=max_crawl_delay, max_redirects=max_redirects, allow_private=allow_private,
        warc_size_mb=warc_size_mb, force=force,
    )
    m = run(cfg)
    s = m["stats"]
    summary(
        f"crawl → {out}",
        [
            ("pages fetched", s["pages"]),
            ("payload MB", s["bytes"] / 1e6),
            ("hosts", s["hosts"]),
            ("robots.txt disallowed", s["robots_disallowed"]),
            ("refused (other)", sum(v for k, v in s["refused"].items() if k != "robots")),
            ("skipped (content type)", sum(s["skipped"].values())),
            ("failed", sum(s["errors"].values())),
            ("retries", s["retries"]),
            ("truncated", s["truncated"]),
            ("WARC files", s["warc_files"]),
            ("pages/s (this run)", s["pages_per_second"]),
        ],
    )
    rows = [[f"status {k}", v] for k, v in s["by_status"].items()]
    rows += [[f"refused: {k}", v] for k, v in s["refused"].items()]
    rows += [[f"skipped: {k}", v] for k, v in s["skipped"].items()]
    rows += [[f"failed: {k}", v] for k, v in s["errors"].items()]
    if rows:
        table("outcomes", ["outcome", "URLs"], rows)

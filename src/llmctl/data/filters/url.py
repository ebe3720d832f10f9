"""URL blocklists in the UT1 format (Université Toulouse 1 Capitole's blacklists).

UT1 ships, per category, a ``domains`` file (one domain or IP per line) and a ``urls`` file (one
``host/path`` per line, no scheme). A listed domain blocks itself and every subdomain; a listed URL
blocks that page and everything below it. Hosts are compared lower-case with a leading ``www.``
dropped; registered domains come from the offline public-suffix list (data/urls.py), so the
manifest can report which registrable sites were blocked most.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ...errors import UsageError
from ..urls import host_of, registered_domain
from .base import Doc, Filter, FilterParams


@dataclass
class UrlParams(FilterParams):
    """Blocklist files or UT1 category directories (each holding ``domains`` and/or ``urls``)."""

    blocklists: list[str] = field(default_factory=list)


def read_list_file(path: Path, what: str) -> list[str]:
    """Non-empty, non-comment lines of a text list file; a one-line UsageError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: {what} not found; check the path")
    if not path.is_file():
        raise UsageError(f"{path}: {what} is not a file; pass a text file with one entry per line")
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise UsageError(f"{path}: {what} is not a text file (binary content); pass a one-entry-per-line text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: {what} is not UTF-8 text; convert it to UTF-8 (one entry per line)") from None
    return [s for s in (ln.strip() for ln in text.splitlines()) if s and not s.startswith("#")]


def _norm_host(host: str) -> str:
    host = host.strip().strip(".").lower()
    return host[4:] if host.startswith("www.") else host


def load_blocklists(paths: Iterable[str]) -> tuple[set[str], set[str]]:
    """(domains, url prefixes) from files or UT1 category directories."""
    domains: set[str] = set()
    urls: set[str] = set()
    for p in map(Path, paths):
        if p.is_dir():
            files = [(f, f.name) for f in sorted(p.rglob("*")) if f.is_file() and f.name in ("domains", "urls")]
            if not files:
                raise UsageError(f"{p}: blocklist directory holds no UT1 'domains' or 'urls' file; check the path")
        else:
            files = [(p, "auto")]
        for f, kind in files:
            for entry in read_list_file(f, "blocklist"):
                entry = entry.split()[0]
                if "://" in entry:
                    entry = entry.split("://", 1)[1]
                is_url = kind == "urls" or (kind == "auto" and "/" in entry.rstrip("/"))
                if is_url:
                    host, _, path = entry.partition("/")
                    urls.add(_norm_host(host) + "/" + path.rstrip("/"))
                else:
                    domains.add(_norm_host(entry.rstrip("/")))
    return domains, urls


class UrlFilter(Filter):
    """Remove documents whose URL's host (or a parent domain) or URL prefix is listed."""

    family = "url"
    Params = UrlParams

    def __init__(self, params: UrlParams):
        super().__init__(params)
        self.domains: set[str] = set()
        self.urls: set[str] = set()
        self._loaded = False

    def check(self) -> None:
        self.domains, self.urls = load_blocklists(self.params.blocklists)
        self._loaded = True

    def apply(self, doc: Doc) -> str | None:
        if not self._loaded:
            self.check()
        if not (self.domains or self.urls) or not doc.url:
            return None
        host = _norm_host(host_of(doc.url))
        if self.domains and host:
            h = host
            while True:
                if h in self.domains:
                    self.counters[f"site:{registered_domain(host)}"] += 1
                    return "blocked_domain"
                dot = h.find(".")
                if dot < 0:
                    break
                h = h[dot + 1 :]
        if self.urls and host:
            try:
                parts = urlsplit(doc.url)
            except ValueError:
                return None
            path = parts.path.rstrip("/")
            full = host + "/" + path.lstrip("/")
            if parts.query:
                full += "?" + parts.query
            # the URL itself and every parent path
            probe = full
            while True:
                if probe in self.urls:
                    return "blocked_url"
                cut = probe.rfind("/")
                if cut < 0:
                    break
                probe = probe[:cut]
        return None

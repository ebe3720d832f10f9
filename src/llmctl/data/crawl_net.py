"""What the crawler decides about a URL before and after fetching it.

URL normalisation (so one page has one spelling in the seen-set), the crawl scope, the refusal of
addresses that are not public (checked on the addresses DNS returns, so a public name pointing at
127.0.0.1 or 10.x is refused too), and link extraction from HTML with its charset honoured.
"""

from __future__ import annotations

import codecs
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

# -- URL normalisation --------------------------------------------------------------------------

_DEFAULT_PORT = {"http": 80, "https": 443}
_PATH_SAFE = "/!$&'()*+,;=:@%~-._"
_QUERY_SAFE = "/?!$&'()*+,;=:@%~-._"
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_STRIP = re.compile(r"[\t\n\r]")


def _unescape_unreserved(m: re.Match[str]) -> str:
    c = chr(int(m.group(1), 16))
    return c if c.isascii() and (c.isalnum() or c in "-._~") else "%" + m.group(1).upper()


def _requote(s: str, safe: str) -> str:
    """Percent-encode what must be (non-ASCII as UTF-8, spaces, stray '%'), canonicalise escapes."""
    s = _BAD_ESCAPE.sub("%25", s)
    s = quote(s, safe=safe)
    return _ESCAPE.sub(_unescape_unreserved, s)


def _remove_dot_segments(path: str) -> str:
    if "." not in path:
        return path
    out: list[str] = []
    segs = path.split("/")
    for i, seg in enumerate(segs):
        if seg == ".":
            if i == len(segs) - 1:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if i == len(segs) - 1:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The canonical spelling of an http(s) URL, or None if it is not one we can fetch.

    Lower-case scheme and host (IDNA for non-ASCII hosts), default port and fragment dropped, dot
    segments resolved, percent-escapes canonical (unreserved characters decoded, hex upper-case),
    empty path → '/'. The query is kept as written: its order can matter to the server. Relative
    references are resolved against ``base`` (itself already normalised).
    """
    url = url.strip()
    if "\t" in url or "\n" in url or "\r" in url:
        url = _STRIP.sub("", url)
    if base is not None and not _ABSOLUTE.match(url):
        if url.startswith("/") and not url.startswith("//"):
            url = origin(base) + url  # the common case, without urljoin's cost
        else:
            try:
                url = urljoin(base, url)
            except ValueError:
                return None
    return _normalize_absolute(url)


@lru_cache(maxsize=1 << 17)
def _normalize_absolute(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORT:
            return None
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORT[scheme]) else f"{host}:{port}"
    path = _remove_dot_segments(_requote(parts.path or "/", _PATH_SAFE))
    query = _requote(parts.query, _QUERY_SAFE) if parts.query else ""
    return urlunsplit((scheme, netloc, path, query, ""))


def origin(url: str) -> str:
    """scheme://host[:port] of a normalised URL: the unit of politeness, robots.txt and concurrency."""
    i = url.find("/", url.find("//") + 2)
    return url if i < 0 else url[:i]


def _registered_domain(host: str) -> str:
    from .urls import registered_domain  # loads the public-suffix list: only --scope domain needs it

    return registered_domain(host)


@lru_cache(maxsize=1 << 14)
def _origin_host(org: str) -> str:
    return (urlsplit(org).hostname or "").lower()


# -- scope --------------------------------------------------------------------------------------

SCOPES = ("host", "domain", "any")


@dataclass
class Scope:
    """Which discovered URLs the crawl follows: by seed host or registered domain, then regexes."""

    mode: str = "host"
    allow: list[re.Pattern[str]] = field(default_factory=list)
    deny: list[re.Pattern[str]] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)

    def add_root(self, url: str) -> None:
        """A seed (or where a seed redirects to) puts its host and domain in scope."""
        host = (urlsplit(url).hostname or "").lower()
        self.hosts.add(host)
        if self.mode == "domain":
            self.domains.add(_registered_domain(host))

    def reason_out(self, url: str) -> str | None:
        """None if ``url`` (normalised) is in scope, otherwise the reason it is not."""
        i = url.find("/", url.find("//") + 2)
        host = _origin_host(url if i < 0 else url[:i])
        if self.mode == "host":
            if host not in self.hosts:
                return "off-host"
        elif self.mode == "domain" and _registered_domain(host) not in self.domains:
            return "off-domain"
        if self.allow and not any(rx.search(url) for rx in self.allow):
            return "not-allowed"
        if self.deny and any(rx.search(url) for rx in self.deny):
            return "denied"
        return None


# -- addresses ----------------------------------------------------------------------------------


def is_public_address(addr: str) -> bool:
    """True for globally routable unicast addresses; private, loopback, link-local, CGNAT,
    reserved, multicast and unspecified addresses (IPv4-mapped IPv6 included) are not."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0].strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class PrivateAddressError(OSError):
    """The host resolves to an address that is not public and --allow-private was not given."""

    def __init__(self, host: str, addr: str):
        super().__init__(f"{host} resolves to non-public address {addr}")
        self.host, self.addr = host, addr


class GuardedResolver:
    """DNS (the system resolver, in a thread) that refuses non-public answers, so the check is
    made on the addresses the crawler then connects to."""

    def __init__(self, allow_private: bool = False):
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        """[{'hostname', 'host' (the address), 'port', 'family'}], in the resolver's order."""
        import asyncio

        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        out = [{"hostname": host, "host": sa[0], "port": port, "family": fam} for fam, _, _, _, sa in infos]
        if not self.allow_private:
            for info in out:
                if not is_public_address(info["host"]):
                    raise PrivateAddressError(host, info["host"])
        return out


# -- HTML ---------------------------------------------------------------------------------------

_META_CHARSET = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE
)
_CT_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_WHATWG_ALIASES = {"iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "us-ascii": "cp1252", "ascii": "cp1252"}


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    name = _WHATWG_ALIASES.get(name.lower(), name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def html_charset(content_type: str, body: bytes) -> str:
    """Charset from the Content-Type header, then <meta> in the first 4 KiB, then UTF-8."""
    m = _CT_CHARSET.search(content_type or "")
    enc = _codec(m.group(1)) if m else None
    if enc is None:
        m2 = _META_CHARSET.search(body[:4096])
        enc = _codec(m2.group(1).decode("ascii", "replace")) if m2 else None
    return enc or "utf-8"


@lru_cache(maxsize=64)
def _parser(encoding: str):
    # lxml.html's parser is this one plus a Python element-class lookup, which only costs here
    from lxml import etree

    return etree.HTMLParser(encoding=encoding)


@lru_cache(maxsize=1)
def _xpaths():
    from lxml import etree

    return (
        etree.XPath("//a/@href | //area/@href | //frame/@src | //iframe/@src", smart_strings=False),
        etree.XPath("//base/@href", smart_strings=False),
        etree.XPath("//meta[translate(@name,'ROBTS','robts')='robots']/@content", smart_strings=False),
    )


def extract_links(body: bytes, url: str, content_type: str) -> tuple[list[str], bool]:
    """Normalised, de-duplicated outlinks of an HTML page in document order, and whether the page
    asks robots not to follow its links (<meta name=robots content=nofollow>)."""
    from lxml import etree

    if not body.strip():
        return [], False
    try:
        doc = etree.fromstring(body, _parser(html_charset(content_type, body)))
    except (etree.ParserError, etree.XMLSyntaxError, ValueError, LookupError):
        return [], False
    if doc is None:  # nothing but comments or a doctype
        return [], False
    links_xp, base_xp, robots_xp = _xpaths()
    if b"obots" in body or b"OBOTS" in body:
        for c in robots_xp(doc):
            c = (c or "").lower()
            if "nofollow" in c or "none" in c:
                return [], True
    base = url
    for href in base_xp(doc)[:1]:
        base = normalize_url(href, url) or url
    seen: dict[str, None] = {}
    base_origin = origin(base)
    for href in links_xp(doc):
        # the common case (an absolute path, nothing to strip) inline; normalize_url does the same
        if href[:1] == "/" and href[1:2] != "/" and href[-1:] > " " and "\t" not in href and "\n" not in href and "\r" not in href:
            n = _normalize_absolute(base_origin + href)
        else:
            n = normalize_url(href, base)
        if n is not None:
            seen[n] = None
    return list(seen), False

"""URL facts shared by the data stages: registered domains (offline public-suffix list)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

_psl = PublicSuffixList()  # ships its list inside the package: no network at run time


@lru_cache(maxsize=65536)
def registered_domain(host: str) -> str:
    """'a.b.example.co.uk' → 'example.co.uk'; IP addresses and bare suffixes come back unchanged."""
    host = host.strip(".").lower()
    if not host:
        return ""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    return _psl.privatesuffix(host) or host


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""

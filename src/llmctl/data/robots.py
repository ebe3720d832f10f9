"""robots.txt as RFC 9309 reads it, plus the Crawl-delay extension most sites still use.

Written here rather than taken from ``urllib.robotparser`` because that one applies the first
matching rule instead of the longest, ignores ``*`` and ``$`` in paths and accepts only whole
seconds in Crawl-delay. Rules: the group naming our product token (case-insensitive, with or
without a version: ``llmctl-crawler/0.1`` names it too) wins over ``*``; within a group the longest matching path wins and Allow wins a tie; ``/robots.txt`` is always
allowed. A robots.txt that answers 4xx allows everything; one that cannot be fetched (5xx,
connection errors) disallows everything, as RFC 9309 section 2.3.1 says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

_MAX_BYTES = 500 * 1024  # RFC 9309: parse at least 500 KiB; we parse exactly that much


@dataclass
class _Group:
    agents: list[str] = field(default_factory=list)
    rules: list[tuple[bool, str]] = field(default_factory=list)  # (allow, pattern)
    delay: float | None = None


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    rx = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(rx + ("$" if anchored else ""))


def _unescape_unreserved(m: re.Match[str]) -> str:
    c = chr(int(m.group(1), 16))
    return c if c.isascii() and (c.isalnum() or c in "-._~") else m.group(0).upper()


def _canon_path(path: str) -> str:
    """Decode percent-escapes of unreserved characters only, so '/a%7Eb' and '/a~b' compare equal."""
    return re.sub(r"%([0-9A-Fa-f]{2})", _unescape_unreserved, path)


@dataclass
class Robots:
    """The rules that apply to one user agent on one host."""

    rules: list[tuple[bool, str, re.Pattern[str]]] = field(default_factory=list)
    delay: float | None = None
    allow_all: bool = False
    disallow_all: bool = False

    @classmethod
    def allowing_all(cls) -> Robots:
        return cls(allow_all=True)

    @classmethod
    def disallowing_all(cls) -> Robots:
        return cls(disallow_all=True)

    @classmethod
    def parse(cls, text: str, user_agent: str) -> Robots:
        token = re.split(r"[/\s]", user_agent.strip(), maxsplit=1)[0].lower()
        groups: list[_Group] = []
        current: _Group | None = None
        last_was_agent = False
        for raw in text[:_MAX_BYTES].lstrip("\ufeff").splitlines():  # a byte-order mark is no part of a key
            line = raw.split("#", 1)[0].strip()
            if ":" not in line:
                continue
            key, value = (s.strip() for s in line.split(":", 1))
            key = key.lower()
            if key in ("user-agent", "useragent"):
                if current is None or not last_was_agent:
                    current = _Group()
                    groups.append(current)
                current.agents.append(value.lower())
                last_was_agent = True
                continue
            last_was_agent = False
            if current is None:
                continue
            if key in ("allow", "disallow"):
                if value:  # an empty Disallow means "nothing disallowed"
                    value = re.sub(r"[^\x21-\x7e]", lambda m: quote(m.group(0)), value)
                    current.rules.append((key == "allow", _canon_path(value)))
            elif key == "crawl-delay":
                try:
                    d = float(value)
                except ValueError:
                    continue
                if d >= 0:
                    current.delay = d
        mine = [g for g in groups if any(a != "*" and re.split(r"[/\s]", a, maxsplit=1)[0] == token for a in g.agents)]
        if not mine:
            mine = [g for g in groups if "*" in g.agents]
        # RFC 9309: several groups for the same agent are merged
        rules = [(allow, pat, _pattern_regex(pat)) for g in mine for allow, pat in g.rules]
        delays = [g.delay for g in mine if g.delay is not None]
        return cls(rules=rules, delay=max(delays) if delays else None)

    def allows(self, url: str) -> bool:
        if self.allow_all:
            return True
        if self.disallow_all:
            return False
        parts = urlsplit(url)
        path = _canon_path(parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if unquote(parts.path) == "/robots.txt":
            return True
        best_len, best_allow = -1, True
        for allow, pat, rx in self.rules:
            if rx.match(path):
                n = len(pat)
                if n > best_len or (n == best_len and allow):
                    best_len, best_allow = n, allow
        return best_allow

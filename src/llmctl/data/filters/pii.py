"""Redact personal data: e-mail addresses, public IP addresses and phone numbers.

Never removes a document; replaces each match with a placeholder and counts redactions per kind.
Care goes into what only *looks* like personal data:

- e-mail: the domain must end in a real top-level domain (offline public-suffix list), so
  ``icon@2x.png`` or ``user@localhost`` stay.
- IPv4: four dotted numbers 0–255 without leading zeros, not part of a longer dotted run
  (``1.2.3.4.5``), not glued to a word (``v1.2.3.4``) or a product token (``Chrome/1.2.3.4``), not
  followed by a pre-release tag (``1.2.3.4-rc1``), not after a word that makes it a version or
  section number ("version 1.2.3.4", "section 1.2.3.4"); and only *public* addresses (Python's
  ``ipaddress.is_global``): private, loopback, link-local, shared, documentation, multicast and
  reserved ranges are left alone, since they identify no one.
- IPv6: must parse as an address and be global (so ``2001:db8::1``, ``::1``, ``fe80::…`` stay);
  clock times and MAC addresses do not parse.
- phones: North American numbers with separators and a valid area code and exchange (first digit
  2–9), or international numbers written with ``+`` (or "(+44)", a fullwidth plus, no-break
  spaces, dashes, an extension) that libphonenumber (``phonenumbers``) finds valid: an assigned
  country code and a number in an assigned range ("+44 20 7946 0958"; not "+3 (2) 10 2020", no
  country code 3; not "+46 2019 2020 2021", years). Bare digit runs (order numbers, ISBNs
  without +, dates) are not phones.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from .base import Doc, Filter, FilterParams

_psl = PublicSuffixList()

# ASCII word boundaries (re.ASCII): an address glued to CJK or other non-Latin text, as in
# "网站地图fyzw88@126.com", has no space before it, and a Unicode \w there would hide it
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![\w-])",
    re.ASCII,
)
_IPV4 = re.compile(r"(?<![\w.])(?<![A-Za-z0-9]/)(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d|-[A-Za-z])", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])", re.ASCII)
_NANP = re.compile(
    r"(?<![\w+.\-/])(?:\+?1[\s.-]?)?(?:\(([2-9]\d\d)\)\s?|([2-9]\d\d)[\s.-])([2-9]\d\d)[\s.-]\d{4}(?![\w]|[.-]\d)",
    re.ASCII,
)
#: separators people put in phone numbers: spaces (no-break and narrow too), dots, hyphens and dashes
_SEP = r"[\s.\-\u00a0\u202f\u2010-\u2015]"
_INTL = re.compile(
    r"(?<![\w+\uff0b])\(?[+\uff0b]\d{1,3}\)?(?:" + _SEP + r"?\(?\d{1,5}\)?){2,6}"
    r"(?:" + _SEP + r"?(?:x|ext\.?|extension)" + _SEP + r"?\d{1,6})?(?![\w]|[.-]\d)",
    re.ASCII | re.IGNORECASE,
)
#: words after which a dotted quad is a version, section or similar number, not an address
_NOT_IP_CONTEXT = re.compile(
    r"(?:version|ver|release|rel|build|rev|revision|firmware|update|patch|section|sec|chapter|ch|"
    r"figure|fig|table|step|rule|clause|article|art|item|para|paragraph|no|number|oid|§)[.:]?\s*$",
    re.IGNORECASE,
)


def _valid_phone(candidate: str) -> bool:
    """An international number (``+`` country code …) that libphonenumber finds valid: an assigned
    country code and a number in a range that country's plan assigns. Merely possible lengths let
    years, dates and amounts after "+NN" through ("+46 2019 2020 2021"); numbers in unassigned or
    fictional ranges identify no one."""
    import phonenumbers

    number = re.sub(_SEP, " ", candidate).strip("()")  # libphonenumber reads plain spaces
    number = number.replace("(+", "+").replace("(\uff0b", "+")
    digits = sum(ch.isdigit() for ch in re.split(r"(?i)x|ext", number)[0])
    if not 8 <= digits <= 15:  # E.164 bounds, before parsing
        return False
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return False


@dataclass
class PiiParams(FilterParams):
    """Which kinds to redact and their placeholders."""

    emails: bool = True
    ips: bool = True
    phones: bool = True
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"


def is_public_ip(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


class PiiFilter(Filter):
    family = "pii"
    Params = PiiParams

    def redact(self, text: str) -> str:
        """The text with personal data replaced; counts go to ``counters`` per kind."""
        p = self.params
        c = self.counters
        if p.emails and "@" in text:

            def email(m: re.Match[str]) -> str:
                if _psl.publicsuffix(m.group(1).lower(), accept_unknown=False) is None:
                    return m.group(0)
                c["email"] += 1
                return p.email_placeholder

            text = _EMAIL.sub(email, text)
        if p.ips and "." in text:

            def ipv4(m: re.Match[str]) -> str:
                octets = m.groups()
                if any(len(o) > 1 and o[0] == "0" for o in octets) or any(int(o) > 255 for o in octets):
                    return m.group(0)
                if _NOT_IP_CONTEXT.search(m.string, max(0, m.start() - 24), m.start()):
                    return m.group(0)
                if not is_public_ip(m.group(0)):
                    return m.group(0)
                c["ipv4"] += 1
                return p.ip_placeholder

            text = _IPV4.sub(ipv4, text)
        if p.ips and ("::" in text or text.count(":") >= 7):

            def ipv6(m: re.Match[str]) -> str:
                if not is_public_ip(m.group(0)):
                    return m.group(0)
                c["ipv6"] += 1
                return p.ip_placeholder

            text = _IPV6.sub(ipv6, text)
        if p.phones:

            def phone(m: re.Match[str]) -> str:
                c["phone"] += 1
                return p.phone_placeholder

            text = _NANP.sub(phone, text)
            if "+" in text or "\uff0b" in text:

                def intl(m: re.Match[str]) -> str:
                    if not _valid_phone(m.group(0)):
                        return m.group(0)
                    c["phone"] += 1
                    return p.phone_placeholder

                text = _INTL.sub(intl, text)
        return text

    def apply(self, doc: Doc) -> str | None:
        before = sum(self.counters.values())
        new = self.redact(doc.text)
        if sum(self.counters.values()) != before:
            self.counters["docs_redacted"] += 1
            doc.text = new
        return None

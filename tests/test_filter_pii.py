"""PII redaction: e-mails, phones, public and private IPs, and text that only looks like them."""

from __future__ import annotations

from llmctl.data.filters.pii import PiiFilter, PiiParams


def redact(text: str, **kw) -> tuple[str, dict]:
    f = PiiFilter(PiiParams(**kw))
    return f.redact(text), dict(f.counters)


def test_emails_redacted_lookalikes_kept():
    out, c = redact("Write to jane.doe+news@mail.example.co.uk or JOHN@Company.COM today.")
    assert out == "Write to <EMAIL> or <EMAIL> today."
    assert c["email"] == 2
    for keep in ("icon@2x.png", "user@localhost", "@handle on twitter", "a @ b.com", "x@y"):
        assert redact(f"see {keep} here")[0] == f"see {keep} here", keep
    # glued to CJK text, as on a real Common Crawl page (no space before or after the address)
    assert redact("网站地图fyzw88@126.com联系我们")[0] == "网站地图<EMAIL>联系我们"
    assert redact("服务器8.8.8.8上")[0] == "服务器<IP_ADDRESS>上"


def test_public_ips_redacted_private_and_reserved_kept():
    out, c = redact("Hosts 8.8.8.8 and 151.101.1.69 answered; 2a00:1450:4001:82b::200e too.")
    assert out == "Hosts <IP_ADDRESS> and <IP_ADDRESS> answered; <IP_ADDRESS> too."
    assert c["ipv4"] == 2 and c["ipv6"] == 1
    for private in ("10.0.0.1", "192.168.1.1", "172.16.5.4", "127.0.0.1", "169.254.0.1", "100.64.0.1",
                    "192.0.2.10", "203.0.113.5", "224.0.0.1", "0.0.0.0", "255.255.255.255",
                    "::1", "fe80::1", "2001:db8::1", "fd00::1"):
        assert redact(f"addr {private} ok")[0] == f"addr {private} ok", private


def test_things_that_only_look_like_ips():
    keep = [
        "version 1.2.3.4 fixes it",
        "Version: 8.8.8.8",
        "see section 4.3.2.1 of the spec",
        "build v1.2.3.4",
        "Chrome/120.0.6099.109 on Linux",
        "Mozilla/5.0.0.1",
        "release 1.2.3.4-rc1",
        "values 1.2.3.4.5 in a row",
        "octets 256.1.1.1 are invalid",
        "leading zeros 08.08.08.08",
        "the time is 12:30:45",
        "MAC 00:1A:2B:3C:4D:5E",
        "C++ std::vector",
    ]
    for text in keep:
        out, c = redact(text, phones=False)
        assert out == text, text
        assert not c, text


def test_phones_redacted_lookalikes_kept():
    out, c = redact("Call (415) 555-0132, 212-555-0198, +1 650 253 0000, +33 1 42 68 53 00 or +44 20 7946 0958.")
    assert out == "Call <PHONE>, <PHONE>, <PHONE>, <PHONE> or <PHONE>."
    assert c["phone"] == 5
    keep = [
        "on 2020-10-12 we met",
        "ISBN 978-3-16-148410-0",
        "order 1234567890 shipped",
        "score 123-456-7890 is not a NANP number",
        "pi is 3.141592653",
        "+12 is a number",
        "scored +3 (2) 10 2020",  # no country code 3
        "+999 123 45678 or +1 212 555 01",  # no country code 999; too short for North America
        "Results: +46 2019 2020 2021, balance +49 1500 2300, build +44 2024.11.24",  # years, amounts, dates
    ]
    for text in keep:
        assert redact(text)[0] == text, text
    # the ways people write international numbers: no-break spaces, dashes, a fullwidth plus, the
    # country code in brackets, an extension (redacted with the number, not left behind)
    for written in ("+44\u00a020\u00a07946\u00a00958", "+44–20–7946–0958", "\uff0b44 20 7946 0958",
                    "(+44) 20 7946 0958", "+44 20 7946 0958x123", "+44 20 7946 0958 ext. 12"):
        assert redact(f"call {written} now") == ("call <PHONE> now", {"phone": 1}), written


def test_placeholders_and_kinds_configurable():
    out, c = redact("mail a@b.com from 8.8.4.4, call 212-555-0198", email_placeholder="[e]", ip_placeholder="[ip]",
                    phones=False)
    assert out == "mail [e] from [ip], call 212-555-0198"
    assert c == {"email": 1, "ipv4": 1}

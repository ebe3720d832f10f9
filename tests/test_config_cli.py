"""`--config FILE.toml` sets any option of a command; the command line wins; unknown keys are refused."""

from __future__ import annotations

import pytest
from test_crawl import HTML, Site, cli, page

from llmctl.artifacts import read_manifest


@pytest.fixture
def small_site():
    s = Site({
        "/": (200, HTML, page("/a.html", "/b.html", "/c.html", "/d.html")),
        **{f"/{x}.html": (200, HTML, page("/")) for x in "abcd"},
    })
    yield s
    s.close()


def test_config_file_sets_options_and_command_line_wins(small_site, tmp_path, capsys):
    conf = tmp_path / "crawl.toml"
    conf.write_text('max-pages = 2\ndelay = 0\nallow_private = true\nrobots = false\ndeny = ["d\\\\.html"]\n')
    code, _, err = cli(capsys, "crawl", small_site.base + "/", "--out", tmp_path / "a", "--config", conf)
    assert code == 0, err
    p = read_manifest(tmp_path / "a")["params"]
    assert (p["max_pages"], p["delay"], p["allow_private"], p["robots"], p["deny"]) == (2, 0.0, True, False, ["d\\.html"])
    assert p["per_host"] == 2 and p["max_depth"] == 10  # untouched options keep their defaults, recorded
    assert len(small_site.log) == 2

    small_site.log.clear()
    code, _, err = cli(capsys, "crawl", small_site.base + "/", "--out", tmp_path / "b", "--config", conf,
                       "--max-pages", "4", "--per-host", "1")
    assert code == 0, err
    p = read_manifest(tmp_path / "b")["params"]
    assert (p["max_pages"], p["per_host"], p["delay"]) == (4, 1, 0.0)
    assert "/d.html" not in small_site.paths() and len(small_site.log) == 4

    # a [crawl] table is read too
    sect = tmp_path / "all.toml"
    sect.write_text('[crawl]\nmax_depth = 0\ndelay = 0\nallow-private = true\n[extract]\nworkers = 9\n')
    small_site.log.clear()
    code, _, err = cli(capsys, "crawl", small_site.base + "/", "--out", tmp_path / "c", "--config", sect)
    assert code == 0, err
    assert read_manifest(tmp_path / "c")["params"]["max_depth"] == 0
    assert small_site.paths() == ["/robots.txt", "/"]


def test_config_unknown_key_or_bad_file_is_one_line_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_pagez = 3\n")
    code, _, err = cli(capsys, "crawl", "https://example.com/", "--out", tmp_path / "o", "--config", bad)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "max_pagez" in err and str(bad) in err
    broken = tmp_path / "broken.toml"
    broken.write_text("max_pages = = 3\n")
    code, _, err = cli(capsys, "crawl", "https://example.com/", "--out", tmp_path / "o", "--config", broken)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "TOML" in err
    code, _, err = cli(capsys, "crawl", "https://example.com/", "--out", tmp_path / "o", "--config", tmp_path / "nope.toml")
    assert code == 2 and "not found" in err
    typed = tmp_path / "typed.toml"
    typed.write_text('max_pages = "two"\n')
    code, _, err = cli(capsys, "crawl", "https://example.com/", "--out", tmp_path / "o", "--config", typed)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{typed}: max_pages = 'two'" in " ".join(err.split()) and "valid integer" in err
    assert not (tmp_path / "o").exists()

#!/usr/bin/env python3
"""Build a docs artifact of real-looking web documents from ../shared/data text, for benchmarks.

    .venv/bin/python scripts/make_bench_docs.py --out /tmp/bench-docs --docs 10000 --seed 0

The text is real (LAMBADA book passages, Shakespeare, Alpaca/Code-Alpaca instructions and answers,
HH-RLHF dialogues, PIQA, MMLU); the page shapes are what a crawl brings: prose articles, pages
wrapped in navigation and cookie boilerplate, menu/list pages, code answers, forum dialogues,
plays, short stubs, pages with e-mail addresses, phone numbers and IPs. URLs come from a pool of
hosts (some matching the default domain rules). ``language``/``language_score`` are computed with
py3langid, as extract does. A fraction of documents are planted duplicates of earlier ones (exact
copies and copies with a few words changed), marked in ``planted_dup_of`` (the source's id) and
``planted_dup_kind`` ("exact"/"near"), so dedup can be scored too.

Writes ``docs-00000.parquet``… plus a manifest (stage ``extract``, ``synthetic: true``), so any
docs-reading stage accepts it. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmctl.artifacts import StageRun  # noqa: E402
from llmctl.data.docs import doc_id, schema, shard_filename, write_table  # noqa: E402

HOSTS = [
    "www.dailychronicle-news.com", "blog.homecookingtips.net", "en.wikipedia.org", "github.com",
    "www.bbc.co.uk", "forum.gardenersworld.org", "stackoverflow.com", "www.reddit.com",
    "cs.stanford.edu", "www.travelnotes.io", "medium.com", "shop.example-store.com",
    "library.citycollege.edu", "www.theguardian.com", "tutorials.codecamp.dev", "quotes.poetryhub.org",
    "arxiv.org", "health.gov", "news.localtimes.co.uk", "www.bookclubreviews.com",
    "ads.casino-bonus-win.com", "free-prizes.clickbait.biz", "www.gutenberg.org", "archive.org",
]
NAV = ["Home", "About us", "Contact", "Blog", "Shop", "Login", "Register", "Search", "Menu", "Subscribe",
       "Privacy", "Help", "Categories", "Archives", "Next post", "Previous post"]
BOILER = [
    "This website uses cookies to improve your experience. By continuing you accept our cookie policy.",
    "Copyright 2021 All rights reserved. Read our privacy policy and terms of use.",
    "Please enable JavaScript in your browser to view this page correctly.",
    "Share this: Facebook | Twitter | Email | Print",
    "Sign up for our newsletter and never miss a story!",
    "Posted in Uncategorized | Leave a comment",
]
FIRST = ["john", "maria", "li.wei", "a.smith", "contact", "info", "sales", "jdoe", "k.tanaka", "admin"]
MAILHOSTS = ["gmail.com", "yahoo.co.uk", "company.com", "university.edu", "mail.ru", "outlook.com"]


def load_sources(data: Path) -> dict[str, list[str]]:
    src: dict[str, list[str]] = {}
    src["lambada"] = [json.loads(x)["text"] for x in open(data / "eval/lambada-test.jsonl", encoding="utf-8")]
    shakes = (data / "corpora/tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    src["shakespeare"] = [s for s in shakes if s.strip()]
    code = json.loads((data / "sft/code-alpaca-2k.json").read_text(encoding="utf-8"))
    src["code"] = [f"{c['instruction']}\n{c['input']}\n\n{c['output']}".replace("\n\n\n", "\n\n") for c in code]
    seeds = [json.loads(x) for x in open(data / "sft/alpaca-seed-tasks.jsonl", encoding="utf-8")]
    src["alpaca"] = [
        f"{t['instruction']}\n{i.get('input', '')}\n{i['output']}".replace("\n\n", "\n")
        for t in seeds for i in t["instances"]
    ]
    with gzip.open(data / "preference/hh-rlhf-harmless-test.jsonl.gz", "rt", encoding="utf-8") as f:
        src["dialogue"] = [json.loads(x)["chosen"].strip() for x in f]
    piqa = [json.loads(x) for x in open(data / "eval/piqa-valid.jsonl", encoding="utf-8")]
    src["piqa"] = [f"{p['goal']}\n{p['sol1']}\n{p['sol2']}" for p in piqa]
    mmlu = []
    for csvf in sorted((data / "eval/mmlu-dev").glob("*.csv")):
        import csv

        for row in csv.reader(open(csvf, encoding="utf-8")):
            if len(row) >= 6:
                mmlu.append(f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer: {row[5]}")
    src["mmlu"] = mmlu
    return src


def pii_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"For questions write to {rng.choice(FIRST)}@{rng.choice(MAILHOSTS)} or call ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}."
    if kind == 1:
        return f"Our server at {rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} was down, while the office router 192.168.{rng.randint(0, 9)}.1 worked fine."
    if kind == 2:
        return f"Upgrade to version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)} before reporting the bug, or email support@company.com."
    if kind == 3:
        return f"Reach the London desk on +44 20 {rng.randint(7000, 7999)} {rng.randint(1000, 9999)} during office hours."
    return f"The mirror is reachable over IPv6 at 2a00:1450:4001:{rng.randint(100, 999)}::200e and locally at ::1."


def make_doc(kind: str, src: dict[str, list[str]], rng: random.Random) -> str:
    def prose(k: int) -> str:
        return "\n\n".join(rng.choice(src["lambada"]) for _ in range(k))

    if kind == "prose":
        return prose(rng.randint(2, 8))
    if kind == "prose_pii":
        parts = [rng.choice(src["lambada"]) for _ in range(rng.randint(2, 6))]
        parts.insert(rng.randrange(len(parts) + 1), pii_line(rng))
        return "\n\n".join(parts)
    if kind == "boilerplate":
        head = " | ".join(rng.sample(NAV, rng.randint(4, 9)))
        body = prose(rng.randint(1, 5))
        tail = "\n".join(rng.sample(BOILER, rng.randint(1, 4)))
        return f"{head}\n{body}\n{tail}"
    if kind == "menu":
        items = [rng.choice(NAV + [w.title() for w in rng.choice(src["lambada"]).split()[:3]]) for _ in range(rng.randint(15, 60))]
        return "\n".join(items) + "\n" + rng.choice(BOILER)
    if kind == "shakespeare":
        i = rng.randrange(len(src["shakespeare"]) - 12)
        return "\n\n".join(src["shakespeare"][i : i + rng.randint(3, 12)])
    if kind == "code":
        return "\n\n".join(rng.choice(src["code"]) for _ in range(rng.randint(1, 3)))
    if kind == "alpaca":
        return "\n\n".join(rng.choice(src["alpaca"]) for _ in range(rng.randint(3, 10)))
    if kind == "dialogue":
        return rng.choice(src["dialogue"])
    if kind == "qa":
        pool = src["piqa"] if rng.random() < 0.5 else src["mmlu"]
        return "\n\n".join(rng.choice(pool) for _ in range(rng.randint(2, 6)))
    if kind == "repeated":
        p = rng.choice(src["lambada"])
        line = rng.choice(BOILER)
        return "\n".join([p] + [line] * rng.randint(3, 8) + [rng.choice(src["lambada"])])
    if kind == "stub":
        return " ".join(rng.choice(src["lambada"]).split()[: rng.randint(5, 45)])
    raise ValueError(kind)


KINDS = [("prose", 40), ("prose_pii", 6), ("boilerplate", 12), ("menu", 4), ("shakespeare", 9), ("code", 8),
         ("alpaca", 4), ("dialogue", 7), ("qa", 4), ("repeated", 3), ("stub", 3)]


def near_copy(text: str, rng: random.Random, frac: float) -> str:
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * frac))):
        words[rng.randrange(len(words))] = rng.choice(["the", "a", "one", "this", "that", "really"])
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="docs artifact directory to write")
    ap.add_argument("--docs", type=int, default=10_000, help="number of documents (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-docs", type=int, default=5000, help="documents per Parquet shard")
    ap.add_argument("--dup-fraction", type=float, default=0.1, help="fraction of planted duplicates (half exact)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    if not a.data.is_dir():
        print(f"error: {a.data}: shared data folder not found; pass --data", file=sys.stderr)
        return 2
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    langid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    rng = random.Random(a.seed)
    src = load_sources(a.data)
    kinds, weights = zip(*KINDS, strict=True)
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "force"}
    run = StageRun.open(a.out, "extract", params, force=a.force)
    if run.done:
        print(f"{a.out}: already complete")
        return 0
    extra = [pa.field("language", pa.string()), pa.field("language_score", pa.float64()),
             pa.field("source_kind", pa.string()), pa.field("planted_dup_of", pa.string()),
             pa.field("planted_dup_kind", pa.string())]
    sch = schema(extra)
    rows: list[dict] = []
    made: list[dict] = []
    shard = 0
    base_ts = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    counts: dict[str, int] = {}
    for i in range(a.docs):
        dup = made and rng.random() < a.dup_fraction
        if dup:
            srcdoc = rng.choice(made)
            exact = rng.random() < 0.5
            text = srcdoc["text"] if exact else near_copy(srcdoc["text"], rng, rng.uniform(0.01, 0.05))
            kind, dup_of, dup_kind = srcdoc["source_kind"], srcdoc["id"], ("exact" if exact else "near")
        else:
            kind = rng.choices(kinds, weights)[0]
            text, dup_of, dup_kind = make_doc(kind, src, rng), None, None
        counts[kind] = counts.get(kind, 0) + 1
        host = rng.choice(HOSTS)
        url = f"https://{host}/{kind}/{i:06d}-{rng.randrange(1 << 30):08x}.html"
        lang, score = langid.classify(text.replace("\n", " "))
        row = {
            "id": doc_id(url, str(i)),
            "url": url,
            "text": text,
            "timestamp": datetime.fromtimestamp(base_ts + i * 37, tz=UTC),
            "language": lang,
            "language_score": float(score),
            "source_kind": kind,
            "planted_dup_of": dup_of,
            "planted_dup_kind": dup_kind,
        }
        rows.append(row)
        if not dup:
            made.append(row)
        if len(rows) == a.shard_docs:
            name = shard_filename(shard)
            write_table(pa.Table.from_pylist(rows, schema=sch), run.partial(name))
            run.commit(name)
            rows, shard = [], shard + 1
    if rows:
        name = shard_filename(shard)
        write_table(pa.Table.from_pylist(rows, schema=sch), run.partial(name))
        run.commit(name)
    run.finish({"docs": a.docs, "by_kind": counts}, synthetic=True, built_by="scripts/make_bench_docs.py")
    print(f"wrote {a.docs} docs to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

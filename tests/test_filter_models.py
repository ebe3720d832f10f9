"""The trained classifiers inside the filter stage, end to end through the CLI entry point (in-process):
``train-quality`` then ``--quality-model`` with a threshold and with a top percentile, and
``train-domain`` then ``--domain-model`` for URLs no rule labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_filter_cli import SENTENCES, cli, good_doc, read_dir

from llmctl.data.docs import schema, write_table
from llmctl.data.filters.classifier import Classifier

COOKING = [
    "Whisk the eggs with sugar until the mixture is pale and thick.",
    "Fold the flour gently into the batter and pour it into a buttered tin.",
    "Roast the onions and garlic slowly in olive oil until they caramelise.",
    "Season the soup with salt, pepper and a handful of fresh parsley.",
    "Bake the bread in a hot oven until the crust sounds hollow when tapped.",
    "Simmer the tomato sauce for an hour and stir it now and then.",
]
SPORTS = [
    "The striker scored twice in the second half to win the match for the visitors.",
    "After the final whistle the coach praised the defence and the goalkeeper.",
    "The sprinter broke the national record in the hundred metres final.",
    "Fans filled the stadium to watch the derby under the floodlights.",
    "The captain lifted the trophy after a penalty shoot-out in extra time.",
    "The team trained all week on set pieces before the cup semi-final.",
]


def write_docs(path: Path, texts: list[str], urls: list[str] | None = None, prefix: str = "d") -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(len(texts))]
    cols = {"id": ids, "url": urls or [f"https://example.org/{i}" for i in ids], "text": texts,
            "timestamp": [None] * len(texts)}
    path.mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pydict(cols, schema=schema()), path / "docs-00000.parquet")
    return ids


def shuffled_doc(rng: random.Random) -> str:
    """The same vocabulary as good_doc, in random order: word salad."""
    words = " ".join(SENTENCES).split()
    return " ".join(rng.sample(words, len(words)))


def topical(rng: random.Random, sentences: list[str]) -> str:
    return " ".join(rng.sample(sentences, 4))


@pytest.fixture(scope="module")
def quality_setup(tmp_path_factory):
    """A quality model trained on real sentences vs word salad, and a mixed input to filter."""
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(1)
    write_docs(root / "pos", [good_doc(rng) for _ in range(40)])
    write_docs(root / "neg", [shuffled_doc(rng) for _ in range(40)])
    code = cli("filter", "train-quality", "--positive", root / "pos", "--negative", root / "neg",
               "--out", root / "model", "--features", 1 << 14)
    assert code == 0
    # fresh documents the model never saw: 10 real, 30 salad
    texts = [good_doc(rng) for _ in range(10)] + [shuffled_doc(rng) for _ in range(30)]
    ids = write_docs(root / "mixed", texts)
    return root, set(ids[:10]), ids


def scores_of(path: Path, prefix: str = "docs") -> dict[str, float]:
    t = read_dir(path, prefix)
    return dict(zip(t.column("id").to_pylist(), t.column("quality_score").to_pylist(), strict=True))


def test_train_quality_artifact(quality_setup):
    root, _, _ = quality_setup
    m = json.loads((root / "model" / "manifest.json").read_text())
    assert m["stage"] == "train-quality" and m["classes"] == ["negative", "positive"]
    assert m["stats"]["docs"] == 80 and m["stats"]["heldout_docs"] == 16
    assert m["stats"]["heldout_accuracy"] >= 0.9 and m["stats"]["heldout_auc"] > 0.95
    assert m["params"]["n_features"] == 1 << 14


def test_quality_threshold_keeps_the_high_scorers(quality_setup, tmp_path):
    root, good, ids = quality_setup
    out, rej = tmp_path / "out", tmp_path / "rej"
    assert cli("filter", root / "mixed", "--out", out, "--keep-rejected", rej, "--chain", "quality",
               "--quality-model", root / "model", "--quality-threshold", "0.5") == 0
    kept, dropped = scores_of(out), scores_of(rej, "rejected")
    assert set(kept) == good  # real text survives, word salad does not
    assert set(kept) | set(dropped) == set(ids)
    assert all(v >= 0.5 for v in kept.values()) and all(v < 0.5 for v in dropped.values())
    assert set(read_dir(rej, "rejected").column("reason").to_pylist()) == {"quality:low_score"}
    # the column holds the model's probability of the positive class, nothing else
    model = Classifier.load(root / "model")
    texts = dict(zip(ids, pq.read_table(root / "mixed").column("text").to_pylist(), strict=True))
    expect = model.predict_proba([texts[i] for i in ids])[:, model.classes.index("positive")]
    got = np.array([{**kept, **dropped}[i] for i in ids])
    assert np.allclose(got, expect, atol=1e-9)
    m = json.loads((out / "manifest.json").read_text())
    assert m["params"]["filters"]["quality"]["threshold"] == 0.5
    assert m["stats"]["filters"]["quality"] == {**m["stats"]["filters"]["quality"], "docs_in": 40, "docs_out": 10}

    # a threshold between two real scores splits exactly there
    all_scores = sorted({**kept, **dropped}.values())
    thr = (all_scores[20] + all_scores[21]) / 2
    assert cli("filter", root / "mixed", "--out", tmp_path / "out2", "--chain", "quality",
               "--quality-model", root / "model", "--quality-threshold", thr) == 0
    kept2 = scores_of(tmp_path / "out2")
    assert set(kept2) == {i for i, v in {**kept, **dropped}.items() if v >= thr} and len(kept2) == 19


def test_quality_top_percent(quality_setup, tmp_path):
    root, good, ids = quality_setup
    out, rej = tmp_path / "out", tmp_path / "rej"
    assert cli("filter", root / "mixed", "--out", out, "--keep-rejected", rej, "--chain", "quality",
               "--quality-model", root / "model", "--quality-top-percent", "20") == 0
    kept, dropped = scores_of(out), scores_of(rej, "rejected")
    # top 20 % of 40 docs: the 8 highest scores, all of them real text
    assert len(kept) == 8 and set(kept) <= good
    assert min(kept.values()) > max(dropped.values())
    m = json.loads((out / "manifest.json").read_text())
    assert m["params"]["filters"]["quality"]["top_percent"] == 20
    assert m["stats"]["quality_scored_for_percentile"] == 40
    thr = m["stats"]["quality_threshold_from_top_percent"]
    assert min(kept.values()) >= thr > max(dropped.values())


def test_train_domain_and_label_by_model(tmp_path):
    rng = random.Random(2)
    write_docs(tmp_path / "cooking", [topical(rng, COOKING) for _ in range(30)])
    write_docs(tmp_path / "sports", [topical(rng, SPORTS) for _ in range(30)])
    model = tmp_path / "dmodel"
    assert cli("filter", "train-domain", "--label", f"cooking={tmp_path / 'cooking'}",
               "--label", f"sports={tmp_path / 'sports'}", "--out", model, "--features", 1 << 12) == 0
    m = json.loads((model / "manifest.json").read_text())
    assert m["stage"] == "train-domain" and m["classes"] == ["cooking", "sports"]
    assert m["stats"]["heldout_accuracy"] == 1.0
    # unlabelled hosts get the model's answer; a host a rule names keeps the rule's label
    texts = [topical(rng, COOKING) for _ in range(5)] + [topical(rng, SPORTS) for _ in range(7)]
    urls = [f"https://blog{i}.example.net/post" for i in range(12)]
    texts.append(topical(rng, COOKING))
    urls.append("https://github.com/someone/recipes")
    ids = write_docs(tmp_path / "in", texts, urls)
    out = tmp_path / "out"
    assert cli("filter", tmp_path / "in", "--out", out, "--chain", "domains", "--domain-model", model) == 0
    t = read_dir(out)
    got = dict(zip(t.column("id").to_pylist(), t.column("domain").to_pylist(), strict=True))
    assert got == {**{i: "cooking" for i in ids[:5]}, **{i: "sports" for i in ids[5:12]}, ids[12]: "code"}
    s = json.loads((out / "manifest.json").read_text())["stats"]
    assert s["filters"]["domains"]["counters"] == {"by_model": 12, "by_rules": 1}
    assert {k: v["docs"] for k, v in s["mixture"].items()} == {"cooking": 5, "sports": 7, "code": 1}
    assert s["mixture"]["sports"]["chars"] == sum(len(x) for x in texts[5:12])

"""``llmctl filter``: the quality filters, and training the classifiers they can use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import summary, table
from ..errors import UsageError
from . import app
from .common import DefaultGroup, ForceOpt, SeedOpt, ShardOpt, WorkersOpt, parse_shard, read_toml

filter_app = typer.Typer(
    cls=DefaultGroup,
    help="Filter documents with a configurable chain (default), or train the quality/domain classifiers.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(filter_app, name="filter")

_CHAIN_HELP = "url, language, gopher_repetition, gopher_quality, c4, fineweb, badwords, quality, pii, domains"


def _load_filter_config(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """Read ``--config FILE.toml``: options at top level (or under [filter]), per-filter tables.

    Options become the command's defaults (the command line wins); a table named after a filter
    family (``[gopher_quality]`` or ``[filter.gopher_quality]``) sets that filter's parameters.
    """
    if value is None:
        return None
    data = read_toml(value)
    if isinstance(data.get("filter"), dict):
        data = data["filter"]
    from ..data.filters import REGISTRY

    known = {p.name: p for p in ctx.command.params if p.name and p.name != "config"}
    defaults: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, v in data.items():
        k = key.replace("-", "_")
        if isinstance(v, dict):
            if k not in REGISTRY:
                raise UsageError(f"{value}: unknown filter table '{key}'; filters are {', '.join(REGISTRY)}")
            tables[k] = v
            continue
        if k not in known or getattr(known[k], "param_type_name", "") == "argument":
            raise UsageError(f"{value}: unknown option '{key}' for 'filter'; see llmctl filter --help")
        if k == "chain" and isinstance(v, list):
            v = ",".join(v)
        defaults[k] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["filter_tables"] = tables
    return value


FilterConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file: any option at top level (or under \\[filter]), and one table per filter "
        "family with its parameters, e.g. \\[gopher_quality] min_doc_words = 40, disable = [\"min_stop_words\"].",
        is_eager=True,
        callback=_load_filter_config,
        dir_okay=False,
    ),
]


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


@filter_app.command("run")
def run_cmd(
    ctx: typer.Context,
    docs: Annotated[Path, typer.Argument(help="Docs artifact (extract/filter/dedup output) or Parquet file(s) directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output docs artifact directory.")],
    chain: Annotated[str, typer.Option("--chain", help=f"Filters in order, comma-separated. Families: {_CHAIN_HELP}.")] = ",".join(
        ["url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "badwords", "quality", "pii", "domains"]
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="FAMILY.PARAM=VALUE, repeatable, e.g. gopher_quality.min_doc_words=40 or c4.min_sentences=off."),
    ] = None,
    blocklist: Annotated[list[str] | None, typer.Option("--blocklist", help="UT1 domains/urls file or category directory (repeatable).")] = None,
    languages: Annotated[str, typer.Option("--languages", help="Languages to keep (comma-separated ISO codes).")] = "en",
    min_language_score: Annotated[float, typer.Option("--min-language-score", help="Minimum language_score.")] = 0.65,
    badwords: Annotated[str | None, typer.Option("--badwords", help="Bad-words list file (default: the shipped English list).")] = None,
    quality_model: Annotated[str | None, typer.Option("--quality-model", help="Classifier from 'llmctl filter train-quality'; enables the quality filter.")] = None,
    quality_threshold: Annotated[float, typer.Option("--quality-threshold", help="Keep docs with quality_score ≥ this.")] = 0.5,
    quality_top_percent: Annotated[float | None, typer.Option("--quality-top-percent", help="Instead keep the top P % of the input by quality_score.")] = None,
    domain_rules: Annotated[str | None, typer.Option("--domain-rules", help="Domain rules file 'PATTERN LABEL' (default: shipped rules).")] = None,
    domain_model: Annotated[str | None, typer.Option("--domain-model", help="Classifier from 'llmctl filter train-domain' for URLs no rule matches.")] = None,
    keep_rejected: Annotated[Path | None, typer.Option("--keep-rejected", help="Also write removed docs here (Parquet, with a 'reason' column).")] = None,
    workers: WorkersOpt = 1,
    shard: ShardOpt = "0/1",
    unit_rows: Annotated[int, typer.Option("--unit-rows", min=1, help="Documents per work unit (output shard).")] = 4096,
    force: ForceOpt = False,
    config: FilterConfigOpt = None,
) -> None:
    """Filter documents through a chain of quality filters; write the kept docs as a new artifact.

    Each filter counts what it removes; the manifest and the summary show docs in/out per filter,
    redactions per kind and the domain mixture. Defaults are FineWeb's (datatrove's Gopher, C4 and
    FineWeb filters); the manifest records every parameter used.
    Parameters: [bold]--set FAMILY.PARAM=VALUE[/] or a TOML table per family in --config
    (VALUE off switches a rule off). Precedence: defaults < --config < shortcut flags < --set.

    Example:

      llmctl filter data/extracted --out data/filtered --blocklist ut1/adult --keep-rejected data/rejected

      llmctl filter data/extracted --out data/filtered --config filter.toml --workers 2

    with filter.toml:

      chain = ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii"]
      \\[gopher_quality]
      min_doc_words = 40
      disable = ["min_stop_words"]
      \\[pii]
      email_placeholder = "\\[email]"
    """
    from ..data.filter import FilterConfig, run

    tables: dict[str, dict[str, Any]] = {k: dict(v) for k, v in ctx.meta.get("filter_tables", {}).items()}

    def put(family: str, key: str, value: Any) -> None:
        tables.setdefault(family, {})[key] = value

    src = ctx.get_parameter_source
    # shortcut flags apply when given on the command line or in --config, or when no table says otherwise
    def given(name: str) -> bool:
        s = src(name)
        return s is not None and s.name in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")

    if blocklist:
        put("url", "blocklists", [str(Path(b)) for b in blocklist])
    if given("languages") or "languages" not in tables.get("language", {}):
        put("language", "languages", _split([languages]))
    if given("min_language_score") or "min_score" not in tables.get("language", {}):
        put("language", "min_score", min_language_score)
    if badwords:
        put("badwords", "path", badwords)
    if quality_model:
        put("quality", "model", quality_model)
    if given("quality_threshold"):
        put("quality", "threshold", quality_threshold)
    if quality_top_percent is not None:
        put("quality", "top_percent", quality_top_percent)
    if (quality_top_percent is not None or given("quality_threshold")) and not tables.get("quality", {}).get("model"):
        flag = "--quality-top-percent" if quality_top_percent is not None else "--quality-threshold"
        raise UsageError(f"{flag} needs --quality-model DIR (a classifier from llmctl filter train-quality)")
    if domain_rules:
        put("domains", "rules", domain_rules)
    if domain_model:
        put("domains", "model", domain_model)
    for item in set_ or []:
        key, eq, value = item.partition("=")
        family, dot, param = key.strip().partition(".")
        if not eq or not dot:
            raise UsageError(f"--set {item!r}: expected FAMILY.PARAM=VALUE, e.g. gopher_quality.min_doc_words=40")
        put(family, param, value)

    cfg = FilterConfig(
        docs=str(docs),
        out=str(out),
        chain=_split([chain]),
        filters=tables,
        keep_rejected=str(keep_rejected) if keep_rejected else None,
        workers=workers,
        shard=parse_shard(shard),
        unit_rows=unit_rows,
        force=force,
    )
    m = run(cfg)
    s = m["stats"]
    rows = [[fam, v["docs_in"], v["docs_out"], v["removed"], ", ".join(f"{k} {n}" for k, n in list(v["removed_by_reason"].items())[:4])]
            for fam, v in s["filters"].items()]
    table("filter chain", ["filter", "docs in", "docs out", "removed", "top reasons"], rows)
    if s.get("mixture"):
        table("domain mixture (kept docs)", ["domain", "docs", "chars", "chars %"],
              [[k, v["docs"], v["chars"], round(100 * v["chars_frac"], 2)] for k, v in s["mixture"].items()])
    pii = s["filters"].get("pii", {}).get("counters", {})
    rows2: list[tuple[str, object]] = [
        ("docs in", s["docs_in"]),
        ("docs out", s["docs_out"]),
        ("kept %", round(100 * s["docs_out"] / max(1, s["docs_in"]), 2)),
        ("chars out", s["chars_out"]),
    ]
    if pii:
        rows2.append(("PII redactions", ", ".join(f"{k} {v}" for k, v in pii.items())))
    if s.get("docs_per_second") and not m.get("already_complete"):
        rows2.append(("docs/s", s["docs_per_second"]))
    rows2.append(("output", m.get("rejected") and f"{out} (rejected: {m['rejected']})" or str(out)))
    if m.get("already_complete"):
        rows2.append(("note", "already complete: nothing to do (--force redoes it)"))
    summary("llmctl filter", rows2)


def _read_texts(path: Path, limit: int | None) -> list[str]:
    from ..data.docs import iter_tables, list_shards

    texts: list[str] = []
    for t in iter_tables(list_shards(path), columns=["text"]):
        texts += [x for x in t.column("text").to_pylist() if x]
        if limit and len(texts) >= limit:
            return texts[:limit]
    return texts


def _train(out: Path, stage: str, classes: dict[str, Path], n_features: int, l2: float, holdout: float,
           seed: int, max_docs: int | None, force: bool) -> None:
    from dataclasses import asdict, dataclass

    from ..artifacts import MANIFEST, StageRun
    from ..data.docs import list_shards
    from ..data.filters.classifier import train

    if n_features < 2 or n_features & (n_features - 1):
        raise UsageError(f"--features {n_features}: must be a power of two, e.g. 1048576")
    if not 0 <= holdout < 1:
        raise UsageError(f"--holdout {holdout}: must be in [0, 1)")

    @dataclass
    class P:
        classes: dict[str, str]
        n_features: int
        l2: float
        holdout: float
        seed: int
        max_docs: int | None

    params = asdict(P({k: str(v) for k, v in classes.items()}, n_features, l2, holdout, seed, max_docs))
    texts = {k: _read_texts(v, max_docs) for k, v in classes.items()}
    for k, v in texts.items():
        if not v:
            raise UsageError(f"{classes[k]}: holds no documents for class '{k}'; check the input")
    # an artifact is identified by its manifest, a plain directory of Parquet files by its files
    inputs: list[Path] = []
    for v in classes.values():
        inputs += [v] if (v / MANIFEST).is_file() else list_shards(v)
    run = StageRun.open(out, stage, params, inputs, force=force)
    if run.done:
        summary(f"llmctl filter {stage}", [("model", str(out)), ("note", "already complete"), *run.manifest["stats"].items()])
        return
    model, metrics = train(texts, n_features=n_features, l2=l2, holdout=holdout, seed=seed)
    model.save(run.partial("model.npz"))
    run.commit("model.npz")
    run.finish(metrics, classes=model.classes)
    summary(f"llmctl filter {stage}", [("model", str(out)), *metrics.items()])


@filter_app.command("train-quality")
def train_quality(
    positive: Annotated[Path, typer.Option("--positive", help="Docs of the quality you want (e.g. reference-linked pages).")],
    negative: Annotated[Path, typer.Option("--negative", help="Docs to score low (e.g. random crawl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model artifact directory.")],
    features: Annotated[int, typer.Option("--features", help="Hashed feature buckets (power of two).")] = 1 << 20,
    l2: Annotated[float, typer.Option("--l2", help="L2 penalty on the weights.")] = 1e-4,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction held out for accuracy/AUC.")] = 0.2,
    max_docs: Annotated[int | None, typer.Option("--max-docs", help="At most this many docs per class.")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: FilterConfigOpt = None,
) -> None:
    """Train the quality classifier (hashed word uni+bigrams, logistic regression, CPU).

    Reports held-out accuracy and ROC AUC; the saved model (fitted on all docs) scores documents
    in 'llmctl filter --quality-model MODEL' (quality_score = probability of positive).

    Example:

      llmctl filter train-quality --positive data/wiki-linked --negative data/crawl --out models/quality
    """
    _train(out, "train-quality", {"negative": negative, "positive": positive}, features, l2, holdout, seed, max_docs, force)


@filter_app.command("train-domain")
def train_domain(
    label: Annotated[list[str], typer.Option("--label", help="NAME=DOCS, one per domain (at least two).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model artifact directory.")],
    features: Annotated[int, typer.Option("--features", help="Hashed feature buckets (power of two).")] = 1 << 18,
    l2: Annotated[float, typer.Option("--l2", help="L2 penalty on the weights.")] = 1e-4,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction held out for accuracy/AUC.")] = 0.2,
    max_docs: Annotated[int | None, typer.Option("--max-docs", help="At most this many docs per domain.")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: FilterConfigOpt = None,
) -> None:
    """Train a domain classifier for documents no URL rule labels (softmax over hashed features).

    Example:

      llmctl filter train-domain --label code=data/code --label prose=data/books --out models/domain
    """
    classes: dict[str, Path] = {}
    for item in label:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--label {item!r}: expected NAME=DOCS, e.g. code=data/code")
        classes[name] = Path(path)
    if len(classes) < 2:
        raise UsageError("train-domain needs at least two --label NAME=DOCS")
    _train(out, "train-domain", classes, features, l2, holdout, seed, max_docs, force)

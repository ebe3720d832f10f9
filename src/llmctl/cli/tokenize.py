"""`llmctl tokenize train|encode|stats`: train a BPE tokenizer, encode documents into token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console, summary, table
from . import app
from .common import ConfigOpt, ForceOpt, SeedOpt, WorkersOpt

tokenize_app = typer.Typer(
    name="tokenize",
    help="Train a byte-fallback BPE tokenizer and encode documents into flat token shards.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(tokenize_app, name="tokenize")

DocsArg = Annotated[
    list[Path],
    typer.Argument(help="Docs artifact(s), .parquet, .jsonl (a 'text' field) or .txt files (.gz ok)."),
]
TxtSplitOpt = Annotated[
    str,
    typer.Option(
        "--txt-split",
        help="How a .txt file becomes documents: paragraphs (split at blank lines), lines, or file (one document).",
    ),
]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="The text field of .jsonl records.")]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", min=0, help="sentencepiece threads (per worker when encoding); 0 = all cores (÷ workers).")
]


@tokenize_app.command("train", epilog="Example: llmctl tokenize train shakespeare.txt --vocab-size 4096 --out tok")
def train_cmd(
    docs: DocsArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Tokenizer artifact directory to write.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, reserved ids included.")] = 8192,
    sample_bytes: Annotated[
        int, typer.Option("--sample-bytes", help="Train on a seeded uniform sample of at most this many bytes.")
    ] = 100_000_000,
    heldout_fraction: Annotated[
        float, typer.Option("--heldout-fraction", help="Share of text held out (≤ 2 MB) to measure bytes/token.")
    ] = 0.02,
    character_coverage: Annotated[
        float, typer.Option("--character-coverage", help="Share of characters given their own piece; the rest fall back to bytes.")
    ] = 0.9995,
    txt_split: TxtSplitOpt = "paragraphs",
    text_field: TextFieldOpt = "text",
    threads: ThreadsOpt = 0,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a sentencepiece BPE tokenizer (byte fallback, digits split, whitespace kept exactly).

    Reserved ids: unk=0, bos=1, eos=2, pad=3, <|system|>=4, <|user|>=5, <|assistant|>=6, <|end|>=7.
    """
    from ..tokenizer import TrainConfig, train

    cfg = TrainConfig(
        docs=[str(d) for d in docs], out=str(out), vocab_size=vocab_size, sample_bytes=sample_bytes,
        heldout_fraction=heldout_fraction, character_coverage=character_coverage, txt_split=txt_split,
        text_field=text_field, threads=threads, seed=seed,
    )
    m = train(cfg, force=force)
    s = m["stats"]
    summary(
        f"tokenize train → {out}",
        [
            ("vocab size", m["vocab_size"]),
            ("documents read", s["docs_read"]),
            ("training sample (MB)", s["sample_bytes"] / 1e6),
            ("held-out sample (MB)", s["heldout_bytes"] / 1e6),
            ("bytes / token (held out)", s["bytes_per_token"] if s["bytes_per_token"] is not None else "n/a"),
            ("round-trip exact (held out)", s["heldout_roundtrip_exact"]),
            ("train seconds", s["train_seconds"]),
            ("bad records", sum(s["bad_records"].values())),
        ],
    )


@tokenize_app.command(
    "encode",
    epilog="Example: llmctl tokenize encode docs/ --tokenizer tok --out tokens --workers 2 --domain-weights web=1,code=2.5",
)
def encode_cmd(
    docs: DocsArg,
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Output of llmctl tokenize train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token artifact directory to write.")],
    val: Annotated[
        list[Path] | None,
        typer.Option("--val", help="Exactly these documents form the val split (repeatable); overrides --val-fraction."),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of documents held out for val, chosen by hashing ids with the seed.")
    ] = 0.01,
    domain_weights: Annotated[
        str, typer.Option("--domain-weights", help="Sampling weights per 'domain' column, e.g. web=1,code=2.5 (train only).")
    ] = "",
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="Tokens per output shard.")] = 100_000_000,
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = 0,
    txt_split: TxtSplitOpt = "paragraphs",
    text_field: TextFieldOpt = "text",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Encode documents into train/val token shards (BOS + tokens + EOS per document)."""
    from ..tokenizer import EncodeConfig, encode, parse_domain_weights

    cfg = EncodeConfig(
        docs=[str(d) for d in docs], tokenizer=str(tokenizer), out=str(out), val=[str(v) for v in val or []],
        val_fraction=val_fraction, domain_weights=parse_domain_weights(domain_weights), shard_tokens=shard_tokens,
        workers=workers, threads=threads, txt_split=txt_split, text_field=text_field, seed=seed,
    )
    m = encode(cfg, force=force)
    _print_tokens_summary(out, m)


def _print_tokens_summary(out: Path, m: dict) -> None:
    s = m["stats"]
    summary(
        f"tokenize encode → {out}",
        [
            ("dtype / vocab", f"{m['dtype']} / {m['vocab_size']:,}"),
            ("train docs / tokens", f"{s['train_docs']:,} / {s['train_tokens']:,}"),
            ("val docs / tokens", f"{s['val_docs']:,} / {s['val_tokens']:,}"),
            ("train / val MB", f"{s['train_bytes'] / 1e6:,.2f} / {s['val_bytes'] / 1e6:,.2f}"),
            ("bytes / token", s["bytes_per_token"]),
            ("shards train / val", f"{len(m['splits']['train']['shards'])} / {len(m['splits']['val']['shards'])}"),
            ("encode MB/s", s["encode_mb_per_s"] if s.get("encode_mb_per_s") is not None else "n/a"),
            ("blocks (resumed)", f"{s['blocks']} ({s['blocks_resumed']})"),
            ("bad records", sum(s["bad_records"].values())),
        ],
    )
    doms = s.get("domains", {})
    if len(doms) > 1 or any(d["weight"] != 1.0 for d in doms.values()):
        table(
            "domains (train)",
            ["domain", "docs", "unique tokens", "weight", "effective epochs", "tokens"],
            [[k, d["docs"], d["unique_tokens"], d["weight"], d["effective_epochs"], d["tokens"]] for k, d in doms.items()],
        )
    if s.get("domain_weights_unmatched"):
        console.print(f"[yellow]warning:[/] no documents of domain(s) {', '.join(s['domain_weights_unmatched'])}")
    if s["val_tokens"] == 0:
        console.print("[yellow]warning:[/] the val split is empty; use --val DOCS or a larger --val-fraction")


@tokenize_app.command("stats", epilog="Example: llmctl tokenize stats tokens")
def stats_cmd(
    tokens: Annotated[Path, typer.Argument(help="Output of llmctl tokenize encode.")],
    show: Annotated[int, typer.Option("--show", help="Decode the first N tokens of the train split.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Summarise a token artifact (counts, bytes/token, domains) and optionally decode a sample."""
    from ..tokens import TokenArtifact

    art = TokenArtifact(tokens)
    _print_tokens_summary(tokens, art.manifest)
    if show > 0:
        tok = art.tokenizer()
        ids = art.split("train").window(0, min(show, art.num_tokens("train")))
        console.print(repr(tok.decode(ids.tolist())))

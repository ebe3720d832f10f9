"""`llmctl eval`: perplexity, multiple choice (likelihood and generation), LAMBADA, judged win rates, contamination."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..console import summary, table
from . import app
from .common import ConfigOpt, ForceOpt

EPILOG = (
    "Examples: llmctl eval runs/tiny --task mmlu:../shared/data/eval/mmlu-dev --task ppl:val.txt --out evals/tiny · "
    "llmctl eval exports/tiny-hf --task piqa:../shared/data/eval/piqa-valid.jsonl --num-fewshot 2 "
    "--protocol both --contamination tokens/ --decontaminate --out evals/piqa · "
    "Task kinds: mmlu:DIR_OR_CSV, piqa:FILE.jsonl (labels in FILE-labels.lst), lambada:FILE.jsonl, "
    "ppl:TEXT_JSONL_PARQUET_OR_DOCS, jsonl:SPEC.json|toml (data, template, choices, gold[, gold_kind, delimiter]), "
    "judge:FILE.jsonl ({instruction, output} references; needs --judge; win rate and length-controlled win rate)"
)


@app.command("eval", epilog=EPILOG)
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A finished model run (pretrain, sft, …) or an exported transformers directory.")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="KIND:PATH (repeatable); see the kinds below.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for results.json, items-*.jsonl and manifest.json.")],
    protocol: Annotated[
        str, typer.Option("--protocol", help="Multiple choice by 'likelihood', by 'generation' (the model writes the letter), or 'both'.")
    ] = "both",
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", "-k", min=0, help="Solved examples in front of each question.")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the few-shot draw.")] = 1234,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Score only the first N items of each task; 0 = all.")] = 0,
    truncate: Annotated[str, typer.Option("--truncate", help="An item longer than the model's context: left drops its oldest context tokens (as lm-evaluation-harness does; counted per task as truncated), skip leaves it out (counted as skipped).")] = "left",
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="Prefix multiple-choice contexts and prompts with BOS, as documents began in pretraining and as lm-evaluation-harness does for a tokenizer that adds BOS (llmctl's exports do); --no-bos matches its add_bos_token=False. Perplexity always scores the first token after BOS.")] = True,
    chat: Annotated[bool, typer.Option("--chat", help="Generation protocol and judge answers: each prompt is a user turn of the model's chat format (llmctl's for sft runs, else the directory's chat_template).")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens generated for a letter answer.")] = 4,
    contamination: Annotated[
        Path | None, typer.Option("--contamination", help="Training artifact (docs, tokens, Parquet, text) to check n-gram overlap against.")
    ] = None,
    ngram: Annotated[int, typer.Option("--ngram", min=1, help="n of the contamination n-grams (words).")] = 13,
    decontaminate: Annotated[bool, typer.Option("--decontaminate", help="Score only the items without overlap.")] = False,
    judge: Annotated[Path | None, typer.Option("--judge", help="judge tasks: an llmctl reward run (σ of the score difference) or a chat model asked which answer is better.")] = None,
    reply_tokens: Annotated[int, typer.Option("--reply-tokens", min=1, help="judge tasks: longest answer the model writes.")] = 128,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", min=1, help="Tokens per scoring batch (questions × longest question; one-token choices: at most 2048).")] = 16384,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch CPU threads; 0 = torch's default.")] = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Evaluate a model on local task files: results.json, per-item scores, and a table.

    Perplexity uses disjoint rolling windows of the model's context (BOS first, every token once)
    and reports token, word and byte perplexity and bits per byte as corpus sums. Multiple choice
    by likelihood gives acc and acc_norm (log-likelihood ÷ characters of the choice), each question's
    context computed once for all its choices; by generation the model writes the answer letter
    (strictly parsed; unparseable answers are counted). An item longer than the model's context is
    cut from the left as lm-evaluation-harness cuts it (--truncate left, counted per task), or
    skipped and counted (--truncate skip).
    """
    from ..eval.results import table_rows
    from ..eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(
        model=str(model), tasks=list(task), out=str(out), protocol=protocol, num_fewshot=num_fewshot, seed=seed,
        limit=limit, bos=bos, truncate=truncate, chat=chat, max_new_tokens=max_new_tokens,
        contamination=str(contamination) if contamination else None, ngram=ngram, decontaminate=decontaminate,
        batch_tokens=batch_tokens, judge=str(judge) if judge else None, reply_tokens=reply_tokens, device=device, threads=threads, force=force,
    )
    manifest, _ = run_eval(cfg)
    results = json.loads((Path(out) / "results.json").read_text(encoding="utf-8"))
    table(f"eval · {model}", ["task", "metric", "protocol", "value", "stderr", "n"], table_rows(results))
    rows: list[tuple[str, object]] = [("items scored", manifest["stats"]["items_scored"])]
    if manifest["stats"].get("items_per_second"):
        rows.append(("items/s", manifest["stats"]["items_per_second"]))
    for name, sk in manifest["stats"].get("skipped", {}).items():
        rows.append((f"skipped · {name}", ", ".join(f"{k} {v}" for k, v in sk.items())))
    for r in results["results"]:
        cut = r["settings"].get("truncated")
        if cut:
            rows.append((f"truncated · {r['task']}", ", ".join(f"{k} {v}" for k, v in cut.items())))
        c = r["settings"].get("contaminated")
        if c is not None:
            rows.append((f"contaminated · {r['task']}", c))
    rows.append(("output", str(out)))
    summary("eval", list(dict.fromkeys(rows)))

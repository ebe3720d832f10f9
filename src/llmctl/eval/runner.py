"""``llmctl eval``: score a model (an llmctl run or a transformers directory) on local tasks.

Writes ``results.json`` (one row per task × metric: value, standard error, n, settings),
``items-<task>.jsonl`` (per-item scores) and ``manifest.json`` into ``--out``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import StageRun, write_json_atomic
from ..chat import ChatFormat, chat_format
from ..console import console, progress
from ..device import resolve_device
from ..errors import UsageError
from ..model.hf import is_hf_dir, load_any
from . import contamination, generation_mc, perplexity
from .multiple_choice import Request, many_context_ids, request_length, score_requests
from .results import Metric, mean_se, write_items
from .tasks import LambadaItem, MCItem, Task, load_task, parse_task_spec

PROTOCOLS = ("likelihood", "generation", "both")


@dataclass
class EvalConfig:
    model: str
    tasks: list[str]
    out: str
    protocol: str = "both"
    num_fewshot: int = 0
    seed: int = 1234
    limit: int = 0
    bos: bool = True
    truncate: str = "left"  # a request longer than the context: "left" drops its oldest context tokens, "skip" skips it
    chat: bool = False  # generation prompts as a user turn of the chat format (sft models)
    max_new_tokens: int = 4
    contamination: str | None = None
    ngram: int = 13
    decontaminate: bool = False
    batch_tokens: int = 16384
    judge: str | None = None  # judge tasks: a reward run, or a chat model asked "A or B"
    reply_tokens: int = 128  # judge tasks: longest answer the model writes
    device: str = "cpu"
    threads: int = 0
    force: bool = False


@dataclass
class TaskRun:
    task: Task
    metrics: list[Metric] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    contaminated: int | None = None


def _check(cfg: EvalConfig) -> None:
    if cfg.protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {cfg.protocol}: choose likelihood, generation or both")
    if cfg.truncate not in ("left", "skip"):
        raise UsageError(f"--truncate {cfg.truncate}: choose left or skip")
    if not cfg.tasks:
        raise UsageError("no --task given; e.g. --task mmlu:../shared/data/eval/mmlu-dev")
    if cfg.num_fewshot < 0 or cfg.limit < 0 or cfg.max_new_tokens < 1 or cfg.batch_tokens < 1:
        raise UsageError("--num-fewshot and --limit must be ≥ 0, --max-new-tokens and --batch-tokens ≥ 1")
    if cfg.chat and cfg.protocol == "likelihood":
        raise UsageError("--chat applies to the generation protocol; use --protocol generation or both")
    if cfg.decontaminate and not cfg.contamination:
        raise UsageError("--decontaminate needs --contamination TRAINING_ARTIFACT")
    kinds = [parse_task_spec(t)[0] for t in cfg.tasks]
    if "judge" in kinds and not cfg.judge:
        raise UsageError("a judge task needs --judge RUN (an llmctl reward run, or a chat model to ask)")
    if cfg.judge and "judge" not in kinds:
        raise UsageError("--judge applies to judge tasks; add --task judge:FILE.jsonl or drop --judge")
    if cfg.judge and not Path(cfg.judge).exists():
        raise UsageError(f"--judge {cfg.judge}: not found; give an llmctl reward run, chat run or transformers directory")
    if cfg.reply_tokens < 1:
        raise UsageError("--reply-tokens must be ≥ 1")


def _inputs(cfg: EvalConfig) -> list[Path]:
    m = Path(cfg.model)
    out = [m if (m / "manifest.json").is_file() else m / "model.safetensors"]
    if not out[0].exists():
        raise UsageError(f"{m}: neither an llmctl run nor a transformers directory with model.safetensors")
    for t in cfg.tasks:
        _, p = parse_task_spec(t)
        out += sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    if cfg.judge:
        j = Path(cfg.judge)
        out.append(j if (j / "manifest.json").is_file() else j / "model.safetensors")
    if cfg.contamination:
        c = Path(cfg.contamination)
        if not c.exists():
            raise UsageError(f"--contamination {c}: not found; give a docs or tokens artifact")
        out.append(c if (c / "manifest.json").is_file() or c.is_file() else next(iter(sorted(c.rglob("*.parquet"))), c))
    return out


def _unique_names(tasks: list[Task]) -> None:
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.name] = seen.get(t.name, 0) + 1
        if seen[t.name] > 1:
            t.name = f"{t.name}-{seen[t.name]}"


def fewshot(item: MCItem, pool: list[MCItem], k: int, seed: int) -> list[MCItem]:
    """k examples from the item's group (never the item itself), the same for a given seed."""
    if k == 0:
        return []
    cands = [x for x in pool if x.group == item.group and x.id != item.id]
    if len(cands) < k:
        raise UsageError(
            f"--num-fewshot {k}: only {len(cands)} other items in group '{item.group or item.id}'; lower it"
        )
    return random.Random(f"{seed}/{item.id}").sample(cands, k)


def run_eval(cfg: EvalConfig) -> tuple[dict[str, Any], list[TaskRun]]:
    _check(cfg)
    inputs = _inputs(cfg)
    tasks = [load_task(t) for t in cfg.tasks]
    _unique_names(tasks)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    stage = StageRun.open(Path(cfg.out), "eval", params, inputs=inputs, force=cfg.force)
    if stage.done:
        console.print(f"{cfg.out}: already evaluated with these settings and inputs; pass --force to redo")
        return stage.manifest, []
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        model, tok = load_any(cfg.model, device)
        ctx_len = model.cfg.max_seq_len
        if cfg.protocol != "likelihood" and any(t.kind == "mc" for t in tasks) and cfg.max_new_tokens >= ctx_len:
            raise UsageError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {ctx_len} tokens; give fewer")
        chat = chat_format(tok, cfg.model) if cfg.chat else None  # the model's own chat format
        kind = "transformers directory" if is_hf_dir(Path(cfg.model)) else "llmctl run"
        t0 = time.perf_counter()
        runs = [TaskRun(t) for t in tasks]
        n_scored = 0
        for r in runs:
            if cfg.limit:
                r.task.items = r.task.items[: cfg.limit]
            if cfg.contamination:
                hit, cstats = contamination.find_contaminated([x.text() for x in r.task.items], Path(cfg.contamination), cfg.ngram)
                r.contaminated = sum(hit)
                r.task.items_contaminated = hit  # type: ignore[attr-defined]
                if cfg.decontaminate:
                    clean = [x for x, h in zip(r.task.items, hit, strict=True) if not h]
                    r.task.items = clean
                    r.task.items_contaminated = [False] * len(clean)  # type: ignore[attr-defined]
                    if not clean:
                        console.print(f"[yellow]{r.task.name}: every item is contaminated; nothing left to score[/]")
            if r.task.items:
                {"mc": _run_mc, "lambada": _run_lambada, "ppl": _run_ppl, "judge": _run_judge}[r.task.kind](cfg, model, tok, r, chat)
            scored = max((m.n for m in r.metrics), default=0)  # items some protocol scored (not the skipped)
            if r.task.items and not scored:
                why = ", ".join(f"{k} {v}" for k, v in r.task.skipped.items()) or "no usable item"
                console.print(f"[yellow]warning:[/] {r.task.name}: no item could be scored ({why}); its metrics are null")
            n_scored += scored
            write_items(stage.partial(f"items-{r.task.name}.jsonl"), r.rows)
            stage.commit(f"items-{r.task.name}.jsonl")
        seconds = time.perf_counter() - t0
        results = {
            "model": str(cfg.model),
            "model_kind": kind,
            "settings": _settings(cfg),
            "results": [
                {"task": r.task.name, **asdict(m), "settings": _task_settings(cfg, r)} for r in runs for m in r.metrics
            ],
            "wall_seconds": round(seconds, 3),
        }
        write_json_atomic(stage.work / "results.json", results)
        stats = {
            "tasks": len(runs),
            "items_scored": n_scored,
            "items_per_second": round(n_scored / seconds, 2) if seconds else None,
            "skipped": {r.task.name: r.task.skipped for r in runs if r.task.skipped},
        }
        manifest = stage.finish(stats)
    except BaseException:
        stage.abandon()
        raise
    return manifest, runs


def _settings(cfg: EvalConfig) -> dict[str, Any]:
    return {
        "protocol": cfg.protocol, "num_fewshot": cfg.num_fewshot, "seed": cfg.seed, "bos": cfg.bos, "truncate": cfg.truncate,
        "chat": cfg.chat,
        "limit": cfg.limit, "ngram": cfg.ngram, "decontaminate": cfg.decontaminate,
        "contamination": cfg.contamination, "max_new_tokens": cfg.max_new_tokens, "judge": cfg.judge,
        "reply_tokens": cfg.reply_tokens,
    }


def _task_settings(cfg: EvalConfig, r: TaskRun) -> dict[str, Any]:
    s: dict[str, Any] = {"source": r.task.source, "skipped": dict(r.task.skipped)}
    cut = {p: n for p in ("likelihood", "generation", "answer", "judge") if (n := sum(1 for row in r.rows if row.get(f"truncated_{p}")))}
    if cut:  # items scored with their oldest context tokens dropped (--truncate left)
        s["truncated"] = cut
    if r.task.kind == "mc":
        s["num_fewshot"] = cfg.num_fewshot
    if r.contaminated is not None:
        s["contaminated"] = r.contaminated
        s["ngram"] = cfg.ngram
        s["decontaminate"] = cfg.decontaminate
    return s


def _with_bos(cfg: EvalConfig, tok, req: Request) -> Request:
    if cfg.bos and tok.bos_id >= 0 and req.context[0] != tok.bos_id:
        return Request([tok.bos_id, *req.context], req.continuations)
    return req


def _score(cfg, model, r: TaskRun, reqs: list[Request], what: str):
    with progress() as bar:
        job = bar.add_task(f"{r.task.name} {what}", total=len(reqs), unit="items")
        return score_requests(model, reqs, max_batch_tokens=cfg.batch_tokens, on_done=lambda n: bar.advance(job, n))


def _run_mc(cfg: EvalConfig, model, tok, r: TaskRun, chat: ChatFormat | None) -> None:
    task = r.task
    items: list[MCItem] = task.items
    pool = list(items)
    ctx_len = model.cfg.max_seq_len
    hit = getattr(task, "items_contaminated", [False] * len(items))
    rows: list[dict[str, Any]] = []
    like = cfg.protocol in ("likelihood", "both")
    gen = cfg.protocol in ("generation", "both")
    reqs, req_rows = [], []
    prompts, prompt_rows = [], []
    shots_of = [fewshot(it, pool, cfg.num_fewshot, cfg.seed) for it in items]
    if like:  # every question's texts tokenised in one batch call
        split = many_context_ids(tok, [
            (it.description + "".join(s.context + task.delimiter + s.choices[s.gold] + "\n\n" for s in shots)
             + it.context, [task.delimiter + c for c in it.choices])
            for it, shots in zip(items, shots_of, strict=True)])
    for i, it in enumerate(items):
        shots = shots_of[i]
        row: dict[str, Any] = {"id": it.id, "gold": it.gold, "n_choices": len(it.choices)}
        if cfg.contamination:
            row["contaminated"] = hit[i]
        rows.append(row)
        if like:
            ctx, conts = split[i]
            req = _with_bos(cfg, tok, Request(ctx, conts))
            fitted = _fit(cfg, req, ctx_len, row, "likelihood")
            if not all(conts):
                row["skip_likelihood"] = "empty_continuation"
            elif fitted is None:
                row["skip_likelihood"] = "longer_than_context"
            else:
                reqs += fitted
                req_rows.append((i, len(fitted)))
        if gen:
            ids = generation_mc.encode(tok, generation_mc.build_prompt(it, shots), cfg.bos, chat)
            fitted_ids, cut = _fit_prompt(cfg, ids, ctx_len - cfg.max_new_tokens)
            if fitted_ids is None:
                row["skip_generation"] = "longer_than_context"
            else:
                if cut:
                    row["truncated_generation"] = True
                prompts.append(fitted_ids)
                prompt_rows.append(i)
    if like:
        scores = _joined(_score(cfg, model, r, reqs, "likelihood"), [n for _, n in req_rows])
        acc, acc_norm = [], []
        for (i, _), sc in zip(req_rows, scores, strict=True):
            it, row = items[i], rows[i]
            lls = [s.loglik for s in sc]
            norm = [ll / len(c) for ll, c in zip(lls, it.choices, strict=True)]
            pred, pred_n = max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)
            row.update(loglik=lls, pred=pred, pred_norm=pred_n, correct=pred == it.gold, correct_norm=pred_n == it.gold)
            acc.append(float(pred == it.gold))
            acc_norm.append(float(pred_n == it.gold))
        _skips(task, rows, "skip_likelihood")
        r.metrics += [Metric("acc", *mean_se(acc), len(acc), "likelihood"),
                      Metric("acc_norm", *mean_se(acc_norm), len(acc_norm), "likelihood")]
    if gen:
        with progress() as bar:
            job = bar.add_task(f"{task.name} generation", total=len(prompts), unit="items")
            outs = []
            for b in range(0, len(prompts), 16):
                outs += generation_mc.select_by_generation(
                    model, tok, prompts[b : b + 16], [len(items[i].choices) for i in prompt_rows[b : b + 16]],
                    cfg.max_new_tokens, chat=chat)
                bar.advance(job, len(prompts[b : b + 16]))
        correct = []
        for i, g in zip(prompt_rows, outs, strict=True):
            rows[i].update(gen_output=g.output, gen_pred=g.pred, gen_correct=g.pred == items[i].gold)
            correct.append(float(g.pred == items[i].gold))
        _skips(task, rows, "skip_generation")
        unparsed = [float(not g.parsed) for g in outs]
        r.metrics += [Metric("acc", *mean_se(correct), len(correct), "generation"),
                      Metric("unparseable", *mean_se(unparsed), len(unparsed), "generation")]
    r.rows = rows


def _fit(cfg: EvalConfig, req: Request, ctx_len: int, row: dict[str, Any], protocol: str) -> list[Request] | None:
    """[``req``] if it fits the model's context. Else, with ``--truncate left``, one request per
    continuation, each context cut from the left just enough for that continuation, as
    lm-evaluation-harness cuts each (context + continuation) to the model's length (the row is
    marked ``truncated_PROTOCOL``); None (skipped) with ``--truncate skip``, or when a continuation
    alone does not fit."""
    if request_length(req) <= ctx_len:
        return [req]
    keeps = [ctx_len + 1 - len(c) for c in req.continuations]
    if cfg.truncate != "left" or min(keeps) < 1:
        return None
    row[f"truncated_{protocol}"] = True
    return [Request(req.context[-k:], [c]) for k, c in zip(keeps, req.continuations, strict=True)]


def _joined(scores: list[list[Any]], parts: list[int]) -> list[list[Any]]:
    """Per-item score lists from requests split by ``_fit``: ``parts[i]`` consecutive requests each."""
    out, pos = [], 0
    for n in parts:
        out.append([s for sc in scores[pos : pos + n] for s in sc])
        pos += n
    return out


def _fit_prompt(cfg: EvalConfig, ids: list[int], room: int) -> tuple[list[int] | None, bool]:
    """A generation prompt in the ``room`` its context leaves beside the tokens to generate:
    (ids, whether cut). Too long, it keeps its end with ``--truncate left`` (as the harness's
    generate_until does); else, or when no room is left at all, (None, False): skip the item."""
    if len(ids) <= room:
        return ids, False
    if cfg.truncate == "left" and room >= 1:
        return ids[-room:], True
    return None, False


def _skips(task: Task, rows: list[dict[str, Any]], key: str) -> None:
    for row in rows:
        if key in row:
            task.skip(f"{key.removeprefix('skip_')}:{row[key]}")


def _run_lambada(cfg: EvalConfig, model, tok, r: TaskRun, chat: ChatFormat | None) -> None:
    items: list[LambadaItem] = r.task.items
    hit = getattr(r.task, "items_contaminated", [False] * len(items))
    reqs, idx, rows = [], [], []
    split = many_context_ids(tok, [(it.context, [it.target]) for it in items])
    for i, it in enumerate(items):
        ctx, conts = split[i]
        req = _with_bos(cfg, tok, Request(ctx, conts))
        row: dict[str, Any] = {"id": it.id, "target": it.target}
        if cfg.contamination:
            row["contaminated"] = hit[i]
        fitted = _fit(cfg, req, model.cfg.max_seq_len, row, "likelihood")
        if fitted is None:
            row["skip"] = "longer_than_context"
        else:
            reqs += fitted  # one continuation: one request
            idx.append(i)
        rows.append(row)
    scores = _score(cfg, model, r, reqs, "last word")
    lls, acc = [], []
    for i, sc in zip(idx, scores, strict=True):
        s = sc[0]
        rows[i].update(loglik=s.loglik, greedy=s.greedy, n_tokens=s.n_tokens)
        lls.append(s.loglik)
        acc.append(float(s.greedy))
    _skips(r.task, rows, "skip")
    m, se = mean_se(lls)
    ppl = math.exp(-m) if lls else float("nan")
    r.metrics += [Metric("acc", *mean_se(acc), len(acc), "greedy"),
                  Metric("perplexity", ppl, ppl * se, len(lls), "likelihood")]
    r.rows = rows


def _run_ppl(cfg: EvalConfig, model, tok, r: TaskRun, chat: ChatFormat | None) -> None:
    items = r.task.items
    hit = getattr(r.task, "items_contaminated", [False] * len(items))
    reqs, owner, rows = [], [], []
    for i, it in enumerate(items):
        doc_reqs = perplexity.doc_requests(tok, it.text(), model.cfg.max_seq_len)
        row: dict[str, Any] = {"id": it.id}
        if cfg.contamination:
            row["contaminated"] = hit[i]
        if not doc_reqs:
            row["skip"] = "no_tokens"
        rows.append(row)
        reqs += doc_reqs
        owner += [i] * len(doc_reqs)
    scores = _score(cfg, model, r, reqs, "windows")
    ll = [0.0] * len(items)
    ntok = [0] * len(items)
    for i, sc in zip(owner, scores, strict=True):
        ll[i] += sc[0].loglik
        ntok[i] += sc[0].n_tokens
    keep = [i for i, row in enumerate(rows) if "skip" not in row]
    words, nbytes = [], []
    for i in keep:
        text = items[i].text()
        w, b = perplexity.count_words(text), len(text.encode("utf-8"))
        rows[i].update(loglik=ll[i], tokens=ntok[i], words=w, bytes=b)
        words.append(w)
        nbytes.append(b)
    _skips(r.task, rows, "skip")
    if keep:
        mets = perplexity.corpus_metrics([ll[i] for i in keep], [ntok[i] for i in keep], words, nbytes)
        r.metrics += [Metric(k, v, se, len(keep), "rolling") for k, (v, se) in mets.items()]
    r.rows = rows


def _run_judge(cfg: EvalConfig, model, tok, r: TaskRun, chat: ChatFormat | None) -> None:
    from ..artifacts import read_manifest
    from . import judge

    items = r.task.items
    jpath = Path(str(cfg.judge))
    is_rm = (jpath / "manifest.json").is_file() and read_manifest(jpath).get("stage") == "reward"
    device = next(model.parameters()).device
    if is_rm:
        prefer = judge.reward_judge(jpath, device, cfg.truncate)
    else:
        jm, jt = (model, tok) if jpath.resolve() == Path(cfg.model).resolve() else load_any(jpath, device)
        prefer = judge.lm_judge(jm, jt, jpath, cfg.truncate)
    # the answers' prompts must leave room for --reply-tokens, as generation multiple choice's do
    prompts, answered, cut = [], [], set()
    for i, it in enumerate(items):
        ids, was_cut = _fit_prompt(cfg, judge.answer_prompt(tok, it, chat, cfg.bos), model.cfg.max_seq_len - cfg.reply_tokens)
        if ids is None:
            r.task.skip("answer:longer_than_context")
            continue
        if was_cut:
            cut.add(i)
        prompts.append(ids)
        answered.append(i)
    with progress() as bar:
        job = bar.add_task(f"{r.task.name} answers", total=len(prompts), unit="items")
        outputs: list[str] = []
        for b in range(0, len(prompts), 16):
            outputs += judge.answers(model, tok, prompts[b : b + 16], chat, cfg.reply_tokens)
            bar.advance(job, len(prompts[b : b + 16]))
    rows = judge.judge_items(prefer, [items[i] for i in answered], outputs, cfg.seed, symmetric=is_rm)
    hit = getattr(r.task, "items_contaminated", None)
    for i, row in zip(answered, rows, strict=True):
        if i in cut:
            row["truncated_answer"] = True
        if hit is not None:
            row["contaminated"] = hit[i]
    _skips(r.task, rows, "skip_judge")
    scored = [row for row in rows if row["preference"] is not None]
    pref = [row["preference"] for row in scored]
    lens, ref_lens = [row["length"] for row in scored], [row["reference_length"] for row in scored]
    r.rows = rows
    if not scored:  # every item skipped: no metrics (the run warns that the task scored nothing)
        return
    lc, lc_se = judge.lc_win_rate(pref, lens, ref_lens, cfg.seed)
    proto = "reward" if is_rm else "lm-judge"
    r.metrics += [
        Metric("win_rate", *mean_se(pref), len(pref), proto),
        Metric("lc_win_rate", lc, lc_se, len(pref), proto),
        Metric("length", *mean_se([float(x) for x in lens]), len(lens), "characters"),
        Metric("reference_length", *mean_se([float(x) for x in ref_lens]), len(ref_lens), "characters"),
    ]
    r.rows = rows

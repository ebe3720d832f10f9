"""Evaluation tasks read from local files: MMLU CSV, PIQA JSONL + labels, LAMBADA, perplexity
corpora, and a generic JSONL spec for anything else.

A task is named on the command line as ``KIND:PATH`` (``mmlu:../shared/data/eval/mmlu-dev``,
``piqa:piqa-valid.jsonl``, ``lambada:lambada-test.jsonl``, ``ppl:corpus.txt``, ``jsonl:spec.json``).
Loaders follow lm-evaluation-harness's prompt formats, so numbers are comparable with it. A bad
record inside a good file (a missing field, a gold label out of range) is skipped and counted by
reason; a file that yields no usable item at all is a usage error.
"""

from __future__ import annotations

import csv
import json
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..jsonl import json_lines, open_binary

LETTERS = string.ascii_uppercase
KINDS = ("mmlu", "piqa", "lambada", "ppl", "jsonl", "judge")


@dataclass
class MCItem:
    """One multiple-choice question: ``context`` + delimiter + ``choices[i]`` is scored."""

    id: str
    context: str
    choices: list[str]
    gold: int
    group: str = ""  # few-shot examples are drawn from the same group (MMLU subject)
    description: str = ""  # text in front of the few-shot examples (MMLU's subject header)
    lettered: bool = False  # the context already lists the options as letters (MMLU)

    def question_with_letters(self) -> str:
        """The prompt for direct selection: the options listed as ``A. …`` and ``Answer:``."""
        if self.lettered:
            return self.context
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        ctx = self.context
        if ctx.rstrip().endswith("Answer:"):
            ctx = ctx.rstrip()[: -len("Answer:")].rstrip()
        return f"{ctx}\n{opts}\nAnswer:"

    def gold_letter(self) -> str:
        return self.choices[self.gold].strip() if self.lettered else LETTERS[self.gold]

    def text(self) -> str:
        """Everything a training set could have leaked: question and every choice."""
        return " ".join([self.context, *self.choices])


@dataclass
class LambadaItem:
    id: str
    context: str  # the passage without its last word
    target: str  # " " + the last word

    def text(self) -> str:
        return self.context + self.target


@dataclass
class DocItem:
    id: str
    text_: str

    def text(self) -> str:
        return self.text_


@dataclass
class Task:
    name: str
    kind: str  # "mc", "lambada" or "ppl"
    source: str
    items: list[Any]
    skipped: dict[str, int] = field(default_factory=dict)
    delimiter: str = " "

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def parse_task_spec(spec: str) -> tuple[str, Path]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise UsageError(f"--task {spec!r}: write KIND:PATH with KIND one of {', '.join(KINDS)} (e.g. mmlu:data/mmlu-dev)")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--task {spec}: {p} does not exist; check the path")
    return kind, p


def load_task(spec: str) -> Task:
    kind, path = parse_task_spec(spec)
    loaders = {"mmlu": load_mmlu, "piqa": load_piqa, "lambada": load_lambada, "ppl": load_ppl, "jsonl": load_jsonl_spec, "judge": load_judge}
    task = loaders[kind](path)
    if not task.items:
        why = ", ".join(f"{k}: {v}" for k, v in task.skipped.items()) or "the file is empty"
        raise UsageError(f"--task {spec}: no usable item ({why}); fix the file")
    return task


def _read_jsonl(path: Path, task: Task) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each usable line of a JSON Lines file (.gz too); a line that is
    not UTF-8, not JSON or not an object is counted in the task's skips, not fatal."""
    rows = []
    try:
        with open_binary(path) as f:
            for n, obj in json_lines(f, task.skip):
                if not isinstance(obj, dict):
                    task.skip("not_an_object")
                    continue
                rows.append((n, obj))
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"{path}: unreadable ({e}); give a JSON Lines file, plain or .gz") from e
    return rows


# -- MMLU ----------------------------------------------------------------------------------------
def _subject(path: Path) -> str:
    name = path.stem
    for suffix in ("_dev", "_val", "_test"):
        name = name.removesuffix(suffix)
    return name


def load_mmlu(path: Path) -> Task:
    """Header-less CSV rows (question, A, B, C, D, answer letter); a directory of them or one file.

    Prompt as lm-eval's ``mmlu`` task: a subject header, the question, the four options, "Answer:",
    and the choices are the letters themselves.
    """
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path}: no .csv files; give an MMLU directory or CSV file")
    task = Task("mmlu", "mc", str(path), [])
    for f in files:
        subject = _subject(f)
        desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        with open(f, encoding="utf-8", newline="") as fh:
            for n, row in enumerate(csv.reader(fh)):
                if len(row) != 6 or any(not c.strip() for c in row[:1]):
                    task.skip("wrong_number_of_fields" if len(row) != 6 else "empty_question")
                    continue
                q, *opts, ans = row
                ans = ans.strip().upper()
                if ans not in LETTERS[:4]:
                    task.skip("gold_out_of_range")
                    continue
                ctx = q.strip() + "".join(f"\n{LETTERS[i]}. {o.strip()}" for i, o in enumerate(opts)) + "\nAnswer:"
                task.items.append(
                    MCItem(f"{subject}/{n}", ctx, list(LETTERS[:4]), LETTERS.index(ans), subject, desc, lettered=True)
                )
    return task


# -- PIQA ------------------------------------------------------------------------------------------
def load_piqa(path: Path) -> Task:
    """``{goal, sol1, sol2}`` lines plus labels (0/1), one per line, in ``<stem>-labels.lst``."""
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.is_file():
        raise UsageError(f"{path}: no labels file {labels_path.name} beside it; PIQA needs its labels")
    task = Task("piqa", "mc", str(path), [])
    labels = labels_path.read_text(encoding="utf-8").split()
    rows = _read_jsonl(path, task)
    if len(labels) != len(rows) + sum(task.skipped.values()):
        raise UsageError(f"{labels_path}: {len(labels)} labels for {len(rows)} questions; the files do not match")
    for n, obj in rows:
        goal, s1, s2 = obj.get("goal"), obj.get("sol1"), obj.get("sol2")
        if not all(isinstance(x, str) and x.strip() for x in (goal, s1, s2)):
            task.skip("missing_field")
            continue
        lab = labels[n].strip()
        if lab not in ("0", "1"):
            task.skip("gold_out_of_range")
            continue
        task.items.append(MCItem(f"piqa/{n}", f"Question: {goal}\nAnswer:", [s1, s2], int(lab)))
    return task


# -- LAMBADA ---------------------------------------------------------------------------------------
def load_lambada(path: Path) -> Task:
    """``{"text"}`` lines; the task is the last word (lm-eval's lambada_openai split)."""
    task = Task("lambada", "lambada", str(path), [])
    for n, obj in _read_jsonl(path, task):
        text = obj.get("text")
        if not isinstance(text, str) or " " not in text.strip():
            task.skip("missing_field" if not isinstance(text, str) else "no_last_word")
            continue
        ctx, last = text.rsplit(" ", 1)
        if not last:
            task.skip("no_last_word")
            continue
        task.items.append(LambadaItem(f"lambada/{n}", ctx, " " + last))
    return task


# -- perplexity corpora --------------------------------------------------------------------------
def load_ppl(path: Path) -> Task:
    """Documents to score: a .txt file (one document), .jsonl (a "text" field per line), Parquet
    doc shards, or a directory of them (a docs artifact)."""
    task = Task("ppl", "ppl", str(path), [])
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path}: no .txt, .jsonl or .parquet files; give text or a docs artifact")
    for f in files:
        if f.suffix == ".parquet":
            from ..data.docs import read_docs

            tbl = read_docs(f, columns=["id", "text"]) if _has_id(f) else read_docs(f, columns=["text"])
            texts = tbl.column("text").to_pylist()
            ids = tbl.column("id").to_pylist() if "id" in tbl.column_names else [f"{f.name}/{i}" for i in range(len(texts))]
            for i, t in zip(ids, texts, strict=True):
                _add_doc(task, str(i), t)
        elif f.suffix == ".jsonl":
            for n, obj in _read_jsonl(f, task):
                _add_doc(task, str(obj.get("id", f"{f.name}/{n}")), obj.get("text"))
        else:
            try:
                _add_doc(task, f.name, f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise UsageError(f"{f}: not UTF-8 text; give UTF-8 text files") from e
    return task


def _has_id(f: Path) -> bool:
    import pyarrow.parquet as pq

    return "id" in pq.read_schema(f).names


def _add_doc(task: Task, doc_id: str, text: Any) -> None:
    if not isinstance(text, str):
        task.skip("missing_field")
    elif not text:
        task.skip("empty_text")
    else:
        task.items.append(DocItem(doc_id, text))


# -- generic JSONL spec --------------------------------------------------------------------------
SPEC_KEYS = {"name", "data", "template", "choices", "gold", "gold_kind", "delimiter", "description"}


def _check_template(path: Path, template: object) -> None:
    """A spec's template is a str.format string over the record's fields: plain names only."""
    if not isinstance(template, str):
        raise UsageError(f"{path}: 'template' must be a string such as \"Question: {{question}}\\nAnswer:\"")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UsageError(f"{path}: template is not a format string ({e}); write a literal brace as {{{{ or }}}}") from e
    for f in fields:
        if not f.isidentifier():
            raise UsageError(f"{path}: template field {{{f}}}: use plain field names of the records, e.g. {{question}}")


def load_jsonl_spec(path: Path) -> Task:
    """A multiple-choice task described by a spec file (.json or .toml)::

        {"name": "arith", "data": "items.jsonl", "template": "Q: {question}\\nA:",
         "choices": "options", "gold": "answer", "gold_kind": "index"}

    ``template`` is filled from each item's fields (``str.format``); ``choices`` names a field
    holding a list of strings, or is a list of field names; ``gold`` names the field holding the
    answer: its index (``gold_kind`` "index", default), letter ("letter") or text ("text").
    ``data`` is relative to the spec file. ``delimiter`` (default " ") joins context and choice.
    """
    try:
        raw = path.read_text(encoding="utf-8")
        spec = tomllib.loads(raw) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid task spec ({e}); write JSON or TOML") from e
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a task spec is an object with data, template, choices and gold")
    missing = [k for k in ("data", "template", "choices", "gold") if k not in spec]
    if missing:
        raise UsageError(f"{path}: task spec lacks {', '.join(missing)}; see llmctl eval --help")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown task spec key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    gold_kind = spec.get("gold_kind", "index")
    if gold_kind not in ("index", "letter", "text"):
        raise UsageError(f"{path}: gold_kind {gold_kind!r}; choose index, letter or text")
    _check_template(path, spec["template"])
    data = (path.parent / spec["data"]).resolve()
    if not data.is_file():
        raise UsageError(f"{path}: data file {data} not found; 'data' is relative to the spec")
    name = str(spec.get("name", path.stem))
    task = Task(name, "mc", str(path), [], delimiter=str(spec.get("delimiter", " ")))
    desc = str(spec.get("description", ""))
    ch = spec["choices"]
    for n, obj in _read_jsonl(data, task):
        try:
            ctx = spec["template"].format(**obj)
        except (KeyError, IndexError):
            task.skip("missing_field")
            continue
        except (ValueError, TypeError):  # a format spec the value does not take, e.g. {n:d} on text
            task.skip("bad_field")
            continue
        if isinstance(ch, str):
            choices = obj.get(ch)
        else:
            choices = [obj.get(k) for k in ch]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            task.skip("missing_field" if not isinstance(choices, list) or None in choices else "bad_choices")
            continue
        g = obj.get(spec["gold"])
        gold = None
        if gold_kind == "index" and isinstance(g, int | str) and str(g).lstrip("-").isdigit():
            gold = int(g)
        elif gold_kind == "letter" and isinstance(g, str) and len(g.strip()) == 1 and g.strip().upper() in LETTERS:
            gold = LETTERS.index(g.strip().upper())
        elif gold_kind == "text" and isinstance(g, str):
            gold = choices.index(g) if g in choices else len(choices)
        if g is None:
            task.skip("missing_field")
            continue
        if gold is None or not 0 <= gold < len(choices):
            task.skip("gold_out_of_range")
            continue
        task.items.append(MCItem(f"{name}/{n}", ctx, [str(c) for c in choices], gold, description=desc))
    return task


# -- pairwise judging ------------------------------------------------------------------------------
def load_judge(path: Path) -> Task:
    """AlpacaEval-style ``{"instruction", "output"}`` lines (``output`` is the reference answer the
    model is compared with; ``prompt``/``reference`` are accepted too), as JSON Lines."""
    from .judge import JudgeItem

    task = Task(path.stem, "judge", str(path), [])
    for n, obj in _read_jsonl(path, task):
        q = obj.get("instruction", obj.get("prompt"))
        ref = obj.get("output", obj.get("reference"))
        if not isinstance(q, str) or not q.strip():
            task.skip("no_instruction")
        elif not isinstance(ref, str) or not ref.strip():
            task.skip("no_reference")
        else:
            task.items.append(JudgeItem(str(obj.get("id", n)), q.strip(), ref.strip()))
    return task

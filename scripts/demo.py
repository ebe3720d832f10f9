"""`make demo`: the pipeline end to end on a small real site that every machine with Python has.

Renders a few dozen standard-library modules' documentation to HTML with pydoc, serves it on
127.0.0.1, and runs every stage on it: crawl, extract, filter, dedup, tokenizer training and
encoding, a short pretraining run, sampling, export to transformers, perplexity on the
documentation of modules the site does not contain, and a short supervised fine-tuning run on
questions about the site's functions (answered by their docstrings' first lines), chat, DPO on
pairs that prefer each docstring line over its words in reverse order, a reward model on the same
pairs, PPO against it on the questions, and the PPO model's answers judged against the docstrings
by that reward model (win rate, length-controlled). It prints where each artifact is. Every step is a stage run
whose rerun is a no-op, so running the demo again takes seconds. Later stages append a Step to
STEPS (a name, the artifact it writes, and a function building the llmctl arguments).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from sitegen import STDLIB_MODULES, port_is_free, render_pydoc_site, serve  # noqa: E402

OUT = ROOT / "demo-out"
PREFERRED_PORT = 8731  # a fixed address keeps the crawl's parameters, and so its no-op rerun, stable


@dataclass
class Context:
    out: Path
    base_url: str = ""
    site_moved: bool = False  # the site is served at another address than last time: redo the crawl
    artifacts: dict[str, Path] = field(default_factory=dict)


@dataclass
class Step:
    name: str
    artifact: str  # directory under demo-out/
    args: Callable[[Context], list[str]]  # the llmctl arguments (without --out)
    # the site moved to another port: its URLs, so every artifact downstream, change
    force: Callable[[Context], bool] = lambda ctx: ctx.site_moved


#: documentation of modules the site does not contain: text the model never saw, for perplexity
HELDOUT_MODULES = ("codecs", "hashlib", "io", "itertools", "os.path", "socket", "sqlite3", "zlib")


def write_atomic(path: Path, text: str) -> None:
    """Write a demo input whole or not at all (its existence means it is complete)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def heldout_text(ctx: Context) -> str:
    """Write (once) plain-text pydoc of HELDOUT_MODULES and return its path."""
    path = ctx.out / "heldout.txt"
    if not path.exists():
        import pydoc

        parts = [pydoc.plain(pydoc.render_doc(name)) for name in HELDOUT_MODULES]
        write_atomic(path, "\n\n".join(parts))
    return str(path)


#: questions for the chat step: functions of the site's modules (their docs were pretrained on)
CHAT_QUESTIONS = ("What does json.dumps do?", "What does textwrap.dedent do?", "What does shutil.copyfile do?")


def instruction_data(ctx: Context) -> str:
    """Write (once) instruction pairs about the site's modules and return the path: "What does
    mod.fn do?" answered by the first line of fn's docstring (the data a demo can embed: every
    machine with Python has it)."""
    path = ctx.out / "sft-data.jsonl"
    if not path.exists():
        import importlib
        import inspect
        import json

        rows = []
        for name in STDLIB_MODULES:
            mod = importlib.import_module(name)
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or not inspect.isfunction(obj) or getattr(obj, "__module__", None) != name:
                    continue
                doc = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
                if 10 <= len(doc) <= 300:
                    rows.append({"instruction": f"What does {name}.{attr} do?", "output": doc})
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def preference_data(ctx: Context) -> str:
    """Write (once) preference pairs from the instruction data and return the path: each question's
    docstring line is chosen over the same words in reverse order (rejected), a preference for
    well-formed text that held-out questions can show too."""
    path = ctx.out / "dpo-data.jsonl"
    if not path.exists():
        import json

        rows = [json.loads(line) for line in open(instruction_data(ctx), encoding="utf-8")]
        pairs = [
            {"prompt": r["instruction"], "chosen": r["output"], "rejected": " ".join(reversed(r["output"].split()))}
            for r in rows
            if len(r["output"].split()) > 2
        ]
        write_atomic(path, "".join(json.dumps(p) + "\n" for p in pairs))
    return str(path)


def chat_prompts(ctx: Context) -> str:
    path = ctx.out / "chat-prompts.txt"
    if not path.exists():
        path.write_text("".join(q + "\n" for q in CHAT_QUESTIONS), encoding="utf-8")
    return str(path)


STEPS: list[Step] = [
    Step(
        "crawl",
        "crawl",
        lambda ctx: [
            "crawl", f"{ctx.base_url}/index.html", "--allow-private", "--delay", "0", "--per-host", "4",
            "--max-pages", "500",
        ],
    ),
    Step(
        "extract",
        "docs",
        lambda ctx: ["extract", str(ctx.artifacts["crawl"]), "--workers", "2"],
    ),
    # API documentation is not web prose: scripts/demo_filter.toml explains the profile it uses.
    Step(
        "filter",
        "filtered",
        lambda ctx: ["filter", str(ctx.artifacts["extract"]), "--config", str(ROOT / "scripts" / "demo_filter.toml")],
    ),
    Step("dedup", "dedup", lambda ctx: ["dedup", str(ctx.artifacts["filter"])]),
    Step(
        "tokenize train",
        "tokenizer",
        lambda ctx: ["tokenize", "train", str(ctx.artifacts["dedup"]), "--vocab-size", "2048"],
    ),
    Step(
        "tokenize encode",
        "tokens",
        lambda ctx: [
            "tokenize", "encode", str(ctx.artifacts["dedup"]), "--tokenizer", str(ctx.artifacts["tokenize train"]),
            "--val-fraction", "0.1",
        ],
    ),
    Step(
        "pretrain",
        "run",
        lambda ctx: [
            "pretrain", str(ctx.artifacts["tokenize encode"]), "--preset", "micro", "--seq-len", "256",
            "--micro-batch", "16", "--max-steps", "300", "--time-budget", "120", "--eval-every", "100",
            "--warmup-steps", "30",
        ],
    ),
    Step(
        "generate",
        "samples.jsonl",
        lambda ctx: _prompts(ctx) + ["--max-new-tokens", "48", "--temperature", "0.8", "--seed", "1"],
    ),
    Step("export", "hf", lambda ctx: ["export", str(ctx.artifacts["pretrain"]), "--format", "hf"]),
    Step(
        "eval",
        "eval",
        lambda ctx: ["eval", str(ctx.artifacts["pretrain"]), "--task", f"ppl:{heldout_text(ctx)}"],
    ),
    Step(
        "sft",
        "sft",
        lambda ctx: [
            "sft", str(ctx.artifacts["pretrain"]), instruction_data(ctx), "--epochs", "30", "--lr", "1e-3",
            "--micro-batch", "16", "--time-budget", "90", "--eval-every", "25",
        ],
    ),
    Step(
        "chat",
        "chat.jsonl",
        lambda ctx: [
            "generate", str(ctx.artifacts["sft"]), "--chat", "--prompts", chat_prompts(ctx), "--max-new-tokens", "48",
            "--temperature", "0",
        ],
    ),
    Step(
        "dpo",
        "dpo",
        lambda ctx: [
            "dpo", str(ctx.artifacts["sft"]), preference_data(ctx), "--epochs", "2", "--lr", "1e-4",
            "--micro-batch", "8", "--time-budget", "60",
        ],
    ),
    Step(
        "reward",
        "reward",
        lambda ctx: [
            "reward", str(ctx.artifacts["sft"]), preference_data(ctx), "--epochs", "2", "--lr", "1e-4",
            "--micro-batch", "8", "--time-budget", "60",
        ],
    ),
    Step(
        "ppo",
        "ppo",
        lambda ctx: [
            "ppo", str(ctx.artifacts["sft"]), instruction_data(ctx), "--reward", str(ctx.artifacts["reward"]),
            "--epochs", "1", "--rollout-batch", "16", "--micro-batch", "8", "--ppo-epochs", "2",
            "--max-new-tokens", "32", "--lr", "2e-5", "--time-budget", "90",
        ],
    ),
    # the PPO model's answers against the docstring lines themselves, judged by the reward model
    Step(
        "judge",
        "eval-judge",
        lambda ctx: [
            "eval", str(ctx.artifacts["ppo"]), "--task", f"judge:{instruction_data(ctx)}", "--judge",
            str(ctx.artifacts["reward"]), "--chat", "--reply-tokens", "48", "--limit", "48",
        ],
    ),
]


def _prompts(ctx: Context) -> list[str]:
    path = ctx.out / "prompts.txt"
    if not path.exists():
        path.write_text("class \nReturn the \ndef \n", encoding="utf-8")
    return ["generate", str(ctx.artifacts["pretrain"]), "--prompts", str(path)]


def llmctl(*args: str) -> None:
    cmd = [sys.executable, "-m", "llmctl", *args]
    print("$ llmctl " + " ".join(args), flush=True)
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"demo: `llmctl {args[0]}` failed with exit code {res.returncode}")


def main() -> None:
    t0 = time.time()
    site = OUT / "site"
    n = render_pydoc_site(site)
    print(f"site: {site} ({'rendered ' + str(n) + ' pages' if n else 'already rendered'})")
    port_file = OUT / "site-port"
    last_port = int(port_file.read_text()) if port_file.exists() else PREFERRED_PORT
    port = last_port if port_is_free(last_port) else 0
    with serve(site, port) as base_url:
        ctx = Context(out=OUT, base_url=base_url)
        used = int(base_url.rsplit(":", 1)[1])
        ctx.site_moved = port_file.exists() and used != last_port
        port_file.write_text(str(used))
        print(f"serving the site at {base_url}/")
        for step in STEPS:
            dest = OUT / step.artifact
            print(f"\n== {step.name} → {dest}")
            if dest.is_file() and not step.force(ctx):  # a file output (samples) is complete once there
                print(f"{dest}: already written")
                ctx.artifacts[step.name] = dest
                continue
            llmctl(*step.args(ctx), "--out", str(dest), *(["--force"] if step.force(ctx) else []))
            ctx.artifacts[step.name] = dest
    print(f"\ndemo finished in {time.time() - t0:.1f} s. Artifacts:")
    for name, path in ctx.artifacts.items():
        what = "" if path.is_file() else "/  (manifest.json describes it)"
        print(f"  {name:<16} {path.relative_to(ROOT)}{what}")


if __name__ == "__main__":
    main()

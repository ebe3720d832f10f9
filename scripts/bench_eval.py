"""Benchmark: `llmctl eval` vs lm-evaluation-harness, MMLU dev (285 items, 0-shot, likelihood), CPU.

Both score the same exported transformers directory on the same prompts (lm-eval's mmlu format:
subject header, question, lettered options, "Answer:", choices " A".." D"); the script checks that
they agree on accuracy and reports items/s for each and the ratio (target ≥ 2×), by wall time and
by the CPU seconds of each process (steadier on a shared machine). Both run fp32 with the same
torch thread count, in interleaved rounds (ours, then lm-eval at each batch size; ours once more
at the end); the best run of each is kept and lm-eval's best batch size named. lm-eval's model
loading is outside its timing; ours is inside (``run_eval`` loads the model), which only counts
against us. lm-eval runs from its own venv (``--lmeval-venv``, default ../peers/lmeval-venv) with
a local task YAML, offline.

    .venv/bin/python scripts/bench_eval.py [--model EXPORTED_HF_DIR] [--threads 2] [--lmeval-batch-size 1 16 32 64] [--rounds 2]

Without --model a small model is built: a BPE tokenizer trained on tinyshakespeare and a 4-layer,
d=256 Llama with random weights (speed does not depend on the weights' values), exported with
`llmctl export`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

LMEVAL_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained=sys.argv[1], dtype="float32", device="cpu", batch_size=int(sys.argv[3]), add_bos_token=False)
tm = TaskManager(include_path=sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
res = simple_evaluate(model=lm, tasks=["bench_mmlu"], task_manager=tm, num_fewshot=0)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
r = res["results"]["bench_mmlu"]
print(json.dumps({"seconds": dt, "cpu": cpu, "acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}))
"""

YAML = """task: bench_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The following are multiple choice questions (with answers) about {{{{subject}}}}.\\n\\n{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def build_model(work: Path) -> Path:
    import torch

    from llmctl.artifacts import StageRun, write_json_atomic
    from llmctl.model import ModelConfig, Transformer
    from llmctl.model.hf import ExportConfig, export_hf
    from llmctl.model.io import save_weights
    from llmctl.tokenizer import TrainConfig, train

    corpus = SHARED / "corpora" / "tinyshakespeare.txt"
    train(TrainConfig(docs=[str(corpus)], out=str(work / "tok"), vocab_size=4000, heldout_fraction=0.0, threads=1))
    spm = work / "tok" / "tokenizer.model"
    from llmctl.tokenizer import Tokenizer

    cfg = ModelConfig(vocab_size=Tokenizer(spm).vocab_size, n_layer=4, n_head=4, d_model=256, max_seq_len=2048)
    torch.manual_seed(0)
    model = Transformer(cfg)
    run = StageRun.open(work / "run", "pretrain", {"bench": True})
    write_json_atomic(run.work / "config.json", {"model": cfg.to_dict()})
    save_weights(model, run.work / "model.safetensors")
    shutil.copyfile(spm, run.work / "tokenizer.model")
    run.finish({})
    export_hf(ExportConfig(run=work / "run", out=work / "hf"))
    return work / "hf"


def mmlu_jsonl(out: Path) -> int:
    """The MMLU dev CSVs as JSONL rows with the fields lm-eval's YAML reads (same prompts as ours)."""
    from llmctl.eval.tasks import load_mmlu

    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for p in sorted((SHARED / "eval" / "mmlu-dev").glob("*.csv")):
            subject = p.stem.removesuffix("_dev").replace("_", " ")
            for row in csv.reader(open(p, encoding="utf-8", newline="")):
                q, a, b, c, d, ans = row
                f.write(json.dumps({"subject": subject, "question": q.strip(), "A": a.strip(), "B": b.strip(),
                                    "C": c.strip(), "D": d.strip(), "label": "ABCD".index(ans.strip())}) + "\n")
                n += 1
    assert n == len(load_mmlu(SHARED / "eval" / "mmlu-dev").items)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="exported transformers directory (default: build a small one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lmeval-venv", type=Path, default=ROOT.parent / "peers" / "lmeval-venv")
    ap.add_argument("--lmeval-batch-size", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--batch-tokens", type=int, default=0, help="llmctl eval --batch-tokens (default: its own)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (ours, then lm-eval at each batch size)")
    args = ap.parse_args()
    if not (SHARED / "eval" / "mmlu-dev").is_dir():
        sys.exit(f"{SHARED}/eval/mmlu-dev not found")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        hf = args.model or build_model(work)
        n = mmlu_jsonl(work / "mmlu.jsonl")
        (work / "yaml").mkdir()
        (work / "yaml" / "bench_mmlu.yaml").write_text(YAML.format(data=work / "mmlu.jsonl"))

        from llmctl.eval.runner import EvalConfig, run_eval
        from llmctl.model.hf import load_any

        load_any(hf)  # warm the file cache like lm-eval's model load below

        def ours(k: int) -> tuple[float, float, dict]:
            t0, c0 = time.perf_counter(), time.process_time()
            run_eval(EvalConfig(model=str(hf), tasks=[f"mmlu:{SHARED / 'eval' / 'mmlu-dev'}"],
                                out=str(work / f"ours{k}"), protocol="likelihood", bos=False,  # as add_bos_token=False
                                **({"batch_tokens": args.batch_tokens} if args.batch_tokens else {})))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            res = json.loads((work / f"ours{k}" / "results.json").read_text())
            acc = next(r for r in res["results"] if r["metric"] == "acc")
            assert acc["n"] == n, f"llmctl scored {acc['n']} of {n} items (skips: {acc['settings']['skipped']})"
            print(f"llmctl eval (run {k}) : {n} items in {wall:6.2f} s = {n / wall:7.1f} items/s, "
                  f"{cpu:6.2f} CPU s   acc {acc['value']:.4f}", flush=True)
            return wall, cpu, acc

        py = args.lmeval_venv / "bin" / "python"
        if not py.is_file():
            print(f"lm-eval venv absent ({args.lmeval_venv}); no comparison")
            ours(1)
            return
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(work / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}

        def theirs(bs: int, ref_acc: float) -> dict:
            p = subprocess.run([str(py), "-c", LMEVAL_SCRIPT, str(hf), str(work / "yaml"), str(bs), str(args.threads)],
                               capture_output=True, text=True, env=env)
            if p.returncode:
                sys.exit(p.stderr[-3000:])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            agree = "agree" if abs(r["acc"] - ref_acc) < 1e-4 else "DISAGREE"
            print(f"lm-eval (bs {bs:>3})   : {n} items in {r['seconds']:6.2f} s = {n / r['seconds']:7.1f} items/s, "
                  f"{r['cpu']:6.2f} CPU s   acc {r['acc']:.4f} ({agree})", flush=True)
            return r

        print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
        runs, their = [], {bs: [] for bs in args.lmeval_batch_size}
        for k in range(1, args.rounds + 1):  # interleaved: each round runs ours, then lm-eval at each batch size
            runs.append(ours(k))
            for bs in args.lmeval_batch_size:
                their[bs].append(theirs(bs, runs[0][2]["value"]))
        runs.append(ours(args.rounds + 1))
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
        wall, cpu = min(x[0] for x in runs), min(x[1] for x in runs)
        best_bs = min(their, key=lambda bs: min(r["seconds"] for r in their[bs]))
        print(f"best of {len(runs)} llmctl runs: {n / wall:.1f} items/s ({wall:.2f} s, {cpu:.2f} CPU s)")
        for bs, rs in their.items():
            tw, tc = min(r["seconds"] for r in rs), min(r["cpu"] for r in rs)
            best = " (lm-eval's best)" if bs == best_bs else ""
            print(f"llmctl / lm-eval bs {bs:>3} (best of {len(rs)}: {n / tw:.1f} items/s): {tw / wall:5.2f}x by wall time, "
                  f"{tc / cpu:5.2f}x by CPU seconds{best}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

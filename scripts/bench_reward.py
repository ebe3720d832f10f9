"""Reward-model training speed, side by side with TRL's RewardTrainer, in one run.

Both start from the same sft run (llmctl's; TRL gets its transformers export with a fresh score
head), train a Bradley–Terry reward model on the same HH-RLHF pairs (the ones whose both sides fit
in --seq-len tokens, so neither truncates nor filters differently), with the same batch of pairs,
learning rate, fp32 and 2 threads, and report the median optimizer-step time after two warm-up
steps: pairs/s and real (unpadded) tokens/s.

Peer set-up (outside the repository):
    python3 -m venv ../peers/trl-venv && ../peers/trl-venv/bin/pip install torch==2.13.0 trl

Run: .venv/bin/python scripts/bench_reward.py [--sft demo-out/sft] [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / ".." / "shared" / "data" / "preference" / "hh-rlhf-harmless-test.jsonl.gz"

TRL_DRIVER = r'''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

hf_dir, data, steps, batch, max_len, lr, out = sys.argv[1:8]
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(hf_dir)
model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32)
model.config.pad_token_id = tok.pad_token_id
rows = [json.loads(line) for line in open(data, encoding="utf-8")]
ds = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
times, tokens = [], []

class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)
        tokens.append(state.num_input_tokens_seen)

args = RewardConfig(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps), learning_rate=float(lr),
                    logging_steps=int(steps), report_to=[], use_cpu=True, max_length=int(max_len), save_strategy="no",
                    bf16=False, dataloader_num_workers=0, seed=0, include_num_input_tokens_seen="non_padding")
tr = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
tr.train()
print("RESULT " + json.dumps({"times": times, "tokens": tokens, "pairs": len(tr.train_dataset)}))
'''


def fitting_pairs(sft: Path, seq_len: int, dest: Path) -> int:
    """HH records whose chosen and rejected conversations both fit in ``seq_len`` tokens (llmctl's
    chat rendering, which the export's chat template reproduces), as JSON Lines."""
    from llmctl.chat import to_preference
    from llmctl.tokenizer import load_tokenizer
    from llmctl.train.preference import encode_pairs

    tok = load_tokenizer(sft / "tokenizer.model")
    keep = []
    for line in gzip.open(HH, "rt", encoding="utf-8"):
        rec = json.loads(line)
        try:
            pref = to_preference(rec)
        except ValueError:
            continue
        bad: dict[str, int] = {}
        pairs, cut = encode_pairs(tok, [pref], seq_len, bad)
        if pairs and not cut:
            keep.append(rec)
    dest.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    return len(keep)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", type=Path, default=ROOT / "demo-out" / "sft")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--trl-python", default=str(ROOT / ".." / "peers" / "trl-venv" / "bin" / "python"))
    a = ap.parse_args()
    if not (a.sft / "manifest.json").is_file():
        sys.exit(f"{a.sft}: no finished sft run; run `make demo` first or pass --sft RUN")
    if not Path(a.trl_python).exists():
        sys.exit(f"{a.trl_python}: no TRL environment; see this script's docstring")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LLMCTL_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        n = fitting_pairs(a.sft, a.seq_len, t / "pairs.jsonl")
        llmctl = [sys.executable, "-m", "llmctl"]
        subprocess.run([*llmctl, "export", str(a.sft), "--format", "hf", "--out", str(t / "hf")], check=True, env=env, capture_output=True)
        subprocess.run([*llmctl, "reward", str(a.sft), str(t / "pairs.jsonl"), "--out", str(t / "ours"), "--max-steps", str(a.steps),
                        "--micro-batch", str(a.batch), "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--warmup-steps", "0",
                        "--val-fraction", "0", "--precision", "fp32", "--log-every", "1", "--device", "cpu"],
                       check=True, env=env, capture_output=True)
        recs = [json.loads(x) for x in (t / "ours" / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "loss" in r]
        step_tokens = [b["tokens"] - a_["tokens"] for a_, b in zip([{"tokens": 0}, *recs], recs, strict=False)]
        step_s = [k / r["tokens_per_s"] for k, r in zip(step_tokens, recs, strict=True)]
        ours_tok, ours_t = step_tokens[2:], step_s[2:]
        (t / "trl_driver.py").write_text(TRL_DRIVER, encoding="utf-8")
        p = subprocess.run([a.trl_python, str(t / "trl_driver.py"), str(t / "hf"), str(t / "pairs.jsonl"), str(a.steps), str(a.batch),
                            str(a.seq_len), str(a.lr), str(t / "trl-out")], env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        res = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
        trl_tok = [b - a_ for a_, b in zip([0, *res["tokens"]], res["tokens"], strict=False)][2:]
        trl_t = res["times"][2:]
    ours_step, trl_step = median(ours_t), median(trl_t)
    ours_tps = sum(ours_tok) / sum(ours_t)
    trl_tps = sum(trl_tok) / sum(trl_t)
    print(f"{n} HH pairs fit in {a.seq_len} tokens (TRL kept {res['pairs']}); {a.steps} steps of {a.batch} pairs, fp32, 2 threads")
    print(f"{'':10} {'step ms':>9} {'pairs/s':>9} {'tokens/s':>10}")
    print(f"{'llmctl':10} {ours_step * 1e3:9.1f} {a.batch / ours_step:9.1f} {ours_tps:10,.0f}")
    print(f"{'TRL':10} {trl_step * 1e3:9.1f} {a.batch / trl_step:9.1f} {trl_tps:10,.0f}")
    print(f"llmctl / TRL: {trl_step / ours_step:.2f}x pairs/s, {ours_tps / trl_tps:.2f}x tokens/s")


if __name__ == "__main__":
    main()

"""Post-training speed (reward, dpo, sft) side by side with TRL's trainers, in one run.

Both sides start from the same sft run: llmctl's own, and TRL its transformers export (a fresh
score head for the reward model). Both train on the same conversations, rendered by the same
chat format (the export's chat template reproduces llmctl's), with the same batch, learning rate,
fp32 and 2 threads, and report the median optimizer-step time after two warm-up steps, plus real
(unpadded) tokens/s.

* reward: Bradley–Terry on HH-RLHF pairs (TRL ``RewardTrainer``);
* dpo: sigmoid DPO, β 0.1, reference = the starting weights, run every step (TRL ``DPOTrainer``);
* sft: loss on the reply only, examples packed into rows of --seq-len (TRL ``SFTTrainer`` with
  ``packing=True`` and prompt–completion records, so its loss is on the completion only too).

Data: the HH-RLHF pairs (reward, dpo) and Code Alpaca conversations (sft) under ../shared/data
whose tokens fit in --seq-len, so neither side truncates or filters differently.

Peer set-up (outside the repository):
    python3 -m venv ../peers/trl-venv && ../peers/trl-venv/bin/pip install torch==2.13.0 trl

Run: .venv/bin/python scripts/bench_posttrain.py [--stages reward dpo sft] [--sft demo-out/sft] [--steps 30]
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
DATA = ROOT / ".." / "shared" / "data"
HH = DATA / "preference" / "hh-rlhf-harmless-test.jsonl.gz"
ALPACA = DATA / "sft" / "code-alpaca-2k.json"

TRL_DRIVER = r'''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

stage, hf_dir, data, steps, batch, max_len, lr, out = sys.argv[1:9]
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(hf_dir)
rows = [json.loads(line) for line in open(data, encoding="utf-8")]
times, tokens = [], []

class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)
        tokens.append(state.num_input_tokens_seen)

common = dict(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps), learning_rate=float(lr),
              logging_steps=int(steps), report_to=[], use_cpu=True, max_length=int(max_len), save_strategy="no",
              bf16=False, dataloader_num_workers=0, seed=0, include_num_input_tokens_seen="non_padding",
              warmup_steps=0, weight_decay=0.0)
if stage == "reward":
    from trl import RewardConfig as Config, RewardTrainer as Trainer
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    kw = {}
elif stage == "dpo":
    from trl import DPOConfig as Config, DPOTrainer as Trainer
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    kw = {"beta": 0.1}
else:
    from trl import SFTConfig as Config, SFTTrainer as Trainer
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    kw = {"packing": True}
tr = Trainer(model=model, args=Config(**common, **kw), train_dataset=Dataset.from_list(rows), processing_class=tok,
             callbacks=[Timer()])
tr.train()
print("RESULT " + json.dumps({"times": times, "tokens": tokens, "rows": len(tr.train_dataset)}))
'''


def fitting_pairs(tok, seq_len: int) -> list[dict]:
    """HH records whose chosen and rejected conversations both fit in ``seq_len`` tokens, as
    ``{"prompt": messages, "chosen": [reply], "rejected": [reply]}``: a layout both llmctl and TRL
    read as conversations, so both render them with the same chat format."""
    from llmctl.chat import BadRecord, to_preference
    from llmctl.train.preference import encode_pairs

    keep = []
    for line in gzip.open(HH, "rt", encoding="utf-8"):
        try:
            prompt, chosen, rejected = to_preference(json.loads(line))
        except BadRecord:
            continue
        pairs, cut = encode_pairs(tok, [(prompt, chosen, rejected)], seq_len, {})
        if pairs and not cut:
            keep.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]})
    return keep


def fitting_chats(tok, seq_len: int) -> tuple[list[dict], list[dict]]:
    """Code Alpaca's conversations that fit in ``seq_len`` tokens: llmctl's records (messages) and
    TRL's (prompt–completion, so its loss is on the reply only, like llmctl's)."""
    from llmctl.chat import BadRecord, encode_chat, to_messages

    ours, trl = [], []
    for rec in json.loads(ALPACA.read_text(encoding="utf-8")):
        try:
            for msgs in to_messages(rec):
                if len(encode_chat(tok, msgs).ids) <= seq_len:
                    ours.append({"messages": msgs})
                    trl.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        except BadRecord:
            continue
    return ours, trl


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bench(stage: str, a, tmp: Path, env: dict) -> dict:
    from llmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(a.sft / "tokenizer.model")
    if stage == "sft":
        ours_rows, trl_rows = fitting_chats(tok, a.seq_len)
        extra = ["--packing"]
    else:
        ours_rows = trl_rows = fitting_pairs(tok, a.seq_len)
        extra = ["--beta", "0.1"] if stage == "dpo" else []
    ours_data = write_jsonl(tmp / f"{stage}-ours.jsonl", ours_rows)
    trl_data = write_jsonl(tmp / f"{stage}-trl.jsonl", trl_rows)
    out = tmp / f"{stage}-ours"
    subprocess.run([sys.executable, "-m", "llmctl", stage, str(a.sft), str(ours_data), "--out", str(out),
                    "--max-steps", str(a.steps), "--micro-batch", str(a.batch), "--seq-len", str(a.seq_len),
                    "--lr", str(a.lr), "--warmup-steps", "0", "--val-fraction", "0", "--precision", "fp32",
                    "--log-every", "1", "--device", "cpu", *extra], check=True, env=env, capture_output=True)
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    step_tokens = [b["tokens"] - a_["tokens"] for a_, b in zip([{"tokens": 0}, *recs], recs, strict=False)]
    step_s = [k / r["tokens_per_s"] for k, r in zip(step_tokens, recs, strict=True)]
    p = subprocess.run([a.trl_python, str(tmp / "trl_driver.py"), stage, str(tmp / "hf"), str(trl_data), str(a.steps),
                        str(a.batch), str(a.seq_len), str(a.lr), str(tmp / f"{stage}-trl")],
                       env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"TRL {stage} failed:\n{p.stderr[-3000:]}")
    res = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
    trl_tok = [b - a_ for a_, b in zip([0, *res["tokens"]], res["tokens"], strict=False)][2:]
    ours_tok, ours_t, trl_t = step_tokens[2:], step_s[2:], res["times"][2:]
    return {"stage": stage, "records": len(ours_rows), "trl_rows": res["rows"],
            "ours_step_s": median(ours_t), "trl_step_s": median(trl_t),
            "ours_tokens_per_s": sum(ours_tok) / sum(ours_t), "trl_tokens_per_s": sum(trl_tok) / sum(trl_t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", choices=["reward", "dpo", "sft"], default=["reward", "dpo", "sft"])
    ap.add_argument("--sft", type=Path, default=ROOT / "demo-out" / "sft")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="pairs (reward, dpo) or rows (sft) per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--trl-python", default=str(ROOT / ".." / "peers" / "trl-venv" / "bin" / "python"))
    a = ap.parse_args()
    if not (a.sft / "manifest.json").is_file():
        sys.exit(f"{a.sft}: no finished sft run; run `make demo` first or pass --sft RUN")
    if not Path(a.trl_python).exists():
        sys.exit(f"{a.trl_python}: no TRL environment; see this script's docstring")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LLMCTL_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "trl_driver.py").write_text(TRL_DRIVER, encoding="utf-8")
        subprocess.run([sys.executable, "-m", "llmctl", "export", str(a.sft), "--format", "hf", "--out", str(tmp / "hf")],
                       check=True, env=env, capture_output=True)
        for stage in a.stages:
            r = bench(stage, a, tmp, env)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{a.steps} steps of {a.batch} pairs or rows, seq-len {a.seq_len}, fp32, 2 threads; median step after 2 warm-up")
    print(f"{'stage':7} {'records':>8} {'ours ms':>8} {'TRL ms':>8} {'ours tok/s':>11} {'TRL tok/s':>10} {'steps/s':>8} {'tok/s':>6}")
    for r in rows:
        print(f"{r['stage']:7} {r['records']:8,} {r['ours_step_s'] * 1e3:8.1f} {r['trl_step_s'] * 1e3:8.1f} "
              f"{r['ours_tokens_per_s']:11,.0f} {r['trl_tokens_per_s']:10,.0f} "
              f"{r['trl_step_s'] / r['ours_step_s']:7.2f}x {r['ours_tokens_per_s'] / r['trl_tokens_per_s']:5.2f}x")


if __name__ == "__main__":
    main()

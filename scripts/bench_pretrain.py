#!/usr/bin/env python
"""Benchmark llmctl pretrain on CPU: (a) throughput by shape/precision/compile, (b) side by side with nanoGPT.

(a) ``--part shapes``: for a few model shapes, ``llmctl pretrain`` runs for a few steps with
    fp32 vs bf16 and compile off vs on; reports median tokens/s, MFU (against this CPU's measured
    matmul peak at that precision) and the process's peak RSS, from each run's manifest.

(b) ``--part side``: on tinyshakespeare (first 90% of the bytes train, last 10% val, exactly
    nanoGPT's shakespeare_char split), nanoGPT's CPU recipe (train.py
    config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --block_size=64
    --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
    --dropout=0.0) against ``llmctl tokenize`` + ``llmctl pretrain --time-budget`` on the same
    bytes. Both are scored the same way at the end: the FULL val split in disjoint windows of
    their context, summed nats / ln 2 / val bytes (nanoGPT's checkpoint is scored with its own
    model code, imported from the peer checkout). Ours runs once per seed (``--seeds``, default
    3): at this size the final bpb moves up to ±0.05 from seed to seed, so the mean is quoted.
    Tokens/s is counted the same way for both: the median over logged iterations of tokens per
    iteration / seconds per iteration. The speed comparison "at nanoGPT's exact shape" runs our
    trainer with nanoGPT's dims, batch and context (SwiGLU width parameter-matched to its MLP;
    eager, and with ``--shape-compile`` compiled, and with ``--shape-ddp`` as ``torchrun`` data
    parallelism with one single-threaded process per core), and reports both models' FLOPs/token
    and MFU by one formula against this CPU's measured fp32 peak. Ours runs at ``--precision``
    (default auto: bf16 autocast where this CPU's bf16 matmuls are ≥ 1.5× its fp32 ones, i.e.
    AVX-512-BF16 or AMX, else fp32); nanoGPT always trains in fp32 on a CPU (its autocast context
    is CUDA-only). Each run's manifest records the precision it used.

nanoGPT must be checked out (outside the repo) with its shakespeare_char data prepared:
``--nanogpt /work/peers/nanoGPT``. Nothing of it is imported into llmctl. Its prepare.py downloads
input.txt only when absent, so on a machine without internet copy
../shared/data/corpora/tinyshakespeare.txt to data/shakespeare_char/input.txt first (prepare.py
still imports ``requests``: install it in the interpreter that runs prepare.py).

Example:
    .venv/bin/python scripts/bench_pretrain.py --part all --json /tmp/bench_pretrain.json
    .venv/bin/python scripts/bench_pretrain.py --part side --shape-compile --shape-ddp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (ROOT / ".." / "shared" / "data" / "corpora" / "tinyshakespeare.txt").resolve()
NANO_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--block_size=64",
    "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def sh(cmd: list, env: dict | None = None, cwd: Path | None = None, timeout: float = 3600) -> tuple[int, str, float]:
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **(env or {})},
                       cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t


def llmctl(*args, env=None, timeout=3600):
    code, out, wall = sh([sys.executable, "-m", "llmctl", *args], env={"LLMCTL_PROGRESS": "0", **(env or {})},
                         timeout=timeout)
    if code != 0:
        raise SystemExit(f"llmctl {' '.join(map(str, args[:3]))} failed:\n{out[-3000:]}")
    return out, wall


def run_stats(run: Path) -> dict:
    """The stats of a finished llmctl run (its manifest)."""
    return json.loads((run / "manifest.json").read_text())["stats"]


def load_avg() -> float:
    return os.getloadavg()[0]


# -- (a) shapes -----------------------------------------------------------------------------------
SHAPES = [
    ("nanoGPT-shape L4 d128 T64 B12", ["--n-layer", "4", "--n-head", "4", "--d-model", "128", "--seq-len", "64",
                                       "--micro-batch", "12"]),
    ("micro L4 d128 T256 B8", ["--preset", "micro", "--seq-len", "256", "--micro-batch", "8"]),
    ("tiny L6 d192 T256 B8", ["--preset", "tiny", "--seq-len", "256", "--micro-batch", "8"]),
]


def part_shapes(tokens: Path, work: Path, steps: int, bf16_steps: int) -> list[dict]:
    """fp32 at every shape; bf16 at the first shape only when this CPU's bf16 matmul is slow (emulated)."""
    from llmctl.train.precision import cpu_peak

    slow_bf16 = cpu_peak("bf16") < cpu_peak("fp32")
    if bf16_steps is None:  # emulated bf16 (AVX2) runs ~20x slower per step: a few steps show it
        bf16_steps = 3 if slow_bf16 else steps
    rows = []
    for si, (name, dims) in enumerate(SHAPES):
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and slow_bf16 and si > 0:
                continue
            for comp in (False, True):
                out = work / f"shape-{len(rows)}"
                args = ["pretrain", tokens, "--out", out, *dims, "--precision", precision, "--device", "cpu",
                        "--max-steps", steps if precision == "fp32" else bf16_steps, "--log-every", "2",
                        "--warmup-steps", "5",
                        "--compile" if comp else "--no-compile"]
                _, wall = llmctl(*args)
                s = run_stats(out)
                row = {"shape": name, "precision": precision, "compile": comp, "steps": s["steps"],
                       "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "peak_rss_mib": s["peak_memory_bytes"] / 2**20,
                       "wall_s": round(wall, 1), "peak_flops": s["peak_flops"], "load_avg": load_avg()}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    return rows


# -- (b) side by side -----------------------------------------------------------------------------
def split_corpus(work: Path) -> tuple[Path, Path, int]:
    data = CORPUS.read_bytes()
    n = len(data)
    cut = int(n * 0.9)  # nanoGPT's prepare.py: data[:int(n*0.9)] (characters; the file is ASCII)
    assert data.isascii(), "tinyshakespeare is ASCII, so characters = bytes"
    train, val = work / "train.txt", work / "val.txt"
    train.write_bytes(data[:cut])
    val.write_bytes(data[cut:])
    return train, val, n - cut


def run_nanogpt(nano: Path, threads: int, out_dir: Path) -> dict:
    if not (nano / "data" / "shakespeare_char" / "val.bin").is_file():
        raise SystemExit(f"{nano}: prepare data/shakespeare_char first (its prepare.py)")
    code, out, wall = sh([sys.executable, "train.py", *NANO_ARGS, f"--out_dir={out_dir}"], cwd=nano,
                         env={"OMP_NUM_THREADS": str(threads)}, timeout=7200)
    if code != 0:
        raise SystemExit(f"nanoGPT failed:\n{out[-3000:]}")
    iters = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)]
    evals = [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
             for m in re.finditer(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)]
    # per-iteration times printed at log iterations; the eval iterations include the eval: leave them out
    eval_steps = {s for s, _, _ in evals}
    dts = [dt for i, dt in iters if i not in eval_steps and i > 0]
    tokens_per_iter = 12 * 64
    med = statistics.median(dts) / 1000
    return {"wall_s": round(wall, 1), "final_est_val_loss": evals[-1][2], "iters": iters[-1][0],
            "tokens_per_s": round(tokens_per_iter / med, 1), "ckpt": str(out_dir / "ckpt.pt")}


def score_nanogpt(nano: Path, ckpt: Path, val_bytes: int, threads: int) -> dict:
    """Full val split in disjoint windows of 64 with nanoGPT's own model code: summed nats → bpb."""
    code = f"""
import sys, math, numpy as np, torch
sys.path.insert(0, {str(nano)!r})
from model import GPT, GPTConfig
torch.set_num_threads({threads})
ck = torch.load({str(ckpt)!r}, map_location='cpu', weights_only=False)
m = GPT(GPTConfig(**ck['model_args']))
sd = {{k.removeprefix('_orig_mod.'): v for k, v in ck['model'].items()}}
m.load_state_dict(sd); m.eval()
d = np.fromfile({str(nano / 'data' / 'shakespeare_char' / 'val.bin')!r}, dtype=np.uint16).astype(np.int64)
T = ck['model_args']['block_size']; nats = 0.0; n = 0
with torch.no_grad():
    for s in range(0, len(d) - 1, T * 32):
        xs, ys = [], []
        for w in range(s, min(s + T * 32, len(d) - 1), T):
            L = min(T, len(d) - 1 - w)
            x = torch.from_numpy(d[w:w + L]); y = torch.from_numpy(d[w + 1:w + 1 + L])
            logits, _ = m(x[None], y[None])
            nats += torch.nn.functional.cross_entropy(logits[0].float(), y, reduction='sum').item(); n += L
print(nats, n)
"""
    rc, out, _ = sh([sys.executable, "-c", code], env={"OMP_NUM_THREADS": str(threads)})
    if rc != 0:
        raise SystemExit(f"scoring nanoGPT failed:\n{out[-2000:]}")
    nats, n = (float(x) for x in out.strip().splitlines()[-1].split())
    return {"full_val_loss": round(nats / n, 4), "full_val_bpb": round(nats / math.log(2) / val_bytes, 4),
            "targets": int(n)}


def part_side(args, work: Path) -> dict:
    train, val, val_bytes = split_corpus(work)
    res: dict = {"val_bytes": val_bytes, "threads": args.threads, "load_avg_start": load_avg()}
    env = {"OMP_NUM_THREADS": str(args.threads)}
    tok, tokens = work / "tok", work / "tokens"
    llmctl("tokenize", "train", train, "--vocab-size", args.vocab, "--out", tok, env=env)
    llmctl("tokenize", "encode", train, "--val", val, "--txt-split", "file", "--tokenizer", tok, "--out", tokens,
           env=env)
    m = json.loads((tokens / "manifest.json").read_text())
    assert m["splits"]["val"]["bytes"] == val_bytes, "val split must be exactly nanoGPT's held-out bytes"
    res["bytes_per_token"] = m["bytes_per_token"]

    ng = None
    if args.nanogpt:
        nano = Path(args.nanogpt)
        ng = run_nanogpt(nano, args.threads, work / "nanogpt-out")
        ng.update(score_nanogpt(nano, Path(ng.pop("ckpt")), val_bytes, args.threads))
        ng["command"] = "python train.py " + " ".join(NANO_ARGS)
        ng["load_avg_after"] = load_avg()
        res["nanogpt"] = ng
        print("nanoGPT:", json.dumps(ng), flush=True)
    # our budget: a number of seconds, or "match" = nanoGPT's whole wall time in this run (on a busy
    # machine its 2,000 iterations take longer than the ~75 s of a quiet one)
    budget = float(ng["wall_s"]) if args.budget == "match" and ng else float(75 if args.budget == "match" else args.budget)
    res["our_time_budget_s"] = budget

    # ours, time budget, full val scored at the end; one run per seed (seed-to-seed spread of the
    # final bpb at this size is up to ±0.05, larger than most tuning effects, so quote the mean)
    runs = []
    for seed in range(args.seeds):
        run = work / f"run-seed{seed}"
        ours_args = ["pretrain", tokens, "--out", run, "--n-layer", args.n_layer, "--n-head", args.n_head,
                     "--d-model", args.d_model, "--seq-len", args.seq_len, "--micro-batch", args.micro_batch,
                     "--global-batch-tokens", args.global_batch_tokens, "--lr", args.lr, "--schedule", args.schedule,
                     "--warmup-steps", args.warmup, "--min-lr-ratio", "0.05", "--time-budget", budget,
                     "--precision", args.precision, "--device", "cpu", "--log-every", "10",
                     "--optimizer", args.optimizer, "--seed", seed, "--compile" if args.compile else "--no-compile"]
        _, wall = llmctl(*ours_args, env=env)
        s = run_stats(run)
        runs.append({"command": "llmctl " + " ".join(map(str, ours_args)), "seed": seed, "wall_s": round(wall, 1),
                     "final_val_loss_nats_per_token": s["final_val_loss"], "final_val_bpb": s["final_val_bpb"],
                     "steps": s["steps"], "tokens_seen": s["tokens_seen"], "train_epochs": s["train_epochs"],
                     "tokens_per_s": s["tokens_per_s"],
                     "bytes_per_s": round(s["tokens_per_s"] * m["bytes_per_token"], 1), "mfu": s["mfu"],
                     "train_seconds": s["train_seconds"], "load_avg_after": load_avg()})
        print("ours:", json.dumps(runs[-1]), flush=True)
    bpbs = [r["final_val_bpb"] for r in runs]
    res["ours"] = {"runs": runs, "final_val_bpb_mean": round(statistics.mean(bpbs), 4),
                   "final_val_bpb_min": min(bpbs), "final_val_bpb_max": max(bpbs),
                   "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
                   "bytes_per_s_median": statistics.median(r["bytes_per_s"] for r in runs)}
    print("ours over seeds:", json.dumps({k: v for k, v in res["ours"].items() if k != "runs"}), flush=True)

    # ours at nanoGPT's exact shape (L4 H4 d128, block 64, batch 12), speed only: eager, then compiled.
    # The SwiGLU width is parameter-matched to nanoGPT's 4·d GELU MLP (3·d·f = 8·d² → f = 8/3·d ≈ 344,
    # the convention of the SwiGLU paper and Llama); our vocabulary (--vocab) stays: the head is the
    # one FLOP difference left, and both models' MFU is reported by the same formula to show it.
    from llmctl.model.config import ModelConfig
    from llmctl.train.precision import cpu_peak

    peak = cpu_peak("fp32")
    ours_cfg = ModelConfig(vocab_size=args.vocab, n_layer=4, n_head=4, d_model=128, max_seq_len=64,
                           ffn_hidden=args.shape_ffn)
    ours_fpt = ours_cfg.flops_per_token()
    # nanoGPT's GPT at the same dims: 4·d² attention + 8·d² MLP per layer, head 65 × d (its char vocab)
    ng_fpt = 6.0 * (4 * (12 * 128 * 128) + 65 * 128) + 12.0 * 4 * 128 * 64
    res["flops_per_token"] = {"ours": ours_fpt, "nanogpt": ng_fpt, "cpu_fp32_matmul_peak": peak}
    def nano_shape_args(out: Path, micro_batch: int, *extra) -> list:
        return ["pretrain", tokens, "--out", out, "--n-layer", 4, "--n-head", 4, "--d-model", 128,
                "--ffn-hidden", args.shape_ffn, "--seq-len", 64, "--micro-batch", micro_batch,
                "--max-steps", args.shape_steps, "--log-every", 10, "--precision", args.precision,
                "--device", "cpu", *extra]

    shape_runs = {}
    for comp in ([False, True] if args.shape_compile else [args.compile]):
        shape = work / f"shape-{int(comp)}"
        shape_args = nano_shape_args(shape, 12, "--compile" if comp else "--no-compile")
        _, wall = llmctl(*shape_args, env=env)
        s2 = run_stats(shape)
        shape_runs["compiled" if comp else "eager"] = {
            "command": "llmctl " + " ".join(map(str, shape_args)), "tokens_per_s": s2["tokens_per_s"],
            "precision": s2.get("precision"), "mfu_at_its_precision": s2["mfu"],
            "mfu_same_formula": round(s2["tokens_per_s"] * ours_fpt / peak, 4),
            "wall_s": round(wall, 1), "vocab": args.vocab, "load_avg_after": load_avg()}
        print("ours at nanoGPT shape:", json.dumps(shape_runs), flush=True)
    if args.shape_ddp and args.threads > 1:
        # the same global batch (12 windows of 64) as data parallelism over the cores: `torchrun` with
        # one process per core and one thread each (gloo all-reduce), instead of intra-op threads
        shape = work / "shape-ddp"
        n = args.threads
        if 12 % n:
            raise SystemExit(f"--shape-ddp needs a thread count that divides nanoGPT's batch of 12, not {n}")
        ddp_args = nano_shape_args(shape, 12 // n, "--global-batch-tokens", 12 * 64, "--no-compile")
        code, out, wall = sh([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", n,
                              "--master-port", "29561", "-m", "llmctl", *ddp_args],
                             env={"OMP_NUM_THREADS": "1", "LLMCTL_PROGRESS": "0"})
        if code != 0:
            raise SystemExit(f"torchrun llmctl pretrain failed:\n{out[-3000:]}")
        s3 = run_stats(shape)
        shape_runs[f"ddp_{n}x1"] = {
            "command": f"OMP_NUM_THREADS=1 torchrun --nproc-per-node {n} -m llmctl " + " ".join(map(str, ddp_args)),
            "tokens_per_s": s3["tokens_per_s"], "precision": s3.get("precision"), "mfu_at_its_precision": s3["mfu"],
            "mfu_same_formula": round(s3["tokens_per_s"] * ours_fpt / peak, 4), "wall_s": round(wall, 1), "vocab": args.vocab,
            "load_avg_after": load_avg()}
        print("ours at nanoGPT shape:", json.dumps(shape_runs), flush=True)
    res["ours_at_nanogpt_shape"] = shape_runs
    if ng:
        ng["mfu_same_formula"] = round(ng["tokens_per_s"] * ng_fpt / peak, 4)
    best_shape = max(r["tokens_per_s"] for r in shape_runs.values())

    if ng:
        res["ratios"] = {
            "bpb_ours_mean_over_nanogpt": round(res["ours"]["final_val_bpb_mean"] / ng["full_val_bpb"], 3),
            "tokens_per_s_same_shape_ours_over_nanogpt": round(best_shape / ng["tokens_per_s"], 3),
            "tokens_per_s_same_shape_by_mode": {k: round(r["tokens_per_s"] / ng["tokens_per_s"], 3)
                                                for k, r in shape_runs.items()},
            "bytes_per_s_ours_over_nanogpt": round(res["ours"]["bytes_per_s_median"] / ng["tokens_per_s"], 3),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["shapes", "side", "all"], default="all")
    ap.add_argument("--nanogpt", default="/work/peers/nanoGPT", help="nanoGPT checkout ('' to skip it)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget", default="75", help="our --time-budget (seconds) for the side by side, or 'match' (nanoGPT's wall time in this run)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--global-batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1.5e-3, help="1.5e-3: best mean of 3 seeds over 1e-3..4e-3 at this batch (1,024 tokens)")
    ap.add_argument("--schedule", default="wsd")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seeds", type=int, default=3, help="our time-budget run once per seed 0..N-1; the mean bpb is quoted")
    ap.add_argument("--shape-steps", type=int, default=60)
    ap.add_argument("--shape-ffn", type=int, default=344, help="SwiGLU width at nanoGPT's shape (344 ≈ 8/3·128: its MLP's parameters)")
    ap.add_argument("--shape-ddp", action="store_true", help="also measure the exact shape as torchrun data parallelism, one process per thread")
    ap.add_argument("--shape-compile", action="store_true", help="measure the exact-shape speed eager AND compiled")
    ap.add_argument("--shape-max-steps", type=int, default=40)
    ap.add_argument("--shape-bf16-steps", type=int, default=None,
                    help="steps of the bf16 shape runs (default: as fp32, or 3 where bf16 is emulated and slow)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = Path(tempfile.mkdtemp(prefix="bench_pretrain-"))
    report: dict = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
                    "cores": os.cpu_count(), "load_avg_start": load_avg()}
    try:
        if args.part in ("side", "all"):
            report["side_by_side"] = part_side(args, work)
        if args.part in ("shapes", "all"):
            tokens = work / "tokens"
            if not tokens.is_dir():
                train, val, _ = split_corpus(work)
                llmctl("tokenize", "train", train, "--vocab-size", args.vocab, "--out", work / "tok")
                llmctl("tokenize", "encode", train, "--val", val, "--txt-split", "file", "--tokenizer",
                       work / "tok", "--out", tokens)
            report["shapes"] = part_shapes(tokens, work, args.shape_max_steps, args.shape_bf16_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time one Muon optimizer step on a model's hidden matrices: torch.optim.Muon vs llmctl's BatchedMuon.

torch's Muon orthogonalises each matrix on its own, in bf16. On a CPU without bf16 units that is
the slow path; BatchedMuon batches matrices by shape and runs the iteration in fp32 there (the
trainer picks the dtype). The fwd+bwd time of one batch is printed for scale.

    .venv/bin/python scripts/bench_muon.py --n-layer 4 --d-model 128 --tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmctl.model import ModelConfig, Transformer, lm_loss
from llmctl.train.optim import BatchedMuon, build_optimizers


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per fwd+bwd batch (for scale)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--torch-repeat", type=int, default=2, help="repeats of torch's Muon (slow without bf16 units)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=1024, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                                    max_seq_len=args.seq_len))
    x = torch.randint(0, 1024, (max(1, args.tokens // args.seq_len), args.seq_len + 1))

    def fwd_bwd():
        model.zero_grad()
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()

    fb = timed(fwd_bwd, args.repeat)
    muon, _ = build_optimizers(model.named_parameters(), optimizer="muon")  # the trainer's split of the weights
    mats = [p for g in muon.param_groups for p in g["params"]]
    kw = dict(lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    rows = [("torch.optim.Muon (per matrix, bf16)", torch.optim.Muon(mats, **kw), args.torch_repeat)]
    for dt in (torch.bfloat16, torch.float32):
        rows.append((f"BatchedMuon ({str(dt).split('.')[-1]})", BatchedMuon(mats, ns_dtype=dt, **kw), args.repeat))
    print(f"{len(mats)} matrices, threads {torch.get_num_threads()}; fwd+bwd of {x.shape[0] * args.seq_len} tokens: "
          f"{fb * 1e3:.1f} ms")
    base = None
    for name, opt, rep in rows:
        t = timed(opt.step, rep)
        base = base or t
        print(f"{name:40s} {t * 1e3:9.1f} ms/step  {base / t:7.1f}x")


if __name__ == "__main__":
    main()

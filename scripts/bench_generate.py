"""Generation speed: llmctl's KV-cache ``generate`` vs transformers' ``model.generate`` on the same
weights (the model exported with ``llmctl export``), greedy, fp32, CPU unless --device says otherwise.

    .venv/bin/python scripts/bench_generate.py --threads 2 --out /tmp/bench_generate

Each shape: a random-weight model (speed does not depend on the values), PROMPT tokens of real
text per prompt, NEW tokens generated, batch 1 and batch B; best of --reps runs; both sides stop
only at the token budget (EOS disabled), and the greedy tokens are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    from test_generate import make_run, train_tokenizer

    from llmctl.model.generate import generate
    from llmctl.model.hf import ExportConfig, export_hf
    from llmctl.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    spm_model = train_tokenizer(tmp / "tok", vocab_size=2048)
    tok = Tokenizer(spm_model)
    text = Path(ROOT / "src/llmctl/model/transformer.py").read_text()
    ids = tok.encode(text)
    shapes = {
        "micro (4L d128)": dict(n_layer=4, n_head=4, d_model=128),
        "small (8L d384)": dict(n_layer=8, n_head=8, d_model=384),
    }
    rows = []
    dev = torch.device(a.device)
    for name, kw in shapes.items():
        run = tmp / name.split()[0]
        make_run(run, spm_model, max_seq_len=a.prompt + a.new + 8, init_std=0.02, **kw)
        export_hf(ExportConfig(run=run, out=tmp / f"{run.name}-hf"))
        from llmctl.model.hf import load_any

        ours, _ = load_any(run)
        ours = ours.to(dev)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / f"{run.name}-hf", dtype=torch.float32).to(dev).eval()
        for B in (1, a.batch):
            prompts = [[tok.bos_id, *ids[i * 7 : i * 7 + a.prompt - 1]] for i in range(B)]
            no_eos = type("T", (), {})()
            no_eos.__dict__.update(bos_id=tok.bos_id, eos_id=-1, pad_id=tok.pad_id, vocab_size=tok.vocab_size,
                                   encode=tok.encode, decode=tok.decode)
            best_ours = best_hf = float("inf")
            for _ in range(a.reps):
                t = time.perf_counter()
                mine = generate(ours, no_eos, prompts, temperature=0, max_new_tokens=a.new, batch_size=B)
                best_ours = min(best_ours, time.perf_counter() - t)
                x = torch.tensor(prompts, device=dev)
                t = time.perf_counter()
                with torch.no_grad():
                    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new, min_new_tokens=a.new,
                                      do_sample=False, pad_token_id=tok.pad_id)
                best_hf = min(best_hf, time.perf_counter() - t)
            same = all(out[i, a.prompt :].tolist() == mine[i].token_ids for i in range(B))
            n = B * a.new
            rows.append(dict(shape=name, batch=B, ours_tok_s=round(n / best_ours, 1), hf_tok_s=round(n / best_hf, 1),
                             ratio=round(best_hf / best_ours, 2), same_tokens=same))
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench_generate.json").write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "rows": rows}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

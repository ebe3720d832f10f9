"""Benchmark llmctl's tokenizer against HF tokenizers' ByteLevel BPE on ~3 MB of real English text.

Corpus (from ../shared/data, never copied into the repo): tinyshakespeare paragraphs, LAMBADA
passages, PIQA goals+solutions and hh-rlhf "chosen" dialogues. Documents are split 90/10 by a hash
of their index: both tokenizers train on the 90% and are measured on the held-out 10%.

Measures, in one run on this machine:
- training time at --vocab-size (default 4,096) for both;
- bytes/token and exact round-trip rate on the held-out documents;
- raw encode throughput (MB/s) of the whole corpus with 1 and 2 threads (sentencepiece
  ``num_threads``; HF ``encode_batch`` with RAYON_NUM_THREADS, in a subprocess each);
- ``llmctl tokenize encode`` end to end (read, encode, write shards) with --workers 1 and 2.

Usage:  .venv/bin/python scripts/bench_tokenizer.py [--vocab-size 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
TARGET_BYTES = 3_300_000  # REFERENCE.md's figures were measured on 3.3 MB of English text


def corpus() -> list[str]:
    docs: list[str] = []
    shakes = (DATA / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs += [p for p in shakes.split("\n\n") if p.strip()]
    with open(DATA / "eval" / "lambada-test.jsonl", encoding="utf-8") as f:
        docs += [json.loads(line)["text"] for line in f if line.strip()]
    with open(DATA / "eval" / "piqa-valid.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            docs.append(f"{r['goal']}\n{r['sol1']}\n{r['sol2']}")
    size = sum(len(d.encode("utf-8")) for d in docs)
    with gzip.open(DATA / "preference" / "hh-rlhf-harmless-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:  # dialogues until the corpus holds TARGET_BYTES
            if size >= TARGET_BYTES:
                break
            docs.append(json.loads(line)["chosen"].strip("\n"))
            size += len(docs[-1].encode("utf-8"))
    return docs


def is_heldout(i: int) -> bool:
    return hashlib.blake2b(str(i).encode(), digest_size=4).digest()[0] < 26  # ~10%


def hf_encode_worker(model: str, texts_file: str, repeats: int) -> None:
    """Subprocess: encode the texts with HF tokenizers (thread count from RAYON_NUM_THREADS)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(model)
    texts = json.loads(Path(texts_file).read_text(encoding="utf-8"))
    tok.encode_batch(texts[:100])  # warm the thread pool
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        tok.encode_batch(texts)
    print(json.dumps({"seconds": (time.perf_counter() - t) / repeats, "cpu_seconds": (time.process_time() - c) / repeats}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="encode passes per throughput figure")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_hf-encode", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._hf_encode:
        hf_encode_worker(args._hf_encode[0], args._hf_encode[1], args.repeats)
        return
    if not DATA.is_dir():
        sys.exit(f"{DATA}: shared data is absent; this benchmark needs it")

    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("LLMCTL_PROGRESS", "0")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llmctl import tokenizer as tk

    docs = corpus()
    train_docs = [d for i, d in enumerate(docs) if not is_heldout(i)]
    held = [d for i, d in enumerate(docs) if is_heldout(i)]
    mb = lambda xs: sum(len(x.encode("utf-8")) for x in xs) / 1e6  # noqa: E731
    total_mb = mb(docs)
    print(f"corpus: {len(docs):,} docs, {total_mb:.2f} MB (train {mb(train_docs):.2f} MB, held out {mb(held):.2f} MB)")
    res: dict = {"corpus_mb": round(total_mb, 3), "heldout_mb": round(mb(held), 3), "vocab_size": args.vocab_size}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, part in (("train", train_docs), ("all", docs)):
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for i, d in enumerate(part):
                    f.write(json.dumps({"id": str(i), "text": d}) + "\n")
        (tmp / "all.json").write_text(json.dumps(docs), encoding="utf-8")

        # --- llmctl (sentencepiece BPE) ---
        t = time.perf_counter()
        m = tk.train(tk.TrainConfig(docs=[str(tmp / "train.jsonl")], out=str(tmp / "tok"), vocab_size=args.vocab_size,
                                    heldout_fraction=0.0, threads=2))
        ours_wall = time.perf_counter() - t
        tok = tk.load_tokenizer(tmp / "tok")
        ours = {
            "train_seconds": m["stats"]["train_seconds"],
            "train_wall_seconds": round(ours_wall, 3),
            "bytes_per_token": round(tok.bytes_per_token(held), 4),
            "roundtrip_exact": sum(tok.decode(ids) == d for ids, d in zip(tok.encode(held), held, strict=True)) / len(held),
        }
        # sentencepiece's own defaults (nmt_nfkc, whitespace collapsed): the lossy baseline
        import io

        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(train_docs), model_writer=buf, model_type="bpe", vocab_size=args.vocab_size,
            byte_fallback=True, max_sentence_length=1 << 16, num_threads=2, minloglevel=2,
        )
        lossy = spm.SentencePieceProcessor(model_proto=buf.getvalue())
        lossy_ids = lossy.encode(held)
        ours["spm_defaults_bytes_per_token"] = round(mb(held) * 1e6 / sum(map(len, lossy_ids)), 4)
        ours["spm_defaults_roundtrip_exact"] = sum(lossy.decode(i) == d for i, d in zip(lossy_ids, held, strict=True)) / len(held)
        for threads in (1, 2):
            tok.encode(docs[:100], num_threads=threads)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.repeats):
                tok.encode(docs, num_threads=threads)
            ours[f"encode_mb_s_{threads}t"] = round(total_mb / ((time.perf_counter() - t) / args.repeats), 2)
            if threads == 1:  # throughput per CPU second: robust when other jobs share the cores
                ours["encode_mb_per_cpu_s"] = round(total_mb / ((time.process_time() - c) / args.repeats), 2)
        for workers in (1, 2):
            mm = tk.encode(tk.EncodeConfig(docs=[str(tmp / "all.jsonl")], tokenizer=str(tmp / "tok"),
                                           out=str(tmp / f"toks-w{workers}"), workers=workers, threads=1))
            ours[f"cli_encode_mb_s_{workers}w"] = mm["stats"]["encode_mb_per_s"]
            ours[f"cli_encode_wall_s_{workers}w"] = mm["stats"]["wall_seconds"]
        same = all((tmp / "toks-w1" / f).read_bytes() == (tmp / "toks-w2" / f).read_bytes()
                   for f in mm["splits"]["train"]["shards"] + mm["splits"]["val"]["shards"])
        ours["workers_1_vs_2_identical"] = same

        # --- HF tokenizers ByteLevel BPE ---
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=args.vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        t = time.perf_counter()
        hf.train_from_iterator(train_docs, trainer=trainer)
        hf_train = time.perf_counter() - t
        hf.save(str(tmp / "hf.json"))
        enc = hf.encode_batch(held)
        theirs = {
            "train_seconds": round(hf_train, 3),
            "bytes_per_token": round(sum(len(d.encode()) for d in held) / sum(len(e.ids) for e in enc), 4),
            "roundtrip_exact": sum(hf.decode(e.ids) == d for e, d in zip(enc, held, strict=True)) / len(held),
        }
        for threads in (1, 2):
            p = subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--_hf-encode", str(tmp / "hf.json"), str(tmp / "all.json")],
                capture_output=True, text=True, check=True,
                env={**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"},
            )
            r = json.loads(p.stdout)
            theirs[f"encode_mb_s_{threads}t"] = round(total_mb / r["seconds"], 2)
            if threads == 1:
                theirs["encode_mb_per_cpu_s"] = round(total_mb / r["cpu_seconds"], 2)

    res["load_average"] = os.getloadavg()
    res["llmctl_sentencepiece_bpe"] = ours
    res["hf_bytelevel_bpe"] = theirs
    rows = [
        ("train seconds", ours["train_seconds"], theirs["train_seconds"]),
        ("bytes/token (held out)", ours["bytes_per_token"], theirs["bytes_per_token"]),
        ("round-trip exact (held out)", f"{ours['roundtrip_exact']:.2%}", f"{theirs['roundtrip_exact']:.2%}"),
        ("spm defaults (lossy): bytes/token", ours["spm_defaults_bytes_per_token"], "-"),
        ("spm defaults (lossy): round-trip exact", f"{ours['spm_defaults_roundtrip_exact']:.2%}", "-"),
        ("encode MB per CPU-second, 1 thread", ours["encode_mb_per_cpu_s"], theirs["encode_mb_per_cpu_s"]),
        ("encode MB/s, 1 thread", ours["encode_mb_s_1t"], theirs["encode_mb_s_1t"]),
        ("encode MB/s, 2 threads", ours["encode_mb_s_2t"], theirs["encode_mb_s_2t"]),
        ("llmctl tokenize encode MB/s, 1 worker", ours["cli_encode_mb_s_1w"], "-"),
        ("llmctl tokenize encode MB/s, 2 workers", ours["cli_encode_mb_s_2w"], "-"),
        ("1 vs 2 workers identical shards", ours["workers_1_vs_2_identical"], "-"),
    ]
    print(f"\n{'vocab ' + str(args.vocab_size):<42}{'llmctl (spm BPE)':>18}{'HF ByteLevel BPE':>18}")
    for name, a, b in rows:
        print(f"{name:<42}{a!s:>18}{b!s:>18}")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in res['load_average'])} on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Builders the model-side tests share: a real tokenizer trained on real text, and finished run
directories with random (peaked) weights in the layout model/io.py reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llmctl.artifacts import StageRun, write_json_atomic
from llmctl.model import ModelConfig, Transformer
from llmctl.model.io import save_weights
from llmctl.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

#: varied real text for the tokenizer beside its base corpus: several scripts, emoji and code
EXTRA_TEXT = "\n\n".join(
    [
        "The quick brown fox jumps over the lazy dog. 1234567890 + 42 = 1234567932",
        "日本語のテキストです。東京と大阪。中文文本：北京欢迎你。한국어 문장입니다.",
        "Emoji: 😀 🎉 🚀 👩‍💻 — naïve café, Zürich, Ελληνικά, русский текст.",
        "def main(argv):\n\tfor i in range(10):\n\t\tprint(i, end='')\n    return 0\n",
    ]
    * 30
)


def tokenizer_corpus() -> str:
    """The tokenizer's training text: fixed real text (the shared Shakespeare corpus) plus the
    multilingual and code lines above, so token ids do not move when the repository's code
    changes. Without ../shared/data, this repository's source stands in (ids then vary by commit)."""
    from conftest import SHARED_DATA

    shakespeare = SHARED_DATA / "corpora" / "tinyshakespeare.txt"
    if shakespeare.is_file():
        base = shakespeare.read_text(encoding="utf-8")[:400_000]
    else:
        src = sorted((ROOT / "src" / "llmctl").rglob("*.py"))
        base = "\n\n".join(p.read_text(encoding="utf-8") for p in src)
    return base + "\n\n" + EXTRA_TEXT


def train_tokenizer(out: Path, vocab_size: int = 700) -> Path:
    """A real llmctl tokenizer (``llmctl.tokenizer.train``, the stage behind ``llmctl tokenize
    train``) on a little real text (:func:`tokenizer_corpus`)."""
    from llmctl.tokenizer import TrainConfig, train

    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text(tokenizer_corpus(), encoding="utf-8")
    train(TrainConfig(docs=[str(corpus)], out=str(out), vocab_size=vocab_size, heldout_fraction=0.0, threads=1))
    return out / "tokenizer.model"


def make_run(path: Path, spm_model: Path, seed: int = 0, **model_kw) -> Transformer:
    """A finished 'pretrain' run directory with random (but peaked) weights: manifest, config.json,
    model.safetensors and tokenizer.model, in the layout model/io.py reads."""
    kw = dict(vocab_size=Tokenizer(spm_model).vocab_size, n_layer=2, n_head=4, d_model=64,
              max_seq_len=96, init_std=0.15)
    kw.update(model_kw)
    cfg = ModelConfig(**kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # norms away from 1 so a wrong norm placement would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    run = StageRun.open(path, "pretrain", {"test": True, **model_kw})
    write_json_atomic(run.work / "config.json", {"model": cfg.to_dict()})
    save_weights(model, run.work / "model.safetensors")
    shutil.copyfile(spm_model, run.work / "tokenizer.model")
    run.finish({})
    return model.eval()


PROMPTS = ["def f(x):", "The", "日本語のテキスト", "Emoji: 😀 and a much longer prompt about foxes, 12345", "\t\tx"]

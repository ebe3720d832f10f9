"""Export to a transformers directory and back: same logits (≤ 1e-4 fp32), same token ids, same
greedy generations, for Llama and Qwen3, tied and untied, with grouped-query attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from modelkit import EXTRA_TEXT, PROMPTS, make_run
from safetensors import safe_open

from llmctl.chat import encode_chat, render_message, render_prompt
from llmctl.errors import UsageError
from llmctl.model.generate import GenerateConfig, generate, run_generate
from llmctl.model.hf import ExportConfig, HFTokenizer, build_hf_tokenizer, export_hf, load_hf
from llmctl.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "llama-tied-mha": dict(),
    "llama-untied-gqa": dict(n_kv_head=2, tie_embeddings=False, rope_theta=50000.0),
    "qwen3-tied-gqa": dict(qk_norm=True, n_kv_head=1),
    "qwen3-untied": dict(qk_norm=True, tie_embeddings=False, norm_eps=1e-6),
}

TEXTS = [
    "def main(argv):\n\tfor i in range(10):\n\t\tprint(i, end='')\n    return 0\n",
    "    indented with spaces\n\n\n  and blank lines  \n",
    " leading space, trailing spaces   ",
    "Numbers 3.14159, 1,000,000 and 2024-06-30T12:00:00Z",
    "日本語のテキストです。中文：北京欢迎你。한국어",
    "Emoji 😀🎉🚀 family 👩‍👩‍👧 flag 🇫🇷 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃",
    "<|user|>What is 2+2?<|end|><|assistant|>4<|end|>",
    "literal specials: <s> </s> <pad> <unk> stay text",
    "\r\nWindows line\r\nendings\x00with a NUL \x7f",
    "Ünïcödé ñ ß ﬁ Ω ≥ → ·",
    "",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm_model):
    """Every variant as (our model, run dir, exported dir)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        model = make_run(root / name, spm_model, seed=i, **kw)
        export_hf(ExportConfig(run=root / name, out=root / f"{name}-hf"))
        out[name] = (model, root / name, root / f"{name}-hf")
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_gives_the_same_logits_and_generations(exported, tok, name):
    model, _, hf_dir = exported[name]
    cfg = model.cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    want_class = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    assert type(hf).__name__ == want_class

    c = json.loads((hf_dir / "config.json").read_text())
    assert c["architectures"] == [want_class]
    assert (c["num_key_value_heads"], c["head_dim"], c["tie_word_embeddings"]) == (
        cfg.n_kv_head, cfg.head_dim, cfg.tie_embeddings)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (
        cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len)
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert c["torch_dtype"] == "float32"
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "model.layers.1.mlp.down_proj.weight" in keys
    assert ("lm_head.weight" in keys) == (not cfg.tie_embeddings)
    assert ("model.layers.0.self_attn.q_norm.weight" in keys) == cfg.qk_norm

    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len))
    text = torch.tensor([[tok.bos_id, *tok.encode(TEXTS[0] + TEXTS[4])]])
    with torch.no_grad():
        for x in (ids, text):
            ours, theirs = model(x), hf(x).logits
            assert (ours - theirs).abs().max().item() <= 1e-4
            assert ours.std() > 0.1  # not vacuous: the logits are far from uniform

    for prompt in PROMPTS[:3]:
        mine = generate(model, tok, [prompt], temperature=0, max_new_tokens=16)[0]
        enc = torch.tensor([mine.prompt_ids])
        out = hf.generate(enc, attention_mask=torch.ones_like(enc), max_new_tokens=len(mine.token_ids),
                          do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert out[0, enc.shape[1]:].tolist() == mine.token_ids

    back, back_tok, _ = load_hf(hf_dir)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert back.cfg == cfg
    assert back_tok.encode(TEXTS[4]) == tok.encode(TEXTS[4])


def test_transformers_tokenizer_gives_the_same_ids(exported, tok):
    _, _, hf_dir = exported["llama-tied-mha"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = [*TEXTS, EXTRA_TEXT[:3000], Path(__file__).read_text(encoding="utf-8")]
    for t in texts:
        ours = tok.encode(t)
        # special-token text reads as text only on request (as sentencepiece always reads it)
        split = {"split_special_tokens": True} if "<s>" in t else {}
        assert hf_tok(t, **split)["input_ids"] == [tok.bos_id, *ours], repr(t[:40])
        assert hf_tok(t, add_special_tokens=False, **split)["input_ids"] == ours
        assert hf_tok.decode(hf_tok(t, **split)["input_ids"], skip_special_tokens=True) == tok.decode(ours)
    # by default it reads as the token, as in every Llama tokenizer (the chat template writes BOS so)
    assert hf_tok("<s>x", add_special_tokens=False)["input_ids"][0] == tok.bos_id
    assert any(tok.sp.is_byte(i) for i in tok.encode(TEXTS[5]))  # byte fallback was exercised
    chat = hf_tok(TEXTS[6], add_special_tokens=False)["input_ids"]
    assert tok.sp.piece_to_id("<|user|>") in chat and tok.sp.piece_to_id("<|assistant|>") in chat
    assert hf_tok.bos_token_id == tok.bos_id and hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.pad_token_id == tok.pad_id
    # the chat format travels with the export: apply_chat_template renders what sft trained on
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == hf_tok.bos_token + render_prompt(msgs)
    # tokenized as transformers and vLLM do (no special tokens added): BOS first, as sft trained
    want = [tok.bos_id, *tok.encode(render_prompt(msgs))]
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"] == want
    # a whole conversation ends with EOS, as sft and reward trained on it: the same ids as encode_chat
    assert hf_tok.apply_chat_template(msgs[:3], tokenize=False) == (
        hf_tok.bos_token + "".join(render_message(**m) for m in msgs[:3]) + hf_tok.eos_token)
    assert hf_tok.apply_chat_template(msgs[:3], return_dict=True)["input_ids"] == encode_chat(tok, msgs[:3]).ids
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, tok.sp.piece_to_id("<|end|>")]  # a reply ends at <|end|>

    assert isinstance(load_hf(hf_dir)[1], Tokenizer)  # our export: the run's own model
    c = json.loads((hf_dir / "config.json").read_text())
    back = HFTokenizer(hf_dir / "tokenizer.json", c["bos_token_id"], c["eos_token_id"], c["pad_token_id"])
    for t in texts:
        assert back.encode(t) == tok.encode(t)
        assert back.decode(back.encode(t)) == tok.decode(tok.encode(t))


def test_dummy_prefix_models_are_converted_too(tmp_path, spm_model):
    """A sentencepiece model with add_dummy_prefix (not llmctl's setting): "▁" goes in front."""
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text(EXTRA_TEXT + "\n" + Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "d"), model_type="bpe", vocab_size=500,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "d.model"))
    hf = build_hf_tokenizer(tmp_path / "d.model")
    hf.encode_special_tokens = True
    for t in [x for x in TEXTS if x and not x.startswith((" ", "<|"))]:
        assert hf.encode(t, add_special_tokens=False).ids == sp.encode(t), repr(t[:40])
        assert hf.decode(sp.encode(t)) == sp.decode(sp.encode(t))
    assert sp.id_to_piece(sp.encode("word")[0]).startswith("▁")


def test_cli_export_and_generate_from_the_export(llmctl, exported, tmp_path, tok):
    model, run, hf_dir = exported["qwen3-tied-gqa"]
    out = tmp_path / "cli-hf"
    r = llmctl("export", run, "--format", "hf", "--out", out, env={"OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.err
    assert "Qwen3ForCausalLM" in r.out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "tokenizer.model", "manifest.json"):
        assert (out / f).is_file(), f
    assert (out / "model.safetensors").read_bytes() == (hf_dir / "model.safetensors").read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "export" and m["params"]["dtype"] == "fp32" and m["params"]["format"] == "hf"
    assert not list(tmp_path.glob(".cli-hf.tmp-*"))

    # an exported directory generates exactly what the run generates
    a = run_generate(GenerateConfig(run=str(run), prompt="def f(x):", temperature=0, max_new_tokens=12))[0][0]
    b = run_generate(GenerateConfig(run=str(out), prompt="def f(x):", temperature=0, max_new_tokens=12))[0][0]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_export_rerun_and_bad_input(exported, tmp_path, capsys):
    _, run, hf_dir = exported["llama-tied-mha"]
    before = (hf_dir / "manifest.json").read_bytes()
    export_hf(ExportConfig(run=run, out=hf_dir))  # same run, same options: no-op
    assert "already exported" in capsys.readouterr().err
    assert (hf_dir / "manifest.json").read_bytes() == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_hf(ExportConfig(run=run, out=foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(UsageError, match="export needs a model run"):
        export_hf(ExportConfig(run=hf_dir, out=tmp_path / "x"))
    with pytest.raises(UsageError, match="--format"):
        export_hf(ExportConfig(run=run, out=tmp_path / "x", format="gguf"))
    with pytest.raises(UsageError, match="no such artifact"):
        export_hf(ExportConfig(run=tmp_path / "missing", out=tmp_path / "x"))
    with pytest.raises(UsageError, match="not a transformers model directory"):
        load_hf(run)
    assert not (tmp_path / "x").exists()


def test_bf16_export_loads_in_bf16(exported, tmp_path):
    model, run, _ = exported["llama-untied-gqa"]
    out = tmp_path / "bf16"
    export_hf(ExportConfig(run=run, out=out, dtype="bf16"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back, _, _ = load_hf(out)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 32))
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max().item() < 0.5  # bf16 rounding of the weights only


def test_real_pipeline_tokenize_pretrain_export(tmp_path, spm_model, tok):
    """The stages as a user runs them: encode real text with the trained tokenizer, pretrain a
    Qwen3-style model (QK-norm, GQA, untied) for a few steps, export, compare with transformers."""
    from llmctl.tokenizer import EncodeConfig, encode
    from llmctl.train.pretrain import PretrainConfig, run

    corpus = spm_model.parent.parent / f"{spm_model.parent.name}-corpus.txt"
    encode(EncodeConfig(docs=[str(corpus)], tokenizer=str(spm_model.parent), out=str(tmp_path / "tokens"),
                        val_fraction=0.1, threads=1))
    run(PretrainConfig(
        tokens=tmp_path / "tokens", out=tmp_path / "run", preset="nano", n_layer=2, n_head=4, n_kv_head=2,
        d_model=64, seq_len=64, qk_norm=True, tie_embeddings=False, micro_batch=4, max_steps=12,
        warmup_steps=2, lr=1e-2, device="cpu", precision="fp32", log_every=6,
    ))
    export_hf(ExportConfig(run=tmp_path / "run", out=tmp_path / "hf"))
    from llmctl.model.io import load_model

    model, _ = load_model(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    text = TEXTS[3] + TEXTS[6]
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert 20 < ids.shape[1] <= 64
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(text)]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    mine = generate(model, tok, ["def "], temperature=0, max_new_tokens=12)[0]
    enc = torch.tensor([mine.prompt_ids])
    out = hf.generate(enc, attention_mask=torch.ones_like(enc), max_new_tokens=len(mine.token_ids),
                      do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert out[0, enc.shape[1]:].tolist() == mine.token_ids

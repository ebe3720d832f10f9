"""Supervised fine-tuning: the chat format and its loss mask, packing without cross-talk, a loss
that weights every reply token of an optimizer step equally, and ``llmctl sft`` end to end (a
model taught a reply answers it through ``llmctl generate --chat``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, one_process_and_two_ranks, torchrun_llmctl, train_losses
from modelkit import make_run

from llmctl.chat import (
    BadRecord,
    ChatFormat,
    chat_format,
    encode_chat,
    render_prompt,
    to_messages,
    user_prompt,
)
from llmctl.errors import UsageError
from llmctl.eval import generation_mc
from llmctl.eval.tasks import MCItem
from llmctl.model import ModelConfig, Transformer
from llmctl.model.generate import GenerateConfig, run_generate
from llmctl.model.hf import ExportConfig, HFTokenizer, export_hf, load_any
from llmctl.model.io import load_model
from llmctl.model.transformer import lm_loss
from llmctl.tokenizer import load_tokenizer
from llmctl.train.distributed import DistContext
from llmctl.train.loop import LoopConfig, TrainContext
from llmctl.train.sft import SFTConfig, SFTObjective, collate, load_conversations, pack, tokenize_examples


def _alpaca(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "sft" / "code-alpaca-2k.json").read_text(encoding="utf-8"))


def test_reply_tokens_alone_are_targets(shared_data, tok):
    rec = _alpaca(shared_data)[0]
    (msgs,) = to_messages(rec)
    ct = encode_chat(tok, msgs)
    assert ct.ids[0] == tok.bos_id and ct.ids[-1] == tok.eos_id
    trained = [i for i, w in zip(ct.ids, ct.trained, strict=True) if w]
    untrained = [i for i, w in zip(ct.ids, ct.trained, strict=True) if not w]
    # the targets are exactly the reply, its end marker and EOS; the prompt is context only
    assert tok.decode(trained) == rec["output"] + "<|end|>"
    assert trained[-1] == tok.eos_id
    assert tok.decode(untrained) == render_prompt(msgs[:-1])
    # the prompt a user's generate call encodes is a prefix of the training ids (REFERENCE: SFT)
    prompt_ids = tok.encode(render_prompt(msgs[:-1]))
    assert ct.ids[1 : 1 + len(prompt_ids)] == prompt_ids
    assert not any(ct.trained[: 1 + len(prompt_ids)]) and all(ct.trained[1 + len(prompt_ids) :])
    inputs, targets = ct.targets()
    assert len(inputs) == len(targets) == len(ct.ids) - 1
    assert [t for t in targets if t != -100] == trained


def test_multi_turn_trains_every_assistant_turn(tok):
    rec = {"system": "Be brief.", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Red."},
    ]}
    (msgs,) = to_messages(rec)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    ct = encode_chat(tok, msgs)
    trained = tok.decode([i for i, w in zip(ct.ids, ct.trained, strict=True) if w])
    assert trained == "Hello.<|end|>Red.<|end|>"
    assert user_prompt("Hi", "Be brief.") == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"


def test_record_layouts_and_bad_records_counted(shared_data, tmp_path):
    seed = [json.loads(line) for line in (shared_data / "sft" / "alpaca-seed-tasks.jsonl").open(encoding="utf-8")]
    code = _alpaca(shared_data)
    bad: dict[str, int] = {}
    convs = load_conversations([shared_data / "sft" / "alpaca-seed-tasks.jsonl", shared_data / "sft" / "code-alpaca-2k.json"], bad)
    empty = sum(not r["output"].strip() for r in code) + sum(not i["output"].strip() for t in seed for i in t["instances"])
    assert len(convs) == sum(len(t["instances"]) for t in seed) + len(code) - empty
    assert bad == ({"empty_output": empty} if empty else {})
    # a seed task's instance: the instruction, then its input, as the user turn
    task = next(t for t in seed if t["instances"][0]["input"].strip())
    ((user, reply),) = to_messages(task)
    assert user["content"] == task["instruction"].strip() + "\n\n" + task["instances"][0]["input"].strip()
    assert reply == {"role": "assistant", "content": task["instances"][0]["output"]}
    two = {"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"output": "0"}]}
    assert [m[0]["content"] for m in to_messages(two)] == ["Add.\n\n1 2", "Add."]

    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\xff\xfe not utf-8\n" + "\n".join([
        json.dumps({"prompt": "2+2?", "completion": "4"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"text": "plain pretraining text"}),
        json.dumps([1, 2]),
    ]).encode() + b"\n")
    bad = {}
    convs = load_conversations([f], bad)
    assert convs == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    assert bad == {"bad_json": 1, "no_assistant_reply": 1, "unknown_role": 1, "unknown_layout": 1, "not_an_object": 1,
                   "not_utf8": 1}
    with pytest.raises(BadRecord):
        list(to_messages({"instruction": "x", "output": 3}))


def test_pack_best_fit_fills_rows_and_keeps_every_example_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (300,), generator=g).tolist()
    order = torch.randperm(300, generator=g).tolist()
    rows = pack(lengths, 128, order)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # best-fit decreasing packs close to the bound; one-after-another filling does not
    assert len(rows) <= 1.03 * sum(lengths) / 128 + 1


def test_packed_example_sees_only_itself(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=128)).eval()
    convs = [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}],
        [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "one two three"}],
    ]
    exs, _ = tokenize_examples(tok, convs, 128, {})
    packed = collate(exs, [[0, 1]], tok.pad_id, packed=True)
    assert packed["position_ids"][0, len(exs[0].inputs)] == 0  # positions restart per example
    with torch.no_grad():
        both = model(packed["input_ids"], position_ids=packed["position_ids"], attn_mask=packed["attn_mask"])
        n0 = len(exs[0].inputs)
        for k, ex in enumerate(exs):
            alone = model(torch.tensor([ex.inputs]))
            start = 0 if k == 0 else n0
            torch.testing.assert_close(both[0, start : start + len(ex.inputs)], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed["labels"][0], torch.tensor(exs[0].targets + exs[1].targets))


def _objective(examples, micro_batch: int, global_batch: int, model) -> SFTObjective:
    cfg = SFTConfig(micro_batch=micro_batch, global_batch=global_batch, seq_len=96, packing=False, seed=3)
    obj = SFTObjective(examples, [], cfg, pad_id=3, global_rows=global_batch)
    obj.setup(TrainContext(torch.device("cpu"), "fp32", DistContext(), global_batch // micro_batch, LoopConfig(), model))
    return obj


def _step_grads(obj: SFTObjective, model) -> list[torch.Tensor]:
    """One optimizer step's gradient, accumulated exactly as ``Trainer.train_step`` does."""
    model.zero_grad(set_to_none=True)
    for _ in range(obj.ctx.accum_steps):
        loss, _ = obj.loss(model, obj.next_batch(), {})
        (loss / obj.ctx.accum_steps).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_loss_is_the_mean_over_every_reply_token_of_the_step(shared_data, tok):
    convs = load_conversations([shared_data / "sft" / "code-alpaca-2k.json"], {})[:64]
    examples, _ = tokenize_examples(tok, convs, 96, {})
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=96))
    one = _step_grads(_objective(examples, 8, 8, model), model)
    accum = _step_grads(_objective(examples, 2, 8, model), model)
    for a, b in zip(one, accum, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the same 8 rows as one batch, loss = summed nats / reply tokens
    obj = _objective(examples, 8, 8, model)
    rows = [obj._row(j) for j in range(8)]
    batch = collate(examples, rows, 3, packed=False)
    model.zero_grad(set_to_none=True)
    (lm_loss(model(batch["input_ids"]), batch["labels"], reduction="sum") / (batch["labels"] != -100).sum()).backward()
    for a, p in zip(one, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    # a mean of per-micro-batch means (what a plain loop gives) is measurably different here
    model.zero_grad(set_to_none=True)
    for k in range(0, 8, 2):
        b = collate(examples, rows[k : k + 2], 3, packed=False)
        (lm_loss(model(b["input_ids"]), b["labels"]) / 4).backward()
    assert max(float((a - p.grad).abs().max()) for a, p in zip(one, model.parameters(), strict=True)) > 1e-4


def test_data_position_resumes_the_same_rows(shared_data, tok):
    convs = load_conversations([shared_data / "sft" / "code-alpaca-2k.json"], {})[:40]
    examples, _ = tokenize_examples(tok, convs, 96, {})
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=96))
    a = _objective(examples, 4, 8, model)
    n = len(a.rows)
    assert 32 < n <= 40  # (an example whose prompt fills 96 tokens is dropped)
    seen = [a.next_batch()["input_ids"] for _ in range(2 * 7)]  # 7 steps of 8 rows: into epoch 2
    b = _objective(examples, 4, 8, model)
    for _ in range(2 * 3):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))
    c = _objective(examples, 4, 8, model)
    c.load_state_dict(state)
    for want in seen[6:]:
        assert torch.equal(c.next_batch()["input_ids"], want)
    # every epoch visits every row once
    for e in range(2):
        assert sorted(a._row(g)[0] for g in range(e * n, (e + 1) * n)) == list(range(n))
    assert [a._row(g) for g in range(n)] != [a._row(g) for g in range(n, 2 * n)]


@pytest.fixture
def base_run(tmp_path, spm_model) -> Path:
    make_run(tmp_path / "base", spm_model, n_layer=2, d_model=64, max_seq_len=128, init_std=0.02)
    return tmp_path / "base"


def test_cli_sft_teaches_a_reply_that_generate_chat_gives(base_run, tmp_path, one_thread, monkeypatch):
    question = MCItem("q", "Which one is a colour?", ["dog", "blue", "seven"], gold=1)
    data = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": question.question_with_letters(), "completion": "B"},
        {"messages": [{"role": "user", "content": "What is the secret word?"}, {"role": "assistant", "content": "swordfish"}]},
        {"instruction": "Name a colour.", "input": "", "output": "blue"},
        {"prompt": "Say hello.", "completion": "hello"},
        {"instruction": "Add the numbers.", "instances": [{"input": "2 and 3", "output": "5"}, {"input": "4 and 4", "output": "8"}]},
    ]
    data.write_text("\n".join(map(json.dumps, rows)) + "\n{broken\n", encoding="utf-8")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    args = [base_run, data, "--out", out, "--val", val, "--max-steps", "60", "--lr", "1e-2", "--warmup-steps", "5",
            "--micro-batch", "2", "--global-batch", "4", "--precision", "fp32", "--device", "cpu", "--log-every", "20"]
    assert cli("sft", *args) == 0
    m = json.loads((out / "manifest.json").read_text())
    s = m["stats"]
    assert m["stage"] == "sft"
    assert (s["train_examples"], s["val_examples"], s["skipped"], s["steps"]) == (6, 1, {"bad_json": 1}, 60)
    assert s["rows"] <= 2 and s["packing_fill"] > 0.5  # six short examples share 128-token rows
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert s["final_val_loss"] < 0.1 < first
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model", "metrics.jsonl", "loss.png"}
    # the run is a model run: generate's chat mode renders the prompt and stops at the reply's end
    done, _, _ = run_generate(GenerateConfig(run=str(out), prompt="What is the secret word?", chat=True, temperature=0, max_new_tokens=20, device="cpu"))
    assert (done[0].text, done[0].finish_reason) == ("swordfish", "stop")
    # eval's generation protocol in chat mode reads the letter the model was taught to write
    model, _ = load_model(out)
    tok = load_tokenizer(out / "tokenizer.model")
    fmt = chat_format(tok, out)
    prompt = generation_mc.encode(tok, generation_mc.build_prompt(question, []), False, fmt)
    assert prompt == [tok.bos_id, *tok.encode(user_prompt(generation_mc.build_prompt(question, [])))]
    (got,) = generation_mc.select_by_generation(model, tok, [prompt], [3], chat=fmt)
    assert (got.output, got.pred) == ("B", 1)
    # exported, it answers the same through transformers' own chat template and generate
    import transformers

    export_hf(ExportConfig(run=out, out=tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "What is the secret word?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    assert ids[0].tolist() == fmt.prompt("What is the secret word?")  # BOS first, as trained
    gen = hf.generate(ids, max_new_tokens=12, do_sample=False)  # generation_config stops at <|end|>
    assert hf_tok.decode(gen[0, ids.shape[1] :]) == "swordfish<|end|>"
    _third_party_chat(tmp_path / "hf", tmp_path / "third", fmt)
    # same options and data: nothing to redo, known from the manifest before any data is read
    import llmctl.train.sft as sft_stage

    def no_reading(*a, **k):
        raise AssertionError("a complete run read its data again")

    monkeypatch.setattr(sft_stage, "train_val", no_reading)
    assert cli("sft", *args) == 0


def _third_party_chat(hf_dir: Path, third: Path, ours: ChatFormat) -> None:
    """A transformers directory that is not an llmctl export (no manifest, no tokenizer.model) is
    read through tokenizer.json, and --chat uses its own chat template and end-of-turn ids: here a
    template in the common style (BOS written by the template, roles as markers) over the markers
    this model was trained on, so its answer must be the same."""
    shutil.copytree(hf_dir, third, ignore=shutil.ignore_patterns("manifest.json", "tokenizer.model"))
    tc = json.loads((third / "tokenizer_config.json").read_text())
    tc["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (third / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = load_any(third)[1]
    fmt = chat_format(tok, third)
    # the end-of-turn id comes from generation_config.json, where chat models (and our exports) list it
    assert isinstance(tok, HFTokenizer) and fmt.kind == "template" and ours.stop_ids[0] in fmt.stop_ids
    for system in (None, "Be brief."):
        assert fmt.prompt("What is the secret word?", system) == ours.prompt("What is the secret word?", system)
    done, _, _ = run_generate(GenerateConfig(run=str(third), prompt="What is the secret word?", chat=True, temperature=0,
                                             max_new_tokens=20, device="cpu"))
    assert (done[0].text, done[0].finish_reason) == ("swordfish", "stop")
    with pytest.raises(UsageError, match="chat template refused the conversation: unknown role tool"):
        fmt.render([{"role": "tool", "content": "x"}])
    del tc["chat_template"]
    (third / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(UsageError, match="neither llmctl's chat markers nor a chat template; drop --chat"):
        run_generate(GenerateConfig(run=str(third), prompt="Hi", chat=True, device="cpu"))


def test_cli_sft_bad_input(base_run, tmp_path, capsys):
    def run(*args) -> tuple[int, str]:
        code = cli(*args)
        return code, capsys.readouterr().err

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "no chat here"}) + "\n", encoding="utf-8")
    code, err = run("sft", base_run, data, "--out", tmp_path / "o", "--max-steps", "1")
    assert code == 2 and "no usable training examples" in err and "unknown_layout 1" in err
    code, err = run("sft", tmp_path, data, "--out", tmp_path / "o", "--max-steps", "1")
    assert code == 2 and "not a complete llmctl artifact" in err
    code, err = run("sft", base_run, tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    assert code == 2 and "missing.jsonl: no such file" in err
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    code, err = run("sft", base_run, good, "--out", tmp_path / "o", "--seq-len", "4096")
    assert code == 2 and "exceeds the base model's context 128" in err
    code, err = run("sft", base_run, good, "--val", data, "--out", tmp_path / "o", "--max-steps", "1")
    assert code == 2 and "no usable records (unknown_layout 1); check the file or drop --val" in " ".join(err.split())
    assert not (tmp_path / "o").exists()
    code, err = run("generate", base_run, "--prompt", "x", "--system", "s")
    assert code == 2 and "--system needs --chat" in err
    code, err = run("eval", base_run, "--task", f"jsonl:{good}", "--chat", "--protocol", "likelihood", "--out", tmp_path / "e")
    assert code == 2 and "--chat applies to the generation protocol" in err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sft_under_torchrun_matches_one_process_at_the_same_global_batch(base_run, shared_data, tmp_path, one_thread, parallel,
                                                                        capsys):
    """Two gloo ranks, each with its own examples (so unequal reply-token counts), against one
    process accumulating the same 8 rows per step: the per-step token count is all-reduced. Under
    --fsdp too (weights sharded; an odd number of val examples at micro-batch 2 gives the ranks
    unequal val batch counts, which the eval's lockstep must carry)."""
    data = shared_data / "sft" / "code-alpaca-2k.json"
    common = ["sft", base_run, data, "--max-steps", "4", "--log-every", "1", "--micro-batch", "2", "--global-batch", "8",
              "--seq-len", "64", "--val-fraction", "0.01", "--lr", "3e-3", "--precision", "fp32", "--device", "cpu",
              *(["--fsdp"] if parallel == "fsdp" else [])]
    s1, s2 = one_process_and_two_ranks(common, tmp_path)
    # the default 10 warmup steps do not fit in 4: said, not silent
    assert "--warmup-steps 10 ≥ the run's 4 steps: the learning rate reaches its peak at best on the last step" in " ".join(
        capsys.readouterr().err.split())
    assert (s1["accum_steps"], s2["accum_steps"], s2["world_size"]) == (4, 2, 2)
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-4)
    # the ranks' real tokens are summed, not one rank's count × 2: the same count as one process
    assert s2["tokens_seen"] == s1["tokens_seen"] > 0
    if parallel == "ddp":  # a no-op rerun under torchrun: one line and one summary, from rank 0
        p = torchrun_llmctl(*common, "--out", tmp_path / "two")
        assert p.code == 0 and p.err.count("nothing to do") == 1 and p.out.count("sft →") == 1, p.out + p.err

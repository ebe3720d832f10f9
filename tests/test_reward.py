"""Reward modelling: the score is read at each row's last real token; ``llmctl reward`` starts at
exactly ln 2, learns a preference on held-out pairs, and writes a run ppo can load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cli, one_process_and_two_ranks, train_losses
from modelkit import make_run

from llmctl.errors import UsageError
from llmctl.model import ModelConfig, Transformer
from llmctl.model.reward import SCORE, load_reward_model, pad_right, rewards, score_head, score_sequences
from llmctl.train import checkpoint as ckpt
from llmctl.train.loop import CHECKPOINTS, METRICS


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def test_the_score_is_read_at_each_rows_last_real_token():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=32)).eval()
    head = score_head(16)
    torch.nn.init.normal_(head.weight)
    seqs = [[1, 5, 7, 9, 11, 13, 2], [1, 4, 2], [1, 8, 8, 2]]
    ids, lengths = pad_right(seqs, pad_id=3)
    assert lengths.tolist() == [7, 3, 4] and ids[1].tolist() == [1, 4, 2, 3, 3, 3, 3]
    with torch.no_grad():
        alone = [float(rewards(model, head, torch.tensor([s]), torch.tensor([len(s)]))) for s in seqs]
        batched = rewards(model, head, ids, lengths)
        # padding after the last token cannot change it (causal attention), whatever the pad id
        other = rewards(model, head, pad_right(seqs, pad_id=0)[0], lengths)
        at_end = rewards(model, head, ids, torch.full_like(lengths, ids.shape[1]))  # the classic bug
    torch.testing.assert_close(batched, torch.tensor(alone))
    torch.testing.assert_close(other, batched)
    assert not torch.allclose(at_end[1:], batched[1:], atol=1e-3)
    assert score_sequences(model, head, seqs, pad_id=3, batch_size=2) == pytest.approx(alone, abs=1e-5)


@pytest.fixture
def base_run(tmp_path, spm_model) -> Path:
    make_run(tmp_path / "base", spm_model, n_layer=2, d_model=64, max_seq_len=128, init_std=0.02)
    return tmp_path / "base"


def test_cli_reward_on_hh_starts_at_ln2_and_writes_a_loadable_run(base_run, shared_data, tmp_path, one_thread):
    out = tmp_path / "rm"
    hh = shared_data / "preference" / "hh-rlhf-harmless-test.jsonl.gz"
    code = cli("reward", base_run, hh, "--out", out, "--max-steps", "4", "--log-every", "1", "--micro-batch", "2",
               "--global-batch", "4", "--lr", "1e-3", "--val-fraction", "0.01", "--precision", "fp32", "--device", "cpu")
    assert code == 0
    recs = [r for r in _metrics(out) if "loss" in r]
    # the zero-initialised head scores everything 0 at step 1: exactly ln 2, margin 0
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert recs[0]["margin"] == recs[0]["rewards/chosen"] == 0.0
    assert recs[-1]["rewards/chosen"] != 0.0 and len(recs) == 4
    m = json.loads((out / "manifest.json").read_text())
    s = m["stats"]
    assert m["stage"] == "reward" and SCORE in m["files"]
    assert s["train_pairs"] > 1000 and s["val_pairs"] > 0 and s["truncated"] > 0 and s["skipped"]["reply_too_long"] > 0
    assert 0.0 <= s["final_val_accuracy"] <= 1.0 and s["final_val_score_std"] > 0
    model, head, cfg = load_reward_model(out)
    assert cfg["base"] == str(base_run.resolve()) and not head.weight.requires_grad
    # the final checkpoint holds the trained head too (a resumed run continues it)
    (_, last), = ckpt.list_checkpoints(out / CHECKPOINTS)[-1:]
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(last / "model.safetensors"))["extra.score.weight"], head.weight)


def test_cli_reward_learns_a_preference_that_holds_out(base_run, tmp_path, one_thread):
    data, val = tmp_path / "pairs.jsonl", tmp_path / "val.jsonl"
    rows = [{"prompt": q, "chosen": "yes", "rejected": "no"} for q in ("Do you agree?", "Shall we go?", "Is it ready?", "Can you help?")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    val.write_text(json.dumps({"prompt": "Will it rain?", "chosen": "yes", "rejected": "no"}) + "\n", encoding="utf-8")
    out = tmp_path / "rm"
    assert cli("reward", base_run, data, "--val", val, "--out", out, "--max-steps", "30", "--lr", "3e-3",
               "--micro-batch", "4", "--warmup-steps", "2", "--precision", "fp32", "--device", "cpu") == 0
    s = json.loads((out / "manifest.json").read_text())["stats"]
    assert s["final_val_accuracy"] == 1.0 and s["final_val_margin"] > 1.0 and s["final_val_loss"] < 0.3
    # the loaded model scores the held-out prompt's chosen reply above its rejected one
    from llmctl.chat import encode_chat
    from llmctl.tokenizer import load_tokenizer

    model, head, _ = load_reward_model(out)
    tok = load_tokenizer(out / "tokenizer.model")
    user = {"role": "user", "content": "Will it rain?"}
    yes, no = (encode_chat(tok, [user, {"role": "assistant", "content": a}]).ids for a in ("yes", "no"))
    r_yes, r_no = score_sequences(model, head, [yes, no], tok.pad_id)
    assert r_yes - r_no > 1.0
    # exported, transformers' sequence classifier gives the same scores on a right-padded batch
    import transformers

    from llmctl.model.hf import ExportConfig, export_hf

    m = export_hf(ExportConfig(run=out, out=tmp_path / "hf"))
    assert m["stats"]["architecture"] == "LlamaForSequenceClassification"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    longer = encode_chat(tok, [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": "yes, it will"}]).ids
    seqs = [yes, no, longer]
    ids, lengths = pad_right(seqs, tok.pad_id)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(got, torch.tensor(score_sequences(model, head, seqs, tok.pad_id)), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.padding_side == "right"
    # it is not a language model: generate and eval say so in one line
    from llmctl.model.generate import GenerateConfig, run_generate

    with pytest.raises(UsageError, match=r"is a reward model \(LlamaForSequenceClassification\), not a language model"):
        run_generate(GenerateConfig(run=str(tmp_path / "hf"), prompt="Hi", device="cpu"))
    with pytest.raises(UsageError, match=r"is a reward model \(llmctl reward run\), not a language model"):
        run_generate(GenerateConfig(run=str(out), prompt="Hi", device="cpu"))  # the run itself, as its export


def test_cli_reward_bad_input(base_run, tmp_path, capsys):
    def run(*args) -> tuple[int, str]:
        code = cli(*args)
        return code, capsys.readouterr().err

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n", encoding="utf-8")
    code, err = run("reward", base_run, data, "--out", tmp_path / "o")
    assert code == 2 and "no usable preference pairs" in err and "same_replies 1" in err
    code, err = run("reward", base_run, tmp_path / "none.jsonl", "--out", tmp_path / "o")
    assert code == 2 and "none.jsonl: no such file" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="is a 'pretrain' artifact, but this stage needs reward output"):
        load_reward_model(base_run)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_reward_under_torchrun_matches_one_process_at_the_same_global_batch(base_run, shared_data, tmp_path, one_thread, parallel):
    """Two gloo ranks, 2 pairs per micro-batch each, against one process accumulating the same 8
    pairs per step: the same pairs in the same steps, the score head's gradients averaged. Under
    --fsdp the backbone is sharded and the head stays whole (its own optimizer group, its
    gradients all-reduced, clipped with the shards by one global norm); one process ignores it."""
    hh = shared_data / "preference" / "hh-rlhf-harmless-test.jsonl.gz"
    common = ["reward", base_run, hh, "--max-steps", "4", "--log-every", "1", "--micro-batch", "2", "--global-batch", "8",
              "--seq-len", "64", "--val-fraction", "0.01", "--lr", "3e-3", "--precision", "fp32", "--device", "cpu",
              *(["--fsdp"] if parallel == "fsdp" else [])]
    s1, s2 = one_process_and_two_ranks(common, tmp_path)
    assert (s1["accum_steps"], s2["accum_steps"], s2["world_size"]) == (4, 2, 2)
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert a[-1] != a[0]
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-4)
    torch.testing.assert_close(load_reward_model(tmp_path / "two")[1].weight, load_reward_model(tmp_path / "one")[1].weight, rtol=1e-3, atol=1e-5)

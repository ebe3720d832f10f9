"""DPO: preference records (HH-RLHF dialogues, prompt/chosen/rejected) become pairs scored on the
final reply only; the loss starts at exactly ln 2 against the frozen reference; ``llmctl dpo`` end
to end moves the policy towards the chosen replies."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cli
from modelkit import make_run

from llmctl.chat import BadRecord, encode_chat, parse_hh, to_preference
from llmctl.model.io import load_model
from llmctl.train.dpo import reply_logps
from llmctl.train.preference import cut_pair, load_preferences
from llmctl.train.sft import Example


def _hh(shared_data: Path) -> Path:
    return shared_data / "preference" / "hh-rlhf-harmless-test.jsonl.gz"


def test_hh_dialogues_become_a_shared_prompt_and_two_replies(shared_data):
    lines = gzip.open(_hh(shared_data), "rt", encoding="utf-8").read().splitlines()
    bad: dict[str, int] = {}
    prefs = load_preferences([_hh(shared_data)], bad)
    assert len(prefs) + sum(bad.values()) == len(lines)
    assert set(bad) <= {"empty_output", "prompts_differ", "same_replies"} and len(prefs) > 0.99 * len(lines)
    rec = json.loads(lines[0])
    prompt, chosen, rejected = to_preference(rec)
    assert prompt[-1]["role"] == "user" and chosen["role"] == rejected["role"] == "assistant"
    # the messages give back the dialogue text exactly
    labels = {"user": "Human", "assistant": "Assistant"}
    for msgs, text in ((prompt + [chosen], rec["chosen"]), (prompt + [rejected], rec["rejected"])):
        assert "".join(f"\n\n{labels[m['role']]}: {m['content']}" for m in msgs) == text
    with pytest.raises(BadRecord, match="not_a_dialogue"):
        parse_hh("no turns here")


def test_prompt_chosen_rejected_layouts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "Go away."},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "x", "chosen": "", "rejected": "b"},
        {"chosen": "just text", "rejected": "more text"},
        {"prompt": "x", "chosen": 3, "rejected": "b"},
        {"text": "nothing"},
    ]) + "\n", encoding="utf-8")
    bad: dict[str, int] = {}
    prefs = load_preferences([f], bad)
    assert [(p[-1]["content"], c["content"], r["content"]) for p, c, r in prefs] == [
        ("Capital of France?", "Paris.", "Rome."), ("Hi", "Hello.", "Go away.")]
    assert prefs[1][0][0] == {"role": "system", "content": "Be brief."}
    assert bad == {"same_replies": 1, "empty_output": 1, "not_a_dialogue": 1, "reply_not_text": 1, "unknown_layout": 1}


def test_only_the_final_reply_is_scored_and_long_prompts_lose_their_start_on_both_sides(tok):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye " * 40}]
    ct = encode_chat(tok, [*prompt, {"role": "assistant", "content": "Goodbye."}], last_only=True)
    other = encode_chat(tok, [*prompt, {"role": "assistant", "content": "See you later, and thanks for all."}],
                        last_only=True)
    assert tok.decode([i for i, w in zip(ct.ids, ct.trained, strict=True) if w]) == "Goodbye.<|end|>"
    c, r, cut = cut_pair(ct, other, 1000)
    assert not cut and (c, r) == (ct, other)
    c, r, cut = cut_pair(ct, other, 25)
    # one cut for both: the longer side fills the window, and both replies follow the same context
    assert cut and len(r.ids) == 25 and len(c.ids) == 25 - (len(other.ids) - len(ct.ids))
    assert c.ids == ct.ids[len(other.ids) - 25 :] and r.ids == other.ids[-25:]
    context = c.trained.index(True)
    assert context > 0 and c.ids[:context] == r.ids[:context] and not any(r.trained[:context])
    assert Example(*c.targets()).targets == Example(*ct.targets()).targets[-(len(c.ids) - 1) :]
    with pytest.raises(BadRecord, match="reply_too_long"):
        cut_pair(ct, other, len(other.ids) - other.trained.index(True))  # no context left before the reply


def test_reply_logps_sum_the_target_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    lp = logits.log_softmax(-1)
    want = torch.stack([lp[0, 1, 3] + lp[0, 2, 4], lp[1, 2, 1] + lp[1, 3, 2] + lp[1, 4, 6]])
    torch.testing.assert_close(reply_logps(logits, labels), want)


@pytest.fixture
def base_run(tmp_path, spm_model) -> Path:
    make_run(tmp_path / "base", spm_model, n_layer=2, d_model=64, max_seq_len=128, init_std=0.02)
    return tmp_path / "base"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_dpo_on_hh_starts_at_ln2_and_keeps_the_reference(base_run, shared_data, tmp_path, one_thread):
    out = tmp_path / "dpo"
    code = cli("dpo", base_run, _hh(shared_data), "--out", out, "--max-steps", "6", "--log-every", "1",
               "--micro-batch", "2", "--global-batch", "4", "--lr", "1e-3", "--val-fraction", "0.01",
               "--precision", "fp32", "--device", "cpu")
    assert code == 0
    recs = [r for r in _metrics(out) if "loss" in r]
    # step 1: the policy is the reference, so every margin is exactly 0 and the loss exactly ln 2
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert recs[0]["rewards/margins"] == recs[0]["rewards/chosen"] == recs[0]["rewards/rejected"] == 0.0
    assert recs[-1]["rewards/chosen"] != 0.0 and len(recs) == 6
    s = json.loads((out / "manifest.json").read_text())["stats"]
    assert s["train_pairs"] > 1000 and s["val_pairs"] > 0 and s["truncated"] > 0 and s["skipped"]["reply_too_long"] > 0
    assert 0.0 <= s["final_val_accuracy"] <= 1.0 and s["final_val_loss"] > 0
    base, _ = load_model(base_run)
    tuned, cfg = load_model(out)
    assert cfg["base"] == str(base_run.resolve())
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), tuned.state_dict().values(), strict=True))


def test_cli_dpo_teaches_a_preference(base_run, tmp_path, one_thread):
    """Pairs always preferring "yes" over "no": after training every val pair has a positive margin
    (DPO moves the policy's log-ratio of the two replies against the reference; it does not by
    itself make either reply likely, so the test reads margins, not samples)."""
    data = tmp_path / "pairs.jsonl"
    prompts = ["Do you agree?", "Shall we go?", "Is it ready?", "Can you help?"]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n" for p in prompts), encoding="utf-8")
    out = tmp_path / "dpo"
    assert cli("dpo", base_run, data, "--val", data, "--out", out, "--max-steps", "40", "--lr", "1e-2", "--beta", "0.5",
               "--micro-batch", "4", "--warmup-steps", "2", "--precision", "fp32", "--device", "cpu") == 0
    s = json.loads((out / "manifest.json").read_text())["stats"]
    assert s["final_val_accuracy"] == 1.0 and s["final_val_margin"] > 1.0 and s["final_val_loss"] < 0.3
    recs = [r for r in _metrics(out) if "loss" in r]
    assert recs[0]["rewards/accuracies"] == 0.0 and recs[-1]["rewards/accuracies"] == 1.0


def test_cli_dpo_bad_input(base_run, tmp_path, capsys):
    def run(*args) -> tuple[int, str]:
        code = cli(*args)
        return code, capsys.readouterr().err

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n", encoding="utf-8")
    code, err = run("dpo", base_run, data, "--out", tmp_path / "o")
    assert code == 2 and "no usable preference pairs" in err and "same_replies 1" in err
    code, err = run("dpo", base_run, data, "--out", tmp_path / "o", "--beta", "0")
    assert code == 2 and "--beta > 0" in err
    code, err = run("dpo", tmp_path / "nope", data, "--out", tmp_path / "o")
    assert code == 2 and "no such artifact" in err
    assert not (tmp_path / "o").exists()

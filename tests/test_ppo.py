"""PPO: the arithmetic (KL estimators, GAE, whitening, clipped losses) against REFERENCE.md's
formulas; prompts from every data layout; and the whole RLHF chain on a real tiny model: sft
teaches "yes" and "no" equally, a reward model learns to prefer "yes", and ``llmctl ppo`` moves the
policy to "yes" under a KL penalty, with rollouts that resume exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, torchrun_llmctl
from modelkit import make_run

from llmctl.chat import BadRecord, to_prompts
from llmctl.model.generate import GenerateConfig, run_generate
from llmctl.model.io import load_model
from llmctl.train.finetune import load_base
from llmctl.train.loop import CHECKPOINTS, METRICS, Trainer, read_metrics
from llmctl.train.ppo import (
    PPOConfig,
    PPOObjective,
    encode_prompts,
    gae,
    kl_estimate,
    load_prompts,
    ppo_losses,
    whiten,
)

QUESTIONS = ["Do you agree?", "Shall we go?", "Is it ready?", "Can you help?", "Will it rain?", "Are you sure?",
             "Is this right?", "Should I wait?", "Do you like tea?", "Is the door open?", "Can we start?", "Was it fun?"]


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), logp - ref)  # may be negative per sample
    r = (ref - logp).exp()
    k3 = kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k3, (r - 1) - r.log())
    assert (k3 >= 0).all() and k3[2] == 0


def test_gae_matches_the_recursion_written_out():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        want, nxt = [0.0] * n, 0.0
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0  # the reply's end bootstraps from 0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            nxt = delta + gamma * lam * nxt
            want[t] = nxt
        assert adv[b, :n].tolist() == pytest.approx(want, abs=1e-6)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n])
    # γ = λ = 1: the advantage is the reward-to-go minus the value
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    togo = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv1, (togo - values) * mask)
    w = whiten(adv, mask)
    on = mask.bool()
    assert float(w[on].mean()) == pytest.approx(0.0, abs=1e-6) and float(w[on].std()) == pytest.approx(1.0, abs=1e-4)
    assert (w[~on] == 0).all()


def test_clipped_policy_and_value_losses():
    mask = torch.ones(1, 4)
    batch = {"mask": mask, "advantages": torch.tensor([[1.0, 1.0, -1.0, -1.0]]), "returns": torch.tensor([[1.0, 1.0, 1.0, 1.0]]),
             "old_values": torch.zeros(1, 4), "old_logp": torch.zeros(1, 4)}
    # ratios 1.5 (A > 0: clipped to 1.2), 0.9 (A > 0: not clipped), 1.5 (A < 0: not clipped), 0.5 (A < 0: clipped to 0.8)
    logp = torch.tensor([[1.5, 0.9, 1.5, 0.5]]).log().requires_grad_(True)
    values = torch.tensor([[0.5, 2.0, 0.1, 1.0]], requires_grad=True)
    pg, vf, m = ppo_losses(logp, values, batch, clip=0.2, clip_value=0.2)
    assert pg.item() == pytest.approx((-1.2 - 0.9 + 1.5 + 0.8) / 4)
    assert float(m["policy/clipfrac"]) == 0.5
    assert float(m["policy/approxkl"]) == pytest.approx(0.5 * float((logp.detach() ** 2).mean()))
    pg.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0 and logp.grad[0, 1] != 0  # clipped terms pass no gradient
    # value: max of the unclipped and the clipped (old ± 0.2) squared errors, halved
    want = 0.5 * sum(max((v - 1.0) ** 2, (max(min(v, 0.2), -0.2) - 1.0) ** 2) for v in (0.5, 2.0, 0.1, 1.0)) / 4
    assert vf.item() == pytest.approx(want)


def test_prompts_from_every_layout(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("What is 2 + 2?\n\n  \nName a colour.\n", encoding="utf-8")
    recs = tmp_path / "p.jsonl"
    recs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hi", "completion": "ignored"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]},
        {"chosen": "\n\nHuman: Q?\n\nAssistant: yes", "rejected": "\n\nHuman: Q?\n\nAssistant: no"},
        # pairs no preference stage could use are still prompts: equal replies, an empty one
        {"chosen": "\n\nHuman: R?\n\nAssistant: same", "rejected": "\n\nHuman: R?\n\nAssistant: same"},
        {"chosen": "\n\nHuman: S?\n\nAssistant:", "rejected": "\n\nHuman: S?\n\nAssistant: no"},
        {"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"input": "3 4", "output": "7"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"prompt": "   "},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"text": "nothing"},
    ]) + "\n{broken\n", encoding="utf-8")
    bad: dict[str, int] = {}
    got = load_prompts([txt, recs], bad)
    last_user = [p[-1]["content"] for p in got]
    assert last_user == ["What is 2 + 2?", "Name a colour.", "Hi", "c", "Q?", "R?", "S?", "Add.\n\n1 2", "Add.\n\n3 4", "x"]
    assert len(got[3]) == 3  # earlier turns stay as context
    assert bad == {"bad_json": 1, "empty_prompt": 1, "prompt_ends_with_reply": 1, "unknown_layout": 1}
    with pytest.raises(BadRecord, match="not_text"):
        to_prompts({"prompt": 3})


def test_long_prompts_keep_their_end(tok):
    ids, cut = encode_prompts(tok, [[{"role": "user", "content": "word " * 200}], [{"role": "user", "content": "Hi"}]], 40)
    assert cut == 1 and len(ids[0]) == 40 and ids[1][0] == tok.bos_id
    assert ids[0][-1] == tok.role_ids["assistant"]  # the reply's opening marker is never cut


@pytest.fixture(scope="module")
def yes_no(tmp_path_factory, spm_model) -> dict[str, Path]:
    """A tiny chat model answering "yes" or "no" equally (sft) and a reward model preferring "yes"."""
    root = tmp_path_factory.mktemp("rlhf")
    make_run(root / "base", spm_model, n_layer=2, d_model=64, max_seq_len=128, init_std=0.02)
    sft_data, pairs, prompts = root / "sft.jsonl", root / "pairs.jsonl", root / "prompts.txt"
    sft_data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q in QUESTIONS for a in ("yes", "no")), encoding="utf-8")
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": "yes", "rejected": "no"}) + "\n" for q in QUESTIONS), encoding="utf-8")
    prompts.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    common = ["--precision", "fp32", "--device", "cpu", "--log-every", "100"]
    assert cli("sft", root / "base", sft_data, "--val", sft_data, "--out", root / "sft", "--epochs", "40", "--lr", "3e-3",
               "--micro-batch", "8", "--no-packing", *common) == 0
    assert cli("reward", root / "sft", pairs, "--val", pairs, "--out", root / "rm", "--max-steps", "30", "--lr", "3e-3",
               "--micro-batch", "4", *common) == 0
    return {"root": root, "sft": root / "sft", "rm": root / "rm", "prompts": prompts}


PPO_ARGS = ["--rollout-batch", "12", "--micro-batch", "6", "--ppo-epochs", "2", "--max-new-tokens", "8", "--temperature", "1.0",
            "--lr", "6e-4", "--warmup-steps", "2", "--precision", "fp32", "--device", "cpu"]


def test_cli_ppo_moves_the_policy_to_the_rewarded_reply(yes_no, tmp_path, one_thread):
    out = tmp_path / "ppo"
    args = [yes_no["sft"], yes_no["prompts"], "--val", yes_no["prompts"], "--reward", yes_no["rm"], "--out", out,
            "--max-steps", "24", "--log-every", "1", *PPO_ARGS]
    assert cli("ppo", *args) == 0
    m = json.loads((out / "manifest.json").read_text())
    s = m["stats"]
    assert m["stage"] == "ppo" and (s["train_prompts"], s["val_prompts"], s["rollouts"]) == (12, 12, 6)
    start, final = s["start_val"], s["final_val"]
    # the sft model says "yes" about half the time; after PPO it says it every time, paying KL for it
    assert start["val_kl"] == 0.0 and final["val_kl"] > 0.3
    assert final["val_score"] > start["val_score"] + 1.0 and final["val_ended"] == 1.0
    recs = [r for r in read_metrics(out / METRICS) if "loss" in r]
    # step 1: the policy is the one that sampled and the reference, so ratio 1 and KL 0 (up to the
    # rounding of other padding: the rollout's forward passes batch the rows differently)
    assert recs[0]["policy/ratio"] == pytest.approx(1.0, abs=1e-6) and recs[0]["policy/approxkl"] == pytest.approx(0.0, abs=1e-9)
    assert recs[0]["objective/kl"] == 0.0
    assert any(r["policy/clipfrac"] > 0 for r in recs)
    assert recs[-1]["objective/scores"] > recs[0]["objective/scores"]
    # rollout cost: logged with each step (4 steps share a rollout), summed into the manifest
    assert all(r["rollout/seconds"] > 0 and r["rollout/sample_tokens_per_s"] > 0 for r in recs)
    assert len({r["rollout/seconds"] for r in recs[:4]}) == 1 and recs[4]["rollout/seconds"] != recs[0]["rollout/seconds"]
    assert 0 < s["rollout_seconds"] < s["train_seconds"] and 0 < s["rollout_share"] < 1 and s["sample_tokens_per_s"] > 0
    done, _, _ = run_generate(GenerateConfig(run=str(out), prompts=str(yes_no["prompts"]), out=str(tmp_path / "g.jsonl"), chat=True, temperature=0,
                                             max_new_tokens=8, device="cpu"))
    assert [c.text for c in done] == ["yes"] * len(QUESTIONS)
    _, cfg = load_model(out)
    assert cfg["base"] == str(yes_no["sft"].resolve())
    assert cli("ppo", *args) == 0  # complete: nothing to redo
    # judged against "no" references: the reward model prefers the PPO model's answers
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"instruction": q, "output": "no"}) + "\n" for q in QUESTIONS), encoding="utf-8")
    for judge, proto in ((yes_no["rm"], "reward"), (yes_no["sft"], "lm-judge")):
        ev = tmp_path / f"eval-{proto}"
        assert cli("eval", out, "--task", f"judge:{refs}", "--judge", judge, "--chat", "--reply-tokens", "8", "--out", ev) == 0
        res = {r["metric"]: r for r in json.loads((ev / "results.json").read_text())["results"]}
        assert {r["protocol"] for r in res.values()} >= {proto} and res["win_rate"]["n"] == len(QUESTIONS)
        items = [json.loads(line) for line in (ev / "items-refs.jsonl").read_text().splitlines()]
        assert [i["output"] for i in items] == ["yes"] * len(QUESTIONS)
        assert all(0.0 < i["preference"] < 1.0 for i in items)
        if proto == "reward":
            assert res["win_rate"]["value"] > 0.7 and all(i["model_first"] for i in items)
        else:  # an LM judge sees the pair in a drawn order
            assert {i["model_first"] for i in items} == {True, False}
    # longer than the context (128): an instruction (its answer's prompt and its judging), a reference
    # (its judging). --truncate left cuts and counts them; --truncate skip leaves them out, counted
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "Say yes. " * 100, "output": "no"}) + "\n"
                    + json.dumps({"instruction": QUESTIONS[0], "output": "no " * 300}) + "\n", encoding="utf-8")
    for judge in (yes_no["rm"], yes_no["sft"]):
        for mode in ("left", "skip"):
            ev = tmp_path / f"long-{judge.name}-{mode}"
            assert cli("eval", out, "--task", f"judge:{long}", "--judge", judge, "--chat", "--reply-tokens", "8",
                       "--truncate", mode, "--out", ev) == 0
            res = json.loads((ev / "results.json").read_text())
            if mode == "left":
                wr = next(r for r in res["results"] if r["metric"] == "win_rate")
                assert wr["n"] == 2 and wr["settings"]["truncated"] == {"answer": 1, "judge": 2}, (judge, wr)
            else:
                skipped = json.loads((ev / "manifest.json").read_text())["stats"]["skipped"]
                assert skipped["long"] == {"answer:longer_than_context": 1, "judge:longer_than_context": 1}


def _trainer(yes_no, work: Path, max_steps: int) -> Trainer:
    work.mkdir(exist_ok=True)
    cfg = PPOConfig(base=yes_no["sft"], data=[yes_no["prompts"]], reward=yes_no["rm"], out=work, max_steps=max_steps,
                    rollout_batch=12, micro_batch=3, global_batch=6, ppo_epochs=2, max_new_tokens=6, temperature=1.0, lr=1e-3,
                    warmup_steps=2, precision="fp32", device="cpu", checkpoint_every=3, log_every=1, seed=1)
    mcfg, _, tok = load_base(cfg.base)
    prompts, _ = encode_prompts(tok, load_prompts(cfg.data, {}), 100)
    model = load_model(cfg.base)[0].train()
    objective = PPOObjective(prompts, [], cfg, tok, cfg.reward, mcfg.d_model)
    return Trainer(model, objective, cfg.loop_config(), work, accum_steps=2, flops_per_token=1.0, title="ppo")


def test_a_resumed_run_continues_inside_its_rollout_exactly(yes_no, tmp_path, one_thread):
    """4 steps per rollout (2 epochs × 12 replies ÷ 6); the step-3 checkpoint is mid-rollout, so the
    resumed run must reuse the saved rollout and then sample the next one as the first run did."""
    full = _trainer(yes_no, tmp_path / "a", 9)
    full.fit()
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / METRICS) if "loss" in r}
    shutil.copytree(tmp_path / "a" / CHECKPOINTS / "step-0000003", tmp_path / "b" / CHECKPOINTS / "step-0000003")
    resumed = _trainer(yes_no, tmp_path / "b", 9)
    assert resumed.fit()["resumed_from_step"] == 3
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / METRICS) if "loss" in r}
    assert set(got) == set(range(4, 10)) and all(got[k] == want[k] for k in got)
    assert resumed.objective.rollouts == full.objective.rollouts == 3
    # the replies sampled before the checkpoint are counted once, from its saved timing
    assert resumed.objective.timing["sampled_tokens"] == full.objective.timing["sampled_tokens"] > 0
    assert all(math.isfinite(v) for v in want.values())


def test_cli_ppo_bad_input(yes_no, tmp_path, capsys, spm_model):
    def run(*args) -> tuple[int, str]:
        code = cli(*args)
        return code, capsys.readouterr().err

    base = [yes_no["sft"], yes_no["prompts"], "--out", tmp_path / "o"]
    code, err = run("ppo", *base, "--reward", yes_no["sft"])
    assert code == 2 and "is an 'sft' artifact, but this stage needs reward output" in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--rollout-batch", "10", "--micro-batch", "4")
    assert code == 2 and "--rollout-batch 10 is not a multiple of the 4 replies" in err
    code, err = run("eval", yes_no["sft"], "--task", f"judge:{yes_no['prompts']}", "--out", tmp_path / "e")
    assert code == 2 and "a judge task needs --judge RUN" in err
    code, err = run("eval", yes_no["sft"], "--task", f"ppl:{yes_no['prompts']}", "--judge", yes_no["rm"], "--out", tmp_path / "e")
    assert code == 2 and "--judge applies to judge tasks" in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--kl-estimator", "k2")
    assert code == 2 and "choose k1 or k3" in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--temperature", "0")
    assert code == 2 and "temperature > 0" in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--max-new-tokens", "128")
    assert code == 2 and "leaves no room for a prompt" in err
    code, err = run("ppo", *base, "--reward", tmp_path / "no-such-rm")
    assert code == 2 and "no-such-rm" in err and "tokenizer" not in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--clip", "0")
    assert code == 2 and "--clip 0.0: the policy ratio's clip range must be > 0" in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--fsdp")
    assert code == 2 and "--fsdp: ppo samples its rollouts from the policy" in err
    code, err = run("ppo", *base, "--reward", yes_no["rm"], "--lr", "-1")
    assert code == 2 and "--lr -1.0: the learning rate must be > 0" in err and "Traceback" not in err
    # a reward model that reads other token ids
    other_tok = tmp_path / "tok"
    other_tok.mkdir()
    from modelkit import train_tokenizer

    other = train_tokenizer(other_tok / "t", vocab_size=600)
    make_run(tmp_path / "other-base", other, n_layer=1, d_model=32, max_seq_len=64)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a?", "chosen": "yes", "rejected": "no"}) + "\n", encoding="utf-8")
    assert cli("reward", tmp_path / "other-base", pairs, "--val", pairs, "--out", tmp_path / "other-rm", "--max-steps", "1", "--device", "cpu") == 0
    capsys.readouterr()
    code, err = run("ppo", *base, "--reward", tmp_path / "other-rm")
    assert code == 2 and "the reward model's tokenizer is not the policy's" in err
    assert not (tmp_path / "o").exists()


def test_ppo_under_torchrun_samples_on_every_rank(yes_no, tmp_path):
    """Two gloo ranks each answer their own 6 prompts per rollout: the 12 prompts are one epoch per
    rollout, the val prompts are split between the ranks, and the score still rises."""
    p = torchrun_llmctl("ppo", yes_no["sft"], yes_no["prompts"], "--val", yes_no["prompts"], "--reward", yes_no["rm"],
                        "--out", tmp_path / "ppo", "--max-steps", "8", "--rollout-batch", "6", "--micro-batch", "3",
                        "--ppo-epochs", "2", "--max-new-tokens", "8", "--temperature", "1.0", "--lr", "1e-3",
                        "--warmup-steps", "2", "--precision", "fp32", "--device", "cpu")
    assert p.code == 0, p.err[-3000:]
    s = json.loads((tmp_path / "ppo" / "manifest.json").read_text())["stats"]
    assert (s["world_size"], s["rollouts"], s["epochs"]) == (2, 2, 2.0)
    assert s["final_val"]["val_score"] > s["start_val"]["val_score"] and s["final_val"]["val_kl"] > 0

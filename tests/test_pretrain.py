"""llmctl pretrain end to end on a real tiny token artifact: layout, resume after kill -9, DDP, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_llmctl, torchrun_llmctl

# one thread per process: bit-for-bit reproducible CPU runs, and kind to the shared 2-core machine
ENV = {"OMP_NUM_THREADS": "1", "LLMCTL_PROGRESS": "0", "COLUMNS": "200"}
TINY = [
    "--preset", "nano", "--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
    "--micro-batch", "4", "--warmup-steps", "2", "--lr", "3e-3", "--precision", "fp32", "--device", "cpu",
]


def _text(n_paragraphs: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    words = "the of and to in a is that for it as was with be by on not he I this are or his from".split()
    paras = []
    for _ in range(n_paragraphs):
        paras.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + ".")
    return "\n\n".join(paras) + "\n"


def _tokens(root: Path, name: str, text: str, tok: Path | None, vocab: int = 300) -> tuple[Path, Path]:
    src = root / f"{name}.txt"
    src.write_text(text, encoding="utf-8")
    if tok is None:
        tok = root / f"{name}-tok"
        r = run_llmctl("tokenize", "train", src, "--vocab-size", vocab, "--out", tok, env=ENV)
        assert r.code == 0, r.err
    out = root / f"{name}-tokens"
    r = run_llmctl("tokenize", "encode", src, "--tokenizer", tok, "--out", out, "--val-fraction", "0.1", env=ENV)
    assert r.code == 0, r.err
    return out, tok


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    tokens, tok = _tokens(root, "main", _text(400, 0), None)
    anneal, _ = _tokens(root, "hq", _text(100, 1), tok)
    other, _ = _tokens(root, "other", _text(100, 2), None, vocab=320)
    return {"tokens": tokens, "anneal": anneal, "other": other, "root": root}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


def test_pretrain_run_layout_stats_and_noop_rerun(data, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", data["tokens"], "--out", run, *TINY, "--max-steps", "24", "--global-batch-tokens", "256",
            "--log-every", "4", "--eval-every", "8", "--eval-batches", "2", "--checkpoint-every", "8",
            "--keep-checkpoints", "2", "--schedule", "wsd", "--optimizer", "muon",
            "--anneal-tokens", data["anneal"], "--anneal-fraction", "0.25", "--ffn-hidden", "88"]
    r = run_llmctl(*args, env=ENV)
    assert r.code == 0, r.err
    assert "parameters" in r.err and "MFLOPs/token" in r.err
    assert "anneal phase from step 18" in r.err  # progress 18/24 = 0.75 = 1 - 0.25
    from llmctl.train.precision import cpu_peak

    # on a CPU without fast bf16, Muon's Newton-Schulz runs in fp32 (torch's runs it in bf16) and says so
    assert ("muon: Newton-Schulz in fp32" in r.err) == (cpu_peak("bf16") < cpu_peak("fp32"))
    for f in ("config.json", "model.safetensors", "tokenizer.model", "metrics.jsonl", "loss.png", "manifest.json"):
        assert (run / f).is_file(), f
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000016", "step-0000024"]  # keep last 2
    for f in ("model.safetensors", "optimizer.pt", "rng.pt", "data.json", "trainer_state.json"):
        assert (run / "checkpoints" / "step-0000024" / f).is_file()
    data_state = json.loads((run / "checkpoints" / "step-0000024" / "data.json").read_text())
    assert data_state["annealing"] is True and data_state["anneal"]["step"] == 6 and data_state["main"]["step"] == 18

    m = json.loads((run / "manifest.json").read_text())
    s = m["stats"]
    assert s["steps"] == 24 and s["tokens_seen"] == 24 * 256 and s["stop_reason"] == "max_steps"
    assert s["accum_steps"] == 2 and s["global_batch_tokens"] == 256
    from llmctl.tokens import BatchSampler

    # passes over each split: 8 windows of 32 per step, 18 steps on the main data and 6 annealing
    per_epoch = {k: BatchSampler(data[k], "train", batch_size=8, seq_len=32, seed=0).windows_per_epoch
                 for k in ("tokens", "anneal")}
    assert s["train_epochs"] == pytest.approx(18 * 8 / per_epoch["tokens"], abs=1e-4)
    assert s["anneal_epochs"] == pytest.approx(6 * 8 / per_epoch["anneal"], abs=1e-4)
    for k in ("non_embedding_params", "total_params", "final_val_loss", "final_val_bpb", "tokens_per_s", "mfu",
              "peak_memory_bytes"):
        assert s[k] is not None and s[k] > 0, k
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["vocab_size"] == 300
    assert cfg["model"]["ffn_hidden"] == 88  # --ffn-hidden overrides SwiGLU's 8/3·d rounded to 64 (= 128 here)
    for k in ("lr", "schedule", "optimizer", "precision", "compile", "max_tokens", "time_budget", "anneal_fraction",
              "micro_batch", "global_batch_tokens", "seed", "grad_clip"):
        assert k in cfg["train"], k
    assert m["params"] == cfg["train"]

    recs = _metrics(run)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 4, 8, 12, 16, 20, 24]
    for r in steps:
        assert {"tokens", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
    assert [r["step"] for r in recs if "val_loss" in r and not r.get("final")] == [8, 16]
    final = recs[-1]
    assert final["final"] and final["val_loss"] == pytest.approx(s["final_val_loss"])
    # learning: well below the uniform distribution's ln(300) = 5.70
    assert s["final_val_loss"] < 5.0 and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    # bpb = nats/token × (val_tokens − 1)/val_bytes / ln 2, from the token manifest
    tm = json.loads((data["tokens"] / "manifest.json").read_text())
    v = tm["splits"]["val"]

    assert s["final_val_bpb"] == pytest.approx(s["final_val_loss"] * (v["tokens"] - 1) / v["bytes"] / math.log(2), rel=1e-5)

    r2 = run_llmctl(*args, env=ENV)
    assert r2.code == 0 and "already complete" in r2.err


def test_kill_9_then_rerun_gives_the_same_loss_curve(data, tmp_path):
    # 120 steps of a few ms each: long enough that a signal sent on seeing a checkpoint lands mid-run
    # (at 20 steps a fast host ran from the step-3 checkpoint to the end between two polls)
    common = ["pretrain", data["tokens"], *TINY, "--max-steps", "120", "--log-every", "1", "--checkpoint-every", "3"]
    ref = tmp_path / "ref"
    r = run_llmctl(*common, "--out", ref, env=ENV)
    assert r.code == 0, r.err

    run = tmp_path / "run"
    work = tmp_path / ".run.tmp-pretrain"
    env = {**os.environ, **ENV}

    def checkpoints() -> list[int]:
        root = work / "checkpoints"
        return sorted(int(d.name.split("-")[1]) for d in root.glob("step-*") if d.is_dir()) if root.is_dir() else []

    def start_and_signal(after_step: int, sig: int) -> subprocess.Popen:
        """Start the run; send ``sig`` as soon as a checkpoint past ``after_step`` exists."""
        # SIGINT at its default disposition in the child: under a non-interactive shell's `&` (a CI
        # runner's background job) it is inherited ignored, and Python then never raises KeyboardInterrupt
        p = subprocess.Popen([sys.executable, "-m", "llmctl", *map(str, common), "--out", str(run)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if any(c > after_step for c in checkpoints()):
                break
            time.sleep(0.005)
        assert p.poll() is None, f"the run finished before it could be stopped: {p.stderr.read()[-2000:]}"
        p.send_signal(sig)
        p.wait(timeout=60)
        return p

    # Ctrl-C: exit status 130 (a shell chain stops), one line, the checkpoints kept
    p = start_and_signal(0, signal.SIGINT)
    err = p.stderr.read()
    assert p.returncode == 130 and "interrupted: rerun the same command to resume" in err and "Traceback" not in err, err
    assert not run.exists() and checkpoints(), checkpoints()
    first = checkpoints()[-1]
    assert first < 120
    # then kill -9 of the resumed run, once it has saved a later checkpoint
    p = start_and_signal(first, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert not run.exists() and work.is_dir()
    second = checkpoints()[-1]
    assert first < second < 120

    r = run_llmctl(*common, "--out", run, env=ENV)
    assert r.code == 0, r.err
    assert "resumed from checkpoint step" in r.err
    a, b = _losses(ref), _losses(run)
    assert sorted(a) == list(range(1, 121)) and sorted(b) == sorted(a)
    assert a == b  # bit-for-bit the same curve
    ma = json.loads((ref / "manifest.json").read_text())["stats"]
    mb = json.loads((run / "manifest.json").read_text())["stats"]
    assert ma["final_val_loss"] == mb["final_val_loss"] and mb["resumed_from_step"] >= second


def _cfg(tokens: Path, out: Path, **kw):
    """The in-process equivalent of TINY (saves a subprocess start: seconds on the shared machine)."""
    from llmctl.train.pretrain import PretrainConfig

    base = dict(tokens=tokens, out=out, preset="nano", n_layer=2, d_model=32, n_head=2, seq_len=32, micro_batch=4,
                warmup_steps=2, lr=3e-3, precision="fp32", device="cpu")
    return PretrainConfig(**{**base, **kw})


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(data, tmp_path):
    from llmctl.train.pretrain import run

    one = tmp_path / "one"
    run(_cfg(data["tokens"], one, max_steps=6, log_every=1, global_batch_tokens=256))
    common = ["pretrain", data["tokens"], *TINY, "--max-steps", "6", "--log-every", "1",
              "--global-batch-tokens", "256"]
    two = tmp_path / "two"
    p = torchrun_llmctl(*common, "--out", two)
    assert p.code == 0, p.err[-3000:]
    s1 = json.loads((one / "manifest.json").read_text())["stats"]
    s2 = json.loads((two / "manifest.json").read_text())["stats"]
    assert s1["accum_steps"] == 2 and s2["accum_steps"] == 1 and s2["world_size"] == 2
    assert s1["tokens_seen"] == s2["tokens_seen"] == 6 * 256
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-4)
    # warmup (2 steps) to the peak 3e-3, then a half cosine from the peak over the other 4 steps
    lrs = [r["lr"] for r in _metrics(one) if "lr" in r]
    want = [1.5e-3, 3e-3] + [3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * q / 4))) for q in range(4)]
    assert lrs == pytest.approx(want) and [r["lr"] for r in _metrics(two) if "lr" in r] == lrs
    # a no-op rerun: one line and one summary, from rank 0 (every rank printed the summary before)
    p = torchrun_llmctl(*common, "--out", two)
    assert p.code == 0 and p.err.count("nothing to do") == 1 and p.out.count("pretrain →") == 1, p.out + p.err
    # a refusal only rank 0 can see (the finished run has other options) reaches every rank as the
    # same one line; the others used to die in the broadcast with a gloo traceback
    p = torchrun_llmctl(*[("7" if a == "6" else a) for a in common], "--out", two)
    assert p.code != 0 and "other options (--max-steps)" in p.err
    assert "RuntimeError" not in p.err and "Connection closed" not in p.err, p.err[-2000:]


def test_logged_loss_is_the_mean_over_the_steps_since_the_last_record(data, tmp_path, capsys):
    from llmctl.train.pretrain import run

    run(_cfg(data["tokens"], tmp_path / "every", max_steps=6, log_every=1))
    run(_cfg(data["tokens"], tmp_path / "third", max_steps=6, log_every=3))
    each, every3 = _losses(tmp_path / "every"), _losses(tmp_path / "third")
    assert sorted(every3) == [1, 3, 6]  # step 1 always, then every 3rd
    assert every3[1] == pytest.approx(each[1])
    assert every3[3] == pytest.approx((each[2] + each[3]) / 2) and every3[6] == pytest.approx(sum(each[k] for k in (4, 5, 6)) / 3)
    # a run whose length is given in tokens (3 steps of 4 × 32) with more warmup steps than that says so
    capsys.readouterr()
    run(_cfg(data["tokens"], tmp_path / "short", max_tokens=3 * 4 * 32, warmup_steps=10))
    assert "--warmup-steps 10 ≥ the run's 3 steps" in " ".join(capsys.readouterr().err.split())


def test_fsdp_two_ranks_match_one_process_and_resume_after_kill_9(data, tmp_path):
    """--fsdp under torchrun (weights, grads and AdamW state sharded over 2 gloo ranks, accumulation
    with the reduce-scatter on the last micro-batch only) trains as one process does at the same
    global batch; its checkpoints hold whole state dicts, and a run killed -9 resumes exactly."""
    import torch
    from safetensors.torch import load_file

    from llmctl.train.pretrain import run

    # a context at which the final eval gives the two ranks unequal numbers of val batches (of 4
    # windows), so lockstep has to keep them together (a bare loop would hang in an all-gather)
    val_targets = json.loads((data["tokens"] / "manifest.json").read_text())["splits"]["val"]["tokens"] - 1
    def batches(n_windows: int, rank: int) -> int:
        return -(-((n_windows + 1 - rank) // 2) // 4)
    T = next(t for t in (20, 24, 28, 36, 40) if batches(-(-val_targets // t), 0) != batches(-(-val_targets // t), 1))
    one = tmp_path / "one"
    run(_cfg(data["tokens"], one, seq_len=T, max_steps=8, log_every=1, global_batch_tokens=16 * T, eval_every=4,
             eval_batches=3, checkpoint_every=3))
    tiny = [str(T) if TINY[i - 1] == "--seq-len" else a for i, a in enumerate(TINY)]
    common = ["pretrain", data["tokens"], *tiny, "--max-steps", "8", "--log-every", "1", "--global-batch-tokens", 16 * T,
              "--eval-every", "4", "--eval-batches", "3", "--checkpoint-every", "3", "--fsdp"]
    two = tmp_path / "two"
    p = torchrun_llmctl(*common, "--out", two)
    assert p.code == 0, p.err[-3000:]
    s1 = json.loads((one / "manifest.json").read_text())["stats"]
    s2 = json.loads((two / "manifest.json").read_text())["stats"]
    assert (s1["accum_steps"], s2["accum_steps"], s2["world_size"]) == (4, 2, 2)
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-4)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()  # whole tensors, gathered from the shards, under the same names
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    # the periodic val (--eval-batches 3) scores the same first 3 × 4 windows on 2 ranks as on one
    def periodic(run):
        return {r["step"]: r["val_loss"] for r in _metrics(run) if "val_loss" in r and not r.get("final")}
    pa, pb = periodic(one), periodic(two)
    assert 4 in pa and pa.keys() == pb.keys()
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=1e-4), (k, pa[k], pb[k])

    # kill -9 of the whole torchrun group after the step-3 checkpoint, then the same command again
    killed = tmp_path / "killed"
    work = tmp_path / ".killed.tmp-pretrain"
    env = {**os.environ, **ENV}
    port = str(29600 + os.getpid() % 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, "-m", "llmctl",
           *map(str, common), "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (work / "checkpoints" / "step-0000003").is_dir():
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    # the launcher and both ranks (torchrun starts its workers in sessions of their own)
    subprocess.run(["pkill", "-KILL", "-f", str(killed)], check=False)
    proc.wait(timeout=60)
    assert not killed.exists(), "the run finished before it was killed"
    saved = torch.load(work / "checkpoints" / "step-0000003" / "optimizer.pt", weights_only=True)
    assert saved["layout"] == "fqn" and "layers.0.mlp.up_proj.weight" in str(list(saved["optimizers"][0]["state"]))
    p = torchrun_llmctl(*common, "--out", killed)
    assert p.code == 0, p.err[-3000:]
    assert "resumed from checkpoint step" in p.err + p.out
    assert _losses(killed) == b  # the uninterrupted --fsdp run's curve, bit for bit


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(data, tmp_path):
    from llmctl.errors import StageError
    from llmctl.train.pretrain import run

    out = tmp_path / "run"
    with pytest.raises(StageError, match=r"loss became (nan|inf) at step \d+; stopped \(the last good checkpoint"):
        run(_cfg(data["tokens"], out, lr=1e9, warmup_steps=0, grad_clip=0.0, max_steps=20, checkpoint_every=1))
    work = tmp_path / ".run.tmp-pretrain"
    ckpts = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert ckpts and all(c.startswith("step-") for c in ckpts)
    assert not out.exists()


def test_bad_inputs_are_refused_with_one_line(data, tmp_path):
    from llmctl.errors import UsageError
    from llmctl.train.pretrain import run

    # tokens of another tokenizer for the anneal phase (through the CLI: one line, exit 2)
    r = run_llmctl("pretrain", data["tokens"], "--out", tmp_path / "a", *TINY, "--max-steps", "2",
                   "--anneal-tokens", data["other"], "--anneal-fraction", "0.5", env=ENV)
    assert r.code == 2 and "another tokenizer" in r.err and len(r.err.strip().splitlines()) == 1
    # a model that cannot fit in memory: refused before allocating anything
    with pytest.raises(UsageError, match="GiB to train.*available"):
        run(_cfg(data["tokens"], tmp_path / "b", preset="base", n_layer=200, d_model=16384, n_head=128, max_steps=1))
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.tmp-pretrain").exists()
    with pytest.raises(UsageError, match="manifest"):  # not a token artifact
        run(_cfg(data["root"], tmp_path / "c", max_steps=1))
    with pytest.raises(UsageError, match="--max-steps"):  # no stopping rule
        run(_cfg(data["tokens"], tmp_path / "d"))
    # out-of-range optimizer options: one line each before anything is written (torch raised a bare ValueError)
    for kw, msg in (({"lr": -1.0}, "--lr -1.0: the learning rate must be > 0"), ({"beta1": 2.0}, "--beta1 2.0: Adam's betas"),
                    ({"min_lr_ratio": 5.0}, "--min-lr-ratio 5.0"), ({"decay_fraction": 3.0}, "--decay-fraction 3.0"),
                    ({"warmup_steps": -5}, "--warmup-steps -5"), ({"weight_decay": -1.0}, "--weight-decay -1.0"),
                    ({"grad_clip": -1.0}, "--grad-clip -1.0"), ({"schedule": "linear"}, "--schedule 'linear'"),
                    ({"fsdp": True, "optimizer": "muon"}, "--fsdp with --optimizer muon: Muon orthogonalises whole matrices")):
        with pytest.raises(UsageError, match=re.escape(msg)):
            run(_cfg(data["tokens"], tmp_path / "h", max_steps=1, **kw))
        assert not (tmp_path / "h").exists() and not (tmp_path / ".h.tmp-pretrain").exists()
    with pytest.raises(UsageError, match="multiple of"):  # micro-batches cannot fill the global batch
        run(_cfg(data["tokens"], tmp_path / "e", max_steps=1, global_batch_tokens=200))
    with pytest.raises(UsageError, match="another tokenizer"):
        run(_cfg(data["tokens"], tmp_path / "f", max_steps=1, anneal_tokens=data["other"], anneal_fraction=0.5))
    # token shards written by a newer llmctl
    import shutil

    newer = tmp_path / "newer-tokens"
    shutil.copytree(data["tokens"], newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="newer llmctl"):
        run(_cfg(newer, tmp_path / "g", max_steps=1))


def test_tokens_without_a_val_split_train_and_report_no_val(data, tmp_path, capsys):
    """--val-fraction 0 is a choice (train on everything): the run trains, warns once up front, and
    publishes with no val figures instead of failing after its last step."""
    from conftest import cli

    from llmctl.train.pretrain import run

    src = data["root"] / "main.txt"
    no_val = tmp_path / "no-val-tokens"
    assert cli("tokenize", "encode", src, "--tokenizer", data["root"] / "main-tok", "--val-fraction", "0", "--out", no_val) == 0
    m = run(_cfg(no_val, tmp_path / "r", max_steps=3, eval_every=2, log_every=1))
    s = m["stats"]
    assert s["steps"] == 3 and s["final_val_loss"] is None and s["final_val_bpb"] is None
    assert "has no val tokens: no val loss or bits per byte will be reported" in " ".join(capsys.readouterr().err.split())
    assert not any("val_loss" in r for r in _metrics(tmp_path / "r"))


def test_compile_on_cpu_trains_like_eager(data, tmp_path):
    """--compile (torch.compile, inductor's C++ kernels on CPU) gives eager's loss curve up to rounding."""
    curves = {}
    for mode in ("--no-compile", "--compile"):
        run = tmp_path / mode.strip("-")
        r = run_llmctl("pretrain", data["tokens"], "--out", run, *TINY, "--max-steps", "6", "--log-every", "1",
                       mode, env=ENV, timeout=600)
        assert r.code == 0, r.err
        curves[mode] = _losses(run)
        assert json.loads((run / "config.json").read_text())["train"]["compile"] is (mode == "--compile")
    eager, compiled = curves["--no-compile"], curves["--compile"]
    assert sorted(eager) == sorted(compiled) == list(range(1, 7))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=2e-4, abs=2e-4), step
    assert eager[6] < eager[1]  # and it is learning

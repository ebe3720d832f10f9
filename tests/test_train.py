"""The training loop's parts: schedules, optimizer groups (AdamW/Muon), precision, atomic checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llmctl.errors import UsageError
from llmctl.model import ModelConfig, Transformer, lm_loss
from llmctl.train import checkpoint as ckpt
from llmctl.train.loop import check_memory, estimate_train_memory
from llmctl.train.optim import BatchedMuon, build_optimizers, set_lr
from llmctl.train.precision import autocast, make_scaler, resolve_precision
from llmctl.train.schedule import lr_factor


def test_schedules_warmup_cosine_and_wsd():
    kw = dict(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, 0.09, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(100, 1.0, schedule="cosine", **kw) == pytest.approx(0.1)
    # the half cosine starts at the peak where warmup ended (progress 0.1), not at the point of a
    # whole-run cosine there (10 warmup steps of a 12-step run fell to 7% of the peak the step after)
    c = dict(kw, schedule="cosine", warmup_end=0.1)
    assert lr_factor(10, 0.1, **c) == pytest.approx(1.0) and lr_factor(55, 0.55, **c) == pytest.approx(0.55)
    assert lr_factor(100, 1.0, **c) == pytest.approx(0.1)
    w = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(20, 0.5, **w) == 1.0 and lr_factor(79, 0.79, **w) == 1.0
    assert lr_factor(90, 0.9, **w) == pytest.approx(0.55)  # halfway down the linear warmdown
    assert lr_factor(100, 1.0, **w) == pytest.approx(0.1)
    with pytest.raises(UsageError):
        lr_factor(0, 0.0, schedule="linear")


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=32, **kw))


def test_muon_takes_hidden_matrices_and_adamw_the_rest_and_both_learn():
    m = _model(tie_embeddings=False)
    muon, adamw = build_optimizers(m.named_parameters(), optimizer="muon", lr=0.02)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.ns_dtype == torch.bfloat16  # torch's own choice unless the trainer picks fp32
    names = {id(p): n for n, p in m.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert all(".self_attn." in n or ".mlp." in n for n in muon_names) and len(muon_names) == 2 * 7
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw_names
    assert not any(p.ndim == 1 for g in muon.param_groups for p in g["params"])
    no_decay = [g for g in adamw.param_groups if g["weight_decay"] == 0.0]
    assert all(p.ndim == 1 for g in no_decay for p in g["params"])
    assert set_lr([muon, adamw], 0.5) == pytest.approx(0.01)

    torch.manual_seed(1)
    x = torch.randint(0, 64, (8, 17))
    losses = []
    for _ in range(15):
        loss = lm_loss(m(x[:, :-1]), x[:, 1:])
        loss.backward()
        for o in (muon, adamw):
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


MUON_KW = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")


def _muon_pair(ns_dtype):
    """Two identical stacks of square, wide and tall matrices: one for torch's Muon, one for ours."""
    torch.manual_seed(3)
    shapes = [(16, 16), (16, 16), (16, 40), (40, 16), (40, 16)]
    ref = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    return ref, torch.optim.Muon(ref, **MUON_KW), ours, BatchedMuon(ours, ns_dtype=ns_dtype, **MUON_KW)


def _muon_grads(params, steps=4):
    """The same gradients for every test: steps x one random tensor per parameter."""
    g = torch.Generator().manual_seed(4)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


def _muon_steps(params, opt, grads):
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr
        opt.step()


def test_batched_muon_is_torchs_muon_update():
    # bf16 Newton-Schulz, batched by shape: the same update as torch's per-matrix loop, to bf16 rounding
    ref, ref_opt, ours, opt = _muon_pair(torch.bfloat16)
    start = [p.detach().clone() for p in ref]
    _muon_steps(ref, ref_opt, _muon_grads(ref))
    _muon_steps(ours, opt, _muon_grads(ours))
    for s, r, o in zip(start, ref, ours, strict=True):
        moved = (r - s).abs().max()
        assert moved > 1e-3
        assert (r - o).abs().max() < 0.02 * moved
        assert torch.equal(ref_opt.state[r]["momentum_buffer"], opt.state[o]["momentum_buffer"])
    # its state is torch's (checkpoints load either way)
    assert ref_opt.state_dict()["param_groups"][0].keys() == opt.state_dict()["param_groups"][0].keys()


def test_batched_muon_fp32_newton_schulz_orthogonalises():
    # in fp32 the iteration's output has singular values in torch's documented band (~0.5-1.5), for
    # wide and tall matrices alike, and the step is lr * 0.2 * sqrt(max dim) * that matrix
    torch.manual_seed(5)
    for shape in [(24, 24), (24, 60), (60, 24)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = BatchedMuon([p], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False,
                          adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
        p.grad = torch.randn(shape)
        opt.step()
        o = -p.detach() / (0.1 * 0.2 * max(shape) ** 0.5)
        sv = torch.linalg.svdvals(o)
        assert sv.min() > 0.5 and sv.max() < 1.5, sv


def test_batched_muon_resumes_from_its_own_or_torchs_state_dict_bit_for_bit():
    # 4 uninterrupted steps == 2 steps, state_dict, a fresh optimizer loads it, 2 more steps; and a
    # torch.optim.Muon state (checkpoints from before BatchedMuon) loads the same way
    _, _, ref, ref_opt = _muon_pair(torch.float32)
    grads = _muon_grads(ref)
    _muon_steps(ref, ref_opt, grads)
    for torch_first in (False, True):
        torch_params, torch_opt, params, opt = _muon_pair(torch.float32)
        live, first_opt = (torch_params, torch_opt) if torch_first else (params, opt)
        _muon_steps(live, first_opt, grads[:2])
        resumed = [nn.Parameter(p.detach().clone()) for p in live]
        opt2 = BatchedMuon(resumed, ns_dtype=torch.float32, **MUON_KW)
        opt2.load_state_dict(first_opt.state_dict())
        _muon_steps(resumed, opt2, grads[2:])
        for a, b in zip(ref, resumed, strict=True):
            assert torch.equal(ref_opt.state[a]["momentum_buffer"], opt2.state[b]["momentum_buffer"])
            if torch_first:  # torch's first 2 steps orthogonalised in bf16: parameters agree to its rounding
                assert 0 < (a - b).abs().max() < 2e-3
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(precision):
    dev = torch.device("cpu")
    assert resolve_precision(precision, dev) == precision
    m = _model()
    (opt,) = build_optimizers(m.named_parameters(), lr=1e-2)
    scaler = make_scaler(dev, precision)
    assert (scaler is not None) == (precision == "fp16")
    x = torch.randint(0, 64, (2, 9))
    with autocast(dev, precision):
        logits = m(x[:, :-1])
    assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loss = lm_loss(logits, x[:, 1:])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(UsageError):
        resolve_precision("fp8", dev)


def _save(root, step, m, opt):
    return ckpt.save_checkpoint(root, step, model_state=m.state_dict(), optimizer_states=[opt.state_dict()],
                                optimizer_layout="index", scaler_state=None, data_state={"step": step},
                                trainer_state={"tokens": step * 10, "elapsed": 1.0}, rng_states=[ckpt.rng_state()],
                                keep=2)


def test_interrupted_checkpoint_write_never_corrupts_the_previous_one(tmp_path, monkeypatch):
    m = _model()
    (opt,) = build_optimizers(m.named_parameters(), lr=1e-2)
    root = tmp_path / "checkpoints"
    _save(root, 1, m, opt)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)  # dies after model.safetensors, before the rest
    with pytest.raises(OSError):
        _save(root, 2, m, opt)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1]
    assert (root / ".step-0000002.tmp").is_dir()  # the half-written one, invisible to readers
    ckpt.clean_stale(root)
    assert not (root / ".step-0000002.tmp").exists()
    c = ckpt.load_checkpoint(root / "step-0000001")
    assert c.trainer_state["step"] == 1 and c.data_state == {"step": 1} and c.optimizer_layout == "index"
    assert c.model_state.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in c.model_state.items())
    # keep last K
    for s in (2, 3, 4):
        _save(root, s, m, opt)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]


def test_rng_state_round_trips_and_newer_checkpoint_format_is_refused(tmp_path):
    import random

    import numpy as np

    m = _model()
    (opt,) = build_optimizers(m.named_parameters(), lr=1e-2)
    d = _save(tmp_path, 5, m, opt)
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.load_checkpoint(d)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    st = json.loads((d / "trainer_state.json").read_text())
    st["format"] = 99
    (d / "trainer_state.json").write_text(json.dumps(st))
    with pytest.raises(UsageError, match="newer llmctl"):
        ckpt.load_checkpoint(d)


def test_memory_estimate_counts_adam_states_and_refuses_what_does_not_fit():
    cfg = ModelConfig(vocab_size=32000, n_layer=12, n_head=12, d_model=768, max_seq_len=1024)
    est = estimate_train_memory(cfg, micro_batch=8, seq_len=1024)
    p = cfg.total_params()
    assert est["weights"] == 4 * p and est["optimizer"] == 8 * p and est["activations"] > 8 * 1024 * 32000 * 4
    muon = estimate_train_memory(cfg, micro_batch=8, seq_len=1024, optimizer="muon")
    assert muon["optimizer"] < est["optimizer"]
    # --fsdp over 8 ranks: an eighth of the state per rank, plus two gathered blocks and the embeddings
    fsdp = estimate_train_memory(cfg, micro_batch=8, seq_len=1024, shards=8)
    gathered = 2 * 4 * cfg.params_per_layer() + 4 * cfg.vocab_size * cfg.d_model
    assert fsdp["optimizer"] == est["optimizer"] // 8 and fsdp["weights"] == 4 * p // 8 + gathered
    assert fsdp["activations"] == est["activations"]  # each rank still runs its own micro-batch
    assert fsdp["total"] == sum(fsdp[k] for k in ("weights", "grads", "optimizer", "activations")) < est["total"]
    check_memory(est, available=10 * est["total"])
    with pytest.raises(UsageError, match="GiB to train"):
        check_memory(est, available=est["total"] // 2)


def test_cpu_mfu_peak_of_a_slow_precision_is_never_below_fp32():
    """MFU's denominator: bf16 on a CPU without bf16 units is rated at the fp32 ceiling, so MFU ≤ 1."""
    from llmctl.train.precision import cpu_peak, peak_flops

    cpu = torch.device("cpu")
    assert peak_flops(cpu, "fp32") == cpu_peak("fp32") > 1e9
    for slow in ("bf16", "fp16"):
        assert peak_flops(cpu, slow) >= peak_flops(cpu, "fp32")
        assert peak_flops(cpu, slow) >= cpu_peak(slow)

import pytest
import torch

from llmctl.errors import UsageError
from llmctl.model import ModelConfig, Transformer, from_preset, lm_loss
from llmctl.model.io import load_weights, save_weights


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"qk_norm": True, "tie_embeddings": False}])
def test_kv_cache_decoding_matches_full_forward(kw):
    m = _model(**kw)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = m(idx)
        cache = m.new_cache(2)
        parts = [m(idx[:, :7], cache=cache)]
        for t in range(7, 20):
            parts.append(m(idx[:, t : t + 1], cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    m = _model()
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97
    with torch.no_grad():
        assert torch.allclose(m(a)[:, :10], m(b)[:, :10], atol=1e-6)
        assert not torch.allclose(m(a)[:, 10:], m(b)[:, 10:])


@pytest.mark.parametrize("tie", [True, False])
def test_return_hidden_gives_the_states_the_head_reads(tie):
    m = _model(tie_embeddings=tie)
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        h = m(idx, return_hidden=True)
        assert h.shape == (2, 12, 32) and torch.equal(h, m.hidden(idx))
        assert torch.allclose(h @ m.output_weight().T, m(idx), atol=1e-6)


def test_position_ids_restart_equals_separate_sequences():
    m = _model()
    x, y = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([x, y], 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])
    seg = torch.tensor([0] * 6 + [1] * 5)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(11, 11, dtype=torch.bool).tril()
    with torch.no_grad():
        out = m(packed, position_ids=pos, attn_mask=mask)
        assert torch.allclose(out[:, :6], m(x), atol=1e-5)
        assert torch.allclose(out[:, 6:], m(y), atol=1e-5)


def test_param_counts_match_modules():
    for kw in ({}, {"n_kv_head": 1, "tie_embeddings": False}, {"qk_norm": True}):
        m = _model(**kw)
        assert sum(p.numel() for p in m.parameters()) == m.cfg.total_params()
    assert from_preset("gpt2-small", vocab_size=50304).non_embedding_params() > 80e6


def test_loss_ignores_minus_100_and_starts_near_log_vocab():
    m = _model()
    idx = torch.randint(0, 97, (4, 32))
    tgt = idx.roll(-1, 1)
    tgt[:, :5] = -100
    loss = lm_loss(m(idx), tgt)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_weights_round_trip(tmp_path):
    m = _model(tie_embeddings=False)
    save_weights(m, tmp_path / "w.safetensors")
    m2 = _model(tie_embeddings=False)
    torch.nn.init.zeros_(m2.embed_tokens.weight)
    load_weights(m2, tmp_path / "w.safetensors")
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(idx), m2(idx))
    # readable as any other file the user writes (safetensors alone creates it 0600)
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "w.safetensors").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_bad_shapes_are_usage_errors():
    with pytest.raises(UsageError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(UsageError, match="preset"):
        from_preset("huge")


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[tuple[torch.dtype, torch.dtype, torch.dtype, bool]]:
    """(q, k, v dtypes, whether a mask was given) of every scaled_dot_product_attention call."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.dtype, k.dtype, v.dtype, kw.get("attn_mask") is not None))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize(
    ("seq", "grad", "expect"),
    [(16, True, torch.float32), (16, False, torch.bfloat16), (300, True, torch.bfloat16)],
)
def test_cpu_bf16_training_attends_in_fp32_at_short_contexts(sdpa_calls, seq, grad, expect):
    """Under CPU bf16 autocast, training at contexts up to CPU_FP32_ATTENTION_MAX_LEN runs attention in
    fp32 (torch's bf16 CPU flash-attention backward is several times slower there); inference and
    long contexts keep the bf16 kernel. Either way the block's output stays bf16 and gradients flow."""
    from llmctl.model import transformer

    assert transformer.CPU_FP32_ATTENTION_MAX_LEN < 300
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=300))
    idx = torch.randint(0, 97, (2, seq))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
        logits = m(idx)
    assert [c[:3] for c in sdpa_calls] == [(expect,) * 3] * 2  # both layers
    assert logits.dtype == torch.bfloat16
    if grad:
        lm_loss(logits[:, :-1], idx[:, 1:]).backward()
        g = m.layers[0].self_attn.q_proj.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cpu_bf16_training_with_a_mask_also_attends_in_fp32(sdpa_calls):
    """sft's packed batches pass a block-diagonal mask: the same rule holds on that path."""
    m = _model()
    idx = torch.randint(0, 97, (2, 12))
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril())[:, None]
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1).clone()
    pos[1] = torch.arange(12)
    with torch.autocast("cpu", torch.bfloat16):
        logits = m(idx, position_ids=pos, attn_mask=mask)
    assert [(c[0], c[3]) for c in sdpa_calls] == [(torch.float32, True)] * 2
    with torch.no_grad():
        ref = m(idx, position_ids=pos, attn_mask=mask)  # fp32 model: the bf16 run stays close
    assert (logits.float() - ref).abs().max() < 0.1

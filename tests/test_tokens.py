"""Reading token artifacts: cross-shard windows, the resumable batch sampler, eval windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmctl import tokenizer as tk
from llmctl.artifacts import StageRun
from llmctl.errors import UsageError
from llmctl.tokens import IGNORE_INDEX, BatchSampler, TokenArtifact, iter_eval_windows


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    d = tmp_path_factory.mktemp("toks")
    text = (SHARED_DATA / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    (d / "s.txt").write_text(text, encoding="utf-8")
    tk.train(tk.TrainConfig(docs=[str(d / "s.txt")], out=str(d / "tok"), vocab_size=400, threads=1))
    # small shards so windows cross shard boundaries
    tk.encode(tk.EncodeConfig(docs=[str(d / "s.txt")], tokenizer=str(d / "tok"), out=str(d / "t"),
                              val_fraction=0.1, shard_tokens=5_000))
    return d / "t"


def _flat(art: TokenArtifact, split: str) -> np.ndarray:
    return np.concatenate([np.fromfile(art.path / s, dtype="<u2") for s in art.splits[split]["shards"]])


def test_split_view_matches_the_files(tokens):
    art = TokenArtifact(tokens)
    flat = _flat(art, "train")
    view = art.split("train")
    assert len(view.shards) > 5 and len(view) == len(flat) == art.num_tokens("train")
    for start, n in [(0, 10), (4_990, 30), (4_999, 1), (5_000, 7), (9_990, 10_020), (len(flat) - 3, 3)]:
        np.testing.assert_array_equal(view.window(start, n), flat[start : start + n])
    np.testing.assert_array_equal(view[4_998:5_003], flat[4_998:5_003])
    assert view[-1] == flat[-1] == art.eos_id
    with pytest.raises(IndexError):
        view.window(len(flat) - 2, 3)
    assert art.vocab_size == 400 and art.dtype == np.dtype("<u2") and art.val_bytes > 0
    assert art.tokenizer().vocab_size == 400 and art.bytes_per_token > 1


def test_batches_are_deterministic_shifted_and_seeded(tokens):
    a = BatchSampler(tokens, "train", batch_size=4, seq_len=32, seed=7)
    b = BatchSampler(tokens, "train", batch_size=4, seq_len=32, seed=7)
    c = BatchSampler(tokens, "train", batch_size=4, seq_len=32, seed=8)
    xa, ya = a.next()
    xb, yb = b.next()
    xc, _ = c.next()
    assert xa.dtype == torch.long and xa.shape == ya.shape == (4, 32)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    flat = _flat(TokenArtifact(tokens), "train")
    for row, s in zip(xa, a.starts(0), strict=True):
        np.testing.assert_array_equal(row.numpy(), flat[s : s + 32])
    assert not torch.equal(a.next()[0], xa)  # a new step draws new windows


def test_each_epoch_tiles_the_split_once_without_replacement(tokens):
    T = 32
    s = BatchSampler(tokens, "train", batch_size=7, seq_len=T, seed=3)
    n, W = len(TokenArtifact(tokens).split("train")), s.windows_per_epoch
    assert W == (n - 2 * T) // T + 1 and W > 100
    steps = -(-3 * W // 7)  # a little over three epochs of draws
    starts = np.concatenate([s.starts(step) for step in range(steps)])
    assert starts.min() >= 0 and starts.max() + T + 1 <= n  # every window (inputs + targets) fits
    offsets = []
    for e in range(3):
        ep = starts[e * W : (e + 1) * W]
        off = int(ep[0] % T)
        assert 0 <= off < T and np.all(ep % T == off)  # one grid per epoch ...
        assert sorted((ep - off) // T) == list(range(W))  # ... each of its W windows drawn exactly once
        offsets.append(off)
    assert len({tuple(starts[e * W : e * W + 20]) for e in range(3)}) == 3  # a new order every epoch
    assert len(set(offsets)) > 1  # and the grid moves with the epoch's offset
    assert s.epochs(steps) == pytest.approx(steps * 7 / W)


def test_resume_reproduces_the_uninterrupted_batches(tokens):
    full = BatchSampler(tokens, "train", batch_size=3, seq_len=16, seed=1)
    seen = [full.next() for _ in range(6)]
    first = BatchSampler(tokens, "train", batch_size=3, seq_len=16, seed=1)
    for _ in range(2):
        first.next()
    state = first.state_dict()
    resumed = BatchSampler(tokens, "train", batch_size=3, seq_len=16, seed=1)
    resumed.load_state_dict(state)
    for x, y in seen[2:]:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    other = BatchSampler(tokens, "train", batch_size=3, seq_len=32, seed=1)
    with pytest.raises(UsageError, match="seq_len"):
        other.load_state_dict(state)


def test_data_parallel_ranks_partition_the_global_batch(tokens):
    single = BatchSampler(tokens, "train", batch_size=8, seq_len=24, seed=5)
    ranks = [BatchSampler(tokens, "train", batch_size=4, seq_len=24, seed=5, rank=r, world_size=2) for r in range(2)]
    four = [BatchSampler(tokens, "train", batch_size=2, seq_len=24, seed=5, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        x, y = single.next()
        parts = [s.next() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(parts[0][0], parts[1][0])
        assert torch.equal(torch.cat([s.next()[0] for s in four]), x)
    # a run resumed with another world size (same global batch) continues with the same data
    st = ranks[0].state_dict()
    cont = BatchSampler(tokens, "train", batch_size=8, seq_len=24, seed=5)
    cont.load_state_dict(st)
    assert torch.equal(cont.next()[0], single.next()[0])


def test_eval_windows_score_every_token_once(tokens):
    art = TokenArtifact(tokens)
    val = _flat(art, "val")
    targets, inputs = [], []
    for x, y in iter_eval_windows(tokens, "val", seq_len=50, batch_size=7):
        assert x.shape == y.shape and x.shape[1] == 50 and x.shape[0] <= 7
        keep = y != IGNORE_INDEX
        targets.append(y[keep])
        inputs.append(x[keep])
    np.testing.assert_array_equal(torch.cat(targets).numpy(), val[1:])
    np.testing.assert_array_equal(torch.cat(inputs).numpy(), val[:-1])
    # two ranks together cover the same targets once
    got = sorted(
        (tuple(row.tolist()) for r in range(2) for _, y in iter_eval_windows(art, "val", 50, 4, rank=r, world_size=2) for row in y)
    )
    mine = sorted(tuple(row.tolist()) for _, y in iter_eval_windows(art, "val", 50, 4) for row in y)
    assert got == mine


def test_corrupt_or_wrong_artifacts_are_refused(tokens, tmp_path):
    import shutil

    bad = tmp_path / "t"
    shutil.copytree(tokens, bad)
    shard = bad / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UsageError, match="re-encode"):
        TokenArtifact(bad)
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(UsageError, match="whole number"):
        TokenArtifact(bad)
    StageRun.open(tmp_path / "x", "extract", {}, ()).finish({})
    with pytest.raises(UsageError, match="'extract' artifact"):
        TokenArtifact(tmp_path / "x")
    with pytest.raises(UsageError, match="fewer than one window"):
        BatchSampler(tokens, "val", batch_size=1, seq_len=10_000_000, seed=0)

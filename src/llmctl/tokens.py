"""Reading token artifacts: memory-mapped shards, random-window training batches, eval windows.

A ``tokenize-encode`` artifact holds ``train-NNNNN.bin`` and ``val-NNNNN.bin``: flat little-endian
uint16/uint32 token ids, every document as ``BOS + tokens + EOS``, shards cut at a fixed token
count (a document may continue into the next shard). A split is therefore one token stream;
``TokenArtifact.split(name)`` gives it as a ``TokenSplit`` that slices across shard boundaries
without loading anything but the slice.

Training batches are random windows of ``seq_len + 1`` tokens. The start positions of step ``k``
are drawn from a generator seeded by ``(seed, k)`` alone, so a sampler restored at step ``k``
reproduces exactly the batches an uninterrupted run sees, and the global batch of a step does not
depend on how it is split across data-parallel ranks: rank ``r`` of ``W`` takes rows
``r·B … (r+1)·B − 1`` of the global batch of ``W·B`` rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import require_artifact
from .errors import UsageError
from .tokenizer import ENCODE_STAGE, TOKENIZER_FILE, Tokenizer, file_fingerprint_full, load_tokenizer

SPLITS = ("train", "val")
IGNORE_INDEX = -100


class TokenSplit:
    """One split's shards as a single sequence of tokens (numpy memmaps underneath)."""

    def __init__(self, shards: list[np.memmap], name: str):
        self.name = name
        self.shards = shards
        self._offsets = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = shards[0].dtype if shards else np.dtype("<u2")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as an array (a copy when it crosses shards)."""
        n = len(self)
        if start < 0 or length < 0 or start + length > n:
            raise IndexError(f"window [{start}, {start + length}) outside the {self.name} split of {n} tokens")
        if length == 0:
            return np.empty(0, self.dtype)
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        off = int(self._offsets[k])
        if start - off + length <= len(self.shards[k]):  # inside one shard: no stitching
            return np.asarray(self.shards[k][start - off : start - off + length])
        pieces = []
        pos, left = start, length
        while left > 0:
            k = int(np.searchsorted(self._offsets, pos, side="right")) - 1
            off = int(self._offsets[k])
            take = min(left, off + len(self.shards[k]) - pos)
            pieces.append(self.shards[k][pos - off : pos - off + take])
            pos += take
            left -= take
        return np.concatenate(pieces)

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("TokenSplit supports contiguous slices only")
            return self.window(start, max(0, stop - start))
        i = int(idx)
        if i < 0:
            i += len(self)
        return self.window(i, 1)[0]

    def to_numpy(self) -> np.ndarray:
        """The whole split in memory (small splits only, e.g. val)."""
        return self.window(0, len(self))


class TokenArtifact:
    """A validated ``tokenize-encode`` artifact."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        m = require_artifact(self.path, [ENCODE_STAGE])
        self.manifest = m
        try:
            self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
            self.vocab_size: int = int(m["vocab_size"])
            self.bos_id: int = int(m["bos_id"])
            self.eos_id: int = int(m["eos_id"])
            self.pad_id: int = int(m["pad_id"])
            self.tokenizer_fingerprint: str = m["tokenizer_fingerprint"]
            self.splits: dict[str, dict[str, Any]] = m["splits"]
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{self.path}: manifest lacks {e}; re-encode with llmctl tokenize encode --force") from e
        self.special_ids: dict[str, int] = dict(m.get("special_ids", {}))
        self.bytes_per_token: float = float(m.get("bytes_per_token") or "nan")
        self.train_bytes: int = int(m.get("train_bytes", 0))
        self.val_bytes: int = int(m.get("val_bytes", 0))
        self.tokenizer_path = self.path / TOKENIZER_FILE
        if not self.tokenizer_path.is_file():
            raise UsageError(f"{self.path}: {TOKENIZER_FILE} is missing; re-encode with --force")
        for name, info in self.splits.items():
            got = 0
            for shard in info.get("shards", []):
                f = self.path / shard
                if not f.is_file():
                    raise UsageError(f"{f}: token shard missing; re-encode with llmctl tokenize encode --force")
                size = f.stat().st_size
                if size % self.dtype.itemsize:
                    raise UsageError(f"{f}: size is not a whole number of {self.dtype.name} tokens; re-encode with --force")
                got += size // self.dtype.itemsize
            if got != int(info.get("tokens", -1)):
                raise UsageError(
                    f"{self.path}: the {name} shards hold {got:,} tokens but the manifest says "
                    f"{info.get('tokens')}; re-encode with llmctl tokenize encode --force"
                )
        self._cache: dict[str, TokenSplit] = {}

    def num_tokens(self, split: str) -> int:
        return int(self._info(split)["tokens"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text encoded into this split (the denominator of bits per byte)."""
        return int(self._info(split)["bytes"])

    def _info(self, split: str) -> dict[str, Any]:
        if split not in self.splits:
            raise UsageError(f"{self.path}: no '{split}' split (has {', '.join(self.splits)})")
        return self.splits[split]

    def shards(self, split: str) -> list[np.memmap]:
        info = self._info(split)
        return [np.memmap(self.path / s, dtype=self.dtype, mode="r") for s in info["shards"]]

    def split(self, split: str) -> TokenSplit:
        """The split as one token sequence; a UsageError when it is empty."""
        if split not in self._cache:
            if self.num_tokens(split) == 0:
                raise UsageError(
                    f"{self.path}: the {split} split is empty; re-encode with --val-fraction > 0 or --val DOCS"
                )
            self._cache[split] = TokenSplit(self.shards(split), split)
        return self._cache[split]

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v.get('tokens', 0):,}" for k, v in self.splits.items())
        return f"TokenArtifact({self.path}, vocab={self.vocab_size}, {sizes})"


def _as_artifact(tokens: TokenArtifact | Path | str) -> TokenArtifact:
    return tokens if isinstance(tokens, TokenArtifact) else TokenArtifact(tokens)


def check_compatible(tokens: TokenArtifact | Path | str, tokenizer_or_vocab_size: Tokenizer | Path | str | int) -> None:
    """Refuse (one-line UsageError) token shards made by another tokenizer or for another vocab.

    Pass the tokenizer (or its path) a model/run uses, or just a model's vocabulary size.
    """
    art = _as_artifact(tokens)
    other = tokenizer_or_vocab_size
    if isinstance(other, int | np.integer):
        if int(other) != art.vocab_size:
            raise UsageError(
                f"{art.path}: tokens have vocab size {art.vocab_size:,} but the model has {int(other):,}; "
                "use tokens encoded with the model's tokenizer"
            )
        return
    if isinstance(other, Tokenizer):
        fp, where = other.fingerprint, other.path
    else:
        from .tokenizer import tokenizer_file

        where = tokenizer_file(other)
        fp = file_fingerprint_full(where)
    if fp != art.tokenizer_fingerprint:
        raise UsageError(
            f"{art.path}: tokens were encoded with another tokenizer than {where}; "
            "re-encode with llmctl tokenize encode --tokenizer (the same tokenizer) or pass matching tokens"
        )


class BatchSampler:
    """Deterministic, resumable random windows of a split: ``next() -> (x, y)``, each ``[B, T]`` long.

    Windows are drawn in epochs, without replacement: epoch ``e`` tiles the split with ``W``
    disjoint windows of ``T + 1`` tokens (inputs and shifted targets) from a random offset in
    ``[0, T)``, in a random order, both drawn from ``(seed, e)``. Every token is then seen once
    per epoch, where i.i.d. random starts would leave ``e^-k`` of the data unseen after ``k``
    epochs and show the rest unevenly (at 2.5 epochs, 8% never seen) -- a real loss in the
    multi-epoch regime of small corpora. The offset moves the window boundaries every epoch.

    ``batch_size`` is the per-rank batch; step ``s`` takes global draws ``[s·G, (s+1)·G)`` with
    ``G = batch_size * world_size``, a function of ``(seed, step)`` only, so resuming at a step
    and changing the number of ranks (at the same global batch) both give the same data.
    """

    def __init__(
        self,
        tokens: TokenArtifact | Path | str,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"batch size {batch_size} and sequence length {seq_len} must be ≥ 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} of world size {world_size}: need 0 ≤ rank < world_size")
        self.tokens = _as_artifact(tokens)
        self.data = self.tokens.split(split)
        self.split_name = split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if len(self.data) < seq_len + 1:
            raise UsageError(
                f"{self.tokens.path}: the {split} split has {len(self.data):,} tokens, fewer than one window "
                f"of {seq_len + 1}; lower the sequence length or encode more text"
            )
        n, t = len(self.data), seq_len
        # W windows fit at every offset o < T: o + (W-1)·T + T + 1 ≤ n. A split shorter than two
        # windows has one window per epoch at a random start instead.
        self.windows_per_epoch = (n - 2 * t) // t + 1 if n >= 2 * t else 1
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, order), cached
        self.step = 0

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            span = self.seq_len if self.windows_per_epoch > 1 else len(self.data) - self.seq_len
            offset = int(rng.integers(0, span))
            dtype = np.int32 if self.windows_per_epoch < 2**31 else np.int64
            self._epoch = (epoch, offset, rng.permutation(self.windows_per_epoch).astype(dtype))
        return self._epoch[1], self._epoch[2]

    def epochs(self, step: int) -> float:
        """Epochs of the split drawn before ``step`` (all ranks together)."""
        return step * self.global_batch / self.windows_per_epoch

    def starts(self, step: int) -> np.ndarray:
        """Start positions of this rank's windows at ``step``."""
        first = step * self.global_batch + self.rank * self.batch_size
        epoch, k = np.divmod(np.arange(first, first + self.batch_size, dtype=np.int64), self.windows_per_epoch)
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epoch):  # one epoch, or two where the batch straddles a boundary
            offset, order = self._epoch_plan(int(e))
            sel = epoch == e
            out[sel] = offset + order[k[sel]].astype(np.int64) * self.seq_len
        return out

    def batch(self, step: int):
        import torch

        rows = np.stack([self.data.window(int(s), self.seq_len + 1) for s in self.starts(step)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def next(self):
        x, y = self.batch(self.step)
        self.step += 1
        return x, y

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "seed": self.seed, "split": self.split_name, "seq_len": self.seq_len,
            "global_batch": self.global_batch, "tokens": self.tokens.num_tokens(self.split_name),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = {"seed": self.seed, "split": self.split_name, "seq_len": self.seq_len, "global_batch": self.global_batch}
        diff = [f"{k} {state.get(k)!r}→{v!r}" for k, v in want.items() if state.get(k) != v]
        if diff:
            hint = ("; the global batch is --micro-batch × ranks unless --global-batch-tokens sets it: resume on the "
                    "same number of ranks, or give --global-batch-tokens" if any(d.startswith("global_batch") for d in diff) else "")
            raise UsageError(f"cannot resume the data sampler: {', '.join(diff)} changed; resume with the same settings{hint}")
        self.step = int(state["step"])


def iter_eval_windows(
    tokens: TokenArtifact | Path | str,
    split: str,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_windows: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """The whole split in disjoint windows: ``(x, y)`` long tensors ``[b, seq_len]``, ``b ≤ batch_size``.

    Window ``i`` covers tokens ``[i·T, (i+1)·T]`` (inputs ``[i·T, (i+1)·T)``, targets one later), so
    every token but the first is a target exactly once. The last window is padded: inputs with the
    pad id, targets with -100 (``IGNORE_INDEX``). With ``world_size > 1`` rank ``r`` gets windows
    ``r, r + W, …``; the ranks together cover the split once. ``max_windows`` keeps only the first
    that many windows of the split, shared over the ranks the same way, so a capped pass scores
    the same tokens whatever the number of ranks.
    """
    import torch

    art = _as_artifact(tokens)
    data = art.split(split)
    n = len(data)
    if n < 2:
        return
    n_windows = (n - 1 + seq_len - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    mine = list(range(rank, n_windows, world_size))
    for b in range(0, len(mine), batch_size):
        idx = mine[b : b + batch_size]
        x = np.full((len(idx), seq_len), art.pad_id, dtype=np.int64)
        y = np.full((len(idx), seq_len), IGNORE_INDEX, dtype=np.int64)
        for r, w in enumerate(idx):
            start = w * seq_len
            length = min(seq_len + 1, n - start)
            win = data.window(start, length).astype(np.int64)
            x[r, : length - 1] = win[:-1]
            y[r, : length - 1] = win[1:]
        yield torch.from_numpy(x), torch.from_numpy(y)

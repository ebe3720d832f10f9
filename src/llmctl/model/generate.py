"""Sampling from a trained model with a KV cache: one function that the CLI, PPO and eval share.

``generate(model, tokenizer, prompts, SamplingParams(...))`` returns one :class:`Completion` per
prompt with the text, the generated token ids and their log-probabilities under the model.

Batches are left-padded; every row keeps its own RoPE positions (``position_ids`` start at 0 on
its first real token) and a boolean attention mask hides the padding, so a prompt's result does
not depend on which other prompts share its batch. Every prompt also has its own random generator
(seeded from ``seed`` and the prompt's index), so sampled outputs are reproducible whatever the
batch size; under greedy decoding (temperature 0) batched output equals unbatched output.

Context: a prompt that does not fit in the model's context (``max_seq_len``) is an error, never
silently truncated; generation stops with ``finish_reason="length"`` when a sequence reaches
``max_new_tokens`` or the end of the context, whichever comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..chat import chat_format
from ..device import resolve_device
from ..errors import UsageError
from ..tokenizer import load_tokenizer
from .transformer import Transformer


# -- tokenizers --------------------------------------------------------------------------------
@runtime_checkable
class TextTokenizer(Protocol):
    """What generation needs from a tokenizer: plain ids in and out, special ids as attributes.

    ``encode`` adds no special tokens; ``decode`` skips special (control) tokens.
    """

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def as_tokenizer(tok: Any) -> TextTokenizer:
    """A :class:`TextTokenizer` from a tokenizer object that speaks it (llmctl's ``Tokenizer``, the
    export's ``HFTokenizer``) or a path to a sentencepiece model / an artifact holding one."""
    if isinstance(tok, str | Path):
        return load_tokenizer(tok)
    if all(isinstance(getattr(tok, n, None), int) for n in ("bos_id", "eos_id", "pad_id", "vocab_size")):
        return tok
    raise TypeError(f"cannot use {type(tok).__name__} as a tokenizer: it needs bos_id/eos_id/pad_id/vocab_size")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Inference dtype: ``auto`` is bf16 on CUDA GPUs that support it, fp32 elsewhere."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision not in table:
        raise UsageError(f"--precision {precision}: choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 is not supported on CPU; use bf16 or fp32")
    return table[precision]


# -- sampling ----------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # token ids that end a completion (kept in token_ids, not in text)

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in self.stop if s)
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass ≥ top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above this one
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the first always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@dataclass
class Completion:
    """One prompt's result. ``token_ids`` include the EOS token when generation ended on it;
    ``logprobs[i]`` is log p(token_ids[i]) under the model (temperature 1, no top-k/top-p filter);
    ``text`` excludes EOS and everything from the first stop string on."""

    prompt: str | None
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # eos | stop | length

    def to_dict(self, logprobs: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "completion": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.token_ids),
            "token_ids": self.token_ids,
        }
        if logprobs:
            d["logprobs"] = [round(x, 6) for x in self.logprobs]
        return d


@dataclass
class GenerationStats:
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _stop_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Detokenizer:
    """Decodes one sequence as it grows; holds back an incomplete UTF-8 character (U+FFFD at the end,
    from byte-fallback pieces still to come) and any tail that may be the start of a stop string.

    Decodes a few prompt tokens in front of the completion and removes their text, so a leading
    space that sentencepiece would strip at the start of a text is kept."""

    def __init__(self, tok: TextTokenizer, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        self.tok, self.stops = tok, stops
        self.prefix = [i for i in prompt_ids if i not in (tok.bos_id, tok.eos_id, tok.pad_id)][-4:]
        self.prefix_text = tok.decode(self.prefix) if self.prefix else ""
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._decode()

    def set_ids(self, ids: Sequence[int]) -> str:
        self.ids = list(ids)
        self._decode()
        return self.text

    def _decode(self) -> None:
        if not self.ids:
            self.text = ""
            return
        full = self.tok.decode(self.prefix + self.ids)
        if self.prefix and full.startswith(self.prefix_text):
            self.text = full[len(self.prefix_text) :]
        else:  # pragma: no cover - a tokenizer whose decode is not prefix-stable
            self.text = self.tok.decode(self.ids)

    def find_stop(self) -> int:
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def ready(self, final: bool = False) -> str:
        """New text safe to show now."""
        end = len(self.text)
        if not final:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            end -= _stop_overlap(self.text[:end], self.stops)
        if end <= self.emitted:
            return ""
        new, self.emitted = self.text[self.emitted : end], end
        return new


@torch.no_grad()
def _generate_batch(
    model: Transformer,
    tok: TextTokenizer,
    prompt_ids: list[list[int]],
    results: list[Completion],
    seeds: list[int],
    params: SamplingParams,
    on_text: Callable[[int, str], None] | None,
    indices: list[int],
) -> int:
    """Generate for one batch in place in ``results``; returns the number of tokens generated."""
    device = model.embed_tokens.weight.device
    ctx = model.cfg.max_seq_len
    B = len(prompt_ids)
    lens = torch.tensor([len(p) for p in prompt_ids], device=device)
    L = int(lens.max())
    budget = [min(params.max_new_tokens, ctx - len(p)) for p in prompt_ids]
    steps = max(budget)
    pad_id = tok.pad_id if 0 <= tok.pad_id < model.cfg.vocab_size else tok.eos_id
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        idx[i, L - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
    padded = bool((lens != L).any())
    cache = model.new_cache(B, L + steps)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds] if params.temperature > 0 else []
    watch = bool(params.stop) or on_text is not None
    detoks = [_Detokenizer(tok, p, params.stop) for p in prompt_ids] if watch else []

    if padded:
        pad = (L - lens)[:, None]  # left padding per row
        valid = torch.zeros(B, L + steps, dtype=torch.bool, device=device)
        valid[:, :L] = torch.arange(L, device=device)[None] >= pad
        pos = (torch.arange(L, device=device)[None] - pad).clamp(min=0)
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=device)
        mask = (causal[None] & valid[:, None, :L]) | eye[None]  # pads see themselves only: no NaN
        logits = model(idx, position_ids=pos, attn_mask=mask[:, None], cache=cache)[:, -1]
    else:
        logits = model(idx, cache=cache)[:, -1]

    done = [False] * B
    n_generated = 0
    for t in range(steps):
        logp = F.log_softmax(logits.float(), dim=-1)
        if params.temperature == 0:
            nxt = logp.argmax(-1)
        else:
            probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(-1)
            nxt = torch.cat(
                [torch.multinomial(probs[i : i + 1], 1, generator=gens[i]).view(1) for i in range(B)]
            )
        chosen = logp.gather(-1, nxt[:, None])[:, 0]
        nxt_list, chosen_list = nxt.tolist(), chosen.tolist()
        for i in range(B):
            if done[i]:
                continue
            r, token = results[i], nxt_list[i]
            r.token_ids.append(token)
            r.logprobs.append(chosen_list[i])
            n_generated += 1
            if token == tok.eos_id:
                r.finish_reason, done[i] = "eos", True
            elif token in params.stop_ids:
                r.finish_reason, done[i] = "stop", True
            elif watch:
                d = detoks[i]
                d.push(token)
                if params.stop and (at := d.find_stop()) >= 0:
                    d.text = d.text[:at]
                    r.finish_reason, done[i] = "stop", True
            if not done[i] and len(r.token_ids) >= budget[i]:
                r.finish_reason, done[i] = "length", True
            if on_text is not None:
                piece = detoks[i].ready(final=done[i])
                if piece:
                    on_text(indices[i], piece)
        if all(done) or t == steps - 1:
            break
        if padded:
            S = L + t + 1
            valid[:, S - 1] = True
            pos = (lens + t).clamp(max=ctx - 1)[:, None]  # rows already finished may run past the context
            logits = model(nxt[:, None], position_ids=pos, attn_mask=valid[:, None, None, :S], cache=cache)[:, -1]
        else:
            logits = model(nxt[:, None], cache=cache)[:, -1]

    for i, r in enumerate(results):
        if watch:
            r.text = detoks[i].text
        else:
            ended = r.finish_reason == "eos" or (r.finish_reason == "stop" and r.token_ids[-1] in params.stop_ids)
            ids = r.token_ids[:-1] if ended else r.token_ids
            r.text = _Detokenizer(tok, prompt_ids[i], ()).set_ids(ids)
    return n_generated


def encode_prompt(tok: TextTokenizer, prompt: str, add_bos: bool = True) -> list[int]:
    ids = tok.encode(prompt)
    return [tok.bos_id, *ids] if add_bos and tok.bos_id >= 0 else ids


def generate(
    model: Transformer,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    batch_size: int = 16,
    add_bos: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    stats: GenerationStats | None = None,
    **overrides: Any,
) -> list[Completion]:
    """Complete each prompt (text, or token ids used as given) and return one Completion per prompt.

    ``params`` (or keyword overrides such as ``temperature=0``) sets the sampling; ``on_text(i,
    piece)`` receives decoded text for prompt ``i`` as it is generated (whole characters only);
    ``stats`` is filled with token counts and wall time. Text prompts get BOS in front, as every
    training document has, unless ``add_bos`` is False. The model is used as it is (device,
    dtype); call ``model.eval()`` first.
    """
    params = params or SamplingParams()
    if overrides:
        params = SamplingParams(**{**params.__dict__, **overrides})
    tok = as_tokenizer(tokenizer)
    ctx = model.cfg.max_seq_len
    encoded: list[list[int]] = []
    for n, p in enumerate(prompts):
        ids = encode_prompt(tok, p, add_bos) if isinstance(p, str) else [int(i) for i in p]
        if not ids:
            raise UsageError(f"prompt {n} is empty (no tokens); give some text or keep BOS on")
        if len(ids) >= ctx:
            raise UsageError(
                f"prompt {n} has {len(ids)} tokens but the model's context is {ctx}; shorten the prompt "
                f"to at most {ctx - 1} tokens"
            )
        if max(ids) >= model.cfg.vocab_size or min(ids) < 0:
            raise UsageError(f"prompt {n} has token ids outside the model's vocabulary of {model.cfg.vocab_size}")
        encoded.append(ids)

    results = [Completion(p if isinstance(p, str) else None, ids) for p, ids in zip(prompts, encoded, strict=True)]
    # longest first, so each batch holds prompts of similar length (little padding)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    t0 = time.perf_counter()
    generated = 0
    for b in range(0, len(order), max(1, batch_size)):
        chunk = order[b : b + batch_size]
        generated += _generate_batch(
            model,
            tok,
            [encoded[i] for i in chunk],
            [results[i] for i in chunk],
            [params.seed * 1_000_003 + i for i in chunk],
            params,
            on_text,
            chunk,
        )
    if stats is not None:
        stats.prompts += len(encoded)
        stats.prompt_tokens += sum(map(len, encoded))
        stats.generated_tokens += generated
        stats.seconds += time.perf_counter() - t0
    return results


# -- the generate command ----------------------------------------------------------------------
@dataclass
class GenerateConfig:
    """Every option of ``llmctl generate`` (one prompt, or a file of prompts to a JSONL file)."""

    run: str
    prompt: str | None = None
    prompts: str | None = None
    out: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 16
    add_bos: bool = True
    logprobs: bool = False
    chat: bool = False  # each prompt is a user turn of the model's chat format (chat.chat_format)
    system: str | None = None  # with chat: a system message before every prompt
    device: str = "auto"
    precision: str = "auto"
    force: bool = False

    def sampling(self, stop_ids: tuple[int, ...] = ()) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, stop=tuple(self.stop), stop_ids=stop_ids, seed=self.seed,
        )


def read_prompts(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Prompt records from a .txt file (one prompt per non-empty line) or a .jsonl file (objects with
    a string "prompt"; other fields are kept and copied to the output). Bad lines are counted by
    reason and skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such prompts file; pass a .txt or .jsonl file")
    bad: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8") from e
    if path.suffix == ".jsonl":
        import json

        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad["invalid_json"] = bad.get("invalid_json", 0) + 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                bad["no_prompt_field"] = bad.get("no_prompt_field", 0) + 1
                continue
            records.append(rec)
    elif path.suffix == ".txt":
        records = [{"prompt": line} for line in lines if line.strip()]
    else:
        raise UsageError(f"{path}: prompts must be a .txt (one per line) or .jsonl (a 'prompt' field) file")
    if not records:
        raise UsageError(f"{path}: holds no prompts; add lines (.txt) or {{\"prompt\": ...}} objects (.jsonl)")
    return records, bad


def write_jsonl_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import json
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_generate(
    cfg: GenerateConfig, on_text: Callable[[int, str], None] | None = None
) -> tuple[list[Completion], GenerationStats, dict[str, int]]:
    """Load the model of ``cfg.run`` (an llmctl run or a transformers directory), complete the
    prompt(s), write ``cfg.out`` when given; return the completions, timing and skipped lines."""
    from .hf import load_any

    if (cfg.prompt is None) == (cfg.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE")
    if cfg.out is not None:
        out = Path(cfg.out)
        if out.suffix != ".jsonl":
            raise UsageError(f"--out {out}: the output is JSON lines; name it *.jsonl")
        if out.exists() and not cfg.force:
            raise UsageError(f"--out {out}: exists; pass --force to overwrite it or choose another file")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    elif cfg.prompts is not None:
        raise UsageError("--prompts needs --out FILE.jsonl for the completions")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be ≥ 1")
    if cfg.system is not None and not cfg.chat:
        raise UsageError("--system needs --chat (a system message is part of the chat format)")
    if cfg.prompts is not None:
        records, bad = read_prompts(Path(cfg.prompts))
    else:
        records, bad = [{"prompt": cfg.prompt}], {}
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    model, tok = load_any(Path(cfg.run))
    model = model.to(device=device, dtype=dtype).eval()
    prompts: list[str] | list[list[int]] = [r["prompt"] for r in records]
    params = cfg.sampling()
    if cfg.chat:  # a user turn of the model's chat format; the reply ends at its end-of-turn id
        fmt = chat_format(tok, cfg.run)
        prompts = [fmt.prompt(p, cfg.system) for p in prompts]
        params = cfg.sampling(fmt.stop_ids)
    stats = GenerationStats()
    done = generate(
        model, tok, prompts, params, batch_size=cfg.batch_size,
        add_bos=cfg.add_bos, on_text=on_text, stats=stats,
    )
    if cfg.out is not None:
        rows = [{**r, **c.to_dict(cfg.logprobs)} for r, c in zip(records, done, strict=True)]
        write_jsonl_atomic(Path(cfg.out), rows)
    return done, stats, bad

"""Export to and import from Hugging Face transformers model directories.

``export_hf`` turns a finished run into a directory that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load without any llmctl code: a Llama (or Qwen3 when the
model uses QK-norm) ``config.json``, ``model.safetensors`` with transformers' parameter names,
``generation_config.json``, and the sentencepiece model rebuilt as a ``tokenizers`` BPE
(``tokenizer.json``) that gives the same ids as sentencepiece: the vocabulary and scores become
BPE merges ranked by the merged piece's score, byte fallback stays on, user-defined symbols (chat
markers) become added tokens, and the dummy "▁" prefix is prepended only when the sentencepiece
model was trained with ``add_dummy_prefix``. ``tokenizer.model`` is copied too (llama.cpp's
converter reads it). Two known differences: special-token text in the input ("<s>") reads as that
token, as in every Llama tokenizer and as the chat template needs for its BOS, where sentencepiece
reads it as text (``split_special_tokens=True`` gives sentencepiece's ids); and in decoding, a run
of byte pieces that is not valid UTF-8 (which only a model can produce) decodes in ``tokenizers``
to one U+FFFD per byte, where sentencepiece keeps the valid bytes of the run. A chat model's
template starts with BOS and its generation config stops at ``<|end|>`` as well as EOS.

``load_hf`` reads such a directory (or any Llama/Qwen3 checkpoint of the same shape) back into our
:class:`Transformer` with a tokenizer adapter (``HFTokenizer``, with the directory's chat template).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import MANIFEST, StageRun, a_stage, read_manifest, write_json_atomic
from ..chat import hf_chat_template
from ..console import console
from ..errors import StageError, UsageError
from ..tokenizer import ROLE_MARKERS, Tokenizer
from .config import ModelConfig
from .generate import TextTokenizer
from .io import CONFIG, RUN_STAGES, TOKENIZER, WEIGHTS, load_model
from .transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# -- the sentencepiece model file, read without protobuf ----------------------------------------
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message; length-delimited values as bytes."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 1:
            v, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i : i + n], i + n
        elif wire == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise StageError(f"sentencepiece model: unsupported protobuf wire type {wire}; is it a .model file?")
        out.append((num, v))
    return out


@dataclass
class SpmModel:
    """What export needs from a sentencepiece ModelProto (field numbers from sentencepiece_model.proto)."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    @classmethod
    def read(cls, path: Path) -> SpmModel:
        data = Path(path).read_bytes()
        pieces: list[tuple[str, float, int]] = []
        m = cls(pieces=pieces)
        for num, v in _fields(data):
            if num == 1:
                piece, score, typ = "", 0.0, NORMAL
                for n, x in _fields(v):
                    if n == 1:
                        piece = x.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", x)[0]
                    elif n == 3:
                        typ = x
                pieces.append((piece, score, typ))
            elif num == 2:
                for n, x in _fields(v):
                    if n == 3:
                        m.model_type = x
                    elif n == 35:
                        m.byte_fallback = bool(x)
                    elif n == 24:
                        m.treat_whitespace_as_suffix = bool(x)
                    elif n in (40, 41, 42, 43):
                        val = x - (1 << 64) if x >= 1 << 63 else x  # int32 -1 is a 10-byte varint
                        setattr(m, {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[n], val)
            elif num == 3:
                for n, x in _fields(v):
                    if n == 1:
                        m.normalizer = x.decode("utf-8")
                    elif n == 2:
                        m.precompiled_charsmap = bytes(x)
                    elif n == 3:
                        m.add_dummy_prefix = bool(x)
                    elif n == 4:
                        m.remove_extra_whitespaces = bool(x)
                    elif n == 5:
                        m.escape_whitespaces = bool(x)
        if not pieces:
            raise StageError(f"{path}: no pieces found; not a sentencepiece model file")
        return m


def build_hf_tokenizer(spm_path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` that segments text exactly as the sentencepiece BPE model does."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE
    except ImportError as e:  # pragma: no cover - tokenizers is a dependency
        raise StageError("export needs the 'tokenizers' package; pip install tokenizers") from e

    sp = SpmModel.read(spm_path)
    if sp.model_type != 2:
        raise StageError(f"{spm_path}: a sentencepiece model of type {sp.model_type}; export supports BPE (2) only")
    if sp.treat_whitespace_as_suffix or not sp.escape_whitespaces:
        raise StageError(f"{spm_path}: whitespace-as-suffix or unescaped whitespace is not supported by export")
    vocab = {p: i for i, (p, _, _) in enumerate(sp.pieces)}
    score = {p: s for p, s, _ in sp.pieces}
    mergeable = {p for p, _, t in sp.pieces if t == NORMAL}
    merges = []
    for piece in mergeable:
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in mergeable and b in mergeable:
                merges.append((a, b))
    # sentencepiece merges the adjacent pair whose result has the highest score first
    merges.sort(key=lambda ab: (-score[ab[0] + ab[1]], vocab[ab[0] + ab[1]], vocab[ab[0]]))
    unk = sp.pieces[sp.unk_id][0]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=sp.byte_fallback))

    # sentencepiece's order: character map, whitespace clean-up, dummy "▁" prefix, spaces → "▁".
    # The whole text is one BPE word, as in sentencepiece (merges never cross whitespace anyway,
    # since no trained piece does). With add_dummy_prefix (not llmctl's setting) two corners
    # differ from sentencepiece: a text starting with a space or with a user-defined symbol.
    norms = []
    if sp.normalizer != "identity" and sp.precompiled_charsmap:
        norms.append(normalizers.Precompiled(sp.precompiled_charsmap))
    if sp.remove_extra_whitespaces:
        norms += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ +| +$"), "")]
    if norms:
        tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if sp.add_dummy_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)

    special = [AddedToken(p, special=True, normalized=False) for p, _, t in sp.pieces if t in (CONTROL, UNKNOWN)]
    tok.add_special_tokens(special)
    user = [AddedToken(p, special=False, normalized=False) for p, _, t in sp.pieces if t == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    if sp.bos_id >= 0:
        bos = sp.pieces[sp.bos_id][0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, sp.bos_id)]
        )
    return tok


# -- weights -----------------------------------------------------------------------------------
def _has_role_markers(sp: Any) -> bool:
    user = {p for p, _, t in sp.pieces if t == USER_DEFINED}
    return set(ROLE_MARKERS.values()) <= user


def _end_marker_id(sp: Any) -> int | None:
    """The id of the ``<|end|>`` chat marker, when the tokenizer has llmctl's role markers."""
    if not _has_role_markers(sp):
        return None
    return next(i for i, (p, _, _) in enumerate(sp.pieces) if p == ROLE_MARKERS["end"])


def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameter names → transformers' (``model.`` prefix on the decoder, ``lm_head`` outside)."""
    state = {}
    for name, t in model.state_dict().items():
        hf = name if name.startswith("lm_head.") else f"model.{name}"
        state[hf] = t
    return state


def from_hf_state(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name.startswith("model."):
            out[name[len("model.") :]] = t
        elif name == "lm_head.weight":
            if not tied:
                out[name] = t
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            out[name] = t
    return out


def hf_config(cfg: ModelConfig, sp: SpmModel | None, dtype: str = "fp32", reward: bool = False) -> dict[str, Any]:
    """transformers' config.json: a causal LM, or with ``reward`` a one-label sequence classifier
    (``*ForSequenceClassification``: the score head read at the last non-pad token, as ours)."""
    qwen = cfg.qk_norm
    ids = {
        "bos_token_id": sp.bos_id if sp and sp.bos_id >= 0 else None,
        "eos_token_id": sp.eos_id if sp and sp.eos_id >= 0 else None,
        "pad_token_id": sp.pad_id if sp and sp.pad_id >= 0 else None,
    }
    c: dict[str, Any] = {
        "architectures": [("Qwen3" if qwen else "Llama") + ("ForSequenceClassification" if reward else "ForCausalLM")],
        "model_type": "qwen3" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        **ids,
    }
    if qwen:
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        c.update(mlp_bias=False, pretraining_tp=1)
    if reward:
        c.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type="regression")
    return c


# -- export ------------------------------------------------------------------------------------
@dataclass
class ExportConfig:
    run: Path
    out: Path
    format: str = "hf"
    dtype: str = "fp32"
    force: bool = False


def export_hf(cfg: ExportConfig) -> dict[str, Any]:
    """Write the transformers directory ``cfg.out`` from the run ``cfg.run``; returns the manifest."""
    if cfg.format != "hf":
        raise UsageError(f"--format {cfg.format}: only 'hf' (transformers directory) is supported")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype {cfg.dtype}: choose fp32, bf16 or fp16")
    run_dir = Path(cfg.run)
    m = read_manifest(run_dir)
    if m.get("stage") not in RUN_STAGES:
        raise UsageError(f"{run_dir}: is {a_stage(m.get('stage'))}; export needs a model run ({', '.join(RUN_STAGES)})")
    spm_path = run_dir / TOKENIZER
    if not spm_path.is_file():
        raise UsageError(f"{run_dir}: has no {TOKENIZER}; export needs the run's tokenizer")
    params = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "force"}
    stage = StageRun.open(cfg.out, "export", params, inputs=[run_dir], force=cfg.force)
    if stage.done:
        console.print(f"{cfg.out}: already exported from this run with these settings; pass --force to redo")
        return stage.manifest
    reward = m.get("stage") == "reward"
    try:
        model, _ = load_model(run_dir)
        sp = SpmModel.read(spm_path)
        if reward and sp.pad_id < 0:
            raise UsageError(f"{spm_path}: a reward model's export needs a PAD token (transformers finds each row's last token by it)")
        if sp.pieces and len(sp.pieces) > model.cfg.vocab_size:
            raise UsageError(
                f"{run_dir}: tokenizer has {len(sp.pieces)} pieces but the model only {model.cfg.vocab_size}"
            )
        w = stage.work
        dt = DTYPES[cfg.dtype]
        hf_state = to_hf_state(model)
        if reward:  # the score head replaces the LM head
            from .reward import load_reward_model

            hf_state.pop("lm_head.weight", None)
            hf_state["score.weight"] = load_reward_model(run_dir)[1].weight
        state = {k: v.detach().to(dt).contiguous().clone() for k, v in hf_state.items()}
        tmp = stage.partial(WEIGHTS)
        save_file(state, str(tmp), metadata={"format": "pt"})
        stage.commit(WEIGHTS)
        write_json_atomic(w / CONFIG, hf_config(model.cfg, sp, cfg.dtype, reward))
        gen = {"_from_model_config": True, "bos_token_id": sp.bos_id, "eos_token_id": sp.eos_id}
        end_id = _end_marker_id(sp)
        if end_id is not None and not reward:  # a chat model's reply ends at <|end|>: generation stops there too
            gen["eos_token_id"] = [sp.eos_id, end_id]
        if sp.pad_id >= 0:
            gen["pad_token_id"] = sp.pad_id
        write_json_atomic(w / "generation_config.json", gen)

        tok = build_hf_tokenizer(spm_path)
        tmp = stage.partial("tokenizer.json")
        tok.save(str(tmp))
        stage.commit("tokenizer.json")
        piece = lambda i: sp.pieces[i][0] if i >= 0 else None  # noqa: E731
        special = {"bos_token": piece(sp.bos_id), "eos_token": piece(sp.eos_id), "unk_token": piece(sp.unk_id)}
        if sp.pad_id >= 0:
            special["pad_token"] = piece(sp.pad_id)
        special = {k: v for k, v in special.items() if v is not None}
        write_json_atomic(
            w / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **special,
                "add_bos_token": sp.bos_id >= 0,
                "add_eos_token": False,
                "model_max_length": model.cfg.max_seq_len,
                "clean_up_tokenization_spaces": False,
                # as in every Llama tokenizer, special-token text ("<s>") reads as that token: the
                # chat template writes BOS as text, since apply_chat_template and vLLM tokenize its
                # rendering without adding BOS. (sentencepiece reads "<s>" in text as text; pass
                # split_special_tokens=True to get its ids for such text.)
                "split_special_tokens": False,
                # generation pads on the left; a reward model reads each row's last token, so right
                "padding_side": "right" if reward else "left",
                # llmctl's chat format (chat.py), when the tokenizer has its role markers
                **({"chat_template": hf_chat_template(bos=sp.bos_id >= 0)} if _has_role_markers(sp) else {}),
            },
        )
        write_json_atomic(w / "special_tokens_map.json", special)
        shutil.copyfile(spm_path, stage.partial(TOKENIZER))
        stage.commit(TOKENIZER)
    except BaseException:
        stage.abandon()
        raise
    n_params = sum(p.numel() for p in model.parameters())
    stats = {
        "architecture": hf_config(model.cfg, None, reward=reward)["architectures"][0],
        "parameters": n_params,
        "vocab_size": model.cfg.vocab_size,
        "weights_bytes": os.path.getsize(stage.path(WEIGHTS)),
    }
    return stage.finish(stats, source_stage=m.get("stage"))


# -- import ------------------------------------------------------------------------------------
class HFTokenizer:
    """A ``tokenizer.json`` (``tokenizers`` library) behind the :class:`TextTokenizer` API, with the
    directory's chat template (tokenizer_config.json) and the ids that end a reply."""

    def __init__(
        self, path: Path, bos_id: int | None, eos_id: int | None, pad_id: int | None, *,
        chat_template: str | None = None, special_text: dict[str, str] | None = None, stop_ids: tuple[int, ...] = (),
    ) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.encode_special_tokens = True  # like sentencepiece: "<s>" in text is just text
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = -1 if bos_id is None else int(bos_id)
        self.eos_id = -1 if eos_id is None else int(eos_id)
        self.pad_id = -1 if pad_id is None else int(pad_id)
        self.chat_template = chat_template
        self.special_text = special_text or {}  # bos_token / eos_token as text, for the template
        eos_text = self.tok.token_to_id(self.special_text["eos_token"]) if "eos_token" in self.special_text else None
        self.stop_ids = tuple(sorted({*stop_ids, *(i for i in (self.eos_id, eos_text) if i is not None and i >= 0)}))
        self._template: Any = None  # the compiled chat template, on first use

    @classmethod
    def from_dir(cls, path: Path, config: dict[str, Any]) -> HFTokenizer:
        """The tokenizer of a transformers directory: tokenizer.json, and from tokenizer_config.json
        and generation_config.json its chat template, special-token text and reply-ending ids."""
        tc = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        special = {}
        for k in ("bos_token", "eos_token"):
            v = tc.get(k)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                special[k] = v
        stops: set[int] = set()
        for v in (gen.get("eos_token_id"), config.get("eos_token_id")):
            stops.update(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int))
        return cls(
            path / "tokenizer.json", config.get("bos_token_id"), config.get("eos_token_id"), config.get("pad_token_id"),
            chat_template=template if isinstance(template, str) else None, special_text=special, stop_ids=tuple(stops),
        )

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages) -> list[int]:
        """The ids of ``messages`` rendered by the directory's chat template with the generation
        prompt, special tokens in the rendered text read as such (as transformers does)."""
        from jinja2 import TemplateError

        try:
            if self._template is None:
                self._template = _compile_template(str(self.chat_template))
            text = self._template.render(messages=list(messages), add_generation_prompt=True, tools=None, **self.special_text)
        except TemplateError as e:
            raise UsageError(f"the chat template does not render ({e}); fix chat_template in tokenizer_config.json") from e
        self.tok.encode_special_tokens = False
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True


def _compile_template(source: str) -> Any:
    """A chat template compiled as transformers renders them: a sandbox, blocks trimmed,
    ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text."""
    import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(msg: str) -> None:
        raise UsageError(f"the chat template refused the conversation: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals.update(raise_exception=fail, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e}); fix or remove it") from e
    return d if isinstance(d, dict) else {}


def is_hf_dir(path: Path) -> bool:
    p = Path(path) / CONFIG
    if not p.is_file():
        return False
    try:
        c = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return "model_type" in c and "model" not in c


def config_from_hf(c: dict[str, Any], where: Path) -> ModelConfig:
    mt = c.get("model_type")
    if mt not in ("llama", "qwen3"):
        raise UsageError(f"{where}: model_type {mt!r} is not supported; llmctl reads llama and qwen3 directories")
    d, nh = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim", d // nh) != d // nh:
        raise UsageError(f"{where}: head_dim {c['head_dim']} ≠ hidden_size/heads {d // nh}; not supported")
    if c.get("attention_bias") or c.get("mlp_bias") or c.get("hidden_act", "silu") != "silu":
        raise UsageError(f"{where}: biases or a non-SiLU MLP are not supported by llmctl's transformer")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(f"{where}: rope scaling {rope.get('rope_type')!r} is not supported")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if mt == "qwen3" and c.get("use_sliding_window"):
        raise UsageError(f"{where}: sliding-window attention is not supported")
    return ModelConfig(
        vocab_size=c["vocab_size"],
        n_layer=c["num_hidden_layers"],
        n_head=nh,
        n_kv_head=c.get("num_key_value_heads") or nh,
        d_model=d,
        ffn_hidden=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qk_norm=mt == "qwen3",
        tie_embeddings=bool(c.get("tie_word_embeddings", mt != "llama")),
        init_std=float(c.get("initializer_range", 0.02)),
    )


def load_hf(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, TextTokenizer, dict[str, Any]]:
    """A transformers Llama/Qwen3 directory → (our Transformer in fp32 eval mode, tokenizer, HF config)."""
    path = Path(path)
    if not is_hf_dir(path):
        raise UsageError(f"{path}: not a transformers model directory (no config.json with model_type)")
    c = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    arch = next((a for a in c.get("architectures") or [] if a.endswith("ForSequenceClassification")), None)
    if arch is not None:
        raise UsageError(
            f"{path}: is a reward model ({arch}), not a language model; generate and eval need a causal LM "
            "(an llmctl reward run serves as eval's --judge)"
        )
    cfg = config_from_hf(c, path)
    index = path / "model.safetensors.index.json"
    if (path / WEIGHTS).is_file():
        state = load_file(str(path / WEIGHTS))
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(load_file(str(path / s)))
    else:
        raise UsageError(f"{path}: no model.safetensors; only safetensors checkpoints are read")
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in from_hf_state(state, cfg.tie_embeddings).items()}, strict=False
    )
    if missing or unexpected:
        raise UsageError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    ours = (path / MANIFEST).is_file() and json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("stage") == "export"
    if ours and (path / TOKENIZER).is_file():
        # our own export: the run's sentencepiece model itself (same ids; and the same text for
        # invalid UTF-8 byte runs, which tokenizers' ByteFallback decodes to one U+FFFD per byte)
        tok: TextTokenizer = Tokenizer(path / TOKENIZER)
    elif (path / "tokenizer.json").is_file():
        tok = HFTokenizer.from_dir(path, c)
    elif (path / TOKENIZER).is_file():
        tok = Tokenizer(path / TOKENIZER)
    else:
        raise UsageError(f"{path}: no tokenizer.json or tokenizer.model")
    return model.to(device).eval(), tok, c


def load_any(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, TextTokenizer]:
    """A finished llmctl run or an exported/transformers directory → (model, tokenizer)."""
    path = Path(path)
    if is_hf_dir(path):
        model, tok, _ = load_hf(path, device)
        return model, tok
    if (path / "manifest.json").is_file() and read_manifest(path).get("stage") == "reward":
        # its backbone carries an LM head that reward training never trained
        raise UsageError(
            f"{path}: is a reward model (llmctl reward run), not a language model; generate and eval need a "
            "causal LM (a reward run serves as eval's --judge)"
        )
    model, _ = load_model(path, device)
    if not (path / TOKENIZER).is_file():
        raise UsageError(f"{path}: has no {TOKENIZER}; the run is missing its tokenizer")
    return model, Tokenizer(path / TOKENIZER)

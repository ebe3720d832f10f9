"""llmctl's chat format: conversations as role-marked text, and their tokens with a loss mask.

A conversation renders as ``<|role|>content<|end|>`` per message; the model's reply follows a bare
``<|assistant|>`` and ends with ``<|end|>``, and a whole training example ends with EOS::

    BOS <|system|>Be brief.<|end|><|user|>Capital of France?<|end|><|assistant|>Paris.<|end|> EOS

The role markers are user-defined symbols of every llmctl tokenizer (tokenizer.py), so the text on
either side of a marker is encoded independently: tokenising a prompt that ends in ``<|assistant|>``
gives exactly the first ids of the whole conversation, which is what lets the loss mask be cut at
token boundaries. ``encode_chat`` still checks that prefix property (REFERENCE.md, SFT) and refuses
an example where it fails rather than train on a shifted mask.

Training examples come from the common instruction-data layouts, mapped to messages by
``to_messages``: ``{"messages": [{"role", "content"}]}`` (also ShareGPT's ``conversations`` with
``from``/``value``), Alpaca's ``{"instruction", "input", "output"}``, self-instruct seed tasks
``{"instruction", "instances": [{"input", "output"}]}`` (one example per instance), and
``{"prompt", "completion"}`` (or ``response``); an optional top-level ``system`` string applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .tokenizer import ROLE_MARKERS

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Message = dict[str, str]


class BadRecord(ValueError):
    """A record that cannot become a conversation; ``reason`` is the counter's key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def render_message(role: str, content: str) -> str:
    return f"{ROLE_MARKERS[role]}{content}{ROLE_MARKERS['end']}"


def render_prompt(messages: Sequence[Message]) -> str:
    """The text a model continues to write the next assistant reply."""
    return "".join(render_message(m["role"], m["content"]) for m in messages) + ROLE_MARKERS["assistant"]


def user_prompt(text: str, system: str | None = None) -> str:
    """``render_prompt`` of one user turn (and an optional system message)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return render_prompt(msgs)


@dataclass(frozen=True)
class ChatFormat:
    """How a model's own tokenizer turns a conversation into the prompt ids it answers, and which
    ids end its reply: llmctl's format (BOS, role markers; a reply ends at ``<|end|>``), or for a
    third-party transformers model the chat template of its tokenizer_config.json (a reply ends at
    one of its EOS ids), as lm-eval's ``--apply_chat_template`` does."""

    kind: str  # "llmctl" or "template"
    render: Callable[[Sequence[Message]], list[int]]
    stop_ids: tuple[int, ...]

    def prompt(self, text: str, system: str | None = None) -> list[int]:
        """The ids of one user turn (after an optional system message), open for the reply."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.render(msgs)


def chat_format(tok: Any, where: object) -> ChatFormat:
    """The chat format of ``tok`` (the tokenizer of the model at ``where``, named in the error)."""
    role_ids = getattr(tok, "role_ids", {})
    if {"user", "assistant", "end"} <= set(role_ids):
        bos = [tok.bos_id] if tok.bos_id >= 0 else []
        return ChatFormat("llmctl", lambda msgs: bos + tok.encode(render_prompt(msgs)), (role_ids["end"],))
    if getattr(tok, "chat_template", None):
        return ChatFormat("template", tok.apply_chat_template, tuple(tok.stop_ids))
    raise UsageError(
        f"{where}: the tokenizer has neither llmctl's chat markers nor a chat template; "
        "drop --chat, or use a chat model (llmctl sft output, or a directory whose tokenizer_config.json has chat_template)"
    )


def hf_chat_template(bos: bool = True) -> str:
    """The chat format as a Jinja template for transformers' ``apply_chat_template`` (written into
    an export's tokenizer_config.json): with ``add_generation_prompt`` it renders exactly
    ``render_prompt``, after ``bos_token`` as every training example starts (``bos``); without it,
    a whole conversation ends with ``eos_token``, as every training example does (``encode_chat``),
    so TRL's trainers and a reward export score and train the ids llmctl did. Templates carry BOS
    themselves because ``apply_chat_template(tokenize=True)``, and vLLM's chat endpoint, tokenize
    the rendering without adding special tokens."""
    opens = "".join(
        f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{r}' %}}{ROLE_MARKERS[r]}" for i, r in enumerate(ROLES)
    )
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}" + opens
        + "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        + "{{ message['content'] }}" + ROLE_MARKERS["end"] + "{% endfor %}"
        + "{% if add_generation_prompt %}" + ROLE_MARKERS["assistant"] + "{% else %}{{ eos_token }}{% endif %}"
    )


def _text(v: Any, reason: str) -> str:
    if not isinstance(v, str):
        raise BadRecord(reason)
    return v


def _instruction_turn(instruction: Any, inp: Any) -> str:
    instruction = _text(instruction, "instruction_not_text").strip()
    inp = "" if inp is None else _text(inp, "input_not_text").strip()
    if not instruction:
        raise BadRecord("empty_instruction")
    return f"{instruction}\n\n{inp}" if inp else instruction


def _pair(system: str | None, user: str, reply: Any) -> list[Message]:
    reply = _text(reply, "output_not_text")
    if not reply.strip():
        raise BadRecord("empty_output")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _messages(raw: Any) -> list[Message]:
    """A list of ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``) objects as messages."""
    if not isinstance(raw, list) or not raw:
        raise BadRecord("messages_not_a_list")
    msgs: list[Message] = []
    for m in raw:
        if not isinstance(m, dict):
            raise BadRecord("message_not_an_object")
        role = m.get("role", m.get("from"))
        role = _SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise BadRecord("unknown_role")
        msgs.append({"role": role, "content": _text(m.get("content", m.get("value")), "content_not_text")})
    return msgs


def to_messages(rec: Any) -> Iterator[list[Message]]:
    """The conversations in one record (raises ``BadRecord`` naming why there are none)."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object")
    system = rec.get("system")
    if system is not None:
        system = _text(system, "system_not_text") or None
    if "messages" in rec or "conversations" in rec:
        msgs = ([{"role": "system", "content": system}] if system else []) + _messages(rec.get("messages", rec.get("conversations")))
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise BadRecord("no_assistant_reply")
        yield msgs
    elif "instances" in rec and "instruction" in rec:
        instances = rec["instances"]
        if not isinstance(instances, list) or not instances:
            raise BadRecord("instances_not_a_list")
        for inst in instances:
            if not isinstance(inst, dict):
                raise BadRecord("instance_not_an_object")
            yield _pair(system, _instruction_turn(rec["instruction"], inst.get("input")), inst.get("output"))
    elif "instruction" in rec and "output" in rec:
        yield _pair(system, _instruction_turn(rec["instruction"], rec.get("input")), rec["output"])
    elif "prompt" in rec and ("completion" in rec or "response" in rec):
        prompt = _text(rec["prompt"], "prompt_not_text")
        if not prompt.strip():
            raise BadRecord("empty_prompt")
        yield _pair(system, prompt, rec.get("completion", rec.get("response")))
    else:
        raise BadRecord("unknown_layout")


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text: str) -> list[Message]:
    """Anthropic HH-RLHF's "\\n\\nHuman: … \\n\\nAssistant: …" dialogue as messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("not_a_dialogue")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def _reply(v: Any) -> Message:
    if isinstance(v, str):
        return {"role": "assistant", "content": v}
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
        return {"role": "assistant", "content": _text(v[0].get("content"), "content_not_text")}
    raise BadRecord("reply_not_text")


def to_preference(rec: Any) -> tuple[list[Message], Message, Message]:
    """(prompt messages, chosen reply, rejected reply) of one preference record: HH-RLHF's two full
    dialogues that differ in the last assistant turn, or ``{"prompt", "chosen", "rejected"}`` with a
    prompt given as text (one user turn) or messages, and replies as text or one assistant message."""
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise BadRecord("unknown_layout")
    if "prompt" in rec:
        p = rec["prompt"]
        prompt: list[Message] = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p)
        if not any(m["content"].strip() for m in prompt):
            raise BadRecord("empty_prompt")
        chosen, rejected = _reply(rec["chosen"]), _reply(rec["rejected"])
    else:
        c = parse_hh(_text(rec["chosen"], "reply_not_text"))
        r = parse_hh(_text(rec["rejected"], "reply_not_text"))
        if c[:-1] != r[:-1]:
            raise BadRecord("prompts_differ")
        prompt, chosen, rejected = c[:-1], c[-1], r[-1]
        if chosen["role"] != "assistant" or rejected["role"] != "assistant" or not prompt:
            raise BadRecord("no_assistant_reply")
    if not chosen["content"].strip() or not rejected["content"].strip():
        raise BadRecord("empty_output")
    if chosen["content"] == rejected["content"]:
        raise BadRecord("same_replies")
    return prompt, chosen, rejected


@dataclass
class ChatTokens:
    """One example's token ids and, per id, whether the model is trained to produce it."""

    ids: list[int]
    trained: list[bool]

    def targets(self) -> tuple[list[int], list[int]]:
        """(input ids, next-token targets with -100 where no loss is taken), each len(ids) - 1."""
        return self.ids[:-1], [t if w else -100 for t, w in zip(self.ids[1:], self.trained[1:], strict=True)]


def _pieces(messages: Sequence[Message], last_only: bool) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces that each start or end at a role marker."""
    out = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and (not last_only or k == len(messages) - 1):
            out += [(ROLE_MARKERS["assistant"], False), (m["content"] + ROLE_MARKERS["end"], True)]
        else:
            out.append((render_message(m["role"], m["content"]), False))
    return out


def encode_chats(tok: Any, conversations: Sequence[Sequence[Message]], last_only: bool = False) -> list[ChatTokens | BadRecord]:
    """``encode_chat`` of many conversations in one batched, multi-threaded tokenizer call; a
    conversation that fails the prefix check gives a ``BadRecord`` in its place."""
    plans, texts = [], []
    for msgs in conversations:
        pieces = _pieces(msgs, last_only)
        plans.append((len(texts), pieces, msgs[-1]["role"] == "assistant"))
        texts += [t for t, _ in pieces] + ["".join(t for t, _ in pieces)]
    encoded = tok.encode(texts) if texts else []
    out: list[ChatTokens | BadRecord] = []
    for start, pieces, ends_with_reply in plans:
        ids: list[int] = [tok.bos_id]
        trained: list[bool] = [False]
        for j, (_, w) in enumerate(pieces):
            ids += encoded[start + j]
            trained += [w] * len(encoded[start + j])
        # the prompt's ids must be a prefix of the whole conversation's (REFERENCE.md, SFT)
        if encoded[start + len(pieces)] != ids[1:]:
            out.append(BadRecord("prefix_mismatch"))
            continue
        ids.append(tok.eos_id)
        trained.append(ends_with_reply)
        out.append(ChatTokens(ids, trained))
    return out


def encode_chat(tok: Any, messages: Sequence[Message], last_only: bool = False) -> ChatTokens:
    """BOS + the rendered conversation + EOS, with every assistant reply (its ``<|end|>`` and the
    final EOS included; with ``last_only`` only the last message's) marked as trained and everything
    else (system, user, the role markers that open a reply) not. Raises
    ``BadRecord("prefix_mismatch")`` if a prompt's ids are not a prefix of the whole conversation's ids."""
    (got,) = encode_chats(tok, [messages], last_only)
    if isinstance(got, BadRecord):
        raise got
    return got


def to_prompts(rec: Any) -> list[list[Message]]:
    """The prompts in one record, each as messages ending in a user (or system) turn, for a stage
    that writes its own replies (ppo): a plain string (one user turn); ``{"prompt"}`` as text or
    messages (other fields such as ``completion`` or ``chosen`` are ignored); an HH-RLHF
    ``{"chosen", "rejected"}`` dialogue pair (the chosen dialogue before its last reply); or any ``to_messages`` layout,
    each conversation cut before its last assistant reply. Raises ``BadRecord`` naming why not."""
    if isinstance(rec, str):
        rec = {"prompt": rec}
    if isinstance(rec, dict) and "prompt" in rec:
        p = rec["prompt"]
        msgs: list[Message] = _messages(p) if isinstance(p, list) else [{"role": "user", "content": _text(p, "prompt_not_text")}]
        system = rec.get("system")
        if isinstance(system, str) and system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        convs = [msgs]
    elif isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
        # the chosen dialogue before its last reply: the replies themselves (empty, equal, or
        # after a context the rejected side words differently) do not matter to a prompt
        c = parse_hh(_text(rec["chosen"], "reply_not_text"))
        convs = [c[:-1] if c and c[-1]["role"] == "assistant" else c]
    else:
        convs = [c[: max(k for k, m in enumerate(c) if m["role"] == "assistant")] for c in to_messages(rec)]
    for msgs in convs:
        if not any(m["content"].strip() for m in msgs if m["role"] == "user"):
            raise BadRecord("empty_prompt")
        if msgs[-1]["role"] == "assistant":
            raise BadRecord("prompt_ends_with_reply")
    return convs

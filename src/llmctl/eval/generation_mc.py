"""Multiple choice by generation ("direct selection"): the model writes the answer letter.

The question is shown with its options lettered (``A. …``) and ends in "Answer:"; the model
decodes greedily a few tokens, and the answer is read strictly: after optional whitespace, one
capital letter among the options' letters, followed by the end of the text, whitespace or one of
``. , : ; ) ]``. Anything else ("The answer is B", "E", "b") is unparseable: counted, and wrong.
The lecture's point is that this protocol and likelihood scoring give different numbers.

With ``chat`` (a fine-tuned model) the whole prompt, shots included, is one user turn of the
model's chat format (``chat.chat_format``: llmctl's, or a transformers directory's template), and
the reply ends at its end-of-turn id, as lm-eval's ``--apply_chat_template`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..chat import ChatFormat
from ..model.generate import encode_prompt, generate
from ..model.transformer import Transformer
from .tasks import LETTERS, MCItem

_ANSWER = re.compile(r"\s*([A-Z])(?:$|[\s.,:;)\]])")


def parse_letter(text: str, n_choices: int) -> int | None:
    """The chosen option's index, or None when the text is not a strict answer."""
    m = _ANSWER.match(text)
    if not m:
        return None
    i = LETTERS.index(m.group(1))
    return i if i < n_choices else None


@dataclass
class GenResult:
    output: str
    pred: int | None  # None = unparseable

    @property
    def parsed(self) -> bool:
        return self.pred is not None


def build_prompt(item: MCItem, shots: list[MCItem]) -> str:
    parts = [s.question_with_letters() + " " + s.gold_letter() for s in shots]
    return item.description + "".join(p + "\n\n" for p in parts) + item.question_with_letters()


def encode(tok, prompt: str, add_bos: bool, chat: ChatFormat | None = None) -> list[int]:
    """The prompt's ids: plain text (BOS first with ``add_bos``), or a user turn of ``chat``."""
    return chat.prompt(prompt) if chat is not None else encode_prompt(tok, prompt, add_bos)


def select_by_generation(
    model: Transformer, tok, prompts: list[list[int]], n_choices: list[int], max_new_tokens: int = 4,
    batch_size: int = 16, chat: ChatFormat | None = None,
) -> list[GenResult]:
    """Greedy answers to encoded prompts (``encode``); a reply ends at a newline, or at ``chat``'s
    end-of-turn id."""
    outs = generate(
        model, tok, prompts, temperature=0.0, max_new_tokens=max_new_tokens, stop=("\n",),
        stop_ids=chat.stop_ids if chat is not None else (), batch_size=batch_size,
    )
    return [GenResult(o.text, parse_letter(o.text, n)) for o, n in zip(outs, n_choices, strict=True)]

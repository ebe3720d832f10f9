"""Rolling-window perplexity and bits-per-byte, as lm-eval-harness computes them.

Each document is tokenised whole (no special tokens) and cut into disjoint windows of the model's
context length; the first window is prefixed with BOS, so the document's first token is scored
too, and every token is scored exactly once. The last, shorter window keeps as much preceding
text as fits in the context (lm-eval's ``get_rolling_token_windows`` with ``context_len=1`` and
``make_disjoint_window``).

Metrics are corpus-level sums, never means of per-document ratios:
token_perplexity = exp(−Σll/Σtokens), word_perplexity = exp(−Σll/Σwords) (words: pieces between
runs of whitespace, lm-eval's count), byte_perplexity = exp(−Σll/ΣUTF-8 bytes), bits_per_byte =
−Σll/Σbytes/ln 2. Only the last two compare across tokenizers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .multiple_choice import Request

_WS = re.compile(r"\s+")


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, targets) pairs covering ``tokens`` once; each pair fits ``max_len`` inputs."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix, *tokens[: first - 1]], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(0, end - max_len - 1) : end - 1], tokens[end - n : end]))
        done += n
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def doc_requests(tok, text: str, max_len: int) -> list[Request]:
    prefix = tok.bos_id if tok.bos_id >= 0 else tok.eos_id
    return [Request(ctx, [tgt]) for ctx, tgt in rolling_windows(tok.encode(text), prefix, max_len)]


def count_words(text: str) -> int:
    return len(_WS.split(text))


def corpus_metrics(ll: Sequence[float], tokens: Sequence[int], words: Sequence[int], nbytes: Sequence[int]) -> dict[str, tuple[float, float]]:
    """metric → (value, standard error). Errors by the delta method over documents (a ratio
    estimator Σll/Σunits); zero with a single document."""
    out = {}
    tot_ll = math.fsum(ll)
    for name, units in (("token_perplexity", tokens), ("word_perplexity", words), ("byte_perplexity", nbytes)):
        tot = float(sum(units))
        r = -tot_ll / tot
        se = _ratio_se([-x for x in ll], units, r)
        out[name] = (math.exp(r), math.exp(r) * se)
    r = -tot_ll / sum(nbytes) / math.log(2)
    out["bits_per_byte"] = (r, _ratio_se([-x / math.log(2) for x in ll], nbytes, r))
    return out


def _ratio_se(num: Sequence[float], den: Sequence[int], r: float) -> float:
    n = len(num)
    if n < 2:
        return 0.0
    mean_den = sum(den) / n
    resid = [x - r * d for x, d in zip(num, den, strict=True)]
    var = math.fsum(e * e for e in resid) / (n - 1)
    return math.sqrt(var / n) / mean_den

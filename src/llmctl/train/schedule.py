"""Learning-rate schedules as a pure function of training progress.

``progress`` is the fraction of the run done, in [0, 1]: steps / max_steps, or tokens / max_tokens,
or seconds / time budget — the trainer uses the largest of the limits it was given, so a run stopped
by its time budget still decays its learning rate to the end. Warmup is counted in optimizer steps
(so that it is the same whatever stops the run).

* ``cosine``: linear warmup to the peak, then a half cosine from the peak down to ``min_lr_ratio``·peak
  over the rest of the run (from ``warmup_end``, the progress at which warmup ended, to 1).
* ``wsd`` (warmup-stable-decay): linear warmup, constant at the peak, then a linear warmdown to
  ``min_lr_ratio``·peak over the last ``decay_fraction`` of the run.
* ``constant``: linear warmup, then the peak.
"""

from __future__ import annotations

import math

from ..errors import UsageError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(
    step: int,
    progress: float,
    *,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    warmup_end: float = 0.0,
    decay_fraction: float = 0.2,
    min_lr_ratio: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate for the optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        q = min(max((p - warmup_end) / (1.0 - warmup_end), 0.0), 1.0) if warmup_end < 1.0 else 1.0
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))
    # wsd
    start = 1.0 - decay_fraction
    if p <= start or decay_fraction <= 0:
        return 1.0
    frac = (p - start) / decay_fraction
    return 1.0 - (1.0 - min_lr_ratio) * min(frac, 1.0)

"""Which torch device a ``--device`` option names, refused in one line when it is not there."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA, then MPS, then CPU; an explicit device that is absent is a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device; use auto, cpu, cuda or mps") from e

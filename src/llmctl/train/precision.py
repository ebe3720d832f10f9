"""Device, precision, peak FLOP/s and memory: what the trainer needs to know about the hardware.

Precision: master weights, gradients and optimizer states are always fp32; ``bf16`` and ``fp16``
run the forward and backward under ``torch.autocast`` (fp16 adds a GradScaler). ``auto`` picks, on
CUDA, bf16 where the GPU supports it, else fp16; on CPU, bf16 only if this CPU's measured bf16
matmul rate is at least 1.5× its fp32 rate (true with AMX or AVX512-BF16; on a plain AVX2 CPU
bf16 matmuls are emulated and far slower, so auto keeps fp32).

Peak FLOP/s for MFU: on CUDA a datasheet table by device name (dense, no sparsity); on CPU a
measured 1024×1024 matmul rate at the chosen precision, measured once and cached in
``$XDG_CACHE_HOME/llmctl/matmul_peak.json`` (keyed by CPU model, thread count and torch version;
the best rate seen is kept, since a busy machine can only under-read the peak).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..errors import UsageError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: dense tensor-core peaks in FLOP/s by a substring of torch.cuda.get_device_name()
CUDA_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("V100", {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12}),
]


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmctl" / "matmul_peak.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_matmul(dtype: torch.dtype, n: int = 1024, budget_s: float = 0.5) -> float:
    """FLOP/s of an n×n matmul on this CPU at ``dtype`` (time-boxed: slow dtypes stop early)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t0 = time.perf_counter()
    a @ b  # warm-up (also tells how slow it is)
    first = time.perf_counter() - t0
    reps = max(1, min(50, int(budget_s / max(first, 1e-6))))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / min(best, first)


_MEASURED: dict[str, float] = {}  # this process's answers: a process measures each precision once


def cpu_peak(dtype_name: str) -> float:
    """Measured matmul FLOP/s of this CPU for 'fp32' or 'bf16' (fp16 likewise), the best seen so far.

    The cache keeps the highest rate ever measured for this CPU, thread count and torch version (a
    measurement on a busy machine only under-reads). Fast precisions (≥ 10 GFLOP/s) are measured
    again once per process (~0.5 s) so the cache converges to the true peak; slow ones only once.
    """
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype_name}"
    if key not in _MEASURED:
        _MEASURED[key] = _cpu_peak_cached(key, dtype_name)
    return _MEASURED[key]


def _cpu_peak_cached(key: str, dtype_name: str) -> float:
    path = _cache_file()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    old = float(cache.get(key, 0.0))
    if old and old < 10e9:
        return old
    value = max(old, measure_cpu_matmul(DTYPES[dtype_name]))
    if value != old:
        cache[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs a re-measurement
    return value


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UsageError("--precision bf16: this GPU has no bf16; use fp16 or fp32")
        return precision
    if precision == "auto":
        return "bf16" if cpu_peak("bf16") >= 1.5 * cpu_peak("fp32") else "fp32"
    return precision


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype for Muon's Newton-Schulz matmuls: bf16 (torch's choice) unless this is a CPU that runs
    bf16 matmuls slower than fp32 (no AVX-512 BF16 / AMX units: there it is ~20x slower per step)."""
    if device.type == "cpu" and cpu_peak("bf16") < cpu_peak("fp32"):
        return torch.float32
    return torch.bfloat16


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s for MFU; 0 when unknown (MFU is then not reported)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for sub, peaks in CUDA_PEAKS:
            if sub in name:
                return peaks[precision]
        return 0.0
    # a CPU without bf16/fp16 units runs those matmuls far below its fp32 rate (and below the rate
    # a model's mixed small matmuls reach): its ceiling is still the fp32 peak, so MFU stays ≤ 1
    return max(cpu_peak(precision), cpu_peak("fp32"))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def available_memory(device: torch.device) -> int:
    """Bytes free for this process: free GPU memory, or MemAvailable on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def peak_memory(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

"""Peak memory of one trial: CUDA's allocator on a GPU, the process's peak RSS on the CPU."""

from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path

import torch


def peak_memory_gb(device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA ``max_memory_allocated`` on a GPU, peak RSS
    on the CPU (Linux's VmHWM; elsewhere the process's lifetime peak)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss * 1024 / 2**30


def reset_peak_memory() -> None:
    """Start a new peak for ``peak_memory_gb``: a process that ran an earlier trial (Tune hands
    finished trial processes on) frees what that one left cached and forgets its peak."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def sync(device) -> None:
    """Wait for the GPU, so a step's time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Timing and memory helpers shared by the prepared GPU scripts (gpu_check.py, gpu_quant.py): a
logging timer that synchronises CUDA around the timed block, and peak memory — the CUDA allocator's
peak on a GPU, the process's peak RSS (VmHWM) on CPU."""

from __future__ import annotations

import time

import torch


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class timed:
    """`with timed("what") as t:` … → t.s seconds (device work included), logged on exit."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        sync()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.t
        log(f"[{self.s:8.2f} s] {self.what}")
        return False


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> int | None:
    """Peak bytes since the last reset (CUDA), or the process's peak resident set (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return None

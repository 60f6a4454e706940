"""Helpers shared by the prepared GPU scripts (gpu_check.py, gpu_quant.py): a logging timer that
synchronises CUDA around the timed block, peak memory — the CUDA allocator's peak on a GPU, the
process's peak RSS (VmHWM) on CPU — and a random-weight model built directly on the device."""

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


def random_model(cfg, device: str, dtype: torch.dtype):
    """Random weights (normal 0.02, norms 1) built on the device — no default init, which dominates
    build time at real sizes."""
    from workbench.model import Llama4ForCausalLM
    from workbench.model.rope import inv_freq

    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.inv_freq = inv_freq(cfg).to(device)
    model.tokenizer = None
    return model.eval()

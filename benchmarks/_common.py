"""Shared helpers for the side-by-side benchmarks: thread pinning, alternating timing, the machine's
measured fp32 matmul peak, analytic FLOP counts for a Llama 4 text forward, machine info, and
rewriting one marked section of docs/benchmarks.md.

Benchmarks import this as `from _common import ...` (run them as scripts: `python benchmarks/X.py`).
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


# ------------------------------------------------------------------------------ threads, machine
def pin_threads(n: int) -> int:
    """Use exactly `n` intra-op threads (and one inter-op thread) for every timed run, ours and theirs."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:            # can only be set once, before any parallel work; harmless if so
        pass
    return torch.get_num_threads()


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "workbench"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        commit += "+uncommitted model changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "logical cpus": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf,
        "os": f"{platform.system()} {platform.release()}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": commit,
    }


# ------------------------------------------------------------------------------------- timing
@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)    # CPU time per run (see cpu_clock)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def cpu_median(self, name: str) -> float:
        """Median CPU time of the calling thread: all of the work when torch runs on one thread, and
        steadier than wall time on a shared machine (time spent descheduled is not counted)."""
        return statistics.median(self.cpu_seconds[name])

    def best(self, name: str) -> float:
        return min(self.seconds[name])


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     cpu_clock: Callable[[], float] = time.thread_time) -> Timings:
    """Run every fn `warmup` times, then `repeats` rounds of fn_a, fn_b, fn_a, fn_b, ... so that slow
    drifts of the machine (other processes, thermal state) hit each contestant alike. `cpu_clock`:
    `time.thread_time` (default; the calling thread) or `time.process_time` where part of the work runs
    on other threads (zarr encodes and writes chunks on its own)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = Timings({name: [] for name in fns}, {name: [] for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0, c0 = time.perf_counter(), cpu_clock()
            fn()
            out.seconds[name].append(time.perf_counter() - t0)
            out.cpu_seconds[name].append(cpu_clock() - c0)
    return out


def matmul_peak(n: int = 2048, tries: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`tries` FLOP/s of one (n×n)@(n×n) matmul: the machine's practical fp32 peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ---------------------------------------------------------------------------------- FLOP counts
def attention_pairs(T: int, chunk: int | None) -> int:
    """Σ over queries of visible keys for a T-token prefill: causal, restricted to the query's chunk."""
    if chunk is None or chunk >= T:
        return T * (T + 1) // 2
    full, rest = divmod(T, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


@dataclass
class FlopCount:
    matmul: float       # 2 × active params per token × tokens (projections, router, experts, lm_head)
    attention: float    # 4 · pairs · H · Dh  (QKᵀ and PV, 2 FLOPs per multiply-add each)

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def active_params_per_token(cfg) -> int:
    """Weights one token multiplies through: embeddings are a lookup and norms are elementwise, so
    neither counts; a MoE layer counts the router, the shared expert and top-k routed experts."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * H * Dh * 2 + D * Hkv * Dh * 2                                     # q, o + k, v
    moe = D * cfg.num_local_experts + 3 * D * cfg.intermediate_size * (1 + cfg.num_experts_per_tok)
    dense = 3 * D * cfg.intermediate_size_mlp
    layers = sum(attn + (moe if m else dense) for m in cfg.is_moe)
    return layers + D * cfg.vocab_size


def forward_flops(cfg, T: int, batch: int = 1) -> FlopCount:
    """Model FLOPs of a T-token prefill (all positions' logits), the useful work only: HF's dense
    expert compute (every expert on every token) is not counted, so both sides share one numerator."""
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    pairs = sum(attention_pairs(T, cfg.attention_chunk_size if ch else None) for ch in cfg.is_chunked)
    return FlopCount(2.0 * active_params_per_token(cfg) * T * batch, 4.0 * pairs * H * Dh * batch)


# ------------------------------------------------------------------------------------ results and docs
def save_results(results: dict, name: str, *dirs: Path) -> str:
    """`results` as indented JSON (str() for what JSON cannot hold) into `name` in each of `dirs` and in
    $OUT when set (the device tool brings $OUT back); returns the text."""
    import json

    text = json.dumps(results, indent=2, default=str)
    for d in (*dirs, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])):
        Path(d, name).write_text(text)
    return text


def write_section(name: str, body: str, title: str, path: Path = DOCS) -> None:
    """Replace (or append) the block between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in
    docs/benchmarks.md, leaving every other benchmark's section untouched."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)

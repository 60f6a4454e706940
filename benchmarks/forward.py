"""Prefill benchmark: our Llama 4 text forward vs `transformers` Llama4ForCausalLM on the same weights.

Both models hold the *same* parameter tensors (loaded with `assign=True`), run fp32 under
`torch.no_grad()` with the same thread count, alternately (ours, HF-sdpa, HF-eager, ours, ...).
Reported: median wall time per full-sequence forward (logits at every position), the HF/ours ratio,
and our model FLOP/s as a fraction of this machine's measured fp32 matmul peak (best of several
2048³ matmuls, measured before and after the runs).

Model FLOPs = 2 × active params per token × tokens + 4 · Σ_queries(visible keys) · H · Dh
(see `_common.forward_flops`): the useful work only, so HF's dense all-experts compute is not credited.

    python benchmarks/forward.py                       # full run, rewrites the section in docs/benchmarks.md
    python benchmarks/forward.py --quick               # tiny sizes, a few seconds (CI smoke)
    python benchmarks/forward.py --configs scout --tokens 1024 --repeats 3 --no-write
    python benchmarks/forward.py --profile scout:1024  # torch.profiler top ops of our forward
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from _common import (
    DOCS,
    forward_flops,
    machine_info,
    markdown_table,
    matmul_peak,
    pin_threads,
    time_alternating,
    write_section,
)

from workbench.config import Llama4TextConfig
from workbench.model import Llama4ForCausalLM

# Scout / Maverick shaped, small enough for a 2-core CPU: chunk 512 so chunking matters from 1024 tokens
# on, floor_scale = chunk so temperature tuning is active on the NoPE layers (layers 3 and 7).
SCOUT = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
             no_rope_layer_interval=4, attention_chunk_size=512, attn_temperature_tuning=True,
             floor_scale=512, attn_scale=0.1, use_qk_norm=True, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
             max_position_embeddings=65536)
MAVERICK = dict(SCOUT, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None)
QUICK = dict(SCOUT, vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_local_experts=4, no_rope_layer_interval=2, attention_chunk_size=32, floor_scale=32)
CONFIGS = {"scout": SCOUT, "maverick": MAVERICK, "quick": QUICK}
# HF runs all 128 experts on every token: at 2048+ tokens one Maverick-shaped HF forward takes minutes.
DEFAULT_TOKENS = {"scout": [1024, 2048, 4096], "maverick": [1024], "quick": [96]}
SECTION = "forward-prefill"


def build_pair(cfg: Llama4TextConfig):
    """HF model with its own default init (normal, std 0.02), and ours sharing its parameter tensors."""
    from transformers import Llama4ForCausalLM as HFModel
    from transformers import Llama4TextConfig as HFConfig

    d = cfg.hf_kwargs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hc = HFConfig(**d)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = HFModel(hc).eval()
    ours = Llama4ForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    return ours, hf


def run_one(name: str, T: int, repeats: int, hf_attn: list[str], threads: int) -> dict:
    cfg = Llama4TextConfig(**CONFIGS[name])
    ours, hf = build_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))

    def hf_fn(impl):
        def fn():
            hf.set_attn_implementation(impl)
            return hf(ids, use_cache=False).logits
        return fn

    fns = {"ours": lambda: ours(ids).logits}
    fns.update({f"hf_{impl}": hf_fn(impl) for impl in hf_attn})
    with torch.no_grad():
        a, b = fns["ours"](), fns[f"hf_{hf_attn[0]}"]()
        max_diff = (a - b).abs().max().item()
        del a, b
        timings = time_alternating(fns, repeats=repeats, warmup=1)
    flops = forward_flops(cfg, T)
    row = dict(config=name, tokens=T, flops=flops.total, attn_share=flops.attention / flops.total,
               max_diff=max_diff, threads=threads)
    for key in fns:
        row[key], row[f"{key}_best"] = timings.median(key), timings.best(key)
    return row


def profile(name: str, T: int):
    """torch.profiler over one forward of ours (after a warm-up): the op averages, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cfg = Llama4TextConfig(**CONFIGS[name])
    ours, _ = build_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        ours(ids)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            ours(ids)
    return p.key_averages()


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def profile_summary(name: str, T: int, top: int = 12) -> str:
    """Markdown: time share of matmuls / attention kernel / everything else, and the top ops."""
    ka = sorted(profile(name, T), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ka)
    mm = sum(e.self_cpu_time_total for e in ka if e.key in MATMUL_OPS)
    att = sum(e.self_cpu_time_total for e in ka if "scaled_dot_product" in e.key)
    head = (f"Profile of our forward, `{name}` at {T} tokens (torch.profiler, self CPU time, "
            f"total {total / 1e3:.0f} ms): matmuls {100 * mm / total:.0f}%, attention kernel "
            f"{100 * att / total:.0f}%, everything else (elementwise, norms, gathers, sort) "
            f"{100 * (total - mm - att) / total:.0f}%.\n\n")
    rows = [[f"`{e.key}`", e.count, f"{e.self_cpu_time_total / 1e3:.1f}", f"{100 * e.self_cpu_time_total / total:.1f}%"]
            for e in ka[:top]]
    return head + markdown_table(["op", "calls", "self ms", "share"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="scout,maverick", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--tokens", default=None, help="comma list; default per config " + str(DEFAULT_TOKENS))
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--hf-attn", default="sdpa,eager", help="HF attention implementations to time")
    ap.add_argument("--quick", action="store_true", help="tiny config, 1 repeat, never writes docs (CI smoke)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile table in the docs section")
    ap.add_argument("--profile", default=None, metavar="CONFIG:TOKENS", help="print torch.profiler top ops and exit")
    args = ap.parse_args(argv)

    # --quick is a smoke test: one thread avoids OpenMP barrier stalls on a shared CI runner.
    threads = pin_threads(args.threads or (1 if args.quick else 2))
    if args.profile:
        name, T = args.profile.split(":")
        print(profile_summary(name, int(T), top=25))
        return 0
    if args.quick:
        args.configs, args.repeats, args.no_write = "quick", 1, True
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {sorted(CONFIGS)}")
    hf_attn = [a.strip() for a in args.hf_attn.split(",") if a.strip()]

    info = machine_info()
    peak_n = 512 if args.quick else 2048
    peaks = [matmul_peak(peak_n)]
    rows = []
    for name in configs:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else DEFAULT_TOKENS[name]
        for T in tokens:
            t0 = time.perf_counter()
            rows.append(run_one(name, T, args.repeats, hf_attn, threads))
            peaks.append(matmul_peak(peak_n))     # re-measured between runs: the machine may be shared
            print(f"[{name} T={T}] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    peak = max(peaks)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    md = results_table(rows, hf_attn, peak)
    cmd = "python benchmarks/forward.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(md)
    print(f"\nmeasured fp32 matmul peak ({peak_n}³, best of 7): {peak / 1e9:.1f} GFLOP/s "
          f"(all measurements: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    for r in rows:      # the line the smoke test looks for
        print(f"ratio {r['config']} T={r['tokens']}: " + ", ".join(
            f"{r['hf_' + a] / r['ours']:.2f}x vs HF {a}" for a in hf_attn))

    if not args.no_write:
        prof = None if args.no_profile else profile_summary(rows[0]["config"], rows[0]["tokens"])
        write_section(SECTION, doc_section(cmd.strip(), md, info, peaks, peak_n, args, configs, prof), "Benchmarks")
        print(f"wrote the '{SECTION}' section of {DOCS.relative_to(DOCS.parents[1])}")
    return 0


def results_table(rows: list[dict], hf_attn: list[str], peak: float) -> str:
    ms = lambda r, k: f"{r[k] * 1e3:.0f} / {r[k + '_best'] * 1e3:.0f}"  # noqa: E731
    header = (["config", "tokens", "ours ms"] + [f"HF {a} ms" for a in hf_attn]
              + [f"ratio vs HF {a}" for a in hf_attn]
              + ["ours GFLOP/s (best)", "% of peak (best)", "attn FLOP share", "max abs Δlogit"])
    table = []
    for r in rows:
        gflops = r["flops"] / r["ours_best"]
        table.append([r["config"], r["tokens"], ms(r, "ours")] + [ms(r, f"hf_{a}") for a in hf_attn]
                     + [f"**{r[f'hf_{a}'] / r['ours']:.2f}×**" for a in hf_attn]
                     + [f"{gflops / 1e9:.0f}", f"**{100 * gflops / peak:.0f}%**", f"{100 * r['attn_share']:.0f}%",
                        f"{r['max_diff']:.1e}"])
    return markdown_table(header, table)


def doc_section(cmd, md, info, peaks, peak_n, args, configs, prof) -> str:
    shapes = []
    for name in configs:
        c = Llama4TextConfig(**CONFIGS[name])
        nope = [i for i, r in enumerate(c.use_rope) if not r]
        shapes.append(f"- `{name}`: hidden {c.hidden_size}, {c.num_hidden_layers} layers "
                      f"({sum(c.is_moe)} MoE with {c.num_local_experts} experts top-{c.num_experts_per_tok}, "
                      f"expert width {c.intermediate_size}; dense width {c.intermediate_size_mlp}), "
                      f"heads {c.num_attention_heads} / kv {c.num_key_value_heads} × {c.head_dim}, "
                      f"chunk {c.attention_chunk_size} (NoPE global layers {nope}), "
                      f"vocab {c.vocab_size}, qk-norm {c.use_qk_norm}")
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    prof = "" if prof is None else f"\n### Where our time goes\n\n{prof}\n"
    return f"""## Forward prefill (ours vs transformers)

```
{cmd}
```

Batch 1, fp32, `torch.no_grad()`, {info['torch threads']} threads for both models, {args.repeats} alternating
timed rounds (ours, HF sdpa, HF eager, ours, ...) after one warm-up round; one run = one full
forward with logits at every position; the ms columns are median / best. Both models hold the same
parameter tensors. **Ratio** = HF median / our median. **% of peak** = model FLOPs / our best time /
measured fp32 matmul peak, with model FLOPs = 2 × active params per token × tokens +
4 · Σ(visible keys per query) · H · Dh: the useful work only (HF's all-experts compute is not
credited). Best-of-N is used for the peak fraction because the peak itself is a best-of-N figure
and contention on a shared machine only adds time.

{md}

Measured fp32 matmul peak: **{max(peaks) / 1e9:.0f} GFLOP/s** (best of 7 {peak_n}³ `torch.mm`, measured
before the runs and after each; all: {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s).

Configs (Scout / Maverick *shaped*, scaled down for a CPU; fp32 weights normal(0, 0.02) from HF's init):
{chr(10).join(shapes)}
{prof}
Machine:
{machine}
"""


if __name__ == "__main__":
    sys.exit(main())

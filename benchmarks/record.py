"""Recording overhead, long-context memory, and store cost (issue: instrumentation and Zarr recording).

    python benchmarks/record.py            # full run, writes the "record" section of docs/benchmarks.md
    python benchmarks/record.py --quick    # seconds; CI smoke

1. Overhead vs a bare forward (same weights, alternating runs): router only, router + both entropies.
2. Long context on the `tiny` preset: peak RSS and wall time for 8K/32K/64K tokens with entropy on,
   each in a fresh subprocess; side by side, transformers' eager route (output_attentions=True, the
   only way peers get attention weights) at the lengths where it still fits.
3. Store: bytes per token on disk and the share of record time spent writing.
4. The peers' row (issue 20): router + entropy at 4,096 tokens on the peers' tiny config, ours vs transformers
   eager + hooks vs transformers sdpa with no capture vs our bare forward, quiet and with one core burnt
   (`throughput.peers_row`; benchmarks/throughput.py has it with decode and prefill figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine_info, markdown_table, pin_threads, time_alternating, write_section

import workbench
from workbench.config import Llama4TextConfig
from workbench.recording import run_document

SCOUT_SHAPED = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                    num_local_experts=16, interleave_moe_layer_step=1, attention_chunk_size=512, floor_scale=512,
                    max_position_embeddings=65536, rope_theta=500000.0, use_qk_norm=True)


def overhead(tokens: int, repeats: int) -> list[list]:
    rows = []
    for name, model in (("tiny", workbench.load_model("tiny")),
                        ("scout-shaped", workbench.build_model(Llama4TextConfig(**SCOUT_SHAPED)).eval())):
        ids = torch.randint(0, 256, (tokens,)).tolist()
        x = torch.tensor([ids])
        with torch.no_grad():
            t = time_alternating({
                "bare": lambda m=model, x=x: m(x, last_only=True),
                "router": lambda m=model, ids=ids: run_document(m, ids, ("router",), segment=tokens),
                "router+entropy": lambda m=model, ids=ids: run_document(m, ids, ("router", "entropy"), segment=tokens),
            }, repeats=repeats)
        base = t.median("bare")
        rows.append([name, tokens, f"{base * 1e3:.0f} ms", f"{t.median('router') / base:.2f}×",
                     f"{t.median('router+entropy') / base:.2f}×"])
    return rows


CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
route, T = sys.argv[1], int(sys.argv[2])
import workbench
model = workbench.load_model("tiny")
ids = torch.randint(0, 256, (1, T))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with torch.no_grad():
    if route == "ours":
        from workbench.recording import run_document
        run_document(model, ids[0].tolist(), ("router", "entropy"), segment=4096)
    else:
        import warnings; warnings.simplefilter("ignore")
        from transformers import Llama4ForCausalLM, Llama4TextConfig
        d = model.config.hf_kwargs()
        cfg = Llama4TextConfig(**d); cfg._attn_implementation = "eager"
        hf = Llama4ForCausalLM(cfg).eval(); hf.load_state_dict(model.state_dict(), strict=False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        out = hf(ids, output_attentions=True)
        ent = [-(a * a.clamp_min(1e-30).log()).sum(-1) for a in out.attentions]
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024}))
"""


def long_context(lengths: list[int], hf_lengths: list[int], limit_s: int) -> list[list]:
    rows = []
    for route, Ts in (("ours", lengths), ("transformers eager", hf_lengths)):
        for T in Ts:
            try:
                res = subprocess.run([sys.executable, "-c", CHILD, "ours" if route == "ours" else "hf", str(T)],
                                     capture_output=True, text=True, timeout=limit_s)
                if res.returncode != 0:
                    rows.append([route, T, "failed", res.stderr.strip().splitlines()[-1][:80], ""])
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append([route, T, f"{r['seconds']:.1f} s", f"{r['peak_mb']:.0f} MB", f"{r['delta_mb']:.0f} MB"])
            except subprocess.TimeoutExpired:
                rows.append([route, T, f"> {limit_s} s", "timeout", ""])
    return rows


def store_cost(n_docs: int, doc_tokens: int) -> list[list]:
    model = workbench.load_model("tiny")
    docs = [torch.randint(0, 256, (doc_tokens,)).tolist() for _ in range(n_docs)]
    tmp = Path(tempfile.mkdtemp())
    rows = []
    try:
        for probes in (("router",), ("router", "entropy")):
            with torch.no_grad():
                t0 = time.perf_counter()
                for d in docs:
                    run_document(model, d, probes)
                compute = time.perf_counter() - t0
            out = tmp / f"{'_'.join(probes)}.zarr"
            t0 = time.perf_counter()
            workbench.record(model, docs, out, probes=probes, progress=False)
            total = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            write_share = max(0.0, total - compute) / total
            rows.append(["+".join(probes), n_docs * doc_tokens, f"{size / (n_docs * doc_tokens):.1f} B",
                         f"{write_share:.1%}"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke), does not write docs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pin_threads(args.threads)
    from throughput import PEERS_HEADER, peers_row  # the peers' row (issue 20), shared with throughput.py
    if args.quick:
        pr = peers_row(256, 1)
        ov = overhead(256, 2)
        lc = long_context([512], [256], 120)
        st = store_cost(2, 256)
    else:
        pr = peers_row(4096, 5)
        ov = overhead(2048, 5)
        lc = long_context([8192, 32768, 65536], [2048, 4096, 8192], 1800)
        st = store_cost(16, 2048)
    body = "\n\n".join([
        "### The peers' row: router + entropy at 4,096 tokens (hidden 256, 4 layers, 8 experts, head dim 64, "
        "chunk 512); median ms (target: record ≤ 1.2× our bare forward)",
        markdown_table(PEERS_HEADER, pr),
        "### Recording overhead vs a bare forward (median of alternating runs; targets: router ≤ 1.05×, "
        "router + entropies ≤ 1.5×)",
        markdown_table(["model", "tokens", "bare forward", "router", "router + entropy + no-temp entropy"], ov),
        "### Long context, entropy on (`tiny` preset; fresh subprocess per row; target: memory linear in T, "
        "64K < 4 GB)",
        markdown_table(["route", "tokens", "time", "peak RSS", "RSS growth during the pass"], lc),
        "### Store cost",
        markdown_table(["probes", "tokens", "bytes/token on disk", "write share of record time (target < 5%)"], st),
        f"Machine: {machine_info()}. Command: `python benchmarks/record.py`.",
    ])
    print(body)
    if not args.quick:
        write_section("record", "## Recording\n\n" + body, "Benchmarks")


if __name__ == "__main__":
    main()

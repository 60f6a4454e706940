"""Quantization quality and streaming-quantization memory, written to docs/quantization.md.

Per layer, on random token ids, every variant against the float32 reference (same weights):
logit error (logit lens through each model's own norm + lm_head: relative L2 and KL), top-1
agreement, routing agreement (same expert chosen, `feed_forward.hook_topk_ids`), see
`workbench/quant/quality.py`. Variants: bf16 (no quantization: the floor), int4 routed experts
(bf16 compute, float32 router), int4 everything but embeddings/head/router, FP8 routed experts as
released (per-expert e4m3 with per-channel scales, written and loaded through `load_fp8`).
Models: the `tiny` preset and a Scout-shaped random model (hidden 512, 16 experts, top-1, 4 layers)
on random ids, and the bundled trained `tiny-moe` on held-out text of its four domains (the last 10 %
of each corpus file, never trained on) — trained weights have the peaked next-token distributions and
confident routing that random weights lack.

Memory: a Scout-shaped bf16 checkpoint is quantized by `quantize_checkpoint` in a fresh process;
reported is the rise of its peak RSS (VmHWM, reset after imports) over the checkpoint's size.

    python benchmarks/quant_quality.py            # full run (a few minutes on 2 cores), rewrites the doc sections
    python benchmarks/quant_quality.py --quick    # tiny only, no memory run, nothing written (CI smoke)
    python benchmarks/quant_quality.py --trained-only   # just the trained tiny-moe section
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from _common import REPO, machine_info, markdown_table, pin_threads, write_section

from workbench.checkpoint import build_model, load_model, save_model
from workbench.config import Llama4TextConfig
from workbench.quant import load_fp8, quantize_model, save_fp8_checkpoint
from workbench.quant.quality import compare, markdown

DOC = REPO / "docs" / "quantization.md"
TITLE = "Quantization"
SCOUT_SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                   num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                   no_rope_layer_interval=4, attention_chunk_size=64, attn_temperature_tuning=True,
                   floor_scale=64, attn_scale=0.1, use_qk_norm=True, rope_theta=500000.0,
                   max_position_embeddings=65536, bos_token_id=0, eos_token_id=1)


def _model(name: str, dtype=torch.float32):
    if name in ("tiny", "tiny-moe"):
        return load_model(name, dtype=dtype)
    return build_model(Llama4TextConfig(**SCOUT_SMALL), dtype=dtype, seed=0).eval()


def variants(name: str, group: int, tmp: Path) -> dict:
    """name → zero-argument builder of the candidate model."""
    def int4(targets):
        return lambda: quantize_model(_model(name, torch.bfloat16), targets, group_size=group)

    def fp8():
        path = save_fp8_checkpoint(_model(name), tmp / f"{name}-fp8")     # quantized from the fp32 weights
        return load_fp8(path, dtype=torch.bfloat16, keep_fp8=True)
    return {"bf16 (no quant.)": lambda: _model(name, torch.bfloat16),
            f"int4 experts g{group}": int4(("experts",)),
            f"int4 all g{group}": int4(("experts", "shared_expert", "attention", "mlp")),
            "fp8 experts (per-channel)": fp8}


def heldout_text_ids(model, batch: int, tokens: int, corpus_dir: str | None = None) -> torch.Tensor:
    """`batch` windows of `tokens` held-out tokens, spread over the four domains (train/data.py split)."""
    from workbench.train.data import TEXT_DOMAINS, Stream, encode_text, eval_windows, read_corpus

    corpus = read_corpus(corpus_dir, 0.1)
    per = -(-batch // len(TEXT_DOMAINS))
    rows = [w[:, :tokens] for d in TEXT_DOMAINS
            for w in [eval_windows(Stream(encode_text(model.tokenizer.tok, corpus[d][1])), tokens, per)]]
    return torch.cat(rows)[:batch]


def quality(name: str, group: int, batch: int, tokens: int, tmp: Path, ids: torch.Tensor | None = None) -> str:
    ref = _model(name)
    if ids is None:
        ids = torch.randint(0, ref.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    rows = {}
    for label, make in variants(name, group, tmp).items():
        t0 = time.perf_counter()
        cand = make()
        rows[label] = compare(ref, cand, ids)
        last = rows[label][-1]
        print(f"{name:12s} {label:26s} final: rel.err {last.logit_rel_err:.4f} top-1 {last.top1_agree:.3f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        del cand
    return markdown(rows)


PEAK = textwrap.dedent("""
    import os, sys, time
    import torch
    from workbench.config import preset
    from workbench.model import Llama4ForCausalLM
    from workbench.quant import quantize_checkpoint
    torch.set_num_threads(int(sys.argv[4]))
    with torch.device("meta"):
        Llama4ForCausalLM(preset("tiny"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    quantize_checkpoint(sys.argv[1], sys.argv[2], group_size=128, max_shard_size=sys.argv[3])
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(base, hwm, time.perf_counter() - t0)
""")


def streaming_rss(tmp: Path, threads: int) -> str:
    cfg = Llama4TextConfig(**SCOUT_SMALL)
    model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    src = save_model(model, tmp / "rss-src", max_shard_size="64MB")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    rows = []
    for shard in ("16MB", "64MB"):
        out = subprocess.run([sys.executable, "-c", PEAK, str(src), str(tmp / f"rss-q{shard}"), shard, str(threads)],
                             capture_output=True, text=True, check=True, cwd=REPO)
        base, hwm, secs = out.stdout.split()
        rise = int(hwm) - int(base)
        qbytes = sum(p.stat().st_size for p in (tmp / f"rss-q{shard}").glob("*.safetensors"))
        rows.append([f"{nbytes / 1e6:.0f} MB", shard, f"{qbytes / 1e6:.0f} MB", f"{rise / 1e6:.0f} MB",
                     f"{rise / nbytes:.2f}×", f"{float(secs):.0f} s"])
        print("rss", rows[-1], flush=True)
    caption = ("Scout-shaped random model (above) saved in bf16 (64 MB shards), converted by `quantize_checkpoint` "
               "(routed experts, g128) in a fresh process; peak RSS rise = VmHWM after − RSS before, "
               "the peak reset after imports.")
    return caption + "\n\n" + markdown_table(["bf16 checkpoint", "max_shard_size", "int4 output", "peak RSS rise",
                                               "rise / checkpoint", "time"], rows)


def trained_section(tmp: Path, args) -> str:
    model = load_model("tiny-moe")
    ids = heldout_text_ids(model, 8, 256, args.corpus)
    info = machine_info()
    return "\n\n".join([
        f"**Trained `tiny-moe`** (hidden 128, 8 experts top-1 of width 128, MoE layers 1, 3, 5) on held-out "
        f"text: 8 windows × 256 tokens, two per domain (arxiv, c4, github, wikipedia); reference = float32. "
        f"{info['cpu']}, torch {info['torch']}, {args.threads} threads, commit {info['commit']}.",
        quality("tiny-moe", 32, 8, 256, tmp, ids)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only, short inputs, no memory run, no write")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/quantization.md alone")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trained-only", action="store_true", help="only the trained tiny-moe section")
    ap.add_argument("--corpus", help="the domain-text directory (default: ../shared/data/domain_texts)")
    args = ap.parse_args()
    pin_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trained = trained_section(tmp, args)
        if args.trained_only:
            print(trained)
            if not args.no_write:
                write_section("quant-quality-trained", trained, TITLE, DOC)
            return
        if args.quick:
            print(quality("tiny", 32, 2, 32, tmp))
            return
        info = machine_info()
        setup = (f"Random token ids, batch {args.batch} × {args.tokens} tokens, seed 0; reference = the same "
                 f"weights in float32. {info['cpu']}, torch {info['torch']}, {args.threads} threads, "
                 f"commit {info['commit']}.")
        tiny = quality("tiny", 32, args.batch, args.tokens, tmp)
        scout = quality("scout-small", 128, args.batch, args.tokens, tmp)
        rss = streaming_rss(tmp, args.threads)
    body = "\n\n".join([setup, "**tiny preset** (hidden 64, 4 experts, layer 2 dense):", tiny,
                        "**Scout-shaped random model** (hidden 512, 16 experts top-1, expert width 1024, "
                        "4 MoE layers, vocab 8192):", scout])
    print(body)
    print(rss)
    print(trained)
    if not args.no_write:
        write_section("quant-quality", body, TITLE, DOC)
        write_section("quant-quality-trained", trained, TITLE, DOC)
        write_section("quant-rss", rss, TITLE, DOC)
        print(f"wrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()

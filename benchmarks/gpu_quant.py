"""Int4 on one GPU (issue 12), prepared to run in ≤ 5 minutes on an H100/H200: quantize a Scout-shaped
random model, then report memory, prefill and decode tokens/s, and bf16-vs-int4 quality per layer.

    python benchmarks/gpu_quant.py                  # Scout dims, 4 layers, full vocab; bf16 vs int4 experts g128
    python benchmarks/gpu_quant.py --layers 8 --prefill 16384 --decode 128 --targets experts,shared_expert
    python benchmarks/gpu_quant.py --via-checkpoint # int4 model streamed from a bf16 checkpoint (Scout's real path)
    python benchmarks/gpu_quant.py --tiny           # the tiny preset on CPU in seconds: the same code paths

Steps (each printed with its wall time):
  1. the bf16 reference: real Scout dimensions (hidden 5120, 16 experts of width 8192, vocab 202048, Scout's
     layer schedule) with `--layers` layers, random normal(0, 0.02) weights built on the device
  2. the int4 model: a copy quantized in place by `workbench.quant.quantize_model` (group-wise symmetric,
     float32 router); with `--via-checkpoint` instead `save_model` → `quantize_checkpoint` (streaming,
     the bf16 model never in host memory) → `load_quantized`, checked equal to the in-place one
  3. memory: each model's weight bytes (counted on its tensors) and the planner's figure for full Scout;
     peak device memory during the speed runs
  4. speed, each model: prefill of `--prefill` tokens in segments of `--segment` on the KV cache (last-position
     logits, as `record` and `generate` run it), then `--decode` greedy decode steps, batch 1
  5. quality on `--quality-tokens` random tokens (`workbench.quant.quality.compare`): per layer the routing
     agreement (same expert chosen), next-token top-1 agreement, logit-lens relative error and KL
A JSON summary is printed last and written to $OUT/gpu_quant.json when OUT is set.

Random weights route differently from trained ones (router margins are set by the init scale), so the
agreement figures show the method works at real dimensions; the real checkpoint's are its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _device import log, peak, peak_reset, random_model, sync, timed  # noqa: E402

from workbench.checkpoint import save_model  # noqa: E402
from workbench.config import preset  # noqa: E402
from workbench.model.kv_cache import KVCache  # noqa: E402
from workbench.params import human, human_bytes  # noqa: E402
from workbench.plan import make_plan  # noqa: E402
from workbench.quant import load_quantized, quantize_checkpoint, quantize_model, weight_bytes  # noqa: E402
from workbench.quant.quality import compare, markdown  # noqa: E402

RESULTS: dict = {}


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the stored weights: the state dict (int4 codes and scales are buffers in it; RoPE
    frequencies are not), tied weights once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def speed(model, prompt, n_decode: int, segment: int) -> dict:
    """Prefill `prompt` (1, T) in segments on a fresh KV cache, then `n_decode` greedy steps."""
    cache = KVCache(model.config.num_hidden_layers)
    peak_reset()
    sync()
    t0 = time.perf_counter()
    for a in range(0, prompt.shape[1], segment):
        out = model(prompt[:, a:a + segment], cache=cache, last_only=True)
    sync()
    prefill_s = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        nxt = model(nxt[:, None], cache=cache, last_only=True).logits[:, -1].argmax(-1)
    sync()
    decode_s = time.perf_counter() - t0
    T = prompt.shape[1]
    return {"prefill_tokens": T, "prefill_s": prefill_s, "prefill_tokens_per_s": T / prefill_s,
            "decode_steps": n_decode, "decode_s": decode_s,
            "decode_tokens_per_s": n_decode / decode_s if n_decode else None, "peak_bytes": peak()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (Scout's schedule)")
    ap.add_argument("--prefill", type=int, default=8192, help="prefill tokens")
    ap.add_argument("--segment", type=int, default=4096, help="prefill segment (tokens per forward)")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--quality-tokens", type=int, default=1024, help="tokens for the per-layer quality table")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--targets", default="experts", help="comma list of experts,shared_expert,attention,mlp")
    ap.add_argument("--via-checkpoint", action="store_true",
                    help="also quantize by streaming a saved bf16 checkpoint (quantize_checkpoint + load_quantized)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU (a smoke run of the same paths)")
    ap.add_argument("--workdir", default=None, help="where --via-checkpoint writes (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device, args.group_size, args.via_checkpoint = "cpu", 32, True
        args.prefill, args.segment, args.decode, args.quality_tokens = 96, 32, 8, 64
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    base = preset("tiny") if args.tiny else preset("scout")
    cfg = base if args.tiny else base.replace(num_hidden_layers=args.layers, moe_layers=None, no_rope_layers=None)
    dtype = torch.bfloat16
    RESULTS.update(torch=torch.__version__, device=args.device, layers=cfg.num_hidden_layers, dtype="bf16",
                   targets=list(targets), group_size=args.group_size)
    if args.device.startswith("cuda"):
        RESULTS["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    log(f"torch {torch.__version__}  device {args.device} ({RESULTS.get('gpu', 'cpu')})  {cfg.num_hidden_layers} "
        f"layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts, vocab {cfg.vocab_size}")

    # 1–2. models
    with timed("build the bf16 reference") as t:
        ref = random_model(cfg, args.device, dtype)
    RESULTS["build_s"] = t.s
    with timed(f"quantize a copy in place: int4 {','.join(targets)}, group {args.group_size}") as t:
        cand = quantize_model(copy.deepcopy(ref), targets, group_size=args.group_size)
    RESULTS["quantize_s"] = t.s
    if args.via_checkpoint:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_quant-"))
        with timed("save_model (bf16) → quantize_checkpoint (streaming) → load_quantized") as t:
            save_model(ref, work / "bf16", max_shard_size="2GB")
            quantize_checkpoint(work / "bf16", work / "int4", targets=targets, group_size=args.group_size)
            streamed = load_quantized(work / "int4", device=args.device)
        ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1)).to(args.device)
        with torch.no_grad():
            same = torch.equal(streamed(ids).logits, cand(ids).logits)
        RESULTS["via_checkpoint"] = {"s": t.s, "logits_equal_in_place": same}
        log(f"    streamed int4 model's logits equal the in-place one's: {same}")
        cand = streamed
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    # 3. memory
    full = preset("scout")
    mem = {"bf16_weight_bytes": tensor_bytes(ref), "int4_weight_bytes": tensor_bytes(cand),
           "planner_int4_bytes_this_model": weight_bytes(cfg, "int4", targets=targets, group_size=args.group_size),
           "planner_full_scout_bf16_bytes": weight_bytes(full, "bf16"),
           "planner_full_scout_int4_bytes": weight_bytes(full, "int4", targets=targets, group_size=args.group_size)}
    for dev in ("h100-80gb", "h200-141gb"):
        mem[f"full_scout_int4_on_{dev}"] = make_plan("scout", dtype="int4", device=dev).recommended
    RESULTS["memory"] = mem
    log(f"weights: bf16 {human_bytes(mem['bf16_weight_bytes'])}, int4 {human_bytes(mem['int4_weight_bytes'])} "
        f"(planner: {human_bytes(mem['planner_int4_bytes_this_model'])}); full Scout int4 "
        f"{human_bytes(mem['planner_full_scout_int4_bytes'])}: {mem['full_scout_int4_on_h100-80gb']} on an H100")

    # 4. speed
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=g).to(args.device)
    RESULTS["speed"] = {}
    for label, model in (("bf16", ref), ("int4", cand)):
        speed(model, prompt[:, :args.segment], 2, args.segment)                    # warm-up (kernels, allocator)
        with timed(f"{label}: prefill {args.prefill} tokens + {args.decode} decode steps") as t:
            row = speed(model, prompt, args.decode, args.segment)
        RESULTS["speed"][label] = row
        log(f"    prefill {row['prefill_tokens_per_s']:,.0f} tok/s, decode {row['decode_tokens_per_s'] or 0:,.1f} "
            f"tok/s, peak {row['peak_bytes'] / 2**30:.2f} GiB")

    # 5. quality
    ids = torch.randint(0, cfg.vocab_size, (1, args.quality_tokens), generator=g).to(args.device)
    with timed(f"quality on {args.quality_tokens} tokens (per layer)") as t:
        rows = compare(ref, cand, ids)
    RESULTS["quality"] = [r.as_dict() for r in rows]
    log(markdown({f"int4 {','.join(targets)} g{args.group_size}": rows}))
    moe = [r.routing_agree for r in rows if r.routing_agree is not None]
    RESULTS["routing_agree_min"] = min(moe) if moe else None
    log(f"routing agreement per MoE layer: {', '.join(f'{a:.3f}' for a in moe)}; "
        f"{human(sum(p.numel() for p in ref.parameters()))} parameters in the bf16 reference")

    log(json.dumps(RESULTS, indent=2, default=str))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_quant.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One prepared check for a GPU machine (sized for < 8 minutes on one H100): plan, layer-streamed and
in-memory recording of Scout-shaped layers, compiled vs eager, int4 decode — timed, one JSON out.

    python benchmarks/gpu_check.py                       # Scout-shaped random checkpoint, 4 layers, bf16, cuda
    python benchmarks/gpu_check.py --checkpoint /models/Llama-4-Scout-17B-16E --tokens 8192
    python benchmarks/gpu_check.py --tiny                # the same code paths on CPU in seconds

Steps (each printed with its wall time):
  1. the memory plan for this device: the checkpoint's own config, and full Scout and Maverick
  2. a Scout-shaped checkpoint (real dimensions and layer schedule, random weights, --layers layers)
     written with save_model, unless --checkpoint is given
  3. layer-streamed recording (router + entropy) of one document per --tokens length: tokens/s,
     peak device memory against the plan's layer-streamed estimate
  4. in-memory, when the plan says it fits: per document length (8K, 32K, 128K tokens by default) the
     prefill tokens/s with router probes only and with router + entropy (the entropy overhead), the
     model FLOP/s as a fraction of the measured bf16 matmul peak, peak memory; then `record` of all
     documents and its equality with the streamed store; each length also runs a bare forward (no probes), so
     `record_overhead` = record time / bare time (issue 20's target: ≤ 1.2)
  5. torch.compile(fullgraph=True) vs eager of the text model (bf16): prefill tokens/s at the first length,
     decode tokens/s after it, compile time apart (--no-compile skips; --tiny skips, tests/test_compile.py
     traces the same step on CPU)
  6. int4 routed experts (quantize_model in place): decode tokens/s against the eager bf16 decode
A JSON summary is printed last and written to $OUT/gpu_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import active_params_per_token, forward_flops, save_results  # noqa: E402
from _device import log, peak, peak_reset, random_model, sync, timed  # noqa: E402

from workbench.checkpoint import load_model, read_config, save_model  # noqa: E402
from workbench.config import preset  # noqa: E402
from workbench.params import human  # noqa: E402
from workbench.plan import format_plan, make_plan, param_counts  # noqa: E402
from workbench.recording import record, run_document  # noqa: E402
from workbench.store import open_run  # noqa: E402
from workbench.streamed import streamed_record  # noqa: E402

RESULTS: dict = {}


def matmul_peak(device: str, dtype: torch.dtype, n: int, tries: int = 10) -> float:
    """Best-of-`tries` FLOP/s of one (n×n)@(n×n) matmul on `device`: the practical peak to compare with."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.mm(a, b)
    best = float("inf")
    for _ in range(tries):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def prefill_flops(cfg, T: int) -> float:
    """Model FLOPs of recording one T-token document: every projection, router, shared and top-k
    experts, attention (QKᵀ and PV over visible pairs); lm_head for the last position only, as `record`
    runs it (`last_only`)."""
    lm_head = cfg.hidden_size * cfg.vocab_size
    return 2.0 * (active_params_per_token(cfg) - lm_head) * T + forward_flops(cfg, T).attention


def device_spec(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"gpu:{props.total_memory / 2**30:.1f}"
    return f"cpu:{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f}"


def synthetic_checkpoint(path: Path, cfg, device: str, dtype: torch.dtype) -> None:
    """Random weights built on the device (no default init), written with save_model."""
    model = random_model(cfg, device, dtype)
    save_model(model, path, max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_run(step, model, prompt, steps: int) -> float:
    """Prefill `prompt` (1, T) on a fresh cache, then `steps` greedy decode steps through `step`: tokens/s of
    the decode steps alone (device work included)."""
    from workbench.model.kv_cache import KVCache

    cache = KVCache(model.config.num_hidden_layers)
    T = prompt.shape[1]
    with torch.no_grad():
        logits = step(prompt, cache, 0)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            tok = step(tok, cache, T + i)[:, -1].argmax(-1, keepdim=True)
        sync()
    return steps / (time.perf_counter() - t0)


def text_step(model):
    """The text model's forward on a KV cache + the last position's logits: what torch.compile compiles
    (input validation, a host sync by nature, stays outside; tests/test_compile.py)."""
    def step(ids, cache, start):
        x, _ = model.model(ids, start=start, cache=cache)
        return model.lm_head(x[:, -1:])
    return step


def compiled_vs_eager(model, T: int, decode_steps: int, backend: str, dtype) -> dict:
    """Prefill tokens/s (T tokens, one call, no probes) and decode tokens/s, eager vs
    torch.compile(fullgraph=True); compile time reported apart (first call of each shape)."""
    import copy

    m = model if dtype == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)   # the traced dtype
    dev = next(m.parameters()).device
    prompt = torch.randint(0, m.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(7)).to(dev)
    eager = text_step(m)
    torch._dynamo.reset()
    comp = torch.compile(eager, fullgraph=True, backend=backend)
    out = {"backend": backend, "tokens": T, "decode_steps": decode_steps}
    from workbench.model.kv_cache import KVCache
    with torch.no_grad():
        with timed(f"compile: first prefill call ({T} tokens) + 2 decode shapes") as t:
            c = KVCache(m.config.num_hidden_layers)
            comp(prompt, c, 0)
            comp(prompt[:, :1], c, T)
            comp(prompt[:, :1], c, T + 1)
        out["compile_s"] = t.s
        for label, fn in (("eager", eager), ("compiled", comp)):
            fn(prompt, KVCache(m.config.num_hidden_layers), 0)                 # warm
            with timed(f"{label} prefill {T} tokens") as t:
                fn(prompt, KVCache(m.config.num_hidden_layers), 0)
            out[f"{label}_prefill_tokens_per_s"] = T / t.s
            out[f"{label}_decode_tokens_per_s"] = decode_run(fn, m, prompt, decode_steps)
            log(f"    {label}: prefill {T / t.s:,.0f} tok/s, decode {out[f'{label}_decode_tokens_per_s']:,.1f} tok/s")
    return out


def compare(a_path, b_path) -> dict:
    a, b = open_run(a_path), open_run(b_path)
    out = {}
    for name in ("router/experts", "router/weights", "attention/entropy"):
        x, y = a.read(name), b.read(name)
        out[name] = ({"equal_fraction": float(np.mean(x == y))} if x.dtype.kind != "f" else
                     {"max_abs_diff": float(np.nanmax(np.abs(x - y))), "bitwise_equal": bool(np.array_equal(x, y))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a real checkpoint directory (default: write a Scout-shaped one)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the synthetic checkpoint (Scout schedule)")
    ap.add_argument("--vocab", type=int, default=None, help="vocab of the synthetic checkpoint (default Scout's)")
    ap.add_argument("--tokens", default="8192,32768,131072", help="comma list: one document of each length")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--segment", type=int, default=4096)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (a smoke run of the same paths)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint and runs (default: a temp dir)")
    ap.add_argument("--decode-steps", type=int, default=64, help="decode steps per decode measurement")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-vs-eager rows")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device, args.dtype, args.segment = "cpu", "fp32", 64
        args.tokens = args.tokens if args.tokens != "8192,32768,131072" else "100,300"
        # compile is traced in tests/test_compile.py; here it would add a minute of dynamo tracing on a CPU
        args.decode_steps, args.compile_backend, args.no_compile = min(args.decode_steps, 4), "eager", True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    lengths = [int(t) for t in args.tokens.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    dev_spec = device_spec(args.device)
    RESULTS.update(torch=torch.__version__, device=args.device, device_spec=dev_spec, dtype=args.dtype,
                   tokens=lengths, segment=args.segment)
    if args.device.startswith("cuda"):
        RESULTS["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    peak_flops = matmul_peak(args.device, dtype, 512 if args.tiny else 8192)
    RESULTS["matmul_peak_tflops"] = peak_flops / 1e12
    log(f"measured {args.dtype} matmul peak: {peak_flops / 1e12:.1f} TFLOP/s")
    log(f"torch {torch.__version__}  device {args.device} ({RESULTS.get('gpu', 'cpu')}, {dev_spec})  "
        f"dtype {args.dtype}")

    # 1. plans
    if args.checkpoint:
        ck = Path(args.checkpoint)
        cfg = read_config(ck)[0]
    else:
        ck = work / "checkpoint"
        base = preset("tiny") if args.tiny else preset("scout")
        n = args.layers
        cfg = base.replace(num_hidden_layers=n, moe_layers=None, no_rope_layers=None,
                           vocab_size=args.vocab or base.vocab_size)
    plan_dtype = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[args.dtype]
    plan = make_plan(cfg, dtype=plan_dtype, device=dev_spec, tokens=max(lengths), segment=args.segment,
                     batch_tokens=sum(lengths))
    log("\n" + format_plan(plan) + "\n")
    RESULTS["plan"] = {m.name: {"device_bytes": m.device_bytes, "fits": m.fits, **m.detail} for m in plan.modes}
    if not args.tiny:
        for name in ("scout", "maverick"):
            p = make_plan(name, dtype="bf16", device=dev_spec, tokens=max(lengths))
            RESULTS[f"plan_{name}"] = {"recommended": p.recommended,
                                       "n_devices": p.modes[2].detail["n_devices"]}
            log(f"full {name} bf16 on this device: {p.recommended}; layer placement needs "
                f"{p.modes[2].detail['n_devices']} such devices")

    # 2. checkpoint
    if not args.checkpoint and not (ck / "config.json").exists():
        with timed(f"write a {cfg.num_hidden_layers}-layer checkpoint "
                   f"({human(param_counts(cfg)['total'])} params) to {ck}") as t:
            synthetic_checkpoint(ck, cfg, args.device, dtype)
        RESULTS["write_checkpoint_s"] = t.s
    g = torch.Generator().manual_seed(0)
    docs = [{"tokens": torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), "id": f"t{n}"} for n in lengths]
    n_tok = sum(lengths)

    # 3. layer-streamed
    runs = {}
    for label, probes in (("streamed", ("router", "entropy")),):
        out = work / f"{label}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        peak_reset()
        with timed(f"layer-streamed record of {n_tok} tokens ({lengths})") as t:
            streamed_record(ck, docs, out, probes, dtype=dtype, device=args.device, segment=args.segment,
                            progress=False)
        runs[label] = out
        RESULTS[label] = {"s": t.s, "tokens_per_s": n_tok / t.s, "peak_bytes": peak(),
                          "plan_device_bytes": plan.modes[1].device_bytes}
        log(f"    {n_tok / t.s:,.0f} tok/s, peak {peak() / 2**30:.2f} GiB "
            f"(plan: {plan.modes[1].device_bytes / 2**30:.2f} GiB incl. weights and hidden states)")

    # 4. in memory, when it fits
    if plan.modes[0].fits:
        peak_reset()
        with timed("load_model (in memory)") as t:
            model = load_model(ck, dtype=dtype, device=args.device)
        RESULTS["load_s"] = t.s
        run_document(model, docs[0]["tokens"][:2 * args.segment], ("router", "entropy"), args.segment)  # warm-up
        RESULTS["prefill"] = {}
        for d in docs:
            n = len(d["tokens"])
            row = {}
            for label, probes in (("router", ("router",)), ("router_entropy", ("router", "entropy"))):
                peak_reset()
                with timed(f"in-memory prefill of {n} tokens, probes {','.join(probes)}") as t:
                    run_document(model, d["tokens"], probes, args.segment)
                flops = prefill_flops(cfg, n) / t.s
                row[label] = {"s": t.s, "tokens_per_s": n / t.s, "tflops": flops / 1e12,
                              "fraction_of_matmul_peak": flops / peak_flops, "peak_bytes": peak()}
                log(f"    {n / t.s:,.0f} tok/s, {flops / 1e12:.1f} TFLOP/s = {flops / peak_flops:.0%} of the "
                    f"matmul peak, peak {peak() / 2**30:.2f} GiB")
            peak_reset()
            with timed(f"in-memory bare forward of {n} tokens (no probes, same segments)") as t:
                run_document(model, d["tokens"], (), args.segment)
            row["bare"] = {"s": t.s, "tokens_per_s": n / t.s, "peak_bytes": peak()}
            row["record_overhead"] = row["router_entropy"]["s"] / t.s     # target ≤ 1.2 (issue 20)
            row["entropy_overhead"] = row["router_entropy"]["s"] / row["router"]["s"] - 1
            RESULTS["prefill"][str(n)] = row
            log(f"    entropy overhead at {n} tokens: {row['entropy_overhead']:+.0%}")
        out = work / "in_memory.zarr"
        shutil.rmtree(out, ignore_errors=True)
        peak_reset()
        with timed("in-memory record router,entropy (all documents)") as t:
            record(model, docs, out, ("router", "entropy"), segment=args.segment, progress=False,
                   model_source=str(ck))
        runs["in_memory"] = out
        RESULTS["in_memory"] = {"s": t.s, "tokens_per_s": n_tok / t.s, "peak_bytes": peak(),
                                "plan_device_bytes": plan.modes[0].device_bytes}
        RESULTS["streamed_vs_in_memory"] = compare(runs["streamed"], runs["in_memory"])
        log(f"streamed vs in-memory {json.dumps(RESULTS['streamed_vs_in_memory'])}")
        # 5. torch.compile(fullgraph=True) vs eager, prefill and decode (bf16: the traced dtype)
        if not args.no_compile:
            try:
                RESULTS["compile"] = compiled_vs_eager(model, min(lengths), args.decode_steps,
                                                       args.compile_backend, dtype)
            except Exception as e:          # report, keep the other figures
                RESULTS["compile"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                log(f"compile failed: {RESULTS['compile']['error']}")
        # 6. int4 routed experts (in place): decode tokens/s against the bf16 model's eager decode
        from workbench.quant import quantize_model
        prompt = torch.tensor([docs[0]["tokens"][:min(lengths)]], device=args.device)
        bf = decode_run(text_step(model), model, prompt, args.decode_steps)
        peak_reset()
        with timed("quantize_model int4 (routed experts, in place)") as t:
            quantize_model(model, group_size=next(g for g in (128, 64, 32, 16) if cfg.hidden_size % g == 0
                                                  and cfg.intermediate_size % g == 0))
        q4 = decode_run(text_step(model), model, prompt, args.decode_steps)
        RESULTS["int4_decode"] = {"quantize_s": t.s, "bf16_decode_tokens_per_s": bf, "int4_decode_tokens_per_s": q4,
                                  "prompt_tokens": prompt.shape[1], "peak_bytes": peak()}
        log(f"    decode after a {prompt.shape[1]}-token prompt: {args.dtype} {bf:,.1f} tok/s, int4 {q4:,.1f} tok/s")
        del model
    else:
        log("in-memory recording skipped: the plan says the checkpoint does not fit this device")

    log(json.dumps(RESULTS, indent=2, default=str))
    save_results(RESULTS, "gpu_check.json")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

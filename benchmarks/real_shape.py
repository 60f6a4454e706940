"""The real-shape dress rehearsal: Scout's exact text widths on this CPU, two decoder layers.

    python benchmarks/real_shape.py --workdir /work/realshape        # ≈ 13 GB checkpoint; writes docs
    python benchmarks/real_shape.py --scaled --workdir /tmp/rs       # the same steps at toy widths (tests)

A random-weight checkpoint with Scout's text config (hidden 5120, 40/8 heads × 128, 16 experts × 8192,
vocab 202,048, chunk 8192, floor_scale 8192, QK norm) but two decoder layers — layer 0 chunked RoPE,
layer 1 NoPE (global, temperature-tuned) — in bf16, in the released `Llama4ForConditionalGeneration`
key layout (`language_model.model.…`, `language_model.lm_head.weight`, `multi_modal_projector.…`) and
sharding (≤ 5 GB `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`). Every shard is
written tensor by tensor, in row slabs, straight into the file: memory stays at one slab, never a shard.
(The vision tower's 0.8 B parameters are not written; the projector stands in for the vision keys.)

Then, each step in a fresh subprocess so its peak RSS (VmHWM) is its own:
  info            `workbench info` on the checkpoint
  plan            `workbench.plan.make_plan` for each document length: predicted peak per mode
  streamed T      layer-streamed `streamed_record` of one T-token document, router + entropy
  in-memory T     `record` with the whole model loaded — only when the plan's in-memory bytes fit
                  under --mem-budget (RAM is shared: 13 GB of bf16 weights do not, by default)
  quantize        int4 `quantize_checkpoint` (routed experts, group 128), streaming
  int4 T          `record` from the int4 checkpoint, in memory (`load_quantized`)
Each record step checks its store: every value finite, entropies in [0, ln(keys)], expert ids in range,
positions past the chunk and `floor_scale` present. Peak RSS is compared with the plan's prediction
(device + host bytes: on a CPU they are one memory, and the plan is a peak RSS, the process included),
always from the current planner (rows kept from earlier runs are re-predicted), and attributed with an
RSS sampler (anonymous vs file-backed pages at the peak).

A JSON summary goes to <workdir>/real_shape.json (and $OUT when set); without --scaled the
"real-shape" section of docs/benchmarks.md is rewritten. --keep keeps the checkpoints (default: the
checkpoint directories are deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_info, markdown_table, save_results, write_section  # noqa: E402

SCOUT_TEXT = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=10485760,
    num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192,
    attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, use_qk_norm=True, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018, rms_norm_eps=1e-5,
)
# the same structure at toy widths (chunk and floor_scale small enough that short documents cross them)
SCALED_TEXT = dict(SCOUT_TEXT, vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                   attention_chunk_size=32, floor_scale=32, bos_token_id=1, eos_token_id=[2], pad_token_id=0,
                   max_position_embeddings=4096)
PROJECTOR_IN = 4096           # Scout's vision_output_dim → multi_modal_projector.linear_1 [hidden, 4096]
SHARD_BYTES = 5 * 10 ** 9     # the release's shards are ≤ 5 GB
SLAB_ELEMS = 1 << 26          # rows generated per write: ≤ 64 M elements (256 MB fp32 while drawn)
PROBES = ("router", "entropy")


def text_config(scaled: bool, layers: int = 2) -> dict:
    d = dict(SCALED_TEXT if scaled else SCOUT_TEXT, num_hidden_layers=layers)
    d["no_rope_layers"] = [int((i + 1) % 2 != 0) for i in range(layers)]   # 1 = RoPE (chunked), 0 = NoPE
    d["moe_layers"] = list(range(layers))
    return d


# ----------------------------------------------------------------------------- the checkpoint
def _tensor_list(cfg_dict: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(released key, shape) of every tensor, in the release's order (sorted keys)."""
    from workbench.config import Llama4TextConfig
    from workbench.model import Llama4ForCausalLM

    with torch.device("meta"):
        model = Llama4ForCausalLM(Llama4TextConfig.from_hf(cfg_dict))
    items = [(f"language_model.{k}", tuple(v.shape)) for k, v in model.state_dict().items()]
    items.append(("multi_modal_projector.linear_1.weight", (cfg_dict["hidden_size"], PROJECTOR_IN)))
    return sorted(items)


def _shards(items, limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    out, cur, n = [], [], 0
    for name, shape in items:
        b = 2 * _numel(shape)
        if cur and n + b > limit:
            out.append(cur)
            cur, n = [], 0
        cur.append((name, shape))
        n += b
    return out + ([cur] if cur else [])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_safetensors_streaming(path: Path, items, gen: torch.Generator) -> int:
    """A bf16 safetensors file written tensor by tensor, in row slabs of ≤ SLAB_ELEMS elements (norm
    weights 1, everything else normal(0, 0.02)); the header first, so no tensor is ever whole in memory."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in items:
            flat = (_numel(shape[:-1]), shape[-1]) if len(shape) > 1 else (1, shape[0])
            rows = max(1, SLAB_ELEMS // flat[1])
            for a in range(0, flat[0], rows):
                r = min(rows, flat[0] - a)
                if name.endswith("norm.weight"):
                    slab = torch.ones(r, flat[1], dtype=torch.bfloat16)
                else:
                    slab = torch.empty(r, flat[1]).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
                f.write(slab.view(torch.int16).numpy().tobytes())
                del slab
    os.replace(tmp, path)
    return off


def write_checkpoint(directory: Path, cfg_dict: dict, shard_bytes: int = SHARD_BYTES) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    items = _tensor_list(cfg_dict)
    shards = _shards(items, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for fname, shard in zip(names, shards):
        total += write_safetensors_streaming(directory / fname, shard, gen)
        weight_map.update({name: fname for name, _ in shard})
        print(f"  wrote {fname} ({sum(2 * _numel(s) for _, s in shard) / 1e9:.2f} GB)", flush=True)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
              "torch_dtype": "bfloat16", "image_token_index": 200092, "boi_token_index": 200080,
              "eoi_token_index": 200081,
              "text_config": dict(cfg_dict, model_type="llama4_text")}
    # no vision_config: the vision tower is not written, and a vision_config makes load_model build the
    # multimodal model (which then rightly reports the tower's keys missing)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return {"bytes": total, "shards": len(shards), "tensors": len(items), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- child steps
def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples the process's resident memory every `every` s on a thread, so a peak can be attributed:
    anonymous pages (tensors) vs file-backed pages (safetensors mappings being copied), and when."""

    def __init__(self, every: float = 0.05):
        import threading

        self.every, self.t0 = every, time.perf_counter()
        self.peak = {"rss": 0, "anon": 0, "file": 0, "at_s": 0.0}
        self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def sample() -> dict:
        out = {}
        for line in open("/proc/self/status"):
            for key, name in (("VmRSS", "rss"), ("RssAnon", "anon"), ("RssFile", "file")):
                if line.startswith(key + ":"):
                    out[name] = int(line.split()[1]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            s = self.sample()
            if s.get("rss", 0) > self.peak["rss"]:
                self.peak = {**s, "at_s": round(time.perf_counter() - self.t0, 2)}
            self.peak_anon = max(self.peak_anon, s.get("anon", 0))
            self.peak_file = max(self.peak_file, s.get("file", 0))
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"at_peak": self.peak, "peak_anon": self.peak_anon, "peak_file": self.peak_file}


def _doc(cfg, T: int) -> list[int]:
    g = torch.Generator().manual_seed(T)
    return torch.randint(0, cfg.vocab_size, (T,), generator=g).tolist()


def check_store(path: Path, cfg, T: int) -> dict:
    """What could break at these widths: NaN/inf, entropies outside [0, ln(keys)], ids out of range."""
    import numpy as np

    from workbench.store import open_run

    run = open_run(path)
    ent = run.read("attention/entropy")                           # (L, H, T)
    ent0 = run.read("attention/entropy_no_temp")
    keys = run.read("attention/n_keys").astype(np.float64)        # (L, T)
    ids = run.read("router/experts")
    w = run.read("router/weights")
    bound = np.log(keys)[:, None, :] + 1e-3
    out = {"finite": bool(np.isfinite(ent).all() and np.isfinite(ent0).all() and np.isfinite(w).all()),
           "entropy_in_bounds": bool(((ent >= 0) & (ent <= bound)).all() and ((ent0 >= 0) & (ent0 <= bound)).all()),
           "expert_ids_in_range": bool(ids.min() >= 0 and ids.max() < cfg.num_local_experts),
           "n_tokens": int(run.n_tokens), "max_keys_per_layer": [int(k) for k in keys.max(-1)]}
    nope = [i for i, r in enumerate(cfg.use_rope) if not r]
    if nope and T > cfg.floor_scale:     # past floor_scale the temperature makes the two entropies differ
        i = nope[0]
        out["temperature_active_past_floor_scale"] = bool(
            np.abs(ent[i, :, cfg.floor_scale:] - ent0[i, :, cfg.floor_scale:]).max() > 0)
    out["ok"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out


def child(step: str, ck: str, T: int, out: str, segment: int) -> dict:
    import workbench
    from workbench.checkpoint import read_config

    cfg = read_config(Path(ck))[0]
    base = _vm("VmRSS")
    sampler = RssSampler()
    t0 = time.perf_counter()
    with torch.no_grad():
        if step == "streamed":
            from workbench.streamed import streamed_record
            streamed_record(ck, [{"tokens": _doc(cfg, T), "id": f"t{T}"}], out, PROBES, dtype="bf16",
                            device="cpu", segment=segment, progress=False)
        elif step == "in-memory":
            model = workbench.load_model(ck, dtype=torch.bfloat16)
            workbench.record(model, [{"tokens": _doc(cfg, T), "id": f"t{T}"}], out, PROBES, segment=segment,
                             progress=False)
        elif step == "int4":
            from workbench.quant.int4_checkpoint import load_quantized
            model = load_quantized(ck, dtype=torch.bfloat16)
            workbench.record(model, [{"tokens": _doc(cfg, T), "id": f"t{T}"}], out, PROBES, segment=segment,
                             progress=False)
        elif step == "quantize":
            from workbench.quant.int4_checkpoint import quantize_checkpoint
            quantize_checkpoint(ck, out, targets=("experts",), group_size=128 if cfg.intermediate_size >= 128 else 16)
        else:
            raise ValueError(f"unknown step {step!r}")
    dt = time.perf_counter() - t0
    res = {"seconds": dt, "baseline_rss": base, "peak_rss": _vm("VmHWM"), "rss_samples": sampler.stop()}
    if step != "quantize":
        res["tokens_per_s"] = T / dt
        res["store"] = check_store(Path(out), cfg, T)
    return res


def run_child(step: str, ck: Path, T: int, out: Path, segment: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--ck", str(ck), "--T", str(T), "--out", str(out),
           "--segment", str(segment)]
    print(f"[{time.strftime('%H:%M:%S')}] {step} T={T}", flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300], "stderr_tail": p.stderr[-2000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"    {json.dumps(res)}", flush=True)
    return res


# ----------------------------------------------------------------------------- main
def predicted(plan, mode: str) -> int:
    m = next(m for m in plan.modes if m.name == mode)
    return int(m.device_bytes + m.host_bytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/work/realshape", help="where checkpoints and runs go (outside the repo)")
    ap.add_argument("--scaled", action="store_true", help="toy widths, same steps (the test suite's version)")
    ap.add_argument("--tokens", default=None, help="comma list of document lengths (default 8192,16384)")
    ap.add_argument("--int4-tokens", type=int, default=None, help="document length recorded from the int4 "
                    "checkpoint (default: the first of --tokens)")
    ap.add_argument("--segment", type=int, default=None, help="tokens per forward segment (default 4096)")
    ap.add_argument("--mem-budget", type=float, default=14.0, help="GiB a step may plan to use (in-memory runs "
                    "only when the plan fits under it)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per step")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints at the end")
    ap.add_argument("--steps", default="streamed,in-memory,quantize,int4",
                    help="which steps to run; results of earlier runs in <workdir>/real_shape.json are kept "
                         "(a step re-run replaces its row), so the rehearsal can be resumed piecewise; a name "
                         "that is no step (e.g. 'report') runs none and only re-predicts and rewrites the table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ck", help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("WORKBENCH_THREADS", os.cpu_count() or 1)))
        print(json.dumps(child(args.child, args.ck, args.T, args.out, args.segment)))
        return 0

    from workbench.checkpoint import read_config
    from workbench.plan import make_plan

    lengths = [int(t) for t in (args.tokens or ("64,128" if args.scaled else "8192,16384")).split(",")]
    segment = args.segment or (32 if args.scaled else 4096)
    work = Path(args.workdir)
    if work.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        raise SystemExit(f"--workdir {work} is inside the repository; put the checkpoint elsewhere")
    work.mkdir(parents=True, exist_ok=True)
    ck, ck4 = work / "checkpoint", work / "checkpoint-int4"
    steps = set(args.steps.split(","))
    saved = work / "real_shape.json"
    old = json.loads(saved.read_text()) if saved.exists() and not args.scaled else {}
    R: dict = {"machine": machine_info(), "scaled": args.scaled, "tokens": lengths, "segment": segment,
               "steps": [r for r in old.get("steps", []) if r.get("step") != "quantize" or "quantize" not in steps]}

    def add(row: dict) -> None:           # replace an earlier row of the same step and length; save at once
        R["steps"] = [r for r in R["steps"] if (r["step"], r.get("tokens")) != (row["step"], row.get("tokens"))]
        R["steps"].append(row)
        saved.write_text(json.dumps(R, indent=2, default=str))

    cfg_dict = text_config(args.scaled)
    if not (ck / "config.json").exists():
        print(f"writing the checkpoint to {ck}", flush=True)
        R["checkpoint"] = write_checkpoint(ck, cfg_dict, SHARD_BYTES if not args.scaled else 40_000)
    else:
        R["checkpoint"] = {"bytes": sum(p.stat().st_size for p in ck.glob("*.safetensors")), "reused": True,
                           "shards": len(list(ck.glob("*.safetensors")))}
    cfg = read_config(ck)[0]

    t0 = time.perf_counter()
    info = subprocess.run([sys.executable, "-m", "workbench", "info", str(ck)], capture_output=True, text=True)
    R["info"] = {"ok": info.returncode == 0, "seconds": time.perf_counter() - t0,
                 "text": (info.stdout if info.returncode == 0 else info.stderr)[-3000:]}
    print(R["info"]["text"], flush=True)

    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    R["plans"] = old.get("plans", {})
    for T in lengths:
        p = make_plan(ck, dtype="bf16", device=f"cpu:{ram_gib:.0f}", tokens=T, segment=segment)
        p4 = make_plan(ck, dtype="int4", device=f"cpu:{ram_gib:.0f}", tokens=T, segment=segment)
        R["plans"][str(T)] = {"bf16": {m.name: predicted(p, m.name) for m in p.modes[:2]},
                         "int4": {m.name: predicted(p4, m.name) for m in p4.modes[:2]}}
        for mode, budget_ok in (("streamed", True),
                                ("in-memory", predicted(p, "in-memory") <= args.mem_budget * 2**30)):
            if mode not in steps:
                continue
            row = {"step": mode, "tokens": T,
                   "predicted": R["plans"][str(T)]["bf16"]["layer-streamed" if mode == "streamed" else "in-memory"]}
            if not budget_ok:
                row["skipped"] = (f"plan needs {row['predicted'] / 2**30:.1f} GiB > --mem-budget "
                                  f"{args.mem_budget} GiB (RAM shared with other jobs)")
            else:
                out = work / f"{mode}-{T}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                row.update(run_child(mode, ck, T, out, segment, args.timeout))
                shutil.rmtree(out, ignore_errors=True)
            add(row)

    if "quantize" in steps and not (ck4 / "config.json").exists():
        add({"step": "quantize", **run_child("quantize", ck, 0, ck4, segment, args.timeout)})
    if (ck4 / "config.json").exists():         # also when only reporting
        R["int4_checkpoint_bytes"] = sum(p.stat().st_size for p in ck4.glob("*.safetensors"))
    if "int4" in steps and (ck4 / "config.json").exists():
        T = args.int4_tokens or lengths[0]
        p4 = make_plan(ck, dtype="int4", device=f"cpu:{ram_gib:.0f}", tokens=T, segment=segment)
        row = {"step": "int4", "tokens": T, "predicted": predicted(p4, "in-memory")}
        if row["predicted"] > args.mem_budget * 2**30:
            row["skipped"] = f"plan needs {row['predicted'] / 2**30:.1f} GiB > --mem-budget {args.mem_budget} GiB"
        else:
            out = work / f"int4-{T}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            row.update(run_child("int4", ck4, T, out, segment, args.timeout))
            shutil.rmtree(out, ignore_errors=True)
        add(row)

    for row in R["steps"]:                # predictions from the current planner, also for kept rows
        if "peak_rss" in row and row["step"] in ("streamed", "in-memory", "int4"):
            p = make_plan(ck, dtype="int4" if row["step"] == "int4" else "bf16", device=f"cpu:{ram_gib:.0f}",
                          tokens=row["tokens"], segment=segment)
            row["predicted"] = predicted(p, "layer-streamed" if row["step"] == "streamed" else "in-memory")
        if "peak_rss" in row and row.get("predicted"):     # the CPU plan is a peak RSS (process included)
            row["peak_vs_prediction"] = row["peak_rss"] / row["predicted"] - 1
    R["ok"] = R["info"]["ok"] and all("error" not in r and r.get("store", {"ok": True})["ok"] for r in R["steps"])
    save_results(R, saved.name, saved.parent)
    body = report(R, cfg)
    print(body)
    if not args.scaled:
        write_section("real-shape", body, "Benchmarks")
    if not args.keep:
        shutil.rmtree(ck, ignore_errors=True)
        shutil.rmtree(ck4, ignore_errors=True)
    return 0 if R["ok"] else 1


def report(R: dict, cfg) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = []
    for r in R["steps"]:
        if "skipped" in r:
            rows.append([r["step"], r.get("tokens", ""), "skipped", "", "", "", "", r["skipped"]])
        elif "error" in r:
            rows.append([r["step"], r.get("tokens", ""), "FAILED", "", "", "", "", r["error"]])
        else:
            store = r.get("store", {})
            checks = ("all checks pass" if store.get("ok") else json.dumps(store)) if store else ""
            rows.append([r["step"], r.get("tokens", "") or "", f"{r['seconds']:.0f} s",
                         f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "",
                         gib(r["peak_rss"]),
                         (f"{gib(r['predicted'])} ({r['peak_vs_prediction']:+.0%})"
                          if "peak_vs_prediction" in r else ""), gib(r["baseline_rss"]), checks])
    ck = R["checkpoint"]
    return "\n\n".join([
        "## Real-shape dress rehearsal (Scout text widths, 2 layers, bf16, CPU)",
        "```\npython benchmarks/real_shape.py --workdir DIR --keep [--tokens 8192,16384] [--steps streamed,in-memory,"
        "quantize,int4]\n```\nRows accumulate in DIR/real_shape.json across runs (a rerun of a step replaces its row; "
        "`--steps report` only re-predicts and rewrites this table).",
        f"Checkpoint: {ck['bytes'] / 1e9:.1f} GB in {ck['shards']} shards, released "
        "`Llama4ForConditionalGeneration` key layout (`language_model.…` + projector), random normal(0, 0.02) "
        f"bf16; hidden {cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads × "
        f"{cfg.head_dim}, {cfg.num_local_experts} experts × {cfg.intermediate_size}, vocab {cfg.vocab_size:,}, "
        f"chunk {cfg.attention_chunk_size}, floor_scale {cfg.floor_scale}; layer kinds {cfg.layer_kinds()}. "
        f"int4 checkpoint: {R.get('int4_checkpoint_bytes', 0) / 1e9:.1f} GB. Segment {R['segment']} tokens, "
        "probes router + entropy; every step in a fresh process.",
        markdown_table(["step", "tokens", "time", "tokens/s", "peak RSS", "plan (Δ)", "RSS after imports",
                        "store checks / note"], rows),
        "Plan = `make_plan` device + host bytes for the mode on `cpu:<RAM>`: on a CPU it is a peak RSS — the "
        "larger of running and loading (layer-streamed: a layer's copy plus the mapped pages of the tensor being "
        "copied; in memory: all weights plus one 16 MiB read slab), plus the process after imports "
        "(`plan.CPU_PROCESS_BASELINE_BYTES`, 0.75 GiB; the column next to it is that baseline as measured in the "
        "same child). Store checks: finite values, entropies in [0, ln keys], expert ids in range, NoPE "
        "temperature active past floor_scale. Steps run in children at `WORKBENCH_THREADS` (1 here); the "
        "machine line is the reporting process's.",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in R["machine"].items()),
    ])


if __name__ == "__main__":
    sys.exit(main())

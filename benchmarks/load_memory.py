"""In-memory loading: peak RSS and load time of `load_model` against the ways it could read a shard.

    python benchmarks/load_memory.py --workdir /tmp/loadmem          # ≈ 1.1 GB bf16 checkpoint, 4 shards
    python benchmarks/load_memory.py --workdir /tmp/lm --small       # a few MB (the test suite's version)

A random checkpoint (`build_model` + `save_model`, bf16, ≤ 300 MB shards) is written under --workdir
(outside the repository), then loaded in fresh child processes, one way at a time, alternating, each way
`--repeats` times:

  pread (load_model)   what `load_model` does now (`tensor_reader.ShardReader`): each tensor read with
                       pread straight into its parameter (same dtype) or through a 16 MiB slab (dtype change)
  mapped shard         what it did before, finite check included: one `safe_open` mapping per shard, each
                       tensor copied out of it (every page copied stays resident until the shard closes)
  mapped tensor        `streamed.py`'s way: the shard mapped again for each tensor, unmapped after its copy
  madvise              one mapping per shard, MADV_DONTNEED on each tensor's pages after its copy
The last two make `load_model`'s finite check of now (fp32 block sums, faster than the isfinite before),
so they differ from pread only in how they read.

Each child first loads a few-MB checkpoint the same way (lazy imports and torch's kernel pages belong to
the process, not the load), then resets VmHWM (/proc/self/clear_refs) and reports load seconds, peak RSS
over its RSS before loading and the weights it holds; "over weights" is the transient a load adds on top
of what it keeps. Warm: the files are in the page cache (read once before); cold: each child first evicts
them (posix_fadvise DONTNEED on the checkpoint's files only). The "load-memory" section of
docs/benchmarks.md is rewritten unless --small.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_info, markdown_table, save_results, write_section  # noqa: E402

WAYS = ("pread (load_model)", "mapped shard", "mapped tensor", "madvise")
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, intermediate_size_mlp=4096,
              num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_hidden_layers=8,
              num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=64,
              max_position_embeddings=4096, tie_word_embeddings=False)
SMALL = dict(CONFIG, vocab_size=2048, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4)


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make_checkpoint(directory: Path, small: bool) -> dict:
    from workbench.checkpoint import build_model, save_model
    from workbench.config import Llama4TextConfig

    if not (directory / "config.json").exists():
        model = build_model(Llama4TextConfig.from_hf(SMALL if small else CONFIG), dtype=torch.bfloat16)
        save_model(model, directory, max_shard_size="2MB" if small else "300MB")
        del model
    files = sorted(directory.glob("*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files),
            "largest_shard": max(f.stat().st_size for f in files)}


# ----------------------------------------------------------------------------- the ways (children)
def _skeleton(ck: Path):
    from workbench.checkpoint import _shard_map, read_config
    from workbench.model import Llama4ForCausalLM

    config, _ = read_config(ck)
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    return model, config, _shard_map(ck)


def _finite_before(t: torch.Tensor) -> None:
    """The finite check `load_model` made before (isfinite per 4 M-value block)."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), 1 << 22):
        if not bool(torch.isfinite(flat[i:i + (1 << 22)]).all()):
            raise ValueError("non-finite weights")


def _finite_now(t: torch.Tensor) -> None:
    """The check `load_model` makes now (tensor_reader: fp32 block sums), so that the other ways differ
    from pread only in how they read."""
    from workbench.tensor_reader import _count_nonfinite

    if _count_nonfinite(t):
        raise ValueError("non-finite weights")


def load_mapped(ck: Path, dtype, per_tensor: bool, dontneed: bool):
    from safetensors import safe_open

    from workbench.checkpoint import _assign, _by_shard, finish_loaded
    from workbench.tensor_reader import DTYPES, ShardReader

    model, config, shard_of = _skeleton(ck)
    names = {k: k for k in shard_of}
    for path, group in _by_shard(shard_of, names).items():
        if dontneed:
            entries = ShardReader(path).entries
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
            for name in group:
                kind, shape, a, b = entries[name]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")          # frombuffer: the mapping is read-only
                    view = torch.frombuffer(mm, dtype=torch.uint8, count=b - a, offset=a)
                view = view.view(DTYPES[kind]).reshape(shape)
                _finite_now(view)
                _assign(model, name, view.to(dtype=dtype, copy=True))
                del view
                lo = a - a % mmap.PAGESIZE
                mm.madvise(mmap.MADV_DONTNEED, lo, b - lo)
            mm.close()
        elif per_tensor:
            for name in group:
                with safe_open(str(path), framework="pt") as f:
                    view = f.get_tensor(name)
                    _finite_now(view)
                    _assign(model, name, view.to(dtype=dtype, copy=True))
                    del view
        else:
            with safe_open(str(path), framework="pt") as f:
                for name in group:
                    view = f.get_tensor(name)
                    _finite_before(view)
                    _assign(model, name, view.to(dtype=dtype, copy=True))
                    del view
    return finish_loaded(model, config, ck, torch.device("cpu"))


def _load(way: str, ck: Path, dtype):
    import workbench

    if way == WAYS[0]:
        return workbench.load_model(ck, dtype=dtype)
    return load_mapped(ck, dtype, per_tensor=way == "mapped tensor", dontneed=way == "madvise")


def child(way: str, ck: Path, warm: Path, dtype: str, cold: bool) -> dict:
    import gc

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    # a first load of a few-MB checkpoint the same way: lazy imports and the first use of torch's kernels
    # (their code pages) belong to the process, not to this load
    del_me = _load(way, warm, dt)
    del del_me
    gc.collect()
    if cold:
        for f in ck.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    from real_shape import RssSampler

    base = _vm("VmRSS")
    start = RssSampler.sample()
    with open("/proc/self/clear_refs", "w") as f:      # "5": reset VmHWM to the current RSS
        f.write("5")
    sampler = RssSampler(every=0.01)                   # attributes the peak: anonymous vs file-backed pages
    t0 = time.perf_counter()
    model = _load(way, ck, dt)
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    samples = sampler.stop()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "base": base, "peak": peak, "weights": weights, "rss_after": _vm("VmRSS"),
            "start": start, "samples": samples}


def run_child(way: str, ck: Path, warm: Path, dtype: str, cold: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", way, "--ck", str(ck), "--warm", str(warm), "--dtype", dtype]
    cmd += ["--cold"] if cold else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{way} {dtype}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/workbench-loadmem", help="where the checkpoint goes (outside the repo)")
    ap.add_argument("--small", action="store_true", help="a few-MB checkpoint, one repeat, warm cache only (the test "
                    "suite's version)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ck", help=argparse.SUPPRESS)
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(child(args.child, Path(args.ck), Path(args.warm), args.dtype, args.cold)))
        return 0

    work = Path(args.workdir)
    if work.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        raise SystemExit(f"--workdir {work} is inside the repository; put the checkpoint elsewhere")
    ck, warm = work / "checkpoint", work / "warm-up"
    t0 = time.perf_counter()
    info = make_checkpoint(ck, args.small)
    make_checkpoint(warm, True)
    print(f"checkpoint {ck}: {info} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for f in ck.glob("*.safetensors"):                 # warm the page cache once
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    repeats = 1 if args.small else args.repeats
    cases = [("bf16", False), ("fp32", False)] + ([] if args.small else [("bf16", True)])
    res: dict = {f"{d}{' cold' if c else ''}": {w: [] for w in WAYS} for d, c in cases}
    machine = machine_info()
    for r in range(repeats):
        for dtype, cold in cases:
            order = WAYS if r % 2 == 0 else WAYS[::-1]        # alternate: drifts hit every way alike
            for way in order:
                out = run_child(way, ck, warm, dtype, cold)
                res[f"{dtype}{' cold' if cold else ''}"][way].append(out)
                print(f"  {dtype}{' cold' if cold else ''} {way}: {out['seconds']:.2f} s, peak over "
                      f"weights {(out['peak'] - out['base'] - out['weights']) / 2**20:.0f} MiB", flush=True)
    R = {"machine": machine, "checkpoint": info, "repeats": repeats, "results": res,
         "load_average_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    save_results(R, "load_memory.json", work)
    body = report(R)
    print(body)
    if not args.small:
        write_section("load-memory", body, "Benchmarks")
    if not args.keep:
        import shutil
        shutil.rmtree(ck, ignore_errors=True)
        shutil.rmtree(warm, ignore_errors=True)
    return 0


def summary(runs: list[dict]) -> dict:
    over = [r["peak"] - r["base"] - r["weights"] for r in runs]
    file = [r["samples"]["peak_file"] - r["start"]["file"] for r in runs]
    return {"seconds": statistics.median(r["seconds"] for r in runs), "over": statistics.median(over),
            "over_max": max(over), "file": max(file), "weights": runs[0]["weights"]}


def report(R: dict) -> str:
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    rows = []
    for case, ways in R["results"].items():
        ref = summary(ways[WAYS[1]])
        for way in WAYS:
            s = summary(ways[way])
            rows.append([case, way, f"{s['seconds']:.2f} s", f"{s['seconds'] / ref['seconds']:.2f}×",
                         mib(s["weights"]), f"{mib(s['over'])} / {mib(s['over_max'])}", mib(s["file"])])
    ck = R["checkpoint"]
    return "\n\n".join([
        "## In-memory loading: peak RSS over the weights, and load time (issue 20)",
        "```\npython benchmarks/load_memory.py --workdir /tmp/loadmem\n```",
        f"Checkpoint: `build_model` + `save_model`, bf16, {ck['bytes'] / 1e9:.2f} GB in {ck['shards']} shards "
        f"(largest {ck['largest_shard'] / 2**20:.0f} MiB). Each load in a fresh child at one thread; time is "
        f"the median of {R['repeats']}, ways alternating. \"Over weights\" is VmHWM − (RSS before "
        "the load, after a warm-up load of a few-MB checkpoint) − (bytes of the loaded parameters): what the "
        "load held beyond what it keeps; file-backed pages: the most the load added to RssFile (mapped shard "
        "pages), from an RSS sampler every 10 ms. Time ratio "
        "against the way `load_model` read shards before (mapped shard). Cold: the checkpoint's pages "
        "evicted (posix_fadvise DONTNEED) before each load.",
        markdown_table(["case", "way", "load time", "vs mapped shard", "weights", "over weights (median / max)",
                        "file-backed pages (max)"], rows),
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in R["machine"].items())
        + f"; load average at end: {R['load_average_end']}",
    ])


if __name__ == "__main__":
    sys.exit(main())

"""Dataset-scale analysis: the full routing-metric set over Scout-router-shaped runs on dask.

Synthetic runs with Scout's router shape (48 MoE layers, 16 experts, top-1, gates; no attention
arrays) at 2M, 5M and 20M tokens, each written as parallel shards the way a `record --dp N` recording
writes its per-rank stores. For every size, in fresh subprocesses (so peak RSS is the job's own):

    cluster   a 2-worker dask.distributed LocalCluster (1 thread each): wall time, peak RSS of the
              driver (which also hosts the scheduler) and of each worker (VmHWM)
    threads   the threaded scheduler, 2 threads: wall time, peak RSS; results compared with cluster's
    single    the single-process chunk loops of probes/routing.py over each shard (2M only):
              throughput in tokens/s (the same work per token as the dask set)
    chunks    (2M; 1048576 also at 20M) dask chunkings against each other on the cluster: the
              measurement behind the default (workbench/store/dataset.py DEFAULT_TOKEN_CHUNK, docs/store.md)
    index     (20M only) the Experts tab's run index of one run, in memory (`build_index`) and through
              dask (`build_index_dask`, 2 threads): on one 2.5M-token shard and on one run of all
              20M tokens (written once under WORKDIR/20M-one), peak RSS of the process

The metrics run as one chunk fold (workbench/store/fold.py): one lane per worker thread, every chunk
read inside the task that counts it, so worker memory should not depend on the run's size.

Metrics: load (+ balance), domain specialization, vocabulary specialization (input and next token),
consecutive-token rates, layer-to-layer transitions + NMI; co-activation is undefined for top-1.

    python benchmarks/analysis_scale.py                       # all sizes; writes docs/benchmarks.md
    python benchmarks/analysis_scale.py --sizes 2M --keep     # one size, keep the runs
    python benchmarks/analysis_scale.py --quick               # 40k tokens, no docs (the smoke test)

Resumable: shards already complete are not rewritten and finished measurements (JSON lines in
WORKDIR/results.jsonl) are not repeated. Data lives under --workdir (default /tmp/analysis_scale) and
each size's runs are deleted after its measurements unless --keep. Gates are drawn from 256 levels so
they compress like real bf16 gates do; the metrics never read them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
M, E, VOCAB, DOMAINS = 48, 16, 32000, ("web", "code", "math", "books")
LAYOUT = {"n_layers": M, "n_heads": 1, "moe_layer_index": list(range(M)), "top_k": 1, "n_experts": E,
          "router": True}
ATTRS = {"model_source": "synthetic-scout-router", "dtype": "bfloat16", "probes": ["router"],
         "config": {"num_hidden_layers": M, "num_local_experts": E, "num_experts_per_tok": 1,
                    "vocab_size": VOCAB, "interleave_moe_layer_step": 1}}
SIZES = {"2M": 2_000_000, "5M": 5_000_000, "20M": 20_000_000, "quick": 40_000}
SHARDS = {"2M": 4, "5M": 4, "20M": 8, "quick": 2}
METRICS = ["load", "domain", "vocab", "vocab_next", "consecutive", "transitions"]
CHUNKINGS = {"262144 tokens x all MoE layers (default)": None,
             "65536 tokens x all MoE layers": {"token": 1 << 16},
             "1048576 tokens x all MoE layers": {"token": 1 << 20}}


# ----------------------------------------------------------------------------------- writing
def _doc(rng, n: int, dom: int):
    """One synthetic document: Zipf-like token ids, routing that depends on the token and domain for
    ~60 % of tokens (so the specialization metrics see structure), 256-level gates."""
    tok = (VOCAB * rng.random(n) ** 3).astype(np.int64)
    layer = np.arange(M)[:, None]
    base = (tok[None] * (31 + 7 * layer) // 97 + 3 * dom + layer) % E
    x = np.where(rng.random((M, n)) < 0.6, base, rng.integers(0, E, (M, n))).astype(np.int16)
    gates = (1.0 / (1.0 + np.exp(-np.linspace(-4, 4, 256)))).astype(np.float32)
    return {"tokens": tok, "router/experts": x[:, :, None],
            "router/weights": gates[rng.integers(0, 256, (M, n, 1))]}


def write_shard(path: str, seed: int, n_tokens: int) -> str:
    """One shard of n_tokens tokens in documents of 512-4096 tokens; resumes an interrupted shard."""
    from workbench.store import RunWriter

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n_tokens:
        lengths.append(int(min(rng.integers(512, 4097), n_tokens - sum(lengths))))
    with RunWriter.create(path, attrs=ATTRS, layout=LAYOUT, exist_ok=True) as w:
        if w.attrs.get("complete") and w.n_tokens == n_tokens:
            return path
        for i, n in enumerate(lengths):
            doc_rng = np.random.default_rng([seed, i])     # each document reproducible on its own
            if f"s{seed}-{i}" in w.done_ids:
                continue
            dom = int(doc_rng.integers(len(DOMAINS)))
            w.append({**_doc(doc_rng, n, dom), "doc_id": f"s{seed}-{i}", "domain": DOMAINS[dom]})
        w.finish()
    return path


def write_size(root: Path, size: str) -> list[Path]:
    """The shards of one size, written by 2 processes at once (a 2-rank --dp recording's parts)."""
    from concurrent.futures import ProcessPoolExecutor

    n, k = SIZES[size], SHARDS[size]
    parts = root / size / f".{size}.zarr.parts"
    parts.mkdir(parents=True, exist_ok=True)
    jobs = [(str(parts / f"rank{r:03d}-of-{k:03d}.zarr"), 1000 * SIZES[size] // 10**6 + r, n // k + (r < n % k))
            for r in range(k)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(write_shard, *zip(*jobs)))
    print(f"[{size}] shards ready in {parts} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return [Path(j[0]) for j in jobs]


# ------------------------------------------------------------------------------- measurement
def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(parts: str, mode: str, chunks: str | None, save: str | None) -> dict:
    """One measurement in this (fresh) process -> dict; results pickled to `save` for comparison."""
    import pickle

    from probes import routing_dask as RD
    from workbench.store import open_dataset

    chunk_opt = json.loads(chunks) if chunks else None
    out: dict = {"mode": mode, "chunks": chunk_opt}
    t0 = time.perf_counter()
    if mode == "single":
        from probes import routing as R
        from workbench.store import open_run

        for p in sorted(Path(parts).glob("*.zarr")):
            run = open_run(p)
            R.load_table(run), R.domain_specialization_table(run), R.vocabulary_specialization_table(run)
            R.vocabulary_specialization_table(run, "next"), R.consecutive_rates(run), R.layer_transitions(run)
        res = None
    elif mode == "threads":
        import dask

        ds = open_dataset(parts, chunk_opt)
        with dask.config.set(scheduler="threads", num_workers=2):
            res = RD.compute_metrics(ds, METRICS)
    elif mode == "cluster":
        import dask
        from distributed import Client, LocalCluster

        from workbench.store.fold import worker_environ

        with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}), \
                LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                             memory_limit="4GB") as cluster, Client(cluster) as client:
            out["startup_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()      # cluster start-up is not analysis time (reported apart)
            ds = open_dataset(parts, chunk_opt)
            res = RD.compute_metrics(ds, METRICS)
            out["wall_s"] = time.perf_counter() - t0
            out["worker_rss_mb"] = sorted(client.run(_vmhwm_mb).values())
    elif mode in ("index-memory", "index-dask"):   # the Experts-tab index of one shard (a single run)
        import dask

        from workbench.store.index import build_index
        from workbench.store.index_dask import build_index_dask

        shard = sorted(Path(parts).glob("*.zarr"))[0]
        out["shard_tokens"] = int(json.loads((shard / "zarr.json").read_text())["attributes"]["n_tokens"])
        if mode == "index-memory":
            build_index(shard)
        else:
            with dask.config.set(scheduler="threads", num_workers=2):
                build_index_dask(shard)
        res = None
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out.setdefault("wall_s", time.perf_counter() - t0)
    out["driver_rss_mb"] = _vmhwm_mb()
    if save and res is not None:
        Path(save).write_bytes(pickle.dumps(res))
    return out


def _measure_sub(parts: Path, mode: str, chunks=None, save: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "measure", str(parts), mode]
    cmd += ["--chunks", json.dumps(chunks)] if chunks else []
    cmd += ["--save", str(save)] if save else []
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} on {parts} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_results(a: Path, b: Path) -> bool:
    import pickle

    import pandas as pd

    ra, rb = pickle.loads(a.read_bytes()), pickle.loads(b.read_bytes())
    try:
        for k in ra:
            pd.testing.assert_frame_equal(ra[k], rb[k], check_exact=True)
    except AssertionError as e:
        print(f"results differ: {e}", flush=True)
        return False
    return True


# ----------------------------------------------------------------------------------- driver
def run(sizes: list[str], workdir: Path, keep: bool, write_docs: bool) -> list[dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def have(key):
        return next((r for r in done if r["key"] == key), None)

    def record(key, row):
        row = {"key": key, "load_avg": os.getloadavg()[0], **row}
        done.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    # cheapest first, so an interrupted run still has the table's core: the time-vs-size series on the
    # cluster, the identity check and the single-process baseline at 2M, then the chunking sweep
    plan = [(s, m) for s in sizes for m in (("cluster", "threads", "single") if s == "2M" else ("cluster",))]
    plan += [("2M", f"chunks/{c}") for c in CHUNKINGS if CHUNKINGS[c] and "2M" in sizes]
    plan += [(s, "threads") for s in sizes if s != "2M"]
    plan += [(s, m) for s in sizes if s == "20M" for m in ("index-memory", "index-dask")]
    plan += [("20M", f"chunks/{c}") for c in CHUNKINGS if c.startswith("1048576") and "20M" in sizes]
    plan += [(s, f"{m}-one") for s in sizes if s == "20M" for m in ("index-memory", "index-dask")]
    for i, (size, what) in enumerate(plan):
        key = f"{size}/{what}"
        if not have(key):
            if size == "20M":
                _wait_for_memory(8, size)
            parts = write_size(workdir, size)[0].parent
            save = workdir / f"{size}-{what}.pkl" if what in ("cluster", "threads") else None
            if what.endswith("-one"):     # the index of one run holding all the size's tokens
                one = workdir / f"{size}-one"
                one.mkdir(exist_ok=True)
                write_shard(str(one / "run.zarr"), 7000 + SIZES[size] // 10**6, SIZES[size])
                record(key, {"size": size, "n_tokens": SIZES[size], **_measure_sub(one, what[:-4])})
            elif what.startswith("chunks/"):
                name = what.split("/", 1)[1]
                record(key, {"size": size, "n_tokens": SIZES[size], "chunking": name,
                             **_measure_sub(parts, "cluster", CHUNKINGS[name])})
            else:
                record(key, {"size": size, "n_tokens": SIZES[size], **_measure_sub(parts, what, save=save)})
            pk = [workdir / f"{size}-{m}.pkl" for m in ("cluster", "threads")]
            if all(p.exists() for p in pk) and not have(f"{size}/identical"):
                record(f"{size}/identical", {"size": size, "identical": _same_results(*pk)})
        if not keep and all(s != size for s, _ in plan[i + 1:]):
            shutil.rmtree(workdir / size, ignore_errors=True)
    if write_docs:
        report(done)
    return done


def report(rows: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import markdown_table, write_section  # imports torch: only here, never in a measurement

    by = {r["key"]: r for r in rows}
    table = []
    for size in ("2M", "5M", "20M"):
        for mode in ("cluster", "threads", "single"):
            r = by.get(f"{size}/{mode}")
            if not r:
                continue
            rate = r["n_tokens"] / r["wall_s"] / 1e3
            workers = ", ".join(f"{x:.0f}" for x in r.get("worker_rss_mb", [])) or "–"
            table.append([size, {"cluster": "LocalCluster, 2 workers", "threads": "threaded, 2 threads",
                                 "single": "single-process chunk loops"}[mode],
                          f"{r['wall_s']:.1f}", f"{rate:.1f}", f"{r['driver_rss_mb']:.0f}", workers,
                          f"{r['load_avg']:.1f}"])
    base = by.get("2M/cluster")
    scaling = ("Cluster wall time relative to 2M (linear would equal the token ratio): " + ", ".join(
        f"{s}: {by[f'{s}/cluster']['wall_s'] / base['wall_s']:.2f}x for {SIZES[s] / SIZES['2M']:.1f}x the tokens"
        for s in ("5M", "20M") if f"{s}/cluster" in by) + ".") if base else ""
    same = ", ".join(f"{s}: {'yes' if by[f'{s}/identical']['identical'] else 'NO'}"
                     for s in ("2M", "5M", "20M") if f"{s}/identical" in by)
    chunks = []
    for size in ("2M", "20M"):
        rows = [(f"{size}/cluster", "262144 tokens x all MoE layers (default)")]
        rows += [(k, r["chunking"]) for k, r in by.items() if k.startswith(f"{size}/chunks/")]
        chunks += [[size, name, f"{by[k]['wall_s']:.1f}", f"{by[k]['driver_rss_mb']:.0f}",
                    ", ".join(f"{x:.0f}" for x in by[k]["worker_rss_mb"]), f"{by[k]['load_avg']:.1f}"]
                   for k, name in rows if k in by and len(rows) > 1]
    index = [[{"index-memory": "in memory (`build_index`)", "index-dask": "dask fold + postings tasks, 2 threads "
               "(`build_index_dask`)"}[m.removesuffix("-one")], f"{by[f'20M/{m}']['shard_tokens']:,}",
              f"{by[f'20M/{m}']['wall_s']:.1f}", f"{by[f'20M/{m}']['driver_rss_mb']:.0f}",
              f"{by[f'20M/{m}']['load_avg']:.1f}"]
             for m in ("index-memory", "index-dask", "index-memory-one", "index-dask-one") if f"20M/{m}" in by]
    body = "\n".join([
        "## Dataset-scale analysis on dask (`benchmarks/analysis_scale.py`)",
        "",
        "Full routing-metric set (load + balance, domain and vocabulary specialization (input, next), "
        "consecutive-token rates, layer transitions + NMI) over synthetic Scout-router runs (48 MoE layers, "
        "16 experts, top-1, gates) written as parallel shards (2M, 5M: 4 shards; 20M: 8), computed as one chunk "
        "fold (`workbench/store/fold.py`: one lane per worker thread, each 262144-token chunk read inside the task "
        "that counts it). Each row is a fresh "
        "process; RSS is the peak (VmHWM). 2 shared CPU cores; the load average is the machine's at the end of "
        "each measurement (other engineers' jobs included), so compare rows only as ratios.",
        "",
        markdown_table(["tokens", "engine", "wall s", "k tokens/s", "driver peak RSS MB", "worker peak RSS MB",
                        "load avg"], table),
        "",
        scaling,
        "",
        f"LocalCluster and threaded results bit-identical (every table, `check_exact`): {same or 'not measured'}.",
        "",
        "Dask chunking, 2-worker LocalCluster (the measurement behind the default; docs/store.md). A chunk never "
        "spans two runs, so at 2M (500k-token shards) 1048576 means one chunk per shard:",
        "",
        markdown_table(["tokens", "dask chunks of router/experts", "wall s", "driver peak RSS MB",
                        "worker peak RSS MB", "load avg"], chunks),
        "",
        *(["The Experts tab's run index of a single run (one shard of the 20M set, then one run of all 20M "
            "tokens), fresh process each; the peak RSS is the whole process's:", "",
            markdown_table(["builder", "tokens", "wall s", "peak RSS MB", "load avg"], index), ""] if index else []),
        *targets(by),
        "",
        "Command: `python benchmarks/analysis_scale.py --workdir /tmp/s3B --keep` (results in WORKDIR/results.jsonl).",
    ])
    write_section("analysis-scale", body, "Benchmarks")
    print("wrote the analysis-scale section of docs/benchmarks.md")


def targets(by: dict) -> list[str]:
    """The issue's targets, each judged from the measurements (bullets for the docs)."""
    out = ["Against the targets:", ""]
    c = {s: by[f"{s}/cluster"] for s in ("2M", "5M", "20M") if f"{s}/cluster" in by}
    t = {s: by[f"{s}/threads"] for s in ("2M", "5M", "20M") if f"{s}/threads" in by}
    if "2M" in c and "20M" in c:
        ratio = c["20M"]["wall_s"] / c["2M"]["wall_s"]
        out.append(f"- time linear in tokens: {'met' if ratio <= 10 * 1.2 else 'NOT met'} "
                   f"({ratio:.1f}x the time for 10x the tokens on the cluster)")
    if c:
        w = {s: max(r["worker_rss_mb"]) for s, r in c.items()}
        d = {s: r["driver_rss_mb"] for s, r in c.items()}
        flat = max(w.values()) <= 1.25 * min(w.values())
        ok = "20M" in w and max(w["20M"], d["20M"]) < 2048 and flat
        out.append(f"- peak RSS < 2 GB at 20M, independent of size: {'met' if ok else 'NOT met'} — largest "
                   "cluster worker " + ", ".join(f"{w[s]:.0f}" for s in w) + " MB, driver "
                   + ", ".join(f"{d[s]:.0f}" for s in d) + " MB at " + ", ".join(w)
                   + (("; threaded (one process) " + ", ".join(f"{t[s]['driver_rss_mb']:.0f}" for s in t) + " MB at "
                       + ", ".join(t)) if t else ""))
    same = [by[k]["identical"] for k in by if k.endswith("/identical")]
    if same:
        out.append(f"- 2-worker LocalCluster and threaded scheduler identical: {'met' if all(same) else 'NOT met'}")
    if "2M/single" in by and "2M/threads" in by and "2M/cluster" in by:
        th, s1, cl = by["2M/threads"], by["2M/single"], by["2M/cluster"]
        rt, rc = s1["wall_s"] / th["wall_s"], s1["wall_s"] / cl["wall_s"]
        start = f"; starting the cluster took {cl['startup_s']:.1f} s more" if "startup_s" in cl else ""
        out.append(f"- throughput >= the single-process path at 2M: threaded {'met' if rt >= 1 else 'NOT met'} "
                   f"({rt:.2f}x), 2-worker LocalCluster {'met' if rc >= 1 else 'NOT met'} ({rc:.2f}x, "
                   f"cluster start-up excluded{start})")
    return out


def _wait_for_memory(gb: float, size: str) -> None:
    """The machine is shared: before a large size, wait (up to 10 min) until `gb` GB are available."""
    for _ in range(60):
        avail = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:")) / 2**20
        if avail >= gb:
            print(f"[{size}] {avail:.1f} GB available", flush=True)
            return
        print(f"[{size}] only {avail:.1f} GB available, waiting for {gb} GB", flush=True)
        time.sleep(10)
    raise SystemExit(f"[{size}] not enough free memory ({gb} GB) after 10 minutes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    m = sub.add_parser("measure", help="(internal) one measurement in this process; prints a JSON line")
    m.add_argument("parts")
    m.add_argument("mode", choices=["cluster", "threads", "single", "index-memory", "index-dask"])
    m.add_argument("--chunks", default=None)
    m.add_argument("--save", default=None)
    p.add_argument("--sizes", default="2M,5M,20M", help="comma list of 2M, 5M, 20M")
    p.add_argument("--workdir", default="/tmp/analysis_scale")
    p.add_argument("--keep", action="store_true", help="keep the synthetic runs")
    p.add_argument("--quick", action="store_true", help="40k tokens in a temporary workdir; docs untouched")
    args = p.parse_args()
    if args.cmd == "measure":
        print(json.dumps(measure(args.parts, args.mode, args.chunks, args.save)))
        return
    if args.quick:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            rows = run(["quick"], Path(d), keep=False, write_docs=False)
        assert next(r for r in rows if r["key"] == "quick/identical")["identical"]
        print(f"quick: {len(rows)} measurements, cluster and threaded identical")
        return
    sizes = [s.strip() for s in args.sizes.split(",")]
    bad = [s for s in sizes if s not in ("2M", "5M", "20M")]
    if bad:
        raise SystemExit(f"--sizes: unknown {bad}; use 2M, 5M, 20M")
    run(sizes, Path(args.workdir), args.keep, write_docs=True)


if __name__ == "__main__":
    main()

"""Where a dataset analysis spends worker memory and time on a 2-worker LocalCluster.

    python benchmarks/analysis_profile.py /tmp/s3B/5M/.5M.zarr.parts             # memory + task stream
    python benchmarks/analysis_profile.py PARTS --malloc-trim                      # dask's default worker env

Samples every worker every --every seconds while the full routing-metric set (the one
benchmarks/analysis_scale.py times) computes: RSS, and the bytes of the results it holds grouped by
task-name prefix (`fold-step` = a lane's state; with the former dask-array graphs these were `sum`,
`rechunk`, `concatenate` partials). Then prints the task stream summary: wall time, each worker's
busy seconds, and every task with its compute and transfer seconds. This is how the growth of worker
memory with the number of chunks and the LocalCluster's lost time were found (docs/scale.md,
"Memory"). Runs are synthetic Scout-router shards (benchmarks/analysis_scale.py --keep writes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ["load", "domain", "vocab", "vocab_next", "consecutive", "transitions"]


def snapshot(dask_worker) -> dict:
    """RSS and held result bytes by task prefix of one worker (run on the worker by client.run)."""
    held, n = Counter(), Counter()
    for key in list(dask_worker.data.keys()):
        name = key[0] if isinstance(key, tuple) else key
        prefix = "-".join(str(name).split("-")[:2]) if str(name).startswith("fold-") else str(name).split("-")[0]
        ts = dask_worker.state.tasks.get(key)
        held[prefix] += (ts.nbytes or 0) if ts is not None else 0
        n[prefix] += 1
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    return {"rss_mb": round(rss / 2**20), "held_mb": {p: (n[p], round(b / 2**20)) for p, b in held.most_common(6)}}


def _vmhwm_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", help="a directory of runs (or a glob) to open as one dataset")
    p.add_argument("--every", type=float, default=3.0, help="seconds between memory samples")
    p.add_argument("--malloc-trim", action="store_true",
                   help="keep dask's default MALLOC_TRIM_THRESHOLD_=65536 in the workers' environment")
    p.add_argument("--out", default=None, help="write the samples as JSON lines here")
    args = p.parse_args()

    import dask
    from distributed import Client, LocalCluster, get_task_stream

    from probes import routing_dask as RD
    from workbench.store import open_dataset
    from workbench.store.fold import worker_environ

    env = dask.config.get("distributed.nanny.pre-spawn-environ") if args.malloc_trim else worker_environ()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         memory_limit="4GB") as cluster, Client(cluster) as client:
        ds = open_dataset(args.parts)
        samples, done = [], threading.Event()

        def poll():
            t0 = time.time()
            while not done.is_set():
                try:
                    snap = client.run(snapshot)
                    samples.append({"t": round(time.time() - t0, 1), **{w[-5:]: v for w, v in snap.items()}})
                except Exception as e:   # a worker busy past the timeout: skip this sample
                    samples.append({"t": round(time.time() - t0, 1), "error": repr(e)})
                done.wait(args.every)

        th = threading.Thread(target=poll, daemon=True)
        t0 = time.time()
        th.start()
        with get_task_stream(client) as ts:
            RD.compute_metrics(ds, METRICS)
        wall = time.time() - t0
        done.set()
        th.join()
        hwm = client.run(_vmhwm_mb)
    busy: dict[str, float] = {}
    tasks = []
    for t in ts.data:
        comp = sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
        xfer = sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "transfer")
        busy[t["worker"][-5:]] = busy.get(t["worker"][-5:], 0.0) + comp
        tasks.append((str(t["key"]), t["worker"][-5:], round(comp, 2), round(xfer, 2)))
    for s in samples:
        print(json.dumps(s))
    print(json.dumps({"wall_s": round(wall, 1), "busy_s": {w: round(b, 1) for w, b in busy.items()},
                      "worker_peak_rss_mb": {w[-5:]: v for w, v in hwm.items()}}))
    for row in sorted(tasks):
        print(row)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(s) + "\n" for s in samples))


if __name__ == "__main__":
    main()

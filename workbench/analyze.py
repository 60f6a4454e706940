"""`workbench analyze`: store-level metrics over many runs, on dask, with provenance.

    workbench analyze runs/corpus-*.zarr --metrics load,domain,heads --out results.zarr
    workbench analyze .out.zarr.parts --out results.csv --workers 4        # a local cluster, 4 processes
    workbench analyze RUNS... --out results.zarr --scheduler tcp://head:8786  # an existing cluster

The runs open as one dataset (`workbench.store.open_dataset`); every metric asked for becomes part of
one dask graph, computed in a single pass over the chunks by the threaded scheduler (default), a
`LocalCluster` of N worker processes (--workers N), or a running `dask.distributed` scheduler
(--scheduler ADDRESS; docs/scale.md). Results:

    results.zarr   one group per metric (a table along `row`), provenance in the root attributes
    results.csv    every metric's rows stacked, with a leading `metric` column; provenance beside it
                   in results.csv.provenance.json

Provenance: the inputs (paths, tokens, documents and input hash of each run, model, config hash),
the versions of the libraries that computed them, the chunking (on disk and in dask), the scheduler,
the metric options and the wall time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# entropy metric -> (array it needs, description); the routing metrics are probes.routing_dask.METRICS
ENTROPY_METRICS = {
    "heads": ("attention/entropy", "entropy per layer and head, ΔH with/without temperature, collapsed heads"),
    "profile": ("attention/entropy", "normalised entropy vs position, binned, per attention kind"),
    "delta_profile": ("attention/entropy_no_temp", "ΔH (temperature effect) vs position, binned, all layers"),
}


def metric_names() -> dict[str, str]:
    """Every metric `analyze` knows -> one-line description."""
    from probes.routing_dask import METRICS

    return {**{n: m.doc for n, m in METRICS.items()}, **{n: d for n, (_, d) in ENTROPY_METRICS.items()}}


def default_metrics(ds) -> list[str]:
    """The metrics a dataset's layout supports (co-activation only for top-k > 1)."""
    from probes.routing_dask import METRICS

    out = []
    if "router/experts" in ds:
        out += [n for n in METRICS if n != "coactivation" or ds["router/experts"].shape[2] > 1]
    out += [n for n, (need, _) in ENTROPY_METRICS.items() if need in ds]
    return out


def _check_metrics(ds, names: list[str]) -> None:
    """Unknown metric names, or metrics needing arrays the runs lack -> ValueError naming them."""
    from probes import routing_dask as RD

    known = metric_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--metrics: unknown {unknown}; known: {', '.join(known)}")
    for n in names:
        needs = RD.METRICS[n].needs if n in RD.METRICS else (ENTROPY_METRICS[n][0],)
        missing = [a for a in needs if a not in ds]
        if missing:
            raise ValueError(f"metric {n!r} needs {missing}, which these runs did not record "
                             f"(layout groups: {ds.attrs['layout']})")


def _graphs(ds, names: list[str], n_bins: int) -> dict[str, tuple[dict, Callable]]:
    from probes import entropy_dask as ED
    from probes import routing_dask as RD

    _check_metrics(ds, names)
    # the routing metrics are one fold: every router chunk is read once for all of them
    routed = RD.metric_graphs(ds, [n for n in names if n in RD.METRICS])
    out = {}
    for n in names:
        if n in routed:
            out[n] = routed[n]
        elif n == "heads":
            out[n] = ED.summary_graph(ds)
        elif n == "delta_profile":
            out[n] = ED.profile_graph(ds, list(range(ds.sizes["layer"])), stat="delta", n_bins=n_bins)
        else:  # one profile per attention kind, stacked with a `kind` column
            from probes.entropy import attention_kind, layer_kinds

            groups: dict[str, list[int]] = {}
            for i, k in enumerate(layer_kinds(ds)):
                groups.setdefault(attention_kind(k), []).append(i)
            parts = {k: ED.profile_graph(ds, ls, stat="normalized", n_bins=n_bins) for k, ls in groups.items()}

            def finish(r, parts=parts):
                import pandas as pd

                return pd.concat([parts[k][1](r[k]).assign(kind=k) for k in parts], ignore_index=True)
            out[n] = ({k: g for k, (g, _) in parts.items()}, finish)
    return out


class _TqdmCallback:
    """A tqdm bar over the tasks of a local dask compute (dask.callbacks protocol)."""

    def __new__(cls, desc: str):
        from dask.callbacks import Callback
        from tqdm.auto import tqdm

        class Bar(Callback):
            def _start_state(self, dsk, state):
                self.bar = tqdm(total=sum(len(state[k]) for k in ("ready", "waiting", "running", "finished")),
                                desc=desc, unit="task", file=sys.stderr)

            def _posttask(self, key, result, dsk, state, worker_id):
                self.bar.update(1)

            def _finish(self, dsk, state, errored):
                self.bar.close()
        return Bar()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("llama4-workbench", "dask", "distributed", "flox", "xarray", "zarr", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _provenance(ds, names, scheduler: str, wall_s: float, n_bins: int) -> dict[str, Any]:
    from workbench.store import open_run

    first = open_run(ds.attrs["runs"][0])
    disk = {n: list(first.array(n).chunks) for n in ds.data_vars if first.has(n)}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "metrics": list(names), "options": {"n_bins": n_bins, "profile_stat": "normalized"},
        "inputs": [{"path": str(Path(p).resolve()), "n_tokens": t, "n_docs": d, "input_hash": h} for p, t, d, h in
                   zip(ds.attrs["runs"], ds.attrs["run_n_tokens"], ds.attrs["run_n_docs"],
                       ds.attrs["run_input_hash"])],
        "n_tokens": ds.attrs["n_tokens"], "n_docs": ds.attrs["n_docs"],
        "model_source": ds.attrs.get("model_source"), "config_hash": ds.attrs.get("config_hash"),
        "dtype": ds.attrs.get("dtype"), "layout": ds.attrs.get("layout"),
        "versions": _versions(),
        "chunking": {"dask": dict(ds.attrs["dask_chunks"]), "disk": disk},
        "scheduler": scheduler, "wall_s": round(wall_s, 3),
    }


def _write(results: dict, out: Path, provenance: dict) -> None:
    import pandas as pd

    if out.suffix == ".csv":
        frames = [df.assign(metric=n)[["metric", *df.columns]] for n, df in results.items()]
        pd.concat(frames, ignore_index=True).to_csv(out, index=False)
        Path(f"{out}.provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
        return
    import xarray as xr

    tmp = out.with_name(f".{out.name}.writing")
    for i, (n, df) in enumerate(results.items()):
        df = df.reset_index(drop=True)
        for c in df.columns:   # zarr v3 stores fixed-width unicode; object columns hold strings
            if df[c].dtype == object or str(df[c].dtype).startswith("str"):
                df[c] = df[c].astype(str).to_numpy(dtype="U")
        part = xr.Dataset({c: ("row", df[c].to_numpy()) for c in df.columns},
                          attrs={"metric": n, "description": metric_names()[n]})
        part.to_zarr(tmp, group=n, mode="w" if i == 0 else "a", zarr_format=3, consolidated=False)
    import zarr

    zarr.open_group(tmp, mode="r+").attrs.update({"provenance": json.loads(json.dumps(provenance, default=str))})
    tmp.rename(out)   # the results appear whole or not at all


def analyze(runs, metrics: list[str] | None = None, out=None, *, scheduler: str | None = None,
            workers: int | None = None, chunks=None, include_incomplete: bool = False, n_bins: int = 512,
            progress: bool = True, overwrite: bool = False, memory_limit: str = "auto") -> dict:
    """Compute `metrics` (default: all the runs support) over the runs as one dataset; write them to
    `out` (.zarr or .csv) with provenance when given. Returns {metric: DataFrame}."""
    import dask

    from workbench.store import open_dataset

    out = Path(out) if out is not None else None
    if out is not None:
        if out.suffix not in (".zarr", ".csv"):
            raise ValueError(f"--out {out}: give a .zarr or .csv path")
        if out.exists() and not overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    if scheduler and workers:
        raise ValueError("give --scheduler ADDRESS or --workers N, not both")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    ds = open_dataset(runs, chunks, include_incomplete=include_incomplete)
    names = list(metrics) if metrics else default_metrics(ds)
    if not names:
        raise ValueError(f"no metrics to compute: the runs hold neither router nor entropy arrays "
                         f"(layout {ds.attrs['layout']})")
    _check_metrics(ds, names)            # before starting a cluster
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if scheduler or workers:
            from distributed import Client, LocalCluster
            from distributed import progress as dist_progress

            if scheduler:
                client = stack.enter_context(Client(scheduler, timeout="30s"))
                where = f"distributed {scheduler}"
            else:
                import dask.config

                from workbench.store.fold import worker_environ

                with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
                    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1,
                                                               processes=True, dashboard_address=None,
                                                               memory_limit=memory_limit))
                client = stack.enter_context(Client(cluster))
                where = f"LocalCluster {workers} workers"
            built = _graphs(ds, names, n_bins)   # built with the client active: one fold lane per worker thread
            future = client.compute({n: g for n, (g, _) in built.items()})
            if progress:
                dist_progress(future)
            computed = future.result()
        else:
            where = "threaded"
            built = _graphs(ds, names, n_bins)
            if progress:
                stack.enter_context(_TqdmCallback(f"analyze {len(names)} metrics"))
            (computed,) = dask.compute({n: g for n, (g, _) in built.items()}, scheduler="threads")
    wall = time.perf_counter() - t0
    results = {n: finish(computed[n]) for n, (_, finish) in built.items()}
    if out is not None:
        if out.exists():
            import shutil

            shutil.rmtree(out) if out.is_dir() else out.unlink()
        _write(results, out, _provenance(ds, names, where, wall, n_bins))
    return results


def cmd_analyze(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.list:
        for n, d in metric_names().items():
            print(f"{n:14s} {d}")
        return 0
    if not args.runs or not args.out:
        raise ValueError("give RUNS... and --out results.zarr|csv (or --list)")
    chunks = {"token": args.chunk_tokens} if args.chunk_tokens else None
    res = analyze(args.runs, metrics, args.out, scheduler=args.scheduler, workers=args.workers, chunks=chunks,
                  include_incomplete=args.include_incomplete, n_bins=args.bins, progress=not args.quiet,
                  overwrite=args.overwrite, memory_limit=args.memory_limit)
    print(f"wrote {', '.join(f'{n} ({len(df)} rows)' for n, df in res.items())} to {args.out}")
    return 0


def add_analyze_parser(sub) -> None:
    s = sub.add_parser("analyze", help="routing and entropy metrics over many runs as one dataset, on dask "
                                       "(threads, a local cluster, or a dask.distributed scheduler)")
    s.add_argument("runs", nargs="*", help="run stores, globs ('runs/shard-*.zarr') or directories of runs "
                                           "(a --dp recording's .OUT.parts)")
    s.add_argument("--metrics", default=None, help="comma list (default: all the runs support; --list shows them)")
    s.add_argument("--out", help="results.zarr (a group per metric) or results.csv (+ .provenance.json)")
    s.add_argument("--scheduler", default=None, help="address of a running dask.distributed scheduler "
                                                     "(tcp://HOST:8786); see docs/scale.md")
    s.add_argument("--workers", type=int, default=None, help="start a LocalCluster of N worker processes")
    s.add_argument("--memory-limit", default="auto",
                   help="--workers: memory per worker, e.g. 2GB (dask spills to disk above 60%% of it)")
    s.add_argument("--chunk-tokens", type=int, default=None, help="tokens per dask chunk (default 262144)")
    s.add_argument("--bins", type=int, default=512, help="position bins of the entropy profiles")
    s.add_argument("--include-incomplete", action="store_true", help="also read runs still being written")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--list", action="store_true", help="list the metrics and exit")
    s.add_argument("--quiet", action="store_true", help="no progress display")
    s.set_defaults(fn=cmd_analyze)

"""Bounded-memory passes over a dataset's token chunks on dask: one fold per lane.

The store-level metrics reduce a dataset to count tables. Built as dask array reductions (a blockwise
table per chunk, then a tree sum), their worker memory grew with the number of chunks: every chunk of
`router/experts` fed tens of tasks (one per metric, and per MoE layer for the vocabulary tables), so
a read chunk stayed in memory until its last consumer ran, and the per-chunk partial tables (4 MB per
MoE layer for the vocabulary) waited for the rest of their tree group. The scheduler runs reads
ahead of the reductions, so what waited grew with the dataset (docs/scale.md, "Memory").

Here the chunks are split into `lanes` contiguous runs of chunks, and each lane is a chain of tasks:

    lane 0:  step(chunk 0) -> step(chunk 1) -> ... -> step(chunk a-1) ┐
    lane 1:  step(chunk a) -> ...                                     ├-> combine -> finish -> {name: result}
    ...                                                               ┘

A step reads its chunk of every array it needs *inside the task* (the chunk's own dask graph, run by
the synchronous scheduler), updates the lane's accumulator tables in place with every pass, and drops
the chunk. Nothing can be read ahead and no chunk crosses between processes: a worker holds its
lanes' accumulators plus one chunk per thread, whatever the size of the dataset. Time stays linear.

Pairs of consecutive tokens (t, t+1) inside a chunk are given to the passes by each step; the pairs
that straddle two chunks are given at the end, from the first and last token of every chunk (the
steps keep these "edges").

Results do not depend on the lanes or the scheduler: integer tables add exactly in any order, and
float tables are kept per chunk and added in chunk order at the end (bit-identical on threads, a
LocalCluster or a real cluster; equal to the single-process chunk loops up to float64 round-off).

A pass (one metric, or one of the run index's tables) is any object with

    arrays          names of dataset variables / coordinates it reads per chunk
    pair_arrays     names it reads for consecutive pairs; () when it has no pairs
    init()                    -> {table: zeros}            (its accumulator)
    update(acc, c)            add one chunk; c = {name: numpy block}, c["_t0"] = first token index
    pairs(acc, a, b)          add pairs (a[t], b[t]) of consecutive tokens (only with pair_arrays)
    combine(acc, other)       optional: merge another lane's accumulator into acc (default: add the
                              tables); a pass with combine() owns its tables, floats included
    finish(acc)               -> result

    fold(ds, {"load": LoadPass(...), ...}, lanes=None) -> dask Delayed of {name: result}
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

__all__ = ["fold", "default_lanes", "count_dtype", "worker_environ", "FoldError"]

TOKEN = "token"
_T0 = "_t0"


class FoldError(ValueError):
    """A pass asked for an array the dataset lacks, or the arrays' token chunks differ."""


def count_dtype(n_events: int):
    """int32 for count tables that can never exceed 2^31 - 1 (n_events: tokens × top-k), else int64:
    halves the largest accumulators (the vocabulary tables) at the sizes this runs at."""
    return np.int32 if n_events < np.iinfo(np.int32).max else np.int64


def worker_environ() -> dict:
    """Environment for dask.distributed worker processes started by the nanny (LocalCluster,
    `dask worker`): dask's default minus MALLOC_TRIM_THRESHOLD_=65536. That setting makes glibc hand
    freed memory back at once and turns off its adaptive mmap threshold, so every table and int64
    temporary above 128 KiB of a step is a fresh mmap with page faults: measured 1.6x slower fold
    steps (5M Scout-router tokens, 2 workers: 44 s against 27 s wall) for 70 MB less peak RSS."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


def default_lanes() -> int:
    """Threads of the active dask.distributed client, else the threaded scheduler's worker count."""
    try:
        from distributed import default_client

        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):
        import dask

        return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def _token_axis(ds, name: str) -> int:
    if name not in ds.variables:
        raise FoldError(f"a pass reads {name!r}, which the dataset does not have "
                        f"(variables: {sorted(map(str, ds.variables))})")
    dims = ds[name].dims
    if TOKEN not in dims:
        raise FoldError(f"{name!r} has no {TOKEN!r} dimension (dims {dims})")
    return dims.index(TOKEN)


def _block_tasks(ds, names: list[str]) -> tuple[list[dict], tuple[int, ...]]:
    """Per token chunk j: {name: (graph, key, token axis)} computing that chunk of every array (all other axes
    whole), with the chunk lengths. The graphs are culled to one chunk, so a task carries only its own."""
    import dask
    from dask.core import flatten
    from dask.optimization import cull

    arrays, chunks = {}, None
    for n in names:
        ax = _token_axis(ds, n)
        a = ds[n].data
        if not hasattr(a, "dask"):
            import dask.array as da
            a = da.from_array(np.asarray(a), chunks=-1)
        a = a.rechunk({i: -1 for i in range(a.ndim) if i != ax})
        if chunks is None:
            chunks = a.chunks[ax]
        elif a.chunks[ax] != chunks:
            a = a.rechunk({ax: chunks})  # one token chunking for every array a pass reads
        arrays[n] = (a, ax)
    out = [{} for _ in chunks or ()]
    for n, (a, ax) in arrays.items():
        (opt,) = dask.optimize(a)
        dsk = dict(opt.__dask_graph__())
        keys = list(flatten(opt.__dask_keys__()))  # one key per token chunk (other axes are whole)
        for j, key in enumerate(keys):
            out[j][n] = (cull(dsk, [key])[0], key, ax)
    return out, tuple(chunks or ())


class _Lazy:
    """Hides a chunk's graph from dask's argument traversal: it is run inside the step, not before."""

    def __init__(self, parts: dict, t0: int):
        self.parts, self.t0 = parts, t0

    def load(self) -> dict[str, np.ndarray]:
        from dask.local import get_sync

        out = {n: np.asarray(get_sync(g, k)) for n, (g, k, _) in self.parts.items()}
        out[_T0] = self.t0
        return out


def _take(c: dict, axes: dict[str, int], sl: slice) -> dict:
    return {n: c[n][(slice(None),) * axes[n] + (sl,)] for n in axes}


def _edges(c: dict, axes: dict[str, int]) -> tuple[dict, dict]:
    """(first token, last token) of a chunk, copied: a view would keep the whole chunk alive."""
    first, last = _take(c, axes, slice(0, 1)), _take(c, axes, slice(-1, None))
    return {n: v.copy() for n, v in first.items()}, {n: v.copy() for n, v in last.items()}


def _is_exact(a: np.ndarray) -> bool:
    return a.dtype.kind in "iub"


def _fresh_floats(p, tables: dict) -> dict:
    """Zeroed per-chunk copies of a pass's float tables (added in chunk order at the end); none for a
    pass with its own combine(), which owns its tables."""
    if hasattr(p, "combine"):
        return {}
    return {t: np.zeros_like(v) for t, v in tables.items() if not _is_exact(v)}


class _Start:
    """A lane's first step: the pass definitions travel inside the task, so the first steps depend on
    nothing, are queued as root tasks and spread over the workers; later steps depend only on their
    lane's state, so a lane stays where it started."""

    def __init__(self, passes: dict):
        self.passes = passes


def _lane(axes: dict[str, int], pair_names: dict[str, tuple], state, chunk: _Lazy, j: int):
    """A lane step: update every pass with chunk j, its inner consecutive pairs, and keep its edges.
    state: _Start(passes) or the lane's (passes, accumulators, float partials, edges)."""
    if isinstance(state, _Start):
        passes = state.passes
        state = (passes, {n: p.init() for n, p in passes.items()}, {}, {})
    passes, acc, floats, edges = state
    c = chunk.load()
    n_tok = c[next(iter(axes))].shape[axes[next(iter(axes))]] if axes else 0
    for n, p in passes.items():
        fresh = _fresh_floats(p, acc[n])
        tabs = {**acc[n], **fresh}
        p.update(tabs, c)
        if pair_names[n] and n_tok > 1:
            pa = {a: axes[a] for a in pair_names[n]}
            a, b = _take(c, pa, slice(0, n_tok - 1)), _take(c, pa, slice(1, n_tok))
            a[_T0], b[_T0] = c[_T0], c[_T0] + 1
            p.pairs(tabs, a, b)
        if fresh:
            floats.setdefault(n, {})[j] = fresh
    if any(pair_names.values()) and n_tok:
        pair_axes = {a: axes[a] for names in pair_names.values() for a in names}
        edges[j] = _edges(c, pair_axes)
    return passes, acc, floats, edges


def _combine(start: _Start, pair_names: dict[str, tuple], axes: dict[str, int], n_chunks: int,
             chunk_t0: list[int], *states):
    """Merge the lanes, add the pairs that straddle chunks, add float tables in chunk order, finish."""
    passes = start.passes
    states = [s[1:] for s in states if s is not None]
    acc = {n: p.init() for n, p in passes.items()} if not states else states[0][0]
    floats, edges = {}, {}
    for i, (a, f, e) in enumerate(states):
        for n, tabs in f.items():
            floats.setdefault(n, {}).update(tabs)
        edges.update(e)
        if i == 0:
            continue
        for n, p in passes.items():
            if hasattr(p, "combine"):
                p.combine(acc[n], a[n])
            else:
                for t, v in a[n].items():
                    if _is_exact(v):
                        acc[n][t] += v
    for n, p in passes.items():
        if not pair_names[n]:
            continue
        js = [j for j in range(n_chunks - 1) if j in edges and j + 1 in edges]
        if not js:
            continue
        pa = {a: axes[a] for a in pair_names[n]}
        a = {x: np.concatenate([edges[j][1][x] for j in js], axis=pa[x]) for x in pa}
        b = {x: np.concatenate([edges[j + 1][0][x] for j in js], axis=pa[x]) for x in pa}
        a[_T0], b[_T0] = None, None  # straddling pairs are not contiguous in the token axis
        fresh = _fresh_floats(p, acc[n])
        p.pairs({**acc[n], **fresh}, a, b)
        if fresh:
            floats.setdefault(n, {})[n_chunks] = fresh
    for n, per_chunk in floats.items():
        for j in sorted(per_chunk):          # chunk order, whatever the lanes: reproducible float sums
            for t, v in per_chunk[j].items():
                acc[n][t] += v
    return {n: p.finish(acc[n]) for n, p in passes.items()}


def fold(ds, passes: dict[str, Any], lanes: int | None = None):
    """A dask Delayed computing {name: pass.finish(accumulator)} in one read of every chunk.

    ds: an `open_dataset` dataset (or any xarray.Dataset with a `token` dimension, dask-backed or not).
    lanes: chains of steps run in parallel (default: the threads of the active dask.distributed
    client, else the threaded scheduler's workers). More lanes = more parallelism and one more
    accumulator in memory each; the results are the same for any number of lanes."""
    from dask.delayed import Delayed, delayed

    if not passes:
        raise ValueError("fold: no passes given")
    lanes = default_lanes() if lanes is None else int(lanes)
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    names = sorted({a for p in passes.values() for a in (*p.arrays, *getattr(p, "pair_arrays", ()))})
    blocks, chunks = _block_tasks(ds, names)
    axes = {n: _token_axis(ds, n) for n in names}
    pair_names = {n: tuple(getattr(p, "pair_arrays", ())) for n, p in passes.items()}
    t0 = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
    n = len(chunks)
    lanes = min(lanes, max(n, 1))
    tag = uuid.uuid4().hex[:12]
    bounds = np.linspace(0, n, lanes + 1).round().astype(int)
    ends = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        state = _Start(passes)
        for j in range(lo, hi):
            state = delayed(_lane, traverse=False)(axes, pair_names, state, _Lazy(blocks[j], int(t0[j])), j,
                                                   dask_key_name=f"fold-step-{j}-{tag}")
        ends.append(state)
    ends = [e for e in ends if not isinstance(e, _Start)]     # lanes without chunks (none when n > 0)
    out = delayed(_combine, traverse=False)(_Start(passes), pair_names, axes, n, t0.tolist(), *ends,
                                            dask_key_name=f"fold-combine-{tag}")
    assert isinstance(out, Delayed)
    return out

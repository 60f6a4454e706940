"""workbench/store/fold.py: chunk folds over a dataset give the same tables for any number of lanes
and any scheduler, read every chunk inside its own step, and hand the passes every consecutive pair
exactly once (inside chunks and across chunk edges)."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
from dataset_runs import LAYOUT, three_runs

from probes import routing_dask as RD
from workbench.store import open_dataset
from workbench.store.fold import FoldError, count_dtype, fold


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return three_runs(tmp_path_factory.mktemp("fold") / "runs", LAYOUT)


class PairLog:
    """Records every pair of consecutive token indices it is given, and every chunk's token span."""
    arrays, pair_arrays = ("tokens",), ("tokens", "position")

    def init(self):
        return {"n": np.zeros(1, np.int64), "tok_sum": np.zeros(1, np.int64), "f": np.zeros(1)}

    def update(self, acc, c):
        acc["n"] += len(c["tokens"])
        acc["tok_sum"] += c["tokens"].sum()
        acc["f"] += np.float64(0.1) * len(c["tokens"])        # a float table: kept per chunk

    def pairs(self, acc, a, b):
        PairLog.pairs_seen.append((a["tokens"].copy(), b["tokens"].copy(), a["position"].copy(), b["position"].copy()))

    def finish(self, acc):
        return {k: v.copy() for k, v in acc.items()}


def test_results_do_not_depend_on_lanes(runs):
    ds = open_dataset(runs, chunks=16)
    names = ["load", "domain", "vocab", "vocab_next", "consecutive", "transitions", "coactivation"]
    ref = RD.compute_metrics(ds, names, lanes=1)
    for lanes in (2, 3, 7, 1000):
        got = RD.compute_metrics(ds, names, lanes=lanes)
        for n in names:   # bit-identical, floats included (per-chunk float tables add in chunk order)
            pd.testing.assert_frame_equal(got[n], ref[n], check_exact=True, obj=f"{n} lanes={lanes}")


def test_chunks_are_read_inside_their_step(runs):
    """The graph holds only the fold's own tasks: no chunk is a task of its own that a scheduler could
    read ahead of the reductions or move between workers."""
    ds = open_dataset(runs, chunks=16)
    graph = fold(ds, RD.metric_passes(ds, ["load", "consecutive", "vocab_next"]), lanes=2).__dask_graph__()
    prefixes = {str(k).split("-")[0] if isinstance(k, str) else str(k[0]).split("-")[0] for k in graph}
    assert prefixes == {"fold"}, prefixes
    n_chunks = len(ds["tokens"].data.chunks[0])
    assert len(graph) == n_chunks + 1      # one step per chunk, the combine
    from dask.core import get_dependencies

    dsk = dict(graph)
    firsts = [k for k in dsk if k.startswith("fold-step-") and not get_dependencies(dsk, k)]
    assert len(firsts) == 2                # each lane's first step depends on nothing: lanes spread out


def test_worker_environ_drops_malloc_trim():
    from workbench.store.fold import worker_environ

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536, "X": 1}}):
        assert worker_environ() == {"X": 1}


def test_every_consecutive_pair_once(runs):
    from collections import Counter

    ds = open_dataset(runs, chunks=5)
    tok, pos = ds["tokens"].values, ds["position"].values
    want = Counter(zip(tok[:-1], tok[1:], pos[:-1], pos[1:]))
    for lanes in (1, 4):
        PairLog.pairs_seen = []
        with dask.config.set(scheduler="sync"):
            (out,) = dask.compute(fold(ds, {"p": PairLog()}, lanes=lanes))
        n = ds.sizes["token"]
        assert out["p"]["n"][0] == n
        assert out["p"]["f"][0] == sum([np.float64(0.1) * c for c in ds["tokens"].data.chunks[0]][1:],
                                       np.float64(0.1) * ds["tokens"].data.chunks[0][0])
        got = Counter(x for p in PairLog.pairs_seen for x in zip(*p))
        assert got == want                                       # every (t, t+1) exactly once


def test_bad_passes_fail_clearly(runs):
    ds = open_dataset(runs, chunks=16)

    class Bad(PairLog):
        arrays, pair_arrays = ("router/nonexistent",), ()
    with pytest.raises(FoldError, match="router/nonexistent"):
        fold(ds, {"b": Bad()})
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        fold(ds, {"p": PairLog()}, lanes=0)
    with pytest.raises(ValueError, match="no passes"):
        fold(ds, {})


def test_count_dtype_never_overflows():
    assert count_dtype(2**31 - 2) == np.int32
    assert count_dtype(2**31 - 1) == np.int64

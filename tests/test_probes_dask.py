"""Store-level metrics on a dataset of several runs (dask) equal the single-process chunk loops on
one run holding the same documents (probes/routing_dask.py, probes/entropy_dask.py)."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
from dataset_runs import LAYOUT, merged_run, three_runs

from probes import entropy as E
from probes import routing as R
from probes import routing_dask as RD
from workbench.store import RunSet, open_dataset, open_run

N_TOKENS = 327
# Float sums run in another order (per dask chunk, then added in chunk order): float64 round-off of N terms.
RTOL = 4 * N_TOKENS * np.finfo(np.float64).eps


_BUILT: dict = {}


def _build(k: int, tmp_path_factory):
    """(dataset over three runs, the same documents as one run, the run paths) for top-k routing
    (top-2 with router logits); 16-token dask chunks put chunk boundaries inside documents."""
    if k not in _BUILT:
        layout = {**LAYOUT, "top_k": k, "router_logits": k > 1}
        root = tmp_path_factory.mktemp(f"top{k}")
        runs = three_runs(root / "runs", layout)
        ref = open_run(merged_run(runs, root / "ref.zarr"))
        _BUILT[k] = (open_dataset(runs, chunks=16), ref, runs)
    return _BUILT[k]


@pytest.fixture(scope="module", params=[2, 1], ids=["top2", "top1"])
def pair(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def top2(tmp_path_factory):
    return _build(2, tmp_path_factory)


def _same(a, b, name):
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=name)
    else:
        pd.testing.assert_frame_equal(a, b, rtol=RTOL, obj=name)


ROUTING = {
    "expert_loads": lambda r, **kw: R.expert_loads(r, **kw),
    "load_table": lambda r, **kw: R.load_table(r, **kw),
    "load_table_sigmoid": lambda r, **kw: R.load_table(r, convention="sigmoid", **kw),
    "domain_specialization_table": lambda r, **kw: R.domain_specialization_table(r, **kw),
    "vocab_input": lambda r, **kw: R.vocabulary_specialization_table(r, min_count=3, **kw),
    "vocab_next": lambda r, **kw: R.vocabulary_specialization_table(r, "next", min_count=3, **kw),
    "consecutive_rates": lambda r, **kw: R.consecutive_rates(r, **kw),
    "layer_transitions": lambda r, **kw: R.layer_transitions(r, **kw),
    "transition_matrix": lambda r, **kw: R.transition_matrix(r, 0, 1, **kw),
}


@pytest.mark.parametrize("name", list(ROUTING))
def test_routing_metrics_equal_single_process(pair, name):
    ds, ref, _ = pair
    _same(ROUTING[name](ds), ROUTING[name](ref, chunk_tokens=23), name)


def test_consecutive_pairs_never_cross_documents_or_runs(pair):
    ds, ref, _ = pair
    cr = R.consecutive_rates(ds).query("domain == 'all'")
    assert (cr["n_pairs"] == N_TOKENS - 8).all()     # 8 documents (3 runs): 8 pairs dropped, none across
    x = ref.read("router/experts")
    want = [R.consecutive_same_expert(x[m], ref.doc_offsets)["first_choice"] for m in range(2)]
    np.testing.assert_allclose(cr["first_choice"], want, rtol=RTOL)


def test_coactivation_table_equals_array_level(pair):
    ds, ref, _ = pair
    x = ref.read("router/experts")
    if x.shape[2] == 1:
        with pytest.raises(ValueError, match="identically zero for top-1"):
            RD.coactivation_table(ds)
        return
    for pairs in ("all", "rank_adjacent"):
        co = RD.coactivation_table(ds, pairs)
        for m in range(2):
            got = co.query("moe_layer == @m")["coactivation"].to_numpy().reshape(4, 4)
            np.testing.assert_array_equal(got, R.coactivation(x[m], 4, pairs))


def test_entropy_metrics_equal_single_process(top2):
    ds, ref, _ = top2
    _same(E.layer_head_summary(ds, min_keys=4), E.layer_head_summary(ref, min_keys=4, chunk_tokens=23), "summary")
    summary = E.layer_head_summary(ds)
    assert summary.query("layer == 0 and head == 0")["collapsed"].item()
    assert (summary["delta_mean"] > 0).all()
    kws = (dict(layers=[0, 2]), dict(layers=1, heads=[1]), dict(layers=[0, 1, 2], n_bins=7),
           dict(layers=0, edges=[3, 10, 40]))                 # edges that leave positions out of every bin
    for stat, kw in zip(E.STATS, kws):
        _same(E.position_profile(ds, stat=stat, **kw), E.position_profile(ref, stat=stat, chunk_tokens=23, **kw),
              f"position_profile {stat} {kw}")
    a, b = E.profile_by_kind(ds), E.profile_by_kind(ref)
    assert list(a) == list(b) == ["rope-chunked", "nope-global"]
    for kind in a:
        _same(a[kind], b[kind], kind)


def test_one_run_as_a_dataset_equals_the_run(pair):
    _, _, runs = pair
    run = open_run(runs[1])
    ds = open_dataset(runs[1], chunks=7)
    for name in ("load_table", "consecutive_rates", "vocab_next", "domain_specialization_table"):
        _same(ROUTING[name](ds), ROUTING[name](run), name)
    _same(E.layer_head_summary(ds), E.layer_head_summary(run), "summary")


def test_runset_goes_through_dask_and_compute_metrics_shares_one_pass(pair):
    ds, ref, runs = pair
    rs = RunSet(runs, chunks=16)
    _same(R.load_table(rs), R.load_table(ref), "load_table via RunSet")
    names = ["load", "domain", "consecutive", "transitions", "vocab", "vocab_next"]
    out = RD.compute_metrics(ds, names)
    _same(out["load"], R.load_table(ref), "load")
    _same(out["transitions"], R.layer_transitions(ref), "transitions")
    _same(out["vocab_next"], R.vocabulary_specialization_table(ref, "next"), "vocab_next")
    with pytest.raises(ValueError, match="unknown routing metrics"):
        RD.compute_metrics(ds, ["lode"])


def test_local_cluster_with_two_workers_gives_the_same_numbers(top2):
    """dask.distributed: 2 in-process workers (processes=False keeps it to a few seconds in CI)."""
    import distributed

    ds, ref, _ = top2
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        assert len(cluster.workers) == 2
        out = RD.compute_metrics(ds, ["load", "consecutive", "vocab_next"])
        summary = E.layer_head_summary(ds)
    with dask.config.set(scheduler="threads", num_workers=3):   # 3 lanes here, 2 on the cluster
        threaded = RD.compute_metrics(ds, ["load", "consecutive", "vocab_next"])
    for name in threaded:   # bit-identical, the load table's float sums of router probabilities included
        pd.testing.assert_frame_equal(out[name], threaded[name], check_exact=True, obj=name)
    _same(out["load"], R.load_table(ref), "load on a cluster")
    _same(out["consecutive"], R.consecutive_rates(ref), "consecutive on a cluster")
    _same(summary, E.layer_head_summary(ref), "entropy summary on a cluster")


def test_layer_chunking_does_not_change_results(top2):
    """One MoE layer per dask chunk (instead of all of them, the default) computes the same tables."""
    _, ref, runs = top2
    ds = open_dataset(runs, chunks={"token": 16, "moe_layer": 1})
    assert ds["router/experts"].data.chunksize[0] == 1
    out = RD.compute_metrics(ds, ["load", "domain", "vocab_next", "consecutive", "transitions", "coactivation"])
    _same(out["load"], R.load_table(ref), "load")
    _same(out["domain"], R.domain_specialization_table(ref), "domain")
    _same(out["vocab_next"], R.vocabulary_specialization_table(ref, "next"), "vocab_next")
    _same(out["consecutive"], R.consecutive_rates(ref), "consecutive")
    _same(out["transitions"], R.layer_transitions(ref), "transitions")
    want = R.coactivation(ref.read("router/experts")[1], 4)
    np.testing.assert_array_equal(out["coactivation"].query("moe_layer == 1")["coactivation"].to_numpy().reshape(4, 4),
                                  want)


def test_count_tables_equal_the_run_index(top2, tmp_path):
    """The Experts tab's index counts (workbench/store/index.py) computed through dask instead."""
    import zarr

    from workbench.store.index import build_index

    ds, ref, _ = top2
    run_path = merged_run([ref.path], tmp_path / "copy.zarr")   # the index is written into the run
    build_index(run_path)
    idx = zarr.open_group(run_path / "index", mode="r")
    got = RD.count_tables(ds)
    for name in ("load", "domain_count", "cofire"):
        np.testing.assert_array_equal(got[name], np.asarray(idx[name]), err_msg=name)
    np.testing.assert_array_equal(got["vocab"], np.asarray(idx["token_ids"]))
    tok, x = ref.read("tokens"), ref.read("router/experts")
    dense = np.searchsorted(got["vocab"], tok)
    for m in range(2):
        want = np.zeros((len(got["vocab"]), 4), np.int64)
        np.add.at(want, (np.repeat(dense, 2), x[m].ravel()), 1)
        np.testing.assert_array_equal(got["vocab_count"][m], want)
    np.testing.assert_array_equal(got["vocab_total"], np.bincount(dense))

"""`workbench analyze`: metrics over many runs into .zarr / .csv with provenance (workbench/analyze.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from dataset_runs import LAYOUT, merged_run, three_runs

from probes import entropy as E
from probes import routing as R
from workbench.analyze import analyze
from workbench.cli import main

RTOL = 4 * 327 * np.finfo(np.float64).eps  # float64 sums of 327 tokens in another order


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    paths = three_runs(root / "runs")
    return paths, open_ref(merged_run(paths, root / "ref.zarr"))


def open_ref(path):
    from workbench.store import open_run
    return open_run(path)


def test_cli_writes_zarr_with_provenance_equal_to_single_process(runs, tmp_path, capsys):
    paths, ref = runs
    out = tmp_path / "res.zarr"
    assert main(["analyze", str(paths[0].parent / "*.zarr"), "--out", str(out), "--chunk-tokens", "32",
                 "--quiet"]) == 0
    assert "wrote load (2 rows)" in capsys.readouterr().out
    groups = set(zarr.open_group(out, mode="r").group_keys())
    assert groups == {"load", "domain", "vocab", "vocab_next", "consecutive", "transitions", "coactivation",
                      "heads", "profile", "delta_profile"}       # everything a top-2 run with entropy supports
    load = xr.open_zarr(out, group="load", consolidated=False).to_dataframe().reset_index(drop=True)
    want = R.load_table(ref)
    pd.testing.assert_frame_equal(load[want.columns], want, rtol=RTOL, check_dtype=False)  # strings: U vs str
    heads = xr.open_zarr(out, group="heads", consolidated=False).to_dataframe().reset_index(drop=True)
    want = E.layer_head_summary(ref)
    pd.testing.assert_frame_equal(heads[want.columns], want, rtol=RTOL, check_dtype=False)
    prov = dict(zarr.open_group(out, mode="r").attrs)["provenance"]
    assert [i["path"] for i in prov["inputs"]] == [str(p.resolve()) for p in paths]
    assert [i["n_tokens"] for i in prov["inputs"]] == [121, 125, 81] and prov["n_tokens"] == 327
    assert all(len(i["input_hash"]) == 64 for i in prov["inputs"])
    assert prov["model_source"] == "synthetic" and len(prov["config_hash"]) == 64
    assert {"dask", "distributed", "flox", "xarray", "zarr", "numpy", "python"} <= set(prov["versions"])
    assert prov["chunking"]["dask"]["token"] == 32
    assert prov["chunking"]["disk"]["router/experts"] == [1, 16384, 2]
    assert prov["scheduler"] == "threaded" and prov["wall_s"] >= 0


def test_csv_stacks_metrics_with_a_provenance_sidecar(runs, tmp_path):
    paths, ref = runs
    out = tmp_path / "res.csv"
    res = analyze(paths, ["consecutive", "transitions"], out, progress=False)
    df = pd.read_csv(out)
    assert list(df.columns[:1]) == ["metric"] and set(df["metric"]) == {"consecutive", "transitions"}
    cr = df[df["metric"] == "consecutive"].reset_index(drop=True)
    want = R.consecutive_rates(ref)
    np.testing.assert_allclose(cr["first_choice"], want["first_choice"], rtol=RTOL)
    assert cr["domain"].tolist() == want["domain"].tolist()
    pd.testing.assert_frame_equal(res["transitions"], R.layer_transitions(ref), rtol=RTOL)
    prov = json.loads((tmp_path / "res.csv.provenance.json").read_text())
    assert prov["metrics"] == ["consecutive", "transitions"]


def test_runs_on_a_dask_distributed_scheduler_address(runs, tmp_path):
    import distributed

    paths, ref = runs
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        res = analyze(paths, ["load", "domain"], tmp_path / "r.zarr", scheduler=cluster.scheduler_address,
                      progress=False)
    pd.testing.assert_frame_equal(res["load"], R.load_table(ref), rtol=RTOL)
    pd.testing.assert_frame_equal(res["domain"], R.domain_specialization_table(ref))
    prov = dict(zarr.open_group(tmp_path / "r.zarr", mode="r").attrs)["provenance"]
    assert prov["scheduler"].startswith("distributed tcp://") or prov["scheduler"].startswith("distributed inproc://")


def test_bad_requests_fail_clearly_and_write_nothing(runs, tmp_path, capsys):
    paths, _ = runs
    base = ["analyze", str(paths[0])]
    cases = [(["--out", str(tmp_path / "x.zarr"), "--metrics", "load,lode"], "unknown ['lode']"),
             (["--out", str(tmp_path / "x.parquet")], "give a .zarr or .csv path"),
             (["--out", str(tmp_path / "x.zarr"), "--workers", "2", "--scheduler", "tcp://h:1"], "not both"),
             (["--out", str(tmp_path / "x.zarr"), "--workers", "0"], "--workers must be >= 1")]
    for extra, msg in cases:
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    (tmp_path / "taken.csv").write_text("keep me")
    assert main(base + ["--out", str(tmp_path / "taken.csv")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken.csv").read_text() == "keep me"
    assert main(["analyze", "--out", str(tmp_path / "y.zarr")]) == 2     # no runs
    router_only = three_runs(tmp_path / "router_only", {**LAYOUT, "entropy": False})
    with pytest.raises(ValueError, match="metric 'heads' needs \\['attention/entropy'\\]"):
        analyze(router_only, ["heads"], progress=False)
    top1 = three_runs(tmp_path / "top1", {**LAYOUT, "top_k": 1, "router_logits": False})
    assert "coactivation" not in analyze(top1, None, progress=False)      # skipped by default for top-1
    with pytest.raises(ValueError, match="identically zero for top-1"):
        analyze(top1, ["coactivation"], progress=False)
    assert main(["analyze", "--list"]) == 0 and "coactivation" in capsys.readouterr().out


@pytest.mark.slow  # starts 2 worker processes (spawn): ~10-20 s
def test_cli_workers_start_a_local_cluster_of_processes(runs, tmp_path, capsys):
    paths, ref = runs
    out = tmp_path / "w.csv"
    assert main(["analyze", *map(str, paths), "--metrics", "load", "--out", str(out), "--workers", "2",
                 "--memory-limit", "1GB", "--quiet"]) == 0
    df = pd.read_csv(out)
    np.testing.assert_allclose(df["load_entropy"], R.load_table(ref)["load_entropy"], rtol=RTOL)
    assert json.loads((tmp_path / "w.csv.provenance.json").read_text())["scheduler"] == "LocalCluster 2 workers"

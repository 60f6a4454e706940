"""The Experts tab's run index built through dask (workbench/store/index_dask.py) equals the
in-memory builder (workbench/store/index.py) array for array: counts, top-gate contexts, vocabulary
tables and the token postings, with many chunks, several lanes and several postings blocks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from dataset_runs import LAYOUT, write_run

from workbench.cli import main
from workbench.store import index_dask
from workbench.store.index import build_index, open_index


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_dask")
    layout = {**LAYOUT, "router_logits": False, "entropy": False}
    a = write_run(root / "a.zarr", 7, [50, 1, 70, 33, 90, 2], ["code", "web", "code", "math", "", "web"], layout,
                  attrs={"config": {"image_token_index": 5}})
    b = root / "b.zarr"
    shutil.copytree(a, b)
    build_index(a, n_top=5, n_vocab=7, chunk_tokens=64)
    return a, b


@pytest.mark.parametrize("lanes", [1, 3])
def test_equals_the_in_memory_index(run_pair, monkeypatch, lanes):
    a, b = run_pair
    monkeypatch.setattr(index_dask, "POSTINGS_BLOCK", 40)        # 7 postings tasks over 246 tokens
    index_dask.build_index_dask(b, n_top=5, n_vocab=7, lanes=lanes, chunk_tokens=16)
    want, got = zarr.open_group(a / "index", mode="r"), zarr.open_group(b / "index", mode="r")
    assert sorted(want.array_keys()) == sorted(got.array_keys())
    for name in want.array_keys():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    def same_attrs(g):
        return {k: v for k, v in g.attrs.items() if k not in ("created", "built_with")}
    assert same_attrs(got) == same_attrs(want)
    assert dict(got.attrs)["built_with"] == "dask"
    idx = open_index(b)                                          # the app's reader takes it as it is
    tok = np.asarray(zarr.open_array(b / "tokens", mode="r"))[: idx.attrs["n_tokens"]]
    for ids in ([5], [0, 29], list(range(30))):
        np.testing.assert_array_equal(idx.positions_of(ids), np.flatnonzero(np.isin(tok, ids)))
    assert (np.asarray(got["modality_count"])[..., 1].sum() > 0)  # image tokens (id 5) were counted


def test_cli_engine_dask_and_bad_inputs(run_pair, tmp_path, capsys):
    a, b = run_pair
    assert main(["index", str(b), "--top", "5", "--vocab", "7", "--engine", "dask", "--quiet"]) == 0
    assert "dask" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(zarr.open_group(b / "index")["postings"]),
                                  np.asarray(zarr.open_group(a / "index")["postings"]))
    with pytest.raises(ValueError, match="n_top"):
        index_dask.build_index_dask(b, n_top=0)
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        index_dask.build_index_dask(tmp_path / "missing.zarr")
    capsys.readouterr()
    assert main(["index", str(b), "--engine", "memory", "--scheduler", "tcp://127.0.0.1:1", "--quiet"]) == 2
    assert "--scheduler needs --engine dask" in capsys.readouterr().err

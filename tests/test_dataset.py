"""open_dataset / RunSet: many runs as one lazy dataset (workbench/store/dataset.py, runset.py)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import zarr
from dataset_runs import LAYOUT, merged_run, three_runs, write_run

from workbench.store import IncompleteRunWarning, RunSet, StoreError, open_dataset, open_run, open_runs


@pytest.fixture
def runs(tmp_path):
    return three_runs(tmp_path / "runs")


def test_concatenates_runs_along_token_with_coordinates(runs, tmp_path):
    ds = open_dataset(runs, chunks=16)
    rs = [open_run(p) for p in runs]
    assert ds.sizes["token"] == ds.attrs["n_tokens"] == sum(r.n_tokens for r in rs) == 327
    assert ds.sizes["doc"] == ds.attrs["n_docs"] == 8
    assert ds.attrs["runs"] == [str(p) for p in runs] and ds.attrs["run_n_tokens"] == [121, 125, 81]
    np.testing.assert_array_equal(ds["tokens"].values, np.concatenate([r.read("tokens") for r in rs]))
    np.testing.assert_array_equal(ds["router/experts"].values,
                                  np.concatenate([r.read("router/experts") for r in rs], axis=1))
    np.testing.assert_array_equal(ds["attention/entropy"].values,
                                  np.concatenate([r.read("attention/entropy") for r in rs], axis=2))
    assert ds["router/experts"].data.chunks[1][:3] == (16, 16, 16)   # the dask chunks asked for
    # coordinates along token: run index, global document index, position in the document, document id
    lengths = [50, 1, 70, 33, 90, 2, 64, 17]
    np.testing.assert_array_equal(ds["run"].values, np.repeat([0, 1, 2], [121, 125, 81]))
    np.testing.assert_array_equal(ds["doc"].values, np.repeat(np.arange(8), lengths))
    np.testing.assert_array_equal(ds["position"].values, np.concatenate([np.arange(n) for n in lengths]))
    ids = ["r0-0", "r0-1", "r0-2", "r1-0", "r1-1", "r1-2", "r2-0", "r2-1"]
    np.testing.assert_array_equal(ds["doc_id"].values, np.repeat(ids, lengths))
    np.testing.assert_array_equal(ds["document_id"].values, ids)
    np.testing.assert_array_equal(ds["doc_offsets"].values, np.cumsum([0, *lengths]))
    np.testing.assert_array_equal(ds["doc_run"].values, [0, 0, 0, 1, 1, 1, 2, 2])
    assert list(ds["doc_domain"].values) == ["code", "web", "code", "math", "web", "", "code", "math"]
    assert list(ds["moe_layer"].values) == [0, 2]
    # selections by coordinate work as in xarray
    doc4 = ds["router/experts"].isel(token=(ds["doc"] == 4).compute())
    np.testing.assert_array_equal(doc4.values, rs[1].read("router/experts", doc=1))

    from xarray.groupers import UniqueGrouper  # grouped reductions by run go through flox, lazily

    per_run = ds["tokens"].groupby(run=UniqueGrouper(labels=[0, 1, 2])).count()
    assert per_run.values.tolist() == [121, 125, 81]


def test_nothing_is_read_until_computed(runs):
    ds = open_dataset(runs, chunks=16)
    chunk = next((runs[1] / "router" / "experts" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(b"not a chunk")                  # corrupt b's first router chunk after opening
    assert int(ds["tokens"].sum().compute()) > 0       # other arrays read fine
    with pytest.raises(Exception, match="(?i)checksum|blosc|decompress|codec|zstd"):  # noqa: B017 (zarr's codec error)
        ds["router/experts"].sum().compute()


def test_paths_globs_directories_and_dp_parts(runs, tmp_path):
    root = tmp_path / "runs"
    for arg in (str(root / "*.zarr"), root, [runs[0], str(root / "[bc].zarr")]):
        assert open_dataset(arg).attrs["runs"] == [str(p) for p in runs]
    # a --dp recording not merged yet: OUT does not exist, its parts directory does
    parts = tmp_path / ".out.zarr.parts"
    parts.mkdir()
    for i, p in enumerate(runs[:2]):
        shutil.copytree(p, parts / f"rank{i:03d}-of-002.zarr")
    assert open_dataset(tmp_path / "out.zarr").attrs["run_n_tokens"] == [121, 125]
    assert open_dataset(parts).sizes["token"] == 246
    with pytest.raises(FileNotFoundError, match="no run stores match"):
        open_dataset(str(root / "*.nothing"))
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        open_dataset([runs[0], root / "missing.zarr"])
    with pytest.raises(ValueError, match="given twice"):
        open_dataset([runs[0], str(root / "a.zarr")])
    with pytest.raises(ValueError, match="no runs given"):
        open_dataset([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run store nor a directory holding run stores"):
        open_dataset(tmp_path / "empty")


@pytest.mark.parametrize("attrs,field", [({"model_source": "other-model"}, "model_source"),
                                         ({"dtype": "bfloat16"}, "dtype"),
                                         ({"config": {"hidden_size": 8}}, "config_hash")])
def test_runs_of_other_models_are_rejected_naming_run_and_field(runs, tmp_path, attrs, field):
    odd = write_run(tmp_path / "odd.zarr", 5, [10], ["x"], attrs=attrs)
    with pytest.raises(StoreError, match=f"odd.zarr: attribute '{field}'"):
        open_dataset([*runs, odd])


def test_incompatible_layouts_are_rejected_naming_the_field(runs, tmp_path):
    odd = write_run(tmp_path / "odd.zarr", 5, [10], ["x"], layout={**LAYOUT, "top_k": 1})
    with pytest.raises(StoreError, match=r"odd.zarr: layout differs .* \['top_k'\]"):
        open_dataset([runs[0], odd])
    odd2 = write_run(tmp_path / "odd2.zarr", 5, [10], ["x"], layout={**LAYOUT, "entropy": False})
    with pytest.raises(StoreError, match=r"odd2.zarr: layout differs .* \['entropy'\]"):
        open_dataset([runs[0], odd2])


def test_incomplete_runs_are_skipped_with_a_warning_unless_asked(runs, tmp_path):
    live = write_run(tmp_path / "runs" / "d.zarr", 7, [20, 30], ["code", "web"], finish=False)
    with pytest.warns(IncompleteRunWarning, match="d.zarr: run is incomplete"):
        ds = open_dataset(tmp_path / "runs")
    assert ds.attrs["runs"] == [str(p) for p in runs] and ds.attrs["complete"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_dataset(tmp_path / "runs", include_incomplete=True)
    assert ds.attrs["runs"][-1] == str(live) and ds.sizes["token"] == 327 + 50 and ds.attrs["complete"] is False
    with pytest.warns(IncompleteRunWarning), pytest.raises(StoreError, match="no complete runs"):
        open_dataset(live)


def test_only_committed_tokens_are_seen(runs):
    """An interrupted writer can leave arrays longer than the commit record: the tail is never read."""
    g = zarr.open_group(runs[1], mode="r+")
    for name, axis in (("tokens", 0), ("router/experts", 1), ("attention/entropy", 2)):
        arr = g[name]
        shape = list(arr.shape)
        shape[axis] += 9
        arr.resize(tuple(shape))
        sel = tuple(slice(-9, None) if i == axis else slice(None) for i in range(arr.ndim))
        arr[sel] = 3
    ds = open_dataset(runs, chunks=16)
    assert ds.sizes["token"] == 327
    np.testing.assert_array_equal(ds["tokens"].values, np.concatenate([open_run(p).read("tokens") for p in runs]))


def test_chunks_argument_is_checked(runs):
    ds = open_dataset(runs, chunks={"token": 32, "moe_layer": -1, "head": 1})
    assert ds["router/experts"].data.chunksize == (2, 32, 2)
    assert ds["attention/entropy"].data.chunksize == (1, 1, 32)
    with pytest.raises(ValueError, match="unknown dimension 'tokens'"):
        open_dataset(runs, chunks={"tokens": 5})
    with pytest.raises(ValueError, match=r"chunks\['token'\] must be a positive int"):
        open_dataset(runs, chunks={"token": 0})
    with pytest.raises(TypeError, match="chunks must be"):
        open_dataset(runs, chunks="auto")


def test_runset_reads_like_one_run(runs, tmp_path):
    rs = RunSet(runs, chunks=16)
    ref = open_run(merged_run(runs, tmp_path / "ref.zarr"))
    assert (rs.n_tokens, rs.n_docs, rs.layout) == (ref.n_tokens, ref.n_docs, ref.layout)
    np.testing.assert_array_equal(rs.doc_offsets, ref.doc_offsets)
    for doc in (0, 1, 4, -1):
        assert rs.doc_slice(doc) == ref.doc_slice(doc)
        for name, layer in (("tokens", None), ("router/experts", 2), ("attention/entropy", 1),
                            ("attention/n_keys", None), ("doc_domain", None)):
            np.testing.assert_array_equal(rs.read(name, doc=doc, layer=layer), ref.read(name, doc=doc, layer=layer))
    np.testing.assert_array_equal(rs.read("router/layer_index"), [0, 2])
    assert rs.run_of_doc(4) == runs[1] and rs.run_of_doc(-1) == runs[2]
    with pytest.raises(IndexError, match="not an MoE layer"):
        rs.read("router/experts", layer=1)
    with pytest.raises(IndexError, match="document 8 out of range"):
        rs.doc_slice(8)
    assert set(rs.to_xarray("router").data_vars) == {"experts", "weights", "logits"}
    assert isinstance(open_runs(runs[0]), type(open_run(runs[0]))) and not isinstance(open_runs(runs[0]), RunSet)
    assert isinstance(open_runs(str(tmp_path / "runs" / "*.zarr")), RunSet)

"""Run store: round trip, xarray view, validation errors, reopen/append, crash safety, list_runs."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from workbench.store import (
    SCHEMA,
    SCHEMA_VERSION,
    Layout,
    RunWriter,
    StoreError,
    chain_input_hash,
    config_hash,
    list_runs,
    open_run,
)
from workbench.store.schema import EMPTY_INPUT_HASH, PROBE_ARRAYS

REPO = Path(__file__).resolve().parents[1]
LAYOUT = dict(n_layers=4, n_heads=3, moe_layer_index=[1, 3], top_k=2, n_experts=8,
              router=True, router_logits=True, entropy=True, norms=True, sink=True)
ATTRS = {"model_source": "preset:tiny", "config": {"hidden_size": 16, "num_hidden_layers": 4},
         "dtype": "float32", "device": "cpu", "layer_kinds": ["rope-chunked", "nope-global"] * 2}


def make_doc(i: int, layout: dict = LAYOUT, length: int | None = None) -> dict:
    """Deterministic document i with every probe array of `layout`."""
    rng = np.random.default_rng(i)
    lay = Layout.from_dict(layout)
    T = length or int(rng.integers(1, 700))
    doc = {"tokens": rng.integers(0, 50_000, T), "doc_id": f"doc-{i}", "domain": ["web", "", "code"][i % 3]}
    for name in PROBE_ARRAYS:
        if name in lay.arrays():
            shape = lay.shape(name, n_tokens=T)
            if name == "router/experts":
                doc[name] = rng.integers(0, lay.n_experts, shape)
            elif name == "attention/n_keys":
                doc[name] = rng.integers(1, 9000, shape)
            else:
                doc[name] = rng.standard_normal(shape).astype(np.float32)
    return doc


def write_run(path, docs, layout=LAYOUT, **opts):
    with RunWriter.create(path, attrs=ATTRS, layout=layout, **opts) as w:
        for d in docs:
            w.append(d)
        w.finish()
    return open_run(path)


def assert_doc_equal(run, i, doc):
    np.testing.assert_array_equal(run.tokens(i), doc["tokens"])
    np.testing.assert_array_equal(run.read("positions", doc=i), np.arange(len(doc["tokens"])))
    assert run.read("doc_id", doc=i) == doc["doc_id"]
    assert run.read("doc_domain", doc=i) == doc.get("domain", "")
    for name in PROBE_ARRAYS:
        if run.has(name):
            np.testing.assert_array_equal(run.read(name, doc=i), doc[name], err_msg=name)


def assert_runs_equal(a, b):
    assert (a.n_docs, a.n_tokens) == (b.n_docs, b.n_tokens)
    assert a.attrs["input_hash"] == b.attrs["input_hash"]
    for name in a.layout.arrays():
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


# ---------------------------------------------------------------- round trip
def test_round_trip_varying_lengths(tmp_path):
    # 70 docs of up to 3000 tokens cross the 16384- and 65536-token chunk edges; small flushes
    # make some commits hold one document and others several.
    docs = [make_doc(i, length=int(np.random.default_rng(i).integers(1, 3000))) for i in range(70)]
    run = write_run(tmp_path / "r.zarr", docs, flush_tokens=5000)
    lengths = [len(d["tokens"]) for d in docs]
    assert run.n_docs == 70 and run.n_tokens == sum(lengths) > 65536
    np.testing.assert_array_equal(run.doc_offsets, np.concatenate([[0], np.cumsum(lengths)]))
    for i in (0, 1, 33, 69, -1):
        assert_doc_equal(run, i % 70, docs[i])
    np.testing.assert_array_equal(run.tokens(), np.concatenate([d["tokens"] for d in docs]))
    np.testing.assert_array_equal(run.read("router/layer_index"), [1, 3])
    # layer= is the decoder layer; for MoE arrays it maps through router/layer_index
    np.testing.assert_array_equal(run.read("router/experts", doc=5, layer=3), docs[5]["router/experts"][1])
    np.testing.assert_array_equal(run.read("attention/entropy", doc=5, layer=2),
                                  docs[5]["attention/entropy"][2])
    with pytest.raises(IndexError, match="decoder layer 2 is not an MoE layer; MoE layers are \\[1, 3\\]"):
        run.read("router/weights", layer=2)
    h = EMPTY_INPUT_HASH
    for d in docs:
        h = chain_input_hash(h, d["tokens"])
    assert run.attrs["input_hash"] == h
    assert run.attrs["config_hash"] == config_hash(ATTRS["config"])
    assert run.attrs["complete"] is True and run.attrs["schema_version"] == SCHEMA_VERSION
    assert run.attrs["layer_kinds"] == ATTRS["layer_kinds"]


def test_minimal_layout_and_int64_float64_inputs(tmp_path):
    layout = dict(n_layers=2, n_heads=2, moe_layer_index=[], top_k=1, n_experts=1, entropy=True)
    doc = make_doc(0, layout, length=10)
    doc["attention/entropy"] = doc["attention/entropy"].astype(np.float64)  # same-kind cast is fine
    run = write_run(tmp_path / "r.zarr", [doc], layout=layout)
    assert not run.has("router/experts") and run.has("attention/entropy")
    assert run.read("attention/entropy").dtype == np.float32
    assert run.tokens().dtype == np.int32


def test_xarray_dims(tmp_path):
    import xarray as xr

    docs = [make_doc(i) for i in range(5)]
    run = write_run(tmp_path / "r.zarr", docs)
    ds = run.to_xarray()
    n = run.n_tokens
    assert ds["attention/entropy"].dims == ("layer", "head", "token")
    assert ds["router/experts"].dims == ("moe_layer", "token", "k")
    assert ds["router/logits"].dims == ("moe_layer", "token", "expert")
    assert ds["attention/n_keys"].dims == ("layer", "token")
    assert dict(ds.sizes) == {"token": n, "doc": 5, "doc_edge": 6, "layer": 4, "head": 3,
                              "moe_layer": 2, "k": 2, "expert": 8}
    assert ds["moe_layer"].values.tolist() == [1, 3]
    assert ds["tokens"].dtype == np.int32 and ds["router/experts"].dtype == np.int16  # no fill masking
    d = run.doc_slice(2)
    np.testing.assert_array_equal(ds["attention/sink_mass"].isel(token=d).values, docs[2]["attention/sink_mass"])
    assert ds.attrs["model_source"] == "preset:tiny"
    # plain xarray, no workbench: dimension_names label the arrays
    raw = xr.open_zarr(run.path, group="router", consolidated=False)
    assert raw["weights"].dims == ("moe_layer", "token", "k")
    assert run.to_xarray("attention")["entropy_no_temp"].sizes["token"] == n


# ---------------------------------------------------------------- validation on append
def test_append_validation_messages(tmp_path):
    w = RunWriter.create(tmp_path / "r.zarr", attrs=ATTRS, layout=LAYOUT, flush_tokens=1)
    good = make_doc(0, length=20)
    w.append(good)

    bad = dict(make_doc(1, length=20), **{"attention/entropy": np.zeros((4, 3, 19), np.float32)})
    with pytest.raises(ValueError, match=r"'attention/entropy': expected shape \(4, 3, 20\).*got \(4, 3, 19\)"):
        w.append(bad)
    bad = dict(make_doc(1, length=20), **{"router/experts": np.zeros((2, 20, 1), np.int64)})
    with pytest.raises(ValueError, match=r"'router/experts': expected shape \(2, 20, 2\).*got \(2, 20, 1\)"):
        w.append(bad)
    bad = dict(make_doc(1, length=20), tokens=np.zeros(20, np.float32))
    with pytest.raises(ValueError, match="'tokens': expected an integer array.*got dtype float32"):
        w.append(bad)
    bad = dict(make_doc(1, length=20), **{"router/weights": np.zeros((2, 20, 2), np.int32)})
    with pytest.raises(ValueError, match="'router/weights': expected a float array.*got dtype int32"):
        w.append(bad)
    bad = dict(make_doc(1, length=20), **{"router/experts": np.full((2, 20, 2), 8)})
    with pytest.raises(ValueError, match=r"'router/experts': values must lie in \[0, 7\]"):
        w.append(bad)
    bad = dict(make_doc(1, length=20), tokens=np.full(20, 2**40))
    with pytest.raises(ValueError, match="'tokens': values must lie in"):
        w.append(bad)
    bad = make_doc(1, length=20)
    del bad["attention/sink_mass"]
    with pytest.raises(ValueError, match=r"missing arrays \['attention/sink_mass'\]"):
        w.append(bad)
    with pytest.raises(ValueError, match=r"unknown keys \['attention/bogus'\]"):
        w.append(dict(make_doc(1, length=20), **{"attention/bogus": np.zeros(3)}))
    with pytest.raises(ValueError, match="doc_id 'doc-0' is already in"):
        w.append(make_doc(0, length=20))
    with pytest.raises(ValueError, match=r"'tokens': expected shape \(T,\) with T >= 1"):
        w.append(dict(make_doc(1, length=20), tokens=np.zeros(0, int)))
    w.close()

    run = open_run(tmp_path / "r.zarr")  # nothing of the rejected documents reached the disk
    assert run.n_docs == 1 and run.n_tokens == 20
    assert all(run.array(n).shape[SCHEMA[n].dims.index("token")] == 20
               for n in run.layout.arrays() if "token" in SCHEMA[n].dims)


def test_create_validation(tmp_path):
    with pytest.raises(ValueError, match=r"layout: unknown keys \['n_head'\]"):
        RunWriter.create(tmp_path / "a.zarr", attrs={}, layout=dict(LAYOUT, n_head=3))
    with pytest.raises(ValueError, match="moe_layer_index must be sorted, unique and in"):
        RunWriter.create(tmp_path / "a.zarr", attrs={}, layout=dict(LAYOUT, moe_layer_index=[1, 4]))
    with pytest.raises(ValueError, match="need MoE layers"):
        RunWriter.create(tmp_path / "a.zarr", attrs={}, layout=dict(LAYOUT, moe_layer_index=[]))
    with pytest.raises(ValueError, match=r"keys \['n_docs'\] are set by the writer"):
        RunWriter.create(tmp_path / "a.zarr", attrs={"n_docs": 3}, layout=LAYOUT)
    with pytest.raises(ValueError, match=r"attrs\['probe_options'\] is not JSON-serialisable"):
        RunWriter.create(tmp_path / "a.zarr", attrs={"probe_options": {"x": object()}}, layout=LAYOUT)
    with pytest.raises(ValueError, match="config_hash 'abc' does not match"):
        RunWriter.create(tmp_path / "a.zarr", attrs={"config": {"a": 1}, "config_hash": "abc"}, layout=LAYOUT)
    assert not (tmp_path / "a.zarr").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- reopen / append
def test_reopen_and_append(tmp_path):
    path = tmp_path / "r.zarr"
    docs = [make_doc(i) for i in range(8)]
    write_run(path, docs[:5])
    with pytest.raises(FileExistsError, match="run store already exists: .*r.zarr"):
        RunWriter.create(path, attrs=ATTRS, layout=LAYOUT)
    with pytest.raises(ValueError, match=r"layout mismatch for .*n_heads: run has 3, given 5"):
        RunWriter.open_append(path, layout=dict(LAYOUT, n_heads=5))
    with pytest.raises(ValueError, match="attribute mismatch for .*config_hash"):
        RunWriter.create(path, attrs=dict(ATTRS, config={"hidden_size": 32}), layout=LAYOUT, exist_ok=True)

    with RunWriter.create(path, attrs=ATTRS, layout=LAYOUT, exist_ok=True) as w:
        assert w.n_docs == 5 and w.done_ids == {f"doc-{i}" for i in range(5)}
        w.append(docs[5])
    assert open_run(path).attrs["complete"] is False  # appended after finish: incomplete again
    with RunWriter.open_append(path, layout=LAYOUT) as w:
        w.append(docs[6])
        w.append(docs[7])
        w.finish()
    assert_runs_equal(open_run(path), write_run(tmp_path / "ref.zarr", docs))


# ---------------------------------------------------------------- crash safety
def _crash_at(monkeypatch, method: str):
    def boom(self, *a, **k):
        if method == "_commit":  # data and doc_offsets are on disk, the commit is not
            raise KeyboardInterrupt("simulated crash before commit")
        orig(self, *a, **k)
        raise KeyboardInterrupt(f"simulated crash after {method}")

    orig = getattr(RunWriter, method)
    monkeypatch.setattr(RunWriter, method, boom)


@pytest.mark.parametrize("method", ["_write_data", "_commit"])
def test_simulated_crash_then_resume(tmp_path, monkeypatch, method):
    path = tmp_path / "r.zarr"
    docs = [make_doc(i) for i in range(10)]
    w = RunWriter.create(path, attrs=ATTRS, layout=LAYOUT, flush_tokens=1)
    for d in docs[:4]:
        w.append(d)
    with monkeypatch.context() as m:
        _crash_at(m, method)
        with pytest.raises(KeyboardInterrupt):
            w.append(docs[4])
    with pytest.raises(StoreError, match="an earlier flush failed"):
        w.append(docs[5])

    run = open_run(path)  # the reader sees only committed data, before any repair
    assert run.n_docs == 4 and run.array("tokens").shape[0] > run.n_tokens
    for i in range(4):
        assert_doc_equal(run, i, docs[i])
    assert run.to_xarray().sizes["token"] == run.n_tokens

    w = RunWriter.open_append(path)  # truncates the garbage
    for name in run.layout.arrays():
        assert w._arrays[name].shape == run.layout.shape(name, run.n_tokens, 4), name
    for d in docs:
        if d["doc_id"] not in w.done_ids:
            w.append(d)
    w.finish()
    assert_runs_equal(open_run(path), write_run(tmp_path / "ref.zarr", docs))


def test_torn_flush_reader_points_to_repair(tmp_path, monkeypatch):
    path = tmp_path / "r.zarr"
    w = RunWriter.create(path, attrs=ATTRS, layout=LAYOUT, flush_tokens=1)
    w.append(make_doc(0))
    calls = []
    orig = RunWriter._grow

    def grow_then_die(self, *a):
        orig(self, *a)
        calls.append(1)
        if len(calls) == 3:  # tokens, positions, ... grown; the rest not: token lengths now differ
            raise KeyboardInterrupt("simulated crash mid-flush")

    monkeypatch.setattr(RunWriter, "_grow", grow_then_die)
    with pytest.raises(KeyboardInterrupt):
        w.append(make_doc(1))
    monkeypatch.undo()
    run = open_run(path)
    assert_doc_equal(run, 0, make_doc(0))
    with pytest.raises(StoreError, match=r"different lengths.*RunWriter.open_append"):
        run.to_xarray()
    RunWriter.open_append(path).close()
    assert open_run(path).to_xarray().sizes["token"] == run.n_tokens


CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from test_store import ATTRS, LAYOUT, make_doc
    from workbench.store import RunWriter
    path, n = sys.argv[1], int(sys.argv[2])
    w = RunWriter.create(path, attrs=ATTRS, layout=LAYOUT, exist_ok=True, flush_tokens=1)
    for i in range(n):
        d = make_doc(i, length=200 + 97 * i % 1500)
        if d["doc_id"] not in w.done_ids:
            w.append(d)
    w.finish()
""")


def test_sigkill_then_resume(tmp_path):
    """Kill -9 a real writer twice mid-run; each time the store reopens intact and resume completes it."""
    path, n_total = tmp_path / "r.zarr", 60
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), tests=str(REPO / "tests")))
    docs = [make_doc(i, length=200 + 97 * i % 1500) for i in range(n_total)]

    def committed():
        try:
            return json.loads((path / "zarr.json").read_text())["attributes"]["n_docs"]
        except (OSError, ValueError, KeyError):
            return 0

    for kill_after in (8, 25):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(n_total)])
        deadline = time.monotonic() + 60
        while committed() < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "child finished before it could be killed"
        run = open_run(path)
        assert kill_after <= run.n_docs < n_total
        for i in range(run.n_docs):
            assert_doc_equal(run, i, docs[i])

    w = RunWriter.open_append(path, layout=LAYOUT)
    assert not list(path.rglob("*.partial"))
    for d in docs:
        if d["doc_id"] not in w.done_ids:
            w.append(d)
    w.finish()
    assert_runs_equal(open_run(path), write_run(tmp_path / "ref.zarr", docs))


# ---------------------------------------------------------------- reader validation
@pytest.fixture
def small_run(tmp_path):
    path = tmp_path / "runs" / "small.zarr"
    write_run(path, [make_doc(i, length=50) for i in range(3)])
    return path


def _edit_json(path: Path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_open_errors(tmp_path, small_run):
    with pytest.raises(FileNotFoundError, match="run store not found: .*nope.zarr"):
        open_run(tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="empty is not a Zarr v3 run store"):
        open_run(tmp_path / "empty")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="not a workbench run"):
        open_run(tmp_path / "plain.zarr")

    newer = tmp_path / "newer.zarr"
    shutil.copytree(small_run, newer)
    _edit_json(newer / "zarr.json", lambda m: m["attributes"].update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(StoreError, match=f"schema_version {SCHEMA_VERSION + 1} is newer .*<= {SCHEMA_VERSION}"):
        open_run(newer)

    missing = tmp_path / "missing.zarr"
    shutil.copytree(small_run, missing)
    shutil.rmtree(missing / "attention" / "entropy")
    shutil.rmtree(missing / "router" / "logits")
    with pytest.raises(StoreError, match=r"missing required arrays \['router/logits', 'attention/entropy'\]"):
        open_run(missing)

    dims = tmp_path / "dims.zarr"
    shutil.copytree(small_run, dims)
    _edit_json(dims / "attention" / "n_keys" / "zarr.json",
               lambda m: m.update(dimension_names=["token", "layer"]))
    want = r"attention/n_keys has dims \('token', 'layer'\), expected \('layer', 'token'\)"
    with pytest.raises(StoreError, match=want):
        open_run(dims)


def test_corrupt_chunk_names_array(tmp_path, small_run):
    chunk = next(p for p in (small_run / "attention" / "entropy" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"not a blosc frame")
    run = open_run(small_run)
    with pytest.raises(StoreError, match="failed to read array 'attention/entropy'"):
        run.read("attention/entropy", doc=1)


def test_list_runs(tmp_path, small_run):
    write_run(small_run.parent / "other.zarr", [make_doc(9, length=7)])
    (small_run.parent / "notes").mkdir()
    summaries = list_runs(small_run.parent)
    assert [Path(s["path"]).name for s in summaries] == ["other.zarr", "small.zarr"]
    s = summaries[1]
    assert (s["n_docs"], s["n_tokens"], s["complete"], s["model_source"]) == (3, 150, True, "preset:tiny")
    assert s["probes"] == ["router", "router_logits", "entropy", "norms", "sink"]
    assert s["size_bytes"] > 0 and s["created"]
    with pytest.raises(FileNotFoundError, match="runs directory not found"):
        list_runs(tmp_path / "absent")


def test_store_package_does_not_import_torch():
    for f in (REPO / "workbench" / "store").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), f"{f.name} imports torch"

"""The run index (`workbench/store/index.py`, `workbench index`): every table equals the library's
whole-run metric or a direct reading of the store, it goes stale after an append, and bad inputs
raise errors naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

import workbench
from probes import routing as pr
from workbench.cli import main
from workbench.store import RunWriter, open_run
from workbench.store.index import IndexStale, build_index, open_index
from workbench.store.schema import StoreError

DOCS = [{"text": "The river bends twice before it reaches the old mill. " * 3, "domain": "prose", "id": "p0"},
        {"text": "def f(x):\n    return x * 2\n" * 3, "domain": "code", "id": "c0"},
        {"text": "Water slows near the mill.", "domain": "prose", "id": "p1"}]


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    model = workbench.load_model("tiny")
    workbench.record(model, DOCS, d / "r.zarr", probes=("router", "entropy"), progress=False, model_source="tiny")
    build_index(d / "r.zarr", n_top=5, n_vocab=7, chunk_tokens=64)      # several chunks: the merges are exercised
    return d / "r.zarr"


def test_tables_equal_the_library(run_path):
    run = open_run(run_path)
    idx = open_index(run)
    np.testing.assert_array_equal(idx["load"][:], pr.expert_loads(run))
    for m in range(run.array("router/experts").shape[0] - 1):
        np.testing.assert_array_equal(idx["cofire"][m], pr.transition_matrix(run, m, m + 1))
    dom = pr.domain_specialization_table(run)
    for d, name in enumerate(idx.domains):
        sub = dom[dom["domain"] == name].sort_values(["moe_layer", "expert"])
        np.testing.assert_array_equal(np.asarray(idx["domain_count"][:, :, d]).ravel(), sub["count"].to_numpy())
    assert np.asarray(idx["modality_count"][..., 1]).sum() == 0          # text-only model: no image tokens
    np.testing.assert_array_equal(np.asarray(idx["modality_count"][..., 0]), pr.expert_loads(run))


def test_top_contexts_and_vocab_equal_direct_reading(run_path):
    run = open_run(run_path)
    idx = open_index(run)
    ex, w, tok = run.read("router/experts")[..., 0], run.read("router/weights")[..., 0], run.read("tokens")
    for m in range(ex.shape[0]):
        for e in range(run.layout.n_experts):
            sel = np.flatnonzero(ex[m] == e)
            want = sel[np.lexsort((sel, -w[m, sel]))][:5]
            pos, gates = idx.top(m, e)
            np.testing.assert_array_equal(pos, want)
            np.testing.assert_array_equal(gates, w[m, want])
            ids, cnt, tot = idx.vocab(m, e)
            u, c = np.unique(tok[sel], return_counts=True)
            order = np.lexsort((u, -c))[:7]
            np.testing.assert_array_equal(ids, u[order])
            np.testing.assert_array_equal(cnt, c[order])
            np.testing.assert_array_equal(tot, [(tok == i).sum() for i in ids])


def test_postings_find_every_occurrence(run_path):
    run = open_run(run_path)
    idx = open_index(run)
    tok = run.read("tokens")
    for t in np.unique(tok)[:10]:
        np.testing.assert_array_equal(idx.positions_of([t]), np.flatnonzero(tok == t))
    both = np.unique(tok)[:2]
    np.testing.assert_array_equal(idx.positions_of(both), np.flatnonzero(np.isin(tok, both)))
    assert len(idx.positions_of([10 ** 6])) == 0


def test_stale_after_append_and_rebuild(run_path, tmp_path):
    import shutil

    p = tmp_path / "r.zarr"
    shutil.copytree(run_path, p)
    model = workbench.load_model("tiny")
    workbench.record(model, DOCS + [{"text": "one more", "domain": "prose", "id": "p2"}], p,
                     probes=("router", "entropy"), progress=False, model_source="tiny")
    with pytest.raises(IndexStale, match="workbench index"):
        open_index(p)
    assert open_index(p, allow_stale=True) is not None
    assert main(["index", str(p), "--quiet", "--top", "3"]) == 0
    assert open_index(p).attrs["n_top"] == 3 and not list(tmp_path.glob(".r.zarr.index-*"))


def test_bad_inputs(run_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        build_index(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="n_top"):
        build_index(run_path, n_top=0)
    with RunWriter.create(tmp_path / "e.zarr", attrs={}, layout=dict(n_layers=1, n_heads=1, moe_layer_index=[0],
                          top_k=1, n_experts=2, router=False, entropy=True)) as w:
        w.finish()
    with pytest.raises(StoreError, match="router"):
        build_index(tmp_path / "e.zarr")
    assert open_index(tmp_path / "e.zarr") is None
    assert main(["index", str(tmp_path / "missing.zarr")]) == 2


def test_record_index_flag(tmp_path):
    import json

    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in DOCS[:2]) + "\n")
    out = tmp_path / "r.zarr"
    assert main(["record", "--model", "tiny", "--input", str(src), "--probes", "router", "--out", str(out),
                 "--index", "--quiet"]) == 0
    idx = open_index(out)
    assert idx is not None and idx.attrs["n_tokens"] == open_run(out).n_tokens

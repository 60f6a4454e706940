"""Run A vs run B (`probes.compare`, `apps.compare_views`): the numbers equal the library's whole-run
metrics, the divergence strip equals a direct reading of both stores, and the intervention twin is
what `intervene` records."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import workbench
from apps import compare_views as cv
from apps import views as v
from probes import compare as pc
from probes import entropy as pe
from probes import routing as pr
from workbench.instrument.hooks import intervene

DOCS = [{"text": "The river bends twice before it reaches the old mill. " * 3, "domain": "prose", "id": "p0"},
        {"text": "def f(x):\n    return x * 2\n" * 3, "domain": "code", "id": "c0"}]
PROBES = ("router", "router_logits", "entropy", "norms", "sink")


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    workbench.record(model, DOCS, d / "a.zarr", probes=PROBES, progress=False, model_source="tiny")
    spec = cv.intervention_spec(temperature_off=True, mask=["E1"])
    name = cv.record_intervention(model, threading.Lock(), d, "a.zarr", spec, model_source="tiny")
    return d, name, spec


@pytest.fixture(scope="module")
def pair(runs):
    d, name, _ = runs
    return v.open_cached(v.resolve_run(d, "a.zarr")), v.open_cached(v.resolve_run(d, name))


def test_twin_equals_recording_under_intervene(model, runs, pair, tmp_path):
    d, name, spec = runs
    a, b = pair
    assert b.attrs["intervention"] == spec and b.attrs["intervention_of"] == "a.zarr"
    moe = model.config.moe_layer_index
    with intervene(model, temperature_tuning=False, mask_experts={i: [1] for i in moe}):
        workbench.record(model, DOCS, tmp_path / "ref.zarr", probes=PROBES, progress=False, model_source="tiny")
    ref = workbench.store.open_run(tmp_path / "ref.zarr")
    for name_ in ("tokens", "router/experts", "attention/entropy"):
        np.testing.assert_array_equal(b.read(name_), ref.read(name_))
    assert not (b.read("router/experts") == 1).any()           # E1 masked everywhere
    # recording the same twin again reuses it
    assert cv.record_intervention(model, threading.Lock(), d, "a.zarr", spec, model_source="tiny") == name


def test_routing_difference_equals_router_agreement(pair):
    a, b = pair
    sa, sb = pc.span(a), pc.span(b)
    assert pc.aligned(sa, sb)
    table = pc.routing_difference(sa, sb)
    ref = pr.router_agreement(a, b)
    np.testing.assert_allclose(table["share_top1_differs"], 1 - ref["top1_agreement"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["saturation"], ref["saturation"], rtol=0, atol=1e-12)
    xa, xb = a.read("router/experts"), b.read("router/experts")
    np.testing.assert_allclose(table["share_differs"], (xa[..., 0] != xb[..., 0]).mean(1))   # top-1 model
    assert (table["share_differs"] > 0).all()


def test_divergence_strip_reads_both_stores(pair):
    a, b = pair
    fig, d = cv.divergence_view(a, 1, b, 1, 3, 20, None, selected=a.doc_slice(1).start + 5)
    sl = slice(a.doc_slice(1).start + 3, a.doc_slice(1).start + 23)
    xa, xb = a.read("router/experts")[:, sl, 0], b.read("router/experts")[:, sl, 0]
    np.testing.assert_array_equal(d["differs"], xa != xb)
    first = np.array([np.flatnonzero(c)[0] if c.any() else -1 for c in (xa != xb).T])
    np.testing.assert_array_equal(d["first_split"], first)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), (xa != xb).astype(int))
    assert any(s.type == "line" for s in fig.layout.shapes)          # the selected token is marked


def test_load_transitions_entropy_equal_library(pair):
    a, b = pair
    sa, sb = pc.span(a), pc.span(b)
    ld = pc.load_difference(sa, sb)
    np.testing.assert_array_equal(ld["counts_a"], pr.expert_loads(a))
    np.testing.assert_array_equal(ld["counts_b"], pr.expert_loads(b))
    ca, cb = pc.transition_pair(sa, sb, 0, 2)
    np.testing.assert_array_equal(ca, pr.transition_matrix(a, 0, 2))
    np.testing.assert_array_equal(cb, pr.transition_matrix(b, 0, 2))
    df = pc.entropy_difference(sa, sb)
    ha, hb = pe.layer_head_summary(a), pe.layer_head_summary(b)
    np.testing.assert_allclose(df["delta"], hb["entropy_mean"] - ha["entropy_mean"], rtol=0, atol=1e-9)
    ea, eb = a.read("attention/entropy").astype(np.float64), b.read("attention/entropy").astype(np.float64)
    np.testing.assert_allclose(df["mean_abs_delta"], np.abs(eb - ea).mean(-1).ravel(), rtol=0, atol=1e-9)
    # temperature off changes NoPE layers only; chunked RoPE layers see the same entropy wherever routing before
    # them is unchanged (layer 0 comes before any MoE layer's output)
    assert df.query("layer == 0")["mean_abs_delta"].max() == 0
    assert df.query("kind.str.startswith('nope')", engine="python")["mean_abs_delta"].max() > 0
    fig, heat, table = cv.entropy_compare_view(a, "all", b, "all", "kind:nope-global", "all", 64)
    assert len(fig.data) >= 2 and np.isfinite(np.asarray(heat.data[0].z, float)).all()
    strip = cv.delta_h_strip_view(a, 0, b, 0, 0, 16)
    sl = a.doc_slice(0)
    np.testing.assert_allclose(np.asarray(strip.data[0].z, float),
                               (eb - ea)[:, :, sl.start:sl.start + 16].mean(1), rtol=0, atol=1e-6)


def test_span_profile_equals_position_profile(pair):
    a, _ = pair
    layers = [1, 3]
    p = pc.span_profile(pc.span(a), layers, None, 32)
    ref = pe.position_profile(a, layers, None, "entropy", 32)
    np.testing.assert_allclose(p["mean"], ref["mean"], rtol=1e-12, atol=1e-12)


def test_different_texts_compare_as_distributions(pair):
    a, b = pair
    note, table = cv.overview(a, 0, b, 1)
    assert "as distributions" in note and table.empty
    with pytest.raises(v.UserError, match="same token sequence"):
        cv.divergence_view(a, 0, b, 1)
    cv.load_diff_view(a, 0, b, 1)
    cv.entropy_compare_view(a, 0, b, 1, "", "all", 32)
    with pytest.raises(v.UserError, match="out of range"):
        cv.overview(a, 7, b, 0)


def test_kl_recomputed_on_the_live_model(model, pair):
    a, b = pair
    fig = cv.kl_view(model, threading.Lock(), a, b, 0)
    ids = torch.tensor([a.tokens(0).tolist()])
    with torch.no_grad():
        la = model(ids).logits[0].double()
        with intervene(model, temperature_tuning=False, mask_experts={i: [1] for i in model.config.moe_layer_index}):
            lb = model(ids).logits[0].double()
    ref = torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(np.asarray(fig.data[0].y), ref.numpy(), rtol=1e-6, atol=1e-9)
    with pytest.raises(v.UserError, match="recomputable"):
        cv.kl_view(model, threading.Lock(), b, a, 0)


def test_intervention_spec_errors():
    with pytest.raises(v.UserError, match="at least one"):
        cv.intervention_spec()
    with pytest.raises(v.UserError, match="E99"):
        cv.intervention_spec(mask=["E99"], n_experts=4)
    with pytest.raises(v.UserError, match="top-k"):
        cv.intervention_spec(top_k=9, max_top_k=4)
    assert cv.intervention_spec(drop_shared=True, top_k=2, chunk_size=8) == {"drop_shared": True, "top_k": 2,
                                                                            "chunk_size": 8}


def test_twin_refused_for_another_model(runs):
    d, _, spec = runs
    other = workbench.load_model("tiny-moe")
    with pytest.raises(v.UserError, match="recorded with"):
        cv.record_intervention(other, threading.Lock(), d, "a.zarr", spec, model_source="tiny-moe")


def test_copy_as_code_rebuilds_the_strip(pair):
    a, b = pair
    fig, d = cv.divergence_view(a, 1, b, 1, 2, 16)
    scope: dict = {}
    exec(fig.layout.meta["wb_code"], scope)        # the snippet the Export panel shows
    np.testing.assert_array_equal(scope["strip"]["differs"], d["differs"])
    fig2, heat, _ = cv.entropy_compare_view(a, "all", b, "all", "kind:nope-global", "all", 64)
    exec(heat.layout.meta["wb_code"], scope)
    np.testing.assert_allclose(scope["table"].pivot(index="layer", columns="head", values="delta").to_numpy(),
                               np.asarray(heat.data[0].z, float))


def test_twin_of_a_private_run_stays_private(model, tmp_path):
    from apps import private_runs

    name = private_runs.new_name("live-20260101-000000-abcdef.zarr")
    workbench.record(model, DOCS[:1], private_runs.path_for(tmp_path, name), probes=("router", "entropy"),
                     progress=False, model_source="tiny")
    twin = cv.record_intervention(model, threading.Lock(), tmp_path, name, {"drop_shared": True},
                                  model_source="tiny")
    assert private_runs.is_private(twin) and twin.split("/")[0] == name.split("/")[0]
    assert v.resolve_run(tmp_path, twin).parent == v.resolve_run(tmp_path, name).parent
    assert v.runs_table(tmp_path).empty                     # nothing leaked into the shared list

"""Experts tab, linked selection and long-context views, called directly (no browser): the dashboard
equals a direct reading of the store, search filters combine exactly, selections outside a run are
ignored, and sink mass vs position equals the stored values binned."""

from __future__ import annotations

import numpy as np
import pytest

import workbench
from apps import experts_views as ev
from apps import longctx_views as lv
from apps import selection_views as sv
from apps import views as v

DOCS = [{"text": "The river bends twice before it reaches the old mill. " * 3, "domain": "prose", "id": "p0"},
        {"text": "def f(x):\n    return x * 2\n" * 3, "domain": "code", "id": "c0"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    workbench.record(workbench.load_model("tiny"), DOCS, d / "r.zarr", probes=("router", "entropy", "sink"),
                     progress=False, model_source="tiny")
    return v.open_cached(v.resolve_run(d, "r.zarr"))


def test_dashboard_equals_the_store(run):
    tok = v.run_tokenizer(run)
    d = ev.expert_dashboard(run, 3, "E1", 4, 10, tok)         # index built on first use (small run)
    assert (run.path / "index" / "zarr.json").is_file()
    ex, w = run.read("router/experts", layer=3)[:, 0], run.read("router/weights", layer=3)[:, 0]
    sel = np.flatnonzero(ex == 1)
    want = sel[np.lexsort((sel, -w[sel]))][:10]
    np.testing.assert_array_equal(d["top"]["token"], want)
    assert d["contexts"].count("<mark") == len(want) and f"data-token='{want[0]}'" in d["contexts"]
    assert f"{len(sel)} assignments" in d["summary"]
    y = np.asarray(d["load"].data[0].y)
    assert abs(np.average(y, weights=np.diff(np.linspace(0, run.n_tokens, len(y) + 1).astype(int))) -
               len(sel) / run.n_tokens) < 1e-9
    cof = np.asarray(d["cofire"].data[0].y) if d["cofire"].data else None
    assert cof is None                                          # layer 3 is the last MoE layer
    d0 = ev.expert_dashboard(run, 0, "E1", 4, 10, tok)
    nxt = run.read("router/experts", layer=1)[:, 0]
    e0 = run.read("router/experts", layer=0)[:, 0]
    want_co = np.bincount(nxt[e0 == 1], minlength=4) / max((e0 == 1).sum(), 1)
    np.testing.assert_allclose(np.asarray(d0["cofire"].data[0].y), want_co)
    with pytest.raises(v.UserError, match="not an MoE layer"):
        ev.expert_dashboard(run, 2, "E1")
    with pytest.raises(v.UserError, match="E0–E3"):
        ev.expert_dashboard(run, 0, "E7")


def test_search_filters_combine(run):
    tok = v.run_tokenizer(run)
    tokens, pos = run.read("tokens"), run.read("positions")
    ex1 = run.read("router/experts", layer=1)[:, 0]
    df, note = ev.search(run, "e", False, 1, "E2", 0, "text", 2, 150, None, tok, limit=1000)
    text = np.array(v.token_text(tok, tokens))
    sl = run.doc_slice(0)
    want = [t for t in range(sl.start, sl.stop) if "e" in text[t].lower() and ex1[t] == 2 and 2 <= pos[t] <= 150]
    assert df["token"].tolist() == want and f"{len(want)} matching" in note
    rx, _ = ev.search(run, r"^\s", True, tokenizer=tok, limit=10_000)
    assert rx["token"].tolist() == [t for t in range(run.n_tokens) if text[t][:1].isspace()]
    chunk = run_info_chunk(run)
    ch, _ = ev.search(run, "", chunk=1, tokenizer=tok, limit=10_000)
    assert ch["token"].tolist() == np.flatnonzero(pos // chunk == 1).tolist()
    img, note = ev.search(run, "", modality="image", tokenizer=tok)
    assert img.empty and note.startswith("0 matching")
    lim, note = ev.search(run, "", tokenizer=tok, limit=5)
    assert len(lim) == 5 and "showing the first 5" in note
    t, layer, e = ev.hit_expert(run, {"token": 9}, 1)
    assert (t, layer, e) == (9, 1, f"E{ex1[9]}")


def run_info_chunk(run):
    return v.run_info(run)["chunk_size"]


def test_selection_views(run):
    sel = sv.make_selection(run.path.name, 12)
    assert sv.check_selection(run, sel) == 12
    assert sv.check_selection(run, {"run": "other.zarr", "token": 12}) is None
    assert sv.check_selection(run, {"run": run.path.name, "token": run.n_tokens}) is None
    bar = sv.selection_html(run, sel, v.run_tokenizer(run))
    assert "#12" in bar and "L0:E" in bar and "locked" in bar
    fig = sv.token_entropy_view(run, sel)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, float), run.read("attention/entropy")[:, :, 12])
    d, p = sv.locate(run, run.doc_slice(1).start + 3)
    assert (d, p) == (1, 3)
    assert "No token selected" in sv.selection_html(run, None)


def test_sink_view_bins_the_stored_values(run):
    fig = lv.sink_view(run, 4096)
    nope = [i for i, k in enumerate(v.run_info(run)["kinds"]) if k.startswith("nope")]
    assert [t.name for t in fig.data][:len(nope)] == [f"layer {i}" for i in nope]
    s = run.read("attention/sink_mass")[nope[0]].mean(0)
    pos = run.read("positions")
    want = [s[pos == q].mean() for q in range(pos.max() + 1)]
    np.testing.assert_allclose(np.asarray(fig.data[0].y, float), want, rtol=1e-6)
    assert "bins of 1 position" in fig.layout.title.text


def test_app_views_benchmark_quick_runs(tmp_path):
    import re
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "benchmarks/app_views.py", "--quick", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Search | regex" in proc.stdout and re.search(r"Slowest switch or search: \*\*[\d.]+ s\*\*", proc.stdout)
    assert "wrote" not in proc.stdout                     # --quick never rewrites docs/benchmarks.md


def test_decoded_view_gives_the_same_profiles(run):
    from apps.decoded import decoded
    from probes import entropy as pe

    layers = [1, 3]
    view = decoded(run, layers)
    assert view is not run and decoded(run, layers) is view          # kept for the next switch
    for head, stat in ((None, "entropy"), (2, "delta"), (1, "normalized")):
        a = pe.position_profile(view, layers, head, stat=stat, n_bins=64)
        b = pe.position_profile(run, layers, head, stat=stat, n_bins=64)
        assert a.equals(b)


def test_sankey_highlights_the_selected_path(run):
    fig, _ = v.transition_view(run, 0, 3, True, "path")
    t = 17
    fig = sv.highlight_sankey(fig, run, sv.make_selection(run.path.name, t))
    tr = fig.data[0]
    ex = run.read("router/experts")[:, t, 0]
    labels = list(tr.node.label)
    dark = [(labels[s], labels[d]) for s, d, c in zip(tr.link.source, tr.link.target, tr.link.color)
            if c.startswith("rgba(20")]
    assert dark == [(f"L0 E{ex[0]}", f"L1 E{ex[1]}"), (f"L1 E{ex[1]}", f"L3 E{ex[2]}")]
    assert f"#{t}" in fig.layout.title.text
    matrix, _ = v.transition_view(run, 0, 3)
    assert sv.highlight_sankey(matrix, run, sv.make_selection(run.path.name, t)) is matrix   # heatmaps: unchanged


def test_joined_runs_get_a_clear_message(run):
    from apps import compare_views as cv

    runs_dir = run.path.parent
    if not (runs_dir / "s.zarr").exists():
        workbench.record(workbench.load_model("tiny"), DOCS[:1], runs_dir / "s.zarr",
                         probes=("router", "entropy", "sink"), progress=False, model_source="tiny")
    joined = v.open_cached(v.resolve_run(runs_dir, "r.zarr+s.zarr"))    # a RunSet (run names joined with '+')
    assert hasattr(joined, "paths")
    with pytest.raises(v.UserError, match="one run"):
        ev.expert_dashboard(joined, 1, "E0")
    with pytest.raises(v.UserError, match="single runs"):
        cv.overview(joined, "all", run, "all")

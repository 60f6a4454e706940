"""Routing probes: hand-computed cases, random-routing baselines, OLMoE's released counts (science §1, §6)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import zarr
from conftest import require_data

from probes import routing as R
from probes import routing_figures as RF

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    """The OLMoE routing counts (conftest.require_data: skip on a fresh clone, fail under CI)."""
    return require_data("olmoe_routing", "OLMoE routing counts").parent


# ---------------------------------------------------------------- OLMoE released counts (§1.1)
N_D = 208_896  # tokens per domain = 102 × 2048
LAYERS = (0, 7, 15)  # the three layers each JSON list holds, in order
# science §1.1 table rows covered by the JSON files: (file, top_k, domain, {layer: (%, expert)})
OLMOE_TABLE = [
    ("expert_counts.json", 8, "arxiv", {0: (97.7, 0), 7: (78.5, 17), 15: (93.7, 17)}),
    ("expert_counts.json", 8, "github", {0: (62.6, 21), 7: (77.0, 17), 15: (56.4, 30)}),
    ("expert_counts.json", 8, "c4", {0: (37.7, 41), 7: (33.2, 1), 15: (31.2, 7)}),
    ("expert_counts.json", 8, "book", {0: (45.4, 28), 7: (50.7, 28), 15: (36.6, 45)}),
    ("expert_counts.json", 8, "wikipedia", {0: (77.2, 11), 7: (84.8, 27), 15: (58.1, 36)}),
    ("expert_counts_top1.json", 1, "arxiv", {0: (51.6, 0), 7: (18.5, 4), 15: (57.3, 17)}),
    ("expert_counts_top1.json", 1, "c4", {0: (7.6, 36), 7: (5.2, 1), 15: (5.9, 54)}),
]


@pytest.mark.parametrize("fname,top_k,domain,expected", OLMOE_TABLE,
                         ids=[f"{r[2]}-top{r[1]}" for r in OLMOE_TABLE])
def test_olmoe_domain_specialization_maxima(fname, top_k, domain, expected):
    counts = json.loads((_data_dir() / "olmoe_routing" / fname).read_text())[domain]
    for pos, layer in enumerate(LAYERS):
        spec = R.domain_specialization(counts[pos], N_D, top_k)
        expert, frac = max(spec.items(), key=lambda kv: kv[1])
        pct, want_expert = expected[layer]
        assert (round(100 * frac, 1), expert) == (pct, want_expert), f"{domain} top-{top_k} layer {layer}"
        assert sum(spec.values()) == pytest.approx(top_k)  # every token has k distinct experts
        assert R.domain_specialization(counts[pos], top_k=top_k) == spec  # N_D = Σ counts / k


def test_domain_specialization_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n_tokens"):
        R.domain_specialization({"0": 5, "1": 7}, n_tokens=5, top_k=2)  # 7 > N_D
    with pytest.raises(ValueError, match="top_k"):
        R.domain_specialization({0: 6, 1: 6, 2: 6}, n_tokens=8, top_k=2)  # 18 > 16
    assert R.domain_specialization({"3": 2, "1": 4}, n_tokens=4, top_k=2) == {1: 1.0, 3: 0.5}


# ---------------------------------------------------------------------- hand-computed metrics
def test_load_metrics_hand_computed():
    x = np.array([[0], [0], [1], [2]])  # E = 4: loads 1/2, 1/4, 1/4, 0
    f = R.expert_load(x, 4)
    np.testing.assert_allclose(f, [0.5, 0.25, 0.25, 0])
    assert R.load_entropy(f) == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(4))
    assert R.max_violation(f) == pytest.approx(0.5 / 0.25 - 1)
    assert R.coefficient_of_variation(f) == pytest.approx(np.std(f) / 0.25)
    assert R.load_entropy(np.full(8, 1 / 8)) == pytest.approx(1.0)
    assert R.load_entropy(np.eye(8)[3]) == 0.0


def test_aux_loss_conventions():
    """Switch form 1 at uniform and E at collapse; HF form = top_k at uniform (science §6.3)."""
    e, k = 8, 2
    x = np.array([[i % e, (i + 1) % e] for i in range(64)])  # exactly balanced, both slots
    zero_logits = np.zeros((64, e))  # uniform router probabilities
    assert R.switch_balance(R.expert_load(x, e), R.router_probs(zero_logits).mean(0)) == pytest.approx(1.0)
    assert R.hf_load_balancing_loss(x, zero_logits) == pytest.approx(k)
    collapsed = np.zeros((64, e))
    collapsed[:, 3] = 50.0
    assert R.switch_balance(np.eye(e)[3], R.router_probs(collapsed).mean(0)) == pytest.approx(e)
    p = R.router_probs(np.array([[0.0, math.log(3.0)]]), "sigmoid")  # σ: 1/2 and 3/4
    np.testing.assert_allclose(p, [[0.4, 0.6]])
    with pytest.raises(ValueError):
        R.router_probs(zero_logits, "relu")


def test_vocabulary_specialization_hand_computed():
    # token 5 routed to {0,1},{0,2},{0,1},{3,1}: e0 and e1 three times of 4 -> 3/4; token 9: e2 2/2
    ids = np.array([5, 5, 9, 5, 9, 5])
    x = np.array([[0, 1], [0, 2], [2, 3], [0, 1], [2, 0], [3, 1]])
    vs = R.vocabulary_specialization(ids, x, 4, min_count=2)
    assert vs.n_token_ids == 2
    assert vs.mean == pytest.approx((3 / 4 + 2 / 2) / 2)
    assert R.vocabulary_specialization(ids, x, 4, min_count=3).mean == pytest.approx(3 / 4)


def test_router_saturation_hand_computed():
    a = np.array([[0, 1], [2, 3], [4, 5]])
    b = np.array([[1, 0], [2, 6], [7, 6]])  # overlaps 2, 1, 0 -> (2/2 + 1/2 + 0)/3
    assert R.router_saturation(a, b) == pytest.approx(0.5)
    assert R.router_saturation(a[:, :1], b[:, :1]) == pytest.approx(1 / 3)  # top-1: agreement rate
    assert R.router_saturation(a, a) == 1.0


def test_transitions_and_nmi():
    src = np.array([0, 0, 1, 1, 1, 2])
    dst = np.array([1, 1, 0, 0, 2, 2])
    c = R.transition_counts(src, dst, 3)
    np.testing.assert_array_equal(c, [[0, 2, 0], [2, 0, 1], [0, 0, 1]])
    np.testing.assert_allclose(R.row_normalize(c)[1], [2 / 3, 0, 1 / 3])
    perm = np.array([2, 0, 1])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 5000)
    assert R.normalized_mutual_information(R.transition_counts(a, perm[a], 3)) == pytest.approx(1.0)
    b = rng.integers(0, 3, 5000)
    assert R.normalized_mutual_information(R.transition_counts(a, b, 3)) < 0.01
    # I = H(A) + H(B) − H(A,B) from the joint above, by hand
    p = c / c.sum()
    h = lambda q: -sum(v * math.log(v) for v in q.ravel() if v > 0)
    assert R.mutual_information(c) == pytest.approx(h(p.sum(1)) + h(p.sum(0)) - h(p))


def test_coactivation_top1_is_refused_and_top2_hand_computed():
    with pytest.raises(ValueError, match="identically zero for top-1"):
        R.coactivation(np.array([[0], [1]]), 4)
    x = np.array([[0, 1], [0, 2], [1, 0]])  # N_0 = 3; with 1 twice, with 2 once
    co = R.coactivation(x, 3)
    np.testing.assert_allclose(co[0], [0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(co[2], [1, 0, 0])
    x3 = np.array([[0, 1, 2]])  # rank-adjacent drops the (0, 2) pair
    assert R.coactivation(x3, 3, "rank_adjacent")[0, 2] == 0 and R.coactivation(x3, 3)[0, 2] == 1


def test_consecutive_same_expert_respects_documents():
    x = np.array([[0, 1], [0, 2], [3, 1], [3, 2], [3, 0]])
    # pairs: (0,1) first equal; (1,2) none... ; doc boundary at token 3 removes pair (2,3)
    out = R.consecutive_same_expert(x, doc_offsets=[0, 3, 5])
    assert out["n_pairs"] == 3
    assert out["first_choice"] == pytest.approx(2 / 3)  # pairs (0,1) and (3,4)
    assert out["any_overlap"] == pytest.approx(2 / 3)  # (1,2) share nothing: {0,2} vs {3,1}
    whole = R.consecutive_same_expert(x)
    assert whole["n_pairs"] == 4 and whole["first_choice"] == pytest.approx(3 / 4)
    assert math.isnan(R.consecutive_same_expert(x[:, :1])["any_overlap"])


def test_consecutive_baselines_closed_form():
    b = R.consecutive_baselines(8, 2)
    assert b["first_choice"] == 0.125
    assert round(100 * b["any_overlap"], 2) == 46.43
    assert R.consecutive_baselines(16, 1)["first_choice"] == 0.0625  # Scout, science §1.2


def test_uniform_random_routing_reproduces_baselines():
    """Mixtral Table 5 baselines by simulation: uniform top-2 of 8 -> 12.5 % and 46.43 %."""
    rng = np.random.default_rng(1234)
    x = np.argsort(rng.random((200_000, 8)), axis=1)[:, :2]  # random ordered 2-subsets
    out = R.consecutive_same_expert(x, doc_offsets=[0, 100_000, 200_000])
    assert out["first_choice"] == pytest.approx(0.125, abs=0.005)
    assert out["any_overlap"] == pytest.approx(0.4643, abs=0.005)
    f = R.expert_load(x, 8)
    np.testing.assert_allclose(f, 1 / 8, atol=0.003)
    assert R.load_entropy(f) > 0.9999


# --------------------------------------------------------------------------------- store level
def _make_run(m=3, t=1000, k=2, e=8, seed=0, with_logits=True, store=None):
    rng = np.random.default_rng(seed)
    g = zarr.open_group(store or zarr.storage.MemoryStore(), mode="w")
    experts = np.argsort(rng.random((m, t, e)), axis=2)[:, :, :k].astype(np.int16)
    if m > 1:  # layer 1's choices are determined by layer 0's: NMI = 1
        experts[1] = (experts[0] + 1) % e
    offsets = np.array([0, 3 * t // 10, 3 * t // 10 + 1, 65 * t // 100, t])  # has a one-token doc
    g.create_array("tokens", data=rng.integers(0, 50, t).astype(np.int32))
    g.create_array("doc_offsets", data=offsets)
    g.create_array("doc_domain", shape=(4,), dtype=str)[:] = ["code", "web", "code", "math"]
    g.create_array("router/experts", data=experts, chunks=(1, 256, k))
    g.create_array("router/weights", data=rng.random((m, t, k)).astype(np.float32))
    g.create_array("router/layer_index", data=np.array([1, 3, 5], dtype=np.int32)[:m])
    if with_logits:
        g.create_array("router/logits", data=rng.normal(size=(m, t, e)).astype(np.float32))
    g.attrs["config"] = {"num_local_experts": e, "num_experts_per_tok": k}
    return g, experts, offsets


def test_store_metrics_equal_array_metrics():
    g, x, off = _make_run()
    e, chunk = 8, 97  # odd chunk size: chunk boundaries fall inside documents
    info = R.router_info(g)
    assert (info["n_experts"], info["top_k"], info["layer_index"]) == (8, 2, [1, 3, 5])
    logits = np.asarray(g["router/logits"][:])
    lt = R.load_table(g, chunk_tokens=chunk)
    for layer in range(3):
        f = R.expert_load(x[layer], e)
        row = lt.iloc[layer]
        assert row["load_entropy"] == pytest.approx(R.load_entropy(f))
        assert row["max_vio"] == pytest.approx(R.max_violation(f))
        assert row["switch_balance"] == pytest.approx(R.switch_balance(f, R.router_probs(logits[layer]).mean(0)))
        assert row["hf_aux_loss"] == pytest.approx(R.hf_load_balancing_loss(x[layer], logits[layer]))
    sig = R.load_table(g, convention="sigmoid", chunk_tokens=chunk).iloc[0]
    want = R.switch_balance(R.expert_load(x[0], e), R.router_probs(logits[0], "sigmoid").mean(0))
    assert sig["switch_balance"] == pytest.approx(want)
    assert sig["hf_aux_loss"] == pytest.approx(lt.iloc[0]["hf_aux_loss"])

    ds = R.domain_specialization_table(g, chunk_tokens=chunk)
    dom_T = np.repeat(np.array(["code", "web", "code", "math"]), np.diff(off))
    for dom in ("code", "web", "math"):
        sel = x[2][dom_T == dom]
        counts = dict(enumerate(np.bincount(sel.ravel(), minlength=e)))
        want = R.domain_specialization(counts, len(sel), 2)
        got = ds.query("domain == @dom and moe_layer == 2").set_index("expert")["specialization"]
        np.testing.assert_allclose(got.to_numpy(), [want[i] for i in range(e)])

    cr = R.consecutive_rates(g, chunk_tokens=chunk)
    for layer in range(3):
        whole = R.consecutive_same_expert(x[layer], off)
        row = cr.query("domain == 'all' and moe_layer == @layer").iloc[0]
        assert row["n_pairs"] == whole["n_pairs"] == 1000 - 4
        assert row["first_choice"] == pytest.approx(whole["first_choice"])
        assert row["any_overlap"] == pytest.approx(whole["any_overlap"])
    code = cr.query("domain == 'code' and moe_layer == 0").iloc[0]  # documents [0, 300), [301, 650)
    parts = [R.consecutive_same_expert(x[0, a:b]) for a, b in ((0, 300), (301, 650))]
    assert code["n_pairs"] == 299 + 348
    hits = sum(p["first_choice"] * p["n_pairs"] for p in parts)
    assert code["first_choice"] == pytest.approx(hits / (299 + 348))
    assert cr.query("domain == 'web'")["n_pairs"].eq(0).all()  # a one-token document has no pair

    lt2 = R.layer_transitions(g, chunk_tokens=chunk)
    assert lt2.iloc[0]["nmi"] == pytest.approx(1.0)  # layer 1 = layer 0 + 1 (mod E)
    assert lt2.iloc[1]["nmi"] < 0.1
    np.testing.assert_array_equal(R.transition_matrix(g, 1, 2, chunk_tokens=chunk),
                                  R.transition_counts(x[1, :, 0], x[2, :, 0], e))


def test_store_vocabulary_specialization_variants():
    g, x, off = _make_run(m=1, t=400)
    tok = np.asarray(g["tokens"][:])
    v_in = R.vocabulary_specialization_table(g, "input", min_count=3, chunk_tokens=61)
    assert v_in.iloc[0]["vocab_specialization"] == pytest.approx(
        R.vocabulary_specialization(tok, x[0], 8, 3).mean)
    keep = np.ones(399, bool)
    keep[off[1:-1] - 1] = False  # the last token of a document has no next token in the document
    want = R.vocabulary_specialization(tok[1:][keep], x[0, :-1][keep], 8, 3).mean
    v_next = R.vocabulary_specialization_table(g, "next", min_count=3, chunk_tokens=61)
    assert v_next.iloc[0]["vocab_specialization"] == pytest.approx(want)
    assert v_next.iloc[0]["baseline"] == 0.25


def test_router_agreement_and_grid():
    a, xa, _ = _make_run(seed=0)
    b, xb, _ = _make_run(seed=0)
    b["router/experts"][2] = np.asarray(_make_run(seed=5)[1][2])
    ag = R.router_agreement(a, b, chunk_tokens=128)
    np.testing.assert_allclose(ag["saturation"][:2], 1.0)
    assert ag["saturation"][2] == pytest.approx(R.router_saturation(xa[2], np.asarray(b["router/experts"][2])))
    c, _, _ = _make_run(seed=1)
    with pytest.raises(ValueError, match="different tokens"):
        R.router_agreement(a, c)
    grid = R.expert_grid(a, 10, 20)
    np.testing.assert_array_equal(grid["experts"], xa[:, 10:20, 0])
    assert grid["gates"].shape == (3, 10) and list(grid["layer_index"]) == [1, 3, 5]


def test_store_without_optional_arrays_and_top1():
    g, x, _ = _make_run(k=1, with_logits=False)
    lt = R.load_table(g)
    assert "switch_balance" not in lt and (lt["top_k"] == 1).all()
    cr = R.consecutive_rates(g)
    assert cr["any_overlap"].isna().all() and (cr["baseline_first"] == 1 / 8).all()


# ------------------------------------------------------------------------------------- figures
def test_figures_build_with_reference_lines():
    g, x, _ = _make_run()
    fig = RF.expert_load_figure(R.expert_loads(g)[0])
    assert isinstance(fig, go.Figure) and fig.layout.shapes[0].y0 == pytest.approx(1 / 8)
    assert isinstance(RF.expert_load_heatmap(R.expert_loads(g), [1, 3, 5]), go.Figure)
    ds = R.domain_specialization_table(g).query("moe_layer == 0")
    fig = RF.domain_specialization_figure(ds, top_k=2, n_experts=8, top_n=4)
    assert len(fig.data) == 3 and fig.layout.shapes[0].y0 == pytest.approx(0.25)
    assert fig.layout.shapes[0].line.dash == "dash"
    heat = RF.transition_heatmap(R.transition_matrix(g, 0, 1), layer_a="1", layer_b="3")
    np.testing.assert_allclose(np.asarray(heat.data[0].z).sum(1), 1.0)
    grid = R.expert_grid(g, 0, 12)
    fig = RF.expert_grid_figure(grid["experts"], grid["gates"], [f"t{i}" for i in range(12)],
                                grid["layer_index"], n_experts=8)
    assert np.asarray(fig.data[0].customdata).shape == (3, 12, 2)
    fig = RF.consecutive_rate_figure(R.consecutive_rates(g))
    assert len(fig.data) == 2 and len(fig.layout.shapes) == 2
    with pytest.raises(ValueError, match="no rows"):
        RF.consecutive_rate_figure(R.consecutive_rates(g), domain="nope")


# ------------------------------------------------------------------ committed data and real stores
def test_store_functions_ignore_uncommitted_tail():
    """Arrays may run past attrs n_tokens / n_docs after an interrupted flush (docs/store.md)."""
    g, x, off = _make_run(t=1000)
    g.attrs.update(n_tokens=int(off[3]), n_docs=3)  # commit the first 3 documents only
    g["router/experts"][:, off[3]:] = 7  # garbage past the commit
    ref = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for name in ("tokens", "router/experts", "router/weights", "router/logits"):
        arr = np.asarray(g[name][:])
        ref.create_array(name, data=arr[:, : off[3]] if arr.ndim == 3 else arr[: off[3]])
    ref.create_array("doc_offsets", data=off[:4])
    ref.create_array("doc_domain", shape=(3,), dtype=str)[:] = ["code", "web", "code"]
    ref.create_array("router/layer_index", data=np.asarray(g["router/layer_index"][:]))
    ref.attrs["config"] = dict(g.attrs["config"])
    for fn in (R.load_table, R.domain_specialization_table, R.consecutive_rates, R.layer_transitions,
               R.vocabulary_specialization_table):
        a, b = fn(g), fn(ref)
        pd.testing.assert_frame_equal(a, b, obj=fn.__name__)


def test_probes_read_a_workbench_run(tmp_path):
    """End to end through the real writer: RunWriter -> open_run / zarr group -> probes."""
    from workbench.store import RunWriter, open_run

    rng = np.random.default_rng(3)
    layout = {"n_layers": 3, "n_heads": 2, "moe_layer_index": [0, 2], "top_k": 2, "n_experts": 4,
              "router": True}
    docs, xs = [], []
    for i, (n, dom) in enumerate([(50, "code"), (30, "web"), (41, "code")]):
        x = np.argsort(rng.random((2, n, 4)), axis=2)[:, :, :2].astype(np.int16)
        xs.append(x)
        docs.append({"tokens": rng.integers(0, 20, n), "domain": dom, "doc_id": f"d{i}",
                     "router/experts": x, "router/weights": rng.random((2, n, 2)).astype(np.float32)})
    with RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=layout, flush_tokens=40) as w:
        for d in docs:
            w.append(d)
        w.finish()
    x = np.concatenate(xs, axis=1)
    off = np.cumsum([0, 50, 30, 41])
    for run in (open_run(tmp_path / "r.zarr"), zarr.open_group(tmp_path / "r.zarr", mode="r")):
        info = R.router_info(run)
        assert (info["n_tokens"], info["n_experts"], info["layer_index"]) == (121, 4, [0, 2])
        np.testing.assert_array_equal(R.expert_loads(run, chunk_tokens=16),
                                      [np.bincount(x[m].ravel(), minlength=4) for m in range(2)])
        cr = R.consecutive_rates(run, chunk_tokens=16).query("domain == 'all'")
        want = [R.consecutive_same_expert(x[m], off)["first_choice"] for m in range(2)]
        np.testing.assert_allclose(cr["first_choice"], want)
        ds = R.domain_specialization_table(run).query("domain == 'web' and moe_layer == 1")
        np.testing.assert_allclose(ds["specialization"], np.bincount(x[1, 50:80].ravel(), minlength=4) / 30)


def _sankey_links(fig) -> dict:
    s = fig.data[0]
    return {(int(a), int(b)): int(v) for a, b, v in zip(s.link.source, s.link.target, s.link.value)}


def test_sankey_links_are_the_transition_counts():
    """top-k = 2 run: the Sankey counts each token once per stage by its first choice, so one stage's
    link values sum to the token count and each link equals the matrix entry."""
    g, x, _ = _make_run(k=2, t=500)
    e, t = 8, 500
    counts = R.transition_matrix(g, 0, 2)
    fig = RF.transition_sankey(counts, [1, 5])
    assert fig.data[0].type == "sankey" and len(fig.data[0].node.label) == 2 * e
    links = _sankey_links(fig)
    assert sum(links.values()) == t == counts.sum()
    want = {(int(a), int(e + b)): int(counts[a, b]) for a, b in zip(*np.nonzero(counts))}
    assert links == want                                  # every non-zero count, nothing else
    assert fig.data[0].node.label[3] == "L1 E3" and fig.data[0].node.label[e + 2] == "L5 E2"
    share = R.row_normalize(counts)
    np.testing.assert_allclose(fig.data[0].link.customdata, [share[a, b - e] for a, b in links])
    # a path through all three layers: each stage is its consecutive matrix, each sums to t
    c01, c12 = R.transition_matrix(g, 0, 1), R.transition_matrix(g, 1, 2)
    path = RF.transition_sankey([c01, c12], [1, 3, 5])
    links = _sankey_links(path)
    first = {k: n for k, n in links.items() if k[0] < e}
    second = {(a - e, b - e): n for (a, b), n in links.items() if a >= e}
    assert sum(first.values()) == sum(second.values()) == t
    assert first == {(int(a), int(e + b)): int(c01[a, b]) for a, b in zip(*np.nonzero(c01))}
    assert second == {(int(a), int(e + b)): int(c12[a, b]) for a, b in zip(*np.nonzero(c12))}
    assert np.count_nonzero(c01) == e                     # layer 1 = layer 0 + 1 (mod E): one link per expert
    with pytest.raises(ValueError, match="layer labels"):
        RF.transition_sankey([c01, c12], [1, 3])

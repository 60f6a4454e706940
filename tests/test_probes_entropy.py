"""Entropy and temperature probes: definitions, invariants, streaming = direct, reference tables
(science §2.1, §2.3, §2.4, §6.4–6.6)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import zarr

from probes import entropy as P
from probes import temperature as T

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------ temperature tables
# science §2.3: n = pos + 1 -> (Llama 4 s, Qwen logn with L = 8192, YaRN factor with s = n/8192)
TABLE_2_3 = [
    (8192, 1.069315, 1.0000, 1.0000),
    (16384, 1.109861, 1.0769, 1.1434),
    (65536, 1.219722, 1.2308, 1.4591),
    (131072, 1.283321, 1.3077, 1.6314),
    (262144, 1.349651, 1.3846, 1.8133),
    (1_048_576, 1.485981, 1.5385, 2.2058),
    (10_000_000, 1.710743, 1.7887, 2.9266),
]


@pytest.mark.parametrize("n,llama,qwen,yarn", TABLE_2_3)
def test_temperature_table(n, llama, qwen, yarn):
    assert T.llama4_attn_scale(n - 1) == pytest.approx(llama, abs=5e-7)  # printed to 6 decimals
    assert T.qwen_logn_scale(n, 8192) == pytest.approx(qwen, abs=5e-5)
    assert T.yarn_logit_factor(n, 8192) == pytest.approx(yarn, abs=5e-5)


def test_temperature_short_context_and_step_location():
    """Row '≤ 8191' of §2.3 and the first active position pos = 8191 (science §6.5)."""
    n = np.arange(1, 8192)
    np.testing.assert_array_equal(T.llama4_attn_scale(n - 1), 1.0)
    np.testing.assert_array_equal(T.qwen_logn_scale(n), 1.0)
    np.testing.assert_array_equal(T.yarn_logit_factor(n), 1.0)
    assert T.first_active_position() == 8191
    assert T.llama4_attn_scale(8190) == 1.0 and T.llama4_attn_scale(8191) > 1.0
    s = T.llama4_attn_scale(np.arange(0, 40_000))
    assert set(np.flatnonzero(np.diff(s)) + 1) == {8191, 16383, 24575, 32767}  # steps at pos+1 ∈ 8192ℕ
    assert T.llama4_attn_scale(15, floor_scale=16, attn_scale=0.2) == pytest.approx(1 + 0.2 * math.log(2))
    with pytest.raises(ValueError):
        T.llama4_attn_scale(-1)


# science §2.4: n -> (softmax max, SSMax max with s = 0.43, softmax entropy, ln n)
TABLE_2_4 = [
    (8, 0.9550, 0.9259, 0.2713, 2.079),
    (64, 0.7020, 0.9918, 1.8438, 4.159),
    (512, 0.2251, 0.9992, 5.3660, 6.238),
    (4096, 0.0350, 0.9999, 8.1782, 8.318),
    (32768, 0.0045, 1.0000, 10.3792, 10.397),
    (2**20, 0.0001, 1.0000, 13.8624, 13.863),
]


@pytest.mark.parametrize("n,smax,ssmax,ent,logn", TABLE_2_4)
def test_ssmax_table(n, smax, ssmax, ent, logn):
    assert T.softmax_max_one_outlier(n) == pytest.approx(smax, abs=5e-5)
    assert T.ssmax_max_one_outlier(n, 0.43) == pytest.approx(ssmax, abs=5e-5)
    assert T.softmax_entropy_one_outlier(n) == pytest.approx(ent, abs=5e-5)
    assert math.log(n) == pytest.approx(logn, abs=5e-4)
    # closed forms agree with a dense softmax of the same logits
    if n <= 4096:
        z = np.full(n, -2.0)
        z[0] = 3.0
        assert P.entropy_from_scores(z) == pytest.approx(T.softmax_entropy_one_outlier(n), rel=1e-10)
        p = np.exp(z * T.ssmax_logit_scale(n) - (z * T.ssmax_logit_scale(n)).max())
        assert (p / p.sum()).max() == pytest.approx(T.ssmax_max_one_outlier(n), rel=1e-10)


def test_adaptive_temperature_and_figures():
    np.testing.assert_array_equal(T.adaptive_temperature_beta([0.0, 0.5]), 1.0)
    poly = np.polyval([-0.037, 0.481, -2.3, 4.917, -1.791], 3.0)
    assert T.adaptive_temperature_beta(3.0) == pytest.approx(max(poly, 1.0))
    fig = T.temperature_figure(n_max=100_000, floor_scale=8192, attn_scale=0.1)
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    x, y = np.asarray(fig.data[0].x), np.asarray(fig.data[0].y)
    np.testing.assert_allclose(y, T.llama4_attn_scale(x - 1))
    assert 8192 in x and 8191 in x  # the step edges are drawn exactly
    assert len(T.ssmax_figure().data) == 4


# --------------------------------------------------------------------------- entropy definitions
def test_uniform_rows_give_log_n_and_normalisation():
    n = np.array([1, 2, 16, 1024])
    h = np.array([P.entropy_from_scores(np.zeros(k)) for k in n])
    np.testing.assert_allclose(h, np.log(n), atol=1e-12)
    np.testing.assert_allclose(P.normalized_entropy(h, n), [0, 1, 1, 1])  # n = 1 -> 0 by definition
    np.testing.assert_allclose(P.kl_to_uniform(h, n), 0, atol=1e-12)
    assert P.normalized_entropy(0.0, 1) == 0.0 and P.kl_to_uniform(0.0, 1) == 0.0
    np.testing.assert_allclose(P.temperature_delta([1.0, 2.0], [1.5, 2.0]), [0.5, 0.0])


def test_entropy_from_scores_matches_definition_and_invariances():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 30)) * 3
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(P.entropy_from_scores(s), -(p * np.log(p)).sum(1), rtol=1e-12)
    np.testing.assert_allclose(P.entropy_from_scores(s + 100.0), P.entropy_from_scores(s), rtol=1e-10)
    masked = s.copy()
    masked[:, 10:] = -np.inf
    np.testing.assert_allclose(P.entropy_from_scores(masked), P.entropy_from_scores(s[:, :10]), rtol=1e-12)


def test_temperature_never_raises_entropy_and_chunk_starts_are_zero():
    """H(β = s(pos)) ≤ H(β = 1) row-wise, equal before the first step; chunk-start rows H = 0."""
    rng = np.random.default_rng(1)
    n, fs, chunk = 80, 16, 32
    s = rng.normal(size=(n, n)) * 2
    causal = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    beta = T.llama4_attn_scale(np.arange(n), floor_scale=fs, attn_scale=0.1)[:, None]
    h1, hb = P.entropy_from_scores(causal), P.entropy_from_scores(causal, beta)
    assert np.all(hb <= h1 + 1e-12)
    np.testing.assert_array_equal(hb[: fs - 1], h1[: fs - 1])
    assert np.all(P.temperature_delta(hb, h1)[fs:] > 0)
    i = np.arange(n)
    chunked = np.where((i[:, None] // chunk == i[None] // chunk) & (i[None] <= i[:, None]), s, -np.inf)
    h = P.entropy_from_scores(chunked)
    np.testing.assert_array_equal(h[::chunk], 0.0)
    np.testing.assert_allclose(P.normalized_entropy(h, i % chunk + 1)[::chunk], 0.0)


def test_binned_stats_streaming_equals_direct():
    rng = np.random.default_rng(2)
    pos = np.concatenate([np.arange(700), np.arange(300)])  # two documents
    v = rng.normal(size=len(pos))
    v[5] = np.nan  # ignored
    edges = P.linear_bin_edges(int(pos.max()), 64)
    acc = P.BinAccumulator(edges)
    for a in range(0, len(pos), 37):
        acc.update(v[a:a + 37], pos[a:a + 37])
    got = acc.frame()
    b = np.searchsorted(edges, pos, side="right") - 1
    want = pd.Series(v).groupby(b).agg(["count", "min", "mean", "max"])
    np.testing.assert_array_equal(got["count"], want["count"])
    for col in ("min", "mean", "max"):
        np.testing.assert_allclose(got[col], want[col])
    pd.testing.assert_frame_equal(P.binned_stats(v, pos, edges), got)
    np.testing.assert_array_equal(P.linear_bin_edges(9, 100), np.arange(11))  # unit bins


def test_collapsed_heads_threshold():
    flags = P.collapsed_heads([0.01, 0.049, 0.05, 0.5, np.nan])
    np.testing.assert_array_equal(flags, [True, True, False, False, False])
    assert P.COLLAPSE_THRESHOLD == 0.05 and P.COLLAPSE_MIN_KEYS == 16


# --------------------------------------------------------------------------------- store level
def _make_run(n_layers=4, n_heads=3, t=500, chunk=32, no_temp=True):
    """Layers alternate rope-chunked / nope-global; head 0 of layer 1 is collapsed (H = 0.01·ln n),
    every other head attends uniformly (H = ln n).  Two documents: positions restart at 300."""
    pos = np.concatenate([np.arange(300), np.arange(t - 300)]).astype(np.int32)
    kinds = ["rope-chunked/moe" if i % 2 == 0 else "nope-global/dense" for i in range(n_layers)]
    n_keys = np.stack([pos % chunk + 1 if i % 2 == 0 else pos + 1 for i in range(n_layers)]).astype(np.int32)
    ent = np.repeat(np.log(n_keys)[:, None, :], n_heads, axis=1).astype(np.float32)
    ent[1, 0] *= 0.01
    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    g.create_array("positions", data=pos)
    g.create_array("attention/n_keys", data=n_keys)
    g.create_array("attention/entropy", data=ent, chunks=(1, n_heads, 128))
    if no_temp:
        g.create_array("attention/entropy_no_temp", data=ent + 0.1 * (pos >= 100)[None, None].astype(np.float32))
    g.attrs["layer_kinds"] = kinds
    g.attrs["config"] = {"attention_chunk_size": chunk, "floor_scale": 16, "attn_scale": 0.1}
    return g, ent, n_keys, pos


def test_layer_head_summary_flags_the_collapsed_head():
    g, ent, nk, _ = _make_run()
    df = P.layer_head_summary(g, chunk_tokens=77)
    assert df[df["collapsed"]][["layer", "head"]].values.tolist() == [[1, 0]]
    ok = df[~df["collapsed"]]
    np.testing.assert_allclose(ok["normalized_mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(ok["kl_mean"], 0.0, atol=1e-5)
    long = nk[0] >= 16
    row = df.query("layer == 0 and head == 2").iloc[0]
    assert row["n_long"] == long.sum() and row["n_tokens"] == 500
    assert row["entropy_mean"] == pytest.approx(ent[0, 2].astype(np.float64).mean(), rel=1e-6)
    assert row["delta_mean"] == pytest.approx(0.1 * (200 + 100) / 500, rel=1e-4)  # pos ≥ 100 in both docs
    assert row["delta_max"] == pytest.approx(0.1, rel=1e-4)
    assert row["entropy_no_temp_mean"] == pytest.approx(row["entropy_mean"] + row["delta_mean"], rel=1e-6)
    assert row["kind"] == "rope-chunked/moe"
    g2, *_ = _make_run(no_temp=False)
    assert P.layer_head_summary(g2)["delta_mean"].isna().all()
    fig = P.layer_head_heatmap(df)
    assert isinstance(fig, go.Figure) and list(fig.data[1].x) == [0]


def test_position_profile_equals_direct_computation():
    g, ent, nk, pos = _make_run()
    prof = P.position_profile(g, [1, 3], heads=[1, 2], stat="normalized", n_bins=50, chunk_tokens=61)
    v = P.normalized_entropy(ent[[1, 3]][:, [1, 2]].astype(np.float64), nk[[1, 3]][:, None]).mean((0, 1))
    want = P.binned_stats(v, pos, P.linear_bin_edges(299, 50))
    for col in ("count", "min", "mean", "max"):
        np.testing.assert_allclose(prof[col], want[col], rtol=1e-6)
    assert "no_temp_mean" in prof and prof.attrs["stat"] == "normalized"
    raw = P.position_profile(g, 0, stat="entropy", n_bins=10_000)  # unit bins: exact per position
    assert len(raw) == 300
    np.testing.assert_allclose(raw["log_n_mean"][:40], np.log(np.arange(40) % 32 + 1), rtol=1e-6)
    np.testing.assert_allclose(raw["mean"], raw["log_n_mean"], rtol=1e-5)  # uniform attention
    delta = P.position_profile(g, 2, stat="delta", n_bins=300)
    np.testing.assert_allclose(delta["mean"], 0.1 * (np.arange(300) >= 100), atol=1e-5)
    with pytest.raises(ValueError):
        P.position_profile(g, 0, stat="bogus")
    g2, *_ = _make_run(no_temp=False)
    with pytest.raises(KeyError):
        P.position_profile(g2, 0, stat="delta")


def test_profile_by_kind_and_layer_kind_fallbacks():
    g, *_ = _make_run()
    prof = P.profile_by_kind(g, n_bins=20)
    assert set(prof) == {"rope-chunked", "nope-global"}
    rope = prof["rope-chunked"]  # uniform heads: 1 except the chunk-start rows (n = 1 -> 0)
    np.testing.assert_allclose(rope["max"], 1.0, rtol=1e-6)
    assert (rope["min"] == 0).sum() == len(range(0, 300, 32))

    class Run(dict):  # the minimal store contract: __getitem__ + .attrs
        attrs: dict = {}

    r = Run({k: np.asarray(g[k][:]) for k in ("positions", "attention/n_keys", "attention/entropy")})
    assert P.layer_kinds(r) == ["layer"] * 4
    # the writer's default layer_kinds is []: derive the schedule from the HF config instead
    cfg = {"num_hidden_layers": 4, "no_rope_layer_interval": 2, "attention_chunk_size": 32,
           "interleave_moe_layer_step": 2}
    r.attrs = {"layer_kinds": [], "config": cfg}
    assert P.layer_kinds(r) == ["rope-chunked/dense", "nope-global/moe"] * 2
    r.attrs = {"config": {"num_hidden_layers": 7}}  # a config for another model: generic labels
    assert P.layer_kinds(r) == ["layer"] * 4
    assert "no_temp_mean" not in P.position_profile(r, 0, n_bins=8)


def test_entropy_position_figure_marks_chunks_and_steps():
    g, *_ = _make_run()
    prof = P.position_profile(g, 1, n_bins=300)
    fig = P.entropy_position_figure(prof, chunk_size=32, floor_scale=16)
    names = [tr.name for tr in fig.data]
    for want in ("as run (mean)", "no temperature (mean)", "ln n (uniform)", "chunk boundary",
                 "temperature step"):
        assert want in names
    chunk = fig.data[names.index("chunk boundary")]
    assert sorted({x for x in chunk.x if x is not None and not np.isnan(x)}) == list(range(32, 300, 32))
    step = fig.data[names.index("temperature step")]
    assert min(x for x in step.x if x is not None and not np.isnan(x)) == 15


def test_committed_tokens_only_and_real_writer(tmp_path):
    g, ent, nk, pos = _make_run()
    g.attrs.update(n_tokens=300, n_docs=1)  # the second document is uncommitted
    g["attention/entropy"][:, :, 300:] = -5.0
    df = P.layer_head_summary(g)
    assert (df["n_tokens"] == 300).all() and (df["entropy_mean"] > 0).all()

    from workbench.store import RunWriter, open_run

    layout = {"n_layers": 2, "n_heads": 3, "moe_layer_index": [1], "top_k": 1, "n_experts": 4,
              "entropy": True}
    with RunWriter.create(tmp_path / "e.zarr", attrs={"layer_kinds": ["rope-chunked/dense",
                                                                      "nope-global/moe"]},
                          layout=layout) as w:
        for a, b in ((0, 300), (300, 500)):
            w.append({"tokens": np.zeros(b - a, np.int32), "attention/entropy": ent[:2, :, a:b],
                      "attention/entropy_no_temp": ent[:2, :, a:b] + 0.5,
                      "attention/n_keys": nk[:2, a:b]})
        w.finish()
    for run in (open_run(tmp_path / "e.zarr"), zarr.open_group(tmp_path / "e.zarr", mode="r")):
        df = P.layer_head_summary(run)
        assert df[df["collapsed"]][["layer", "head"]].values.tolist() == [[1, 0]]
        np.testing.assert_allclose(df["delta_mean"], 0.5, rtol=1e-5)
        prof = P.profile_by_kind(run, n_bins=50)
        assert set(prof) == {"rope-chunked", "nope-global"} and prof["nope-global"]["count"].sum() == 500


def test_probes_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, probes.routing, probes.routing_figures, probes.entropy, probes.temperature; "
            "assert 'torch' not in sys.modules, 'a probe imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))

"""The app's callbacks, called directly (no server, no browser): safe run paths, live recording,
routing / entropy views, the teaching callbacks, and speed on a 100K-token run (the Attribution tab:
test_app_attribution.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import plotly.graph_objects as go
import pytest

import workbench
from apps import teach_views as tv
from apps import views as v
from workbench.store import RunWriter

DOCS = [{"text": "The <b>router</b> & the experts: " + "abc " * 12, "domain": "prose", "id": "p0"},
        {"text": "def f(x):\n    return x * 2  # <script>\n" * 2, "domain": "code", "id": "c0"},
        {"text": "Chunked layers see 32 keys at most; NoPE layers see all of them.", "domain": "prose", "id": "p1"}]
PROBES = ("router", "router_logits", "entropy", "norms", "sink")


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    workbench.record(model, DOCS, d / "example.zarr", probes=PROBES, progress=False, model_source="tiny")
    return d


@pytest.fixture
def run(runs):
    return v.open_cached(v.resolve_run(runs, "example.zarr"))


# ------------------------------------------------------------------------------------ runs tab
@pytest.mark.parametrize("name", ["../example.zarr", "..", ".", "a/b", "/etc", "x\\y", ".hidden", "", None,
                                  "nope.zarr", "example.zarr/../example.zarr", "ex\x00ample"])
def test_resolve_run_rejects_anything_but_a_run_inside(runs, name):
    with pytest.raises(v.UserError):
        v.resolve_run(runs, name)


def test_resolve_run_rejects_symlink_out_of_runs_dir(runs, tmp_path):
    outside = tmp_path / "outside.zarr"
    outside.mkdir()
    (outside / "zarr.json").write_text("{}")
    link = runs / "link.zarr"
    os.symlink(outside, link)
    try:
        with pytest.raises(v.UserError, match="outside"):
            v.resolve_run(runs, "link.zarr")
    finally:
        link.unlink()
    assert v.resolve_run(runs, "example.zarr") == (runs / "example.zarr").resolve()


def test_runs_table_and_summary(runs, run, tmp_path):
    df = v.runs_table(runs)
    assert df["name"].tolist() == ["example.zarr"] and df["tokens"].iloc[0] == run.n_tokens
    assert v.runs_table(tmp_path / "missing").empty
    html_ = v.run_summary_html(run)
    assert "example.zarr" in html_ and "rope-chunked/moe" in html_ and "code, prose" in html_
    info = v.run_info(run)
    assert info["moe_layers"] == [0, 1, 3] and info["has_logits"] and len(info["docs"]) == 3


def test_summary_escapes_attributes(model, tmp_path):
    workbench.record(model, ["hi"], tmp_path / "x.zarr", probes=("router",), progress=False,
                     model_source="<script>alert(1)</script>")
    html_ = v.run_summary_html(v.open_cached(v.resolve_run(tmp_path, "x.zarr")))
    assert "<script>" not in html_ and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_


def test_record_live_limits_and_result(model, tmp_path):
    lock = threading.Lock()
    with pytest.raises(v.UserError, match="Type a prompt"):
        v.record_live(model, lock, tmp_path, "   ")
    with pytest.raises(v.UserError, match=f"limit is {v.MAX_PROMPT_CHARS}"):
        v.record_live(model, lock, tmp_path, "x" * (v.MAX_PROMPT_CHARS + 1))
    with pytest.raises(v.UserError, match="New tokens"):
        v.record_live(model, lock, tmp_path, "hi", v.MAX_NEW_TOKENS + 1)
    steps = []
    name, text = v.record_live(model, lock, tmp_path, "Hello MoE", 3, progress=lambda f, d: steps.append((f, d)))
    assert name.startswith("@") and "/live-" in name and text.startswith("<|begin_of_text|>Hello MoE")
    assert not v.runs_table(tmp_path)["name"].tolist()        # private to the session until published
    assert steps[-1] == (1.0, "done") and any("generating token 3/3" in d for _, d in steps)
    r = v.open_cached(v.resolve_run(tmp_path, name))
    assert r.n_tokens == len(model.tokenizer.encode("Hello MoE")) + 3
    assert all(r.has(n) for n in ("router/experts", "router/logits", "attention/entropy", "attention/sink_mass"))


def test_concurrent_live_runs_are_separate(model, tmp_path):
    lock, names, errors = threading.Lock(), [], []

    def user(prompt):
        try:
            names.append(v.record_live(model, lock, tmp_path, prompt)[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=user, args=(p,)) for p in ("first user", "second user here")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(names)) == 2
    lengths = sorted(v.open_cached(v.resolve_run(tmp_path, n)).n_tokens for n in names)
    assert lengths == sorted(len(model.tokenizer.encode(p)) for p in ("first user", "second user here"))


# ------------------------------------------------------------------------------------ routing
def test_routing_tokens_match_store_and_grid_hover(run):
    tok = v.run_tokenizer(run)
    hl, colors, fig, t0 = v.routing_tokens(run, 1, 2, 16, 1, tok)
    sl = run.doc_slice(1)
    assert t0 == sl.start + 2 and len(hl) == 16
    experts = run.read("router/experts", layer=1)[t0:t0 + 16, 0]
    assert [lab for _, lab in hl] == [f"E{e}" for e in experts]
    assert "".join(s for s, _ in hl) == "".join(tok.token_strings(run.tokens()[t0:t0 + 16]))
    assert set(colors) == {f"E{i}" for i in range(4)}
    assert isinstance(fig, go.Figure) and "logits" in fig.data[0].hovertemplate
    assert all("<" not in str(t) for t in fig.layout.xaxis.ticktext)      # token text escaped in plotly
    with pytest.raises(v.UserError, match="not an MoE layer"):
        v.routing_tokens(run, 0, 0, 8, 2, tok)


def test_window_clamped_to_document(run):
    t0, t1 = v.doc_window(run, 2, 10_000, 10_000)
    sl = run.doc_slice(2)
    assert t0 == sl.stop - 1 and t1 == sl.stop
    t0, t1 = v.doc_window(run, 0, 0, 10_000)
    assert t1 - t0 == min(v.MAX_WINDOW, run.doc_slice(0).stop)


def test_token_path_view_and_escaping(run):
    t = int(np.flatnonzero(run.tokens() == ord("<"))[0])
    fig, table = v.token_path_view(run, t, v.run_tokenizer(run))
    path_x = [list(tr.x) for tr in fig.data if isinstance(tr, go.Scatter)][0]
    assert path_x == run.array("router/experts")[:, t, 0].tolist()
    assert "&#x27;&lt;&#x27;" in table and "'<'" not in table
    assert "&lt;" in fig.layout.title.text


def test_load_transition_domain_consecutive_views(run):
    bar, heat, table = v.load_views(run, 3)
    assert "layer 3" in bar.layout.title.text and table["layer"].tolist() == [0, 1, 3]
    fig, nmi = v.transition_view(run, 0, 3)
    assert np.asarray(fig.data[0].customdata).sum() == run.n_tokens and len(nmi) == 2
    fig, msg = v.domain_view(run, 1)
    assert fig is not None and "code, prose" in msg
    assert isinstance(v.consecutive_view(run), go.Figure)
    with pytest.raises(v.UserError):
        v.transition_view(run, 0, 2)


def test_domain_view_without_domains(model, tmp_path):
    workbench.record(model, ["one doc", "two docs"], tmp_path / "n.zarr", probes=("router",), progress=False)
    fig, msg = v.domain_view(v.open_cached(v.resolve_run(tmp_path, "n.zarr")), 0)
    assert fig is None and "no domain labels" in msg


# ------------------------------------------------------------------------------------ entropy
def test_entropy_views(run):
    groups = dict((val, lab) for lab, val in v.layer_groups(run))
    assert {"kind:rope-chunked", "kind:nope-global", "layer:0", "layer:3"} <= set(groups)
    fig = v.entropy_profile_view(run, "kind:nope-global", "all", "entropy", 64)
    names = [t.name for t in fig.data]
    assert "no temperature (mean)" in names and "ln n (uniform)" in names and "temperature step" in names
    fig = v.entropy_profile_view(run, "layer:0", "2", "normalized", 64)
    assert "chunk boundary" in [t.name for t in fig.data] and "head 2" in fig.layout.title.text
    assert isinstance(v.entropy_profile_view(run, "layer:1", "all", "delta", 16), go.Figure)
    for bad in (("layer:9", "all", "entropy"), ("kind:x", "all", "entropy"), ("layer:0", "7", "entropy"),
                ("layer:0", "all", "bogus")):
        with pytest.raises(v.UserError):
            v.entropy_profile_view(run, *bad)
    fig, df = v.layer_head_view(run, "delta_mean")
    assert len(df) == 16 and isinstance(fig, go.Figure)


def _big_run(path, n_docs=25, doc_len=4096):
    """A 102,400-token run with the tiny layout (random values; only speed matters here)."""
    rng = np.random.default_rng(0)
    layout = dict(n_layers=4, n_heads=4, moe_layer_index=[0, 1, 3], top_k=1, n_experts=4, router=True,
                  router_logits=True, entropy=True)
    attrs = dict(model_source="tiny", config=workbench.preset("tiny").to_hf(),
                 layer_kinds=workbench.preset("tiny").layer_kinds())
    with RunWriter.create(path, attrs=attrs, layout=layout) as w:
        for i in range(n_docs):
            n = np.minimum(np.arange(doc_len) % 32 + 1, np.arange(doc_len) + 1)
            nk = np.stack([n, np.arange(1, doc_len + 1)] * 2).astype(np.int32)
            w.append({"tokens": rng.integers(0, 256, doc_len, dtype=np.int32), "doc_id": f"d{i}",
                      "router/experts": rng.integers(0, 4, (3, doc_len, 1), dtype=np.int16),
                      "router/weights": rng.random((3, doc_len, 1), dtype=np.float32),
                      "router/logits": rng.standard_normal((3, doc_len, 4), dtype=np.float32),
                      "attention/entropy": rng.random((4, 4, doc_len), dtype=np.float32) * 3,
                      "attention/entropy_no_temp": rng.random((4, 4, doc_len), dtype=np.float32) * 3,
                      "attention/n_keys": nk})
        w.finish()


def test_views_fast_on_100k_token_run(tmp_path):
    _big_run(tmp_path / "big.zarr")
    run = v.open_cached(v.resolve_run(tmp_path, "big.zarr"))
    assert run.n_tokens == 102_400
    timings = {}
    for name, call in [
        ("profile", lambda: v.entropy_profile_view(run, "kind:nope-global", "all", "entropy", 2048)),
        ("profile_head", lambda: v.entropy_profile_view(run, "layer:0", "1", "normalized", 512)),
        ("layer_head", lambda: v.layer_head_view(run)),
        ("tokens", lambda: v.routing_tokens(run, 20, 100, 256, 1, v.run_tokenizer(run))),
        ("loads", lambda: v.load_views(run, 0)),
        ("transitions", lambda: v.transition_view(run, 0, 3)),
        ("path", lambda: v.token_path_view(run, 99_999)),
    ]:
        t = time.perf_counter()
        call()
        timings[name] = time.perf_counter() - t
    slow = {k: round(s, 2) for k, s in timings.items() if s > 2.0}
    assert not slow, f"views over 2 s on a 100K-token run: {slow} (all: {timings})"


# ------------------------------------------------------------------------------------ teaching callbacks
def test_moe_journey_view_reacts_to_edits(model):
    lock = threading.Lock()
    prompt = "Experts and a shared expert."
    j0, n0, s0 = tv.moe_journey_view(model, lock, prompt, 3, 1)
    assert "KL(before‖after) = 0.00000" in s0 and "Edits: <code>none</code>" in s0
    chosen = int(j0.data[2].text[0].split(":")[0][1:])                # "E<id>: <gate>" in the sigmoid panel
    j1, n1, s1 = tv.moe_journey_view(model, lock, prompt, 3, 1, mask=[f"E{chosen}"], drop_shared=True)
    assert int(j1.data[2].text[0].split(":")[0][1:]) != chosen
    assert "mask_experts" in s1 and "drop_shared" in s1
    assert list(n1.data[1].y) != list(n0.data[1].y)                  # the distribution moved
    _, _, s2 = tv.moe_journey_view(model, lock, prompt, 3, 1, top_k=2, everywhere=True)
    assert "top_k=2" in s2
    with pytest.raises(v.UserError, match="fewer than"):
        tv.moe_journey_view(model, lock, prompt, 3, 1, mask=["E0", "E1", "E2", "E3"])
    with pytest.raises(v.UserError, match="dense"):
        tv.moe_journey_view(model, lock, prompt, 3, 2)
    with pytest.raises(v.UserError, match="position"):
        tv.moe_journey_view(model, lock, prompt, 999, 1)
    with pytest.raises(v.UserError, match="keep it under"):
        tv.moe_journey_view(model, lock, "x" * 400, 0, 1)


def test_prompt_tokens_escaped(model):
    n, chips = tv.prompt_tokens(model, "a<b>")
    assert n == 5 and "&lt;" in chips and "<b>" not in chips


def test_params_view(model):
    fig, md = tv.params_view("scout", 16, 1)
    assert "107.77B total" in md and "17.17B active" in md and isinstance(fig, go.Figure)
    fig2, md2 = tv.params_view("maverick", 128, 2)
    assert "top-2 of 128" in fig2.layout.title.text
    with pytest.raises(v.UserError, match="cannot exceed"):
        tv.params_view("tiny", 2, 4)
    with pytest.raises(v.UserError, match="Unknown preset"):
        tv.params_view("../../etc", 2, 1)


def test_irope_views(model):
    fig = tv.mask_view(40, 8)
    assert np.asarray(fig.data[0].z).sum(1)[-1] == 8 and np.asarray(fig.data[1].z).sum(1)[-1] == 40
    with pytest.raises(v.UserError):
        tv.mask_view(10_000, 8)
    assert isinstance(tv.rope_view(model.config, 1, 4, 2), go.Figure)
    with pytest.raises(v.UserError, match="pair"):
        tv.rope_view(model.config, 99, 4, 2)
    fig = tv.temperature_view(16, 0.2)
    assert "floor_scale=16" in fig.data[0].name
    with pytest.raises(v.UserError):
        tv.temperature_view(0, 0.1)


def test_live_entropy_view_tuning_on_off(model):
    lock = threading.Lock()
    on = tv.live_entropy_view(model, lock, 96, True, 16, 0.5)
    off = tv.live_entropy_view(model, lock, 96, False, 16, 0.5)

    def curve(fig, name):
        return np.asarray([t for t in fig.data if t.name == name][0].y, dtype=float)
    run_on, free_on = curve(on, "as run (mean)"), curve(on, "no temperature (mean)")
    run_off, free_off = curve(off, "as run (mean)"), curve(off, "no temperature (mean)")
    np.testing.assert_allclose(run_off, free_off, atol=1e-6)      # tuning off: nothing to undo
    np.testing.assert_allclose(free_on, free_off, atol=1e-5)      # same counterfactual either way
    np.testing.assert_allclose(run_on[:15], free_on[:15], atol=1e-6)   # s(pos) = 1 below floor_scale − 1
    assert (run_on[20:] < free_on[20:] - 1e-4).all()             # sharper past the first step
    assert "temperature step" in [t.name for t in on.data]
    delta = curve(on, "ΔH = H(no temp) − H (right axis)")
    np.testing.assert_allclose(delta, free_on - run_on, atol=1e-9)
    with pytest.raises(v.UserError):
        tv.live_entropy_view(model, lock, 1, True, 16, 0.1)


def test_guard_turns_failures_into_escaped_messages():
    gr = pytest.importorskip("gradio")
    from apps.workbench_app import guard

    def user_error():
        raise v.UserError("bad <b>name</b>")

    def crash():
        raise RuntimeError("boom")
    with pytest.raises(gr.Error) as e:
        guard(user_error)()
    assert e.value.message == "bad &lt;b&gt;name&lt;/b&gt;"
    with pytest.raises(gr.Error, match="Internal error .*boom.*still running"):
        guard(crash)()
    assert guard(lambda x: x + 1)(1) == 2


def test_transition_sankey_views_equal_the_matrix(run):
    from probes import routing as pr

    heat, _ = v.transition_view(run, 0, 3, view="matrix")
    sankey, nmi = v.transition_view(run, 0, 3, view="sankey")
    counts = np.asarray(heat.data[0].customdata)
    s = sankey.data[0]
    assert s.type == "sankey" and sum(s.link.value) == run.n_tokens == counts.sum() and len(nmi) == 2
    e = run.layout.n_experts
    assert {(a, b - e): n for a, b, n in zip(s.link.source, s.link.target, s.link.value)} == \
        {(a, b): counts[a, b] for a, b in zip(*np.nonzero(counts))}
    path, _ = v.transition_view(run, 0, 3, view="path")          # MoE layers 0 → 1 → 3
    p = path.data[0]
    assert len(p.node.label) == 3 * e and sum(p.link.value) == 2 * run.n_tokens
    assert "layer 0 → layer 1 → layer 3" in path.layout.title.text
    first = {(a, b - e): n for a, b, n in zip(p.link.source, p.link.target, p.link.value) if a < e}
    c01 = pr.transition_matrix(run, 0, 1)
    assert first == {(a, b): c01[a, b] for a, b in zip(*np.nonzero(c01))}
    back, _ = v.transition_view(run, 3, 0, view="path")           # reversed direction: 3 → 1 → 0
    assert "layer 3 → layer 1 → layer 0" in back.layout.title.text
    with pytest.raises(v.UserError, match="Unknown transition view"):
        v.transition_view(run, 0, 3, view="chord")


def test_a_multimodal_models_run_reads_its_text_config(tmp_path):
    """Image chat records with the multimodal model: its run's config nests the text config."""
    from conftest import random_image

    from apps import chat_views as cv

    vision = workbench.load_model("tiny-vision")
    turn = cv.chat_turn(vision, threading.Lock(), tmp_path, None, "", "What?", 2, 0.0, image=random_image(),
                        model_source="tiny-vision")
    run = v.open_cached(v.resolve_run(tmp_path, turn.run))
    info = v.run_info(run)
    cfg = vision.config.text_config
    assert (info["chunk_size"], info["floor_scale"]) == (cfg.attention_chunk_size, cfg.floor_scale)
    assert f"{cfg.hidden_size} / {cfg.vocab_size}" in v.run_summary_html(run)
    assert v.run_tokenizer(run, vision.tokenizer) is not None
    fig, _ = v.transition_view(run, cfg.moe_layer_index[0], cfg.moe_layer_index[-1], view="sankey")
    assert sum(fig.data[0].link.value) == run.n_tokens

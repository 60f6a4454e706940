"""The linked selection's other sources and targets (issue 18 §2), without a browser: token references
from the JS bridge, a chat turn's reply tokens, attribution-table rows with their image patches, and
the hover preview line (apps/selection_sources.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import random_image

import workbench
from apps import chat_views as cv
from apps import selection_sources as ss
from apps import selection_views as sv
from apps import views as v
from workbench.store import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    workbench.record(model, [{"text": "The river bends twice before the mill.", "id": "a"},
                             {"text": "def f(x): return x", "id": "b"}], d / "r.zarr",
                     probes=("router", "entropy"), progress=False, model_source="tiny")
    return open_run(d / "r.zarr")


def test_references_select_a_token_of_the_named_run_or_the_open_one(run):
    get = {"r.zarr": run}.__getitem__
    assert ss.parse_ref("r.zarr#5", None) == ("r.zarr", 5)
    assert ss.parse_ref("#7", "r.zarr") == ("r.zarr", 7)
    assert ss.parse_ref("@ab/chat-1.zarr#3", None) == ("@ab/chat-1.zarr", 3)    # a session's private run
    sel = ss.select_ref("#4", "r.zarr", get)
    assert sel == sv.make_selection("r.zarr", 4) and sel["locked"]
    assert sv.check_selection(run, sel) == 4
    for bad, match in (("r.zarr#x", "expected RUN#TOKEN"), ("5", "expected RUN#TOKEN"), ("#1", "names no run")):
        with pytest.raises(v.UserError, match=match):
            ss.select_ref(bad, None, get)
    with pytest.raises(v.UserError, match=rf"outside run r.zarr \(0–{run.n_tokens - 1}\)"):
        ss.select_ref(f"#{run.n_tokens}", "r.zarr", get)
    with pytest.raises(v.UserError, match="outside"):
        ss.select_ref("#-1", "r.zarr", get)


def test_hover_preview_shows_path_and_entropy_without_selecting(run, model):
    t = int(run.doc_offsets[1]) + 2
    line = ss.preview_html(run, t, model.tokenizer)
    ex = np.asarray(run.array("router/experts")[:, t, 0])
    path = " → ".join(f"L{li}:E{int(e)}" for li, e in zip(run.layout.moe_layer_index, ex))
    h = np.asarray(run.array("attention/entropy")[:, :, t], np.float64).mean(axis=1)
    assert f"token #{t}" in line and "(document 1, position 2)" in line and "click to select" in line
    assert path.replace(">", "&gt;") in line
    assert "mean H per layer " + " ".join(f"{x:.2f}" for x in h) in line
    assert ss.preview_html(run, None) == "" and ss.preview_html(None, 3) == ""
    with pytest.raises(v.UserError, match="outside"):
        ss.preview_html(run, run.n_tokens)


def test_chat_reply_tokens_map_to_the_chat_runs_global_indices(model, tmp_path):
    lock = threading.Lock()
    first = cv.chat_turn(model, lock, tmp_path, None, "", "Hello there", 5)
    second = cv.chat_turn(model, lock, tmp_path, first.session, "", "And again", 4)
    run = v.open_cached(v.resolve_run(tmp_path, second.run))
    strip, base = ss.chat_reply_tokens(run, second.doc, second.recording.n_prompt, model.tokenizer)
    assert second.doc == 1 and base == int(run.doc_offsets[1]) + second.recording.n_prompt
    new = second.recording.new_ids
    assert len(strip) == len(new) == int(run.doc_offsets[2]) - base
    assert [s for s, _ in strip] == v.token_text(model.tokenizer, new)
    assert np.array_equal(run.array("tokens")[base:base + len(new)], new)      # the strip's i-th token = base + i
    ex = np.asarray(run.array("router/experts")[0, base:base + len(new), 0])
    assert [lab for _, lab in strip] == [f"E{int(e)}" for e in ex]
    fig = ss.chat_figure_meta(cv.turn_figures(model, second)[0], second.run, base)
    assert fig.layout.meta == {"wb_token_offset": base, "wb_run": second.run}
    sel = ss.select_ref(f"{second.run}#{base + 1}", None, lambda n: v.open_cached(v.resolve_run(tmp_path, n)))
    assert sv.check_selection(run, sel) == base + 1
    assert f"#{base + 1}" in sv.selection_html(run, sel, model.tokenizer)
    with pytest.raises(v.UserError, match="no turn 2"):
        ss.chat_reply_tokens(run, 2, 0)
    with pytest.raises(v.UserError, match="fewer than"):
        ss.chat_reply_tokens(run, 0, 10_000)


@pytest.fixture(scope="module")
def attribution(tmp_path_factory):
    from apps import attribution_views as av
    from probes.attribution import attribute

    vm = workbench.load_model("tiny-vision")
    d = tmp_path_factory.mktemp("attr")
    for key, r in attribute(vm, "<|image|>What is it?", random_image(), " cat", methods="gxi").items():
        r.save(d / "a.zarr", key)
    group = av.method_choices(d, "a.zarr")[0][1]
    return d, group, av.result_dataset(d, "a.zarr", group)


def test_attribution_row_selects_the_token_and_its_patch(attribution, run):
    from apps import attribution_views as av

    d, group, ds = attribution
    table = av.scores_table(ds, 0, 0)
    row = table.iloc[0]
    sel = ss.attribution_selection(ds, "a.zarr", group, row["position"])
    k = int(row["image token"])
    assert sel["token"] == int(ds["token_position"].values[k]) and sel["image_token"] == k
    assert sel["tile"] == row["tile"] and (sel["row"], sel["col"]) == (row["row"], row["col"])
    assert sel["box"] == [int(x) for x in ds["pixel_box"].values[k]]
    assert ", ".join(map(str, sel["box"])) == row["pixels x0,y0,x1,y1"]
    bar = sv.selection_html(run, sel)
    assert f"#{sel['token']}" in bar and "a.zarr" in bar and row["tile"] in bar and "locked" in bar
    assert sv.check_selection(run, sel) is None           # not a token of a recorded run: those views ignore it
    with pytest.raises(v.UserError, match="not an image token"):
        ss.attribution_selection(ds, "a.zarr", group, 0)
    with pytest.raises(v.UserError, match="Not a token position"):
        ss.attribution_selection(ds, "a.zarr", group, "x")


def test_patch_outline_on_the_heatmap(attribution):
    from apps import attribution_views as av

    d, group, ds = attribution
    glob = np.flatnonzero(ds["is_global"].values & (ds["pixel_box"].values[:, 0] >= 0))[0]
    local = np.flatnonzero(~ds["is_global"].values & (ds["pixel_box"].values[:, 0] >= 0))[0]
    for k, own in ((local, "x"), (glob, "x2")):
        fig = av.attribution_view(d, "a.zarr", group, 0, 0)[0]
        sel = ss.attribution_selection(ds, "a.zarr", group, ds["token_position"].values[k])
        fig = ss.highlight_patch(fig, sel, "a.zarr", 0)
        rects = [s for s in fig.layout.shapes if s.type == "rect"]
        assert sorted(s.xref for s in rects) == ["x", "x2"]               # both panels, same pixels
        x0, y0, x1, y1 = (int(x) for x in ds["pixel_box"].values[k])
        assert all((s.x0, s.y0, s.x1, s.y1) == (x0, y0, x1, y1) for s in rects)
        assert next(s for s in rects if s.xref == own).line.dash == "solid"    # its own panel: solid
        assert next(s for s in rects if s.xref != own).line.dash == "dash"
        for other in (None, sv.make_selection("a.zarr", int(ds["token_position"].values[k])),
                      {**sel, "run": "b.zarr"}, {**sel, "image": 1}):
            again = av.attribution_view(d, "a.zarr", group, 0, 0)[0]
            assert not ss.highlight_patch(again, other, "a.zarr", 0).layout.shapes
    pad = np.flatnonzero(ds["pixel_box"].values[:, 0] < 0)
    if len(pad):                                           # padding-only tokens own no pixels: no outline
        sel = ss.attribution_selection(ds, "a.zarr", group, ds["token_position"].values[pad[0]])
        assert sel["box"] is None and "padding only" in ss.attribution_html(sel)
        assert not ss.highlight_patch(av.attribution_view(d, "a.zarr", group, 0, 0)[0], sel, "a.zarr", 0).layout.shapes


def test_a_private_runs_selection_is_its_own(model, tmp_path):
    """A chat/live run is named "@<token>/x.zarr" in the session: its selection must reach its views."""
    turn = cv.chat_turn(model, threading.Lock(), tmp_path, None, "", "Hi", 3)
    run = v.open_cached(v.resolve_run(tmp_path, turn.run))
    assert turn.run.startswith("@") and sv.check_selection(run, sv.make_selection(turn.run, 2)) == 2
    token, base = turn.run[1:].split("/", 1)
    for other in (base, f"@{'0' * 32}/{base}", f"@{token}/other.zarr"):
        assert sv.check_selection(run, sv.make_selection(other, 2)) is None


def test_an_image_token_of_a_chat_turn_has_its_patch(tmp_path):
    """A turn with an image keeps its patch map in the run's generation note; selecting one of its image
    tokens names the patch (bar) and outlines it on the session's image (Chat tab)."""
    from workbench.chat import prepare_chat

    vm = workbench.load_model("tiny-vision")
    img = random_image()
    turn = cv.chat_turn(vm, threading.Lock(), tmp_path, None, "", "What is <|image|> this?", 2, image=img,
                        prompt_format="plain")
    run = v.open_cached(v.resolve_run(tmp_path, turn.run))
    note = run.attrs["generations"]["turn-0"]
    c = prepare_chat(vm, [{"role": "user", "content": cv.user_content("What is <|image|> this?", img)}],
                     prompt_format="plain")
    pm = c.prepared.patch_map
    assert note["image_token_positions"] == pm.position.tolist() and len(note["image_layouts"]) == 1
    k = int(np.flatnonzero(~pm.padding_only & ~pm.is_global)[3])
    t = int(run.doc_offsets[0]) + int(pm.position[k])
    patch = ss.run_image_patch(run, t)
    want = [int(np.floor(pm.box[k, 0])), int(np.floor(pm.box[k, 1])), int(np.ceil(pm.box[k, 2])),
            int(np.ceil(pm.box[k, 3]))]
    assert patch["box"] == want and (patch["row"], patch["col"]) == (int(pm.row[k]), int(pm.col[k]))
    assert patch["tile"] == f"local {int(pm.tile[k])}" and patch["prompt_format"] == "plain"
    assert ss.run_image_patch(run, 0) is None                              # <|begin_of_text|>: not an image token
    bar = sv.selection_html(run, sv.make_selection(turn.run, t), vm.tokenizer)
    assert f"image token: image 0 of its turn, local {int(pm.tile[k])} tile" in bar
    images = ss.turn_images(turn.session, 0, "plain")
    assert len(images) == 1 and images[0].size == img.size
    fig = ss.image_patch_figure(images[0], patch)
    rect = fig.layout.shapes[0]
    assert [rect.x0, rect.y0, rect.x1, rect.y1] == want and fig.data[0].type == "image"
    assert ss.image_patch_figure(None, patch) is None and ss.image_patch_figure(images[0], None) is None


def test_turn_images_follow_the_prompt_format():
    a, b = object(), object()
    s = {"messages": [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "x"}]},
                      {"role": "assistant", "content": "r"}, {"role": "user", "content": "y"},
                      {"role": "assistant", "content": "r"},
                      {"role": "user", "content": [{"type": "image", "image": b}]}]}
    assert ss.turn_images(s, 0) == [a] and ss.turn_images(s, 1) == [a] and ss.turn_images(s, 2) == [a, b]
    assert ss.turn_images(s, 1, "plain") == [a] and ss.turn_images(s, 2, "plain") == [b]
    assert ss.turn_images(s, 3) == [] and ss.turn_images(None, 0) == []

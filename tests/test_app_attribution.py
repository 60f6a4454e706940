"""The Attribution tab's callbacks (apps/attribution_views.py), called directly on the random tiny-vision
model, CPU, fp32: listing attribution runs safely, the viewer (heatmap over the stored / supplied / no
image, tables, IG completeness, method attributes, escaping), upload limits, the compute panel (a new
run per call, written atomically, honest refusal on a text-only model), and the app wiring for both."""

from __future__ import annotations

import base64
import io
import os
import threading

import numpy as np
import plotly.graph_objects as go
import pytest
from conftest import random_image
from PIL import Image

import workbench
from apps import attribution_views as av
from apps import views as v
from probes.attribution import attribute

PROMPT = "<|image|>What is it?"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny-vision")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    # 100×80: a 2×2 canvas of 56-px tiles + a global tile = 20 image tokens
    path = tmp_path_factory.mktemp("img") / "img.png"
    random_image().save(path)
    return path


@pytest.fixture(scope="module")
def runs(model, image_file, tmp_path_factory):
    """computed (by the tab, image stored), cli.zarr (library results only: no image, plus attention),
    text.zarr (a recorded run without attributions)."""
    d = tmp_path_factory.mktemp("runs")
    name, summary = av.compute_attribution(model, threading.Lock(), d, str(image_file), "What is it?", " <b>&",
                                           ["ig", "gxi", "ablation"], 8, "mean", model_source="tiny-vision")
    res = attribute(model, PROMPT, Image.open(image_file), "ab", methods="gxi", attention=True)
    for key, r in res.items():
        r.save(d / "cli.zarr", key)
    workbench.record(model.language_model, [[1, 2, 3, 4]], d / "text.zarr", probes=("router",), progress=False)
    return {"dir": d, "computed": name, "summary": summary, "cli": res}


# ------------------------------------------------------------------------------------ listing
def test_lists_only_runs_with_attributions(runs, tmp_path):
    d = runs["dir"]
    names = av.attribution_runs(d)
    assert set(names) == {runs["computed"], "cli.zarr"}            # text.zarr has none
    assert not any(p.name.startswith(".tmp-") for p in d.iterdir())
    assert av.attribution_runs(tmp_path / "missing") == []
    outside = tmp_path / "outside.zarr"          # an attribution store reached by a symlink: not listed
    runs["cli"]["gxi"].save(outside, "gxi")
    assert av.attribution_runs(tmp_path) == ["outside.zarr"]
    link = d / "link.zarr"
    os.symlink(outside, link)
    try:
        assert "link.zarr" not in av.attribution_runs(d)
        with pytest.raises(v.UserError, match="outside"):
            av.method_choices(d, "link.zarr")
    finally:
        link.unlink()


@pytest.mark.parametrize("name", ["../cli.zarr", "..", "a/b", ".hidden", "", None, "text.zarr", "nope.zarr"])
def test_bad_run_names_are_refused(runs, name):
    with pytest.raises(v.UserError):
        av.method_choices(runs["dir"], name)


def test_method_choices_and_controls(runs):
    d, name = runs["dir"], runs["computed"]
    methods = av.method_choices(d, name)
    groups = [g for _, g in methods]
    assert groups[:2] == ["attribution/ig", "attribution/gxi"]
    assert set(groups) == {"attribution/ig", "attribution/gxi", "attribution/ablation_token",
                           "attribution/ablation_tile"}
    labels = dict((g, lab) for lab, g in methods)
    assert "integrated gradients" in labels["attribution/ig"] and "8 steps" in labels["attribution/ig"]
    assert "per tile" in labels["attribution/ablation_tile"]
    c = av.attribution_controls(d, name, "attribution/gxi", 2, 0)
    assert c["group"] == "attribution/gxi" and c["target"] == 2 and c["images"] == [("image 0", 0)]
    assert len(c["targets"]) == 5 and c["targets"][1][0].startswith("1: '<'")   # byte tokens of " <b>&"
    c = av.attribution_controls(d, name, "attribution/nope", 99, 5)       # invalid → valid defaults
    assert (c["group"], c["target"], c["image"]) == ("attribution/ig", 0, 0)
    cli = av.method_choices(d, "cli.zarr")
    assert "NOT an attribution" in dict((g, lab) for lab, g in cli)["attribution/attention"]


# ------------------------------------------------------------------------------------ the view
def _uri_image(fig) -> Image.Image:
    src = next(t for t in fig.data if t.type == "image").source
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_view_of_a_computed_run(runs, image_file):
    d, name = runs["dir"], runs["computed"]
    fig, info, targets, scores, mass = av.attribution_view(d, name, "attribution/ig", 1, 0, 0.6)
    kinds = [t.type for t in fig.data]
    assert kinds == ["image", "heatmap", "image", "heatmap"]              # local tiles + global tile
    assert [a.text for a in fig.layout.annotations][:2] == ["local tiles (stitched, padding cropped)",
                                                           "global tile (whole image in one tile)"]
    assert fig.data[1].opacity == 0.6 and fig.data[1].zmid == 0
    assert np.array_equal(np.asarray(_uri_image(fig).convert("RGB")), np.asarray(Image.open(image_file)))
    assert "stored with the run" in info and "grey canvas" not in info
    assert "**baseline** mean" in info and "**steps** 8" in info and "**routing** pinned" in info
    assert "IG completeness error" in info and mass is None
    ds = av._dataset(av._run_path(d, name), "attribution/ig")
    err = np.abs(ds["delta"].values) / np.abs(ds["logprob"].values - ds["baseline_logprob"].values)
    assert f"**{err[1]:.2%}**" in info
    assert targets["completeness error"].tolist() == [f"{e:.2%}" for e in err]
    assert len(scores) == 20 and set(scores["tile"]) == {"local 0", "local 1", "local 2", "local 3", "global"}
    a = np.abs(scores["score"].to_numpy())
    assert (np.diff(a) <= 1e-9).all()                                      # ordered by |score|
    np.testing.assert_allclose(np.sort(scores["score"].to_numpy()),
                               np.sort(ds["scores"].values[1].astype(np.float64)), rtol=1e-3)


def test_view_escapes_token_strings(runs):
    d, name = runs["dir"], runs["computed"]
    fig, info, targets, _, _ = av.attribution_view(d, name, "attribution/gxi", 1, 0)   # target 1 is "<"
    assert "<code>&#x27;&lt;&#x27;</code>" in info
    assert "<b>" not in info and "&lt;b&gt;&amp;" in info                              # the stored target
    assert "“&lt;”" in fig.layout.title.text
    assert "IG completeness" not in info                                               # gxi has none


def test_view_without_a_stored_image(runs, image_file, tmp_path):
    d = runs["dir"]
    fig, info, _, _, mass = av.attribution_view(d, "cli.zarr", "attribution/gxi", 0, 0)
    assert "grey canvas" in info
    grey = np.asarray(_uri_image(fig).convert("RGB"))
    assert (grey == 206).all()
    fig, info, *_ = av.attribution_view(d, "cli.zarr", "attribution/gxi", 0, 0, override=str(image_file))
    assert "the image you supplied" in info and not (np.asarray(_uri_image(fig).convert("RGB")) == 206).all()
    wrong = tmp_path / "wrong.png"
    Image.new("RGB", (50, 40)).save(wrong)
    with pytest.raises(v.UserError, match="100×80"):
        av.attribution_view(d, "cli.zarr", "attribution/gxi", 0, 0, override=str(wrong))


def test_attention_result_is_labelled_and_shows_mass(runs):
    fig, info, _, _, mass = av.attribution_view(runs["dir"], "cli.zarr", "attribution/attention", 1, 0)
    assert "NOT an attribution" in info and "NOT an attribution" in fig.layout.title.text
    assert isinstance(mass, go.Figure) and mass.data[0].type == "heatmap"


@pytest.mark.parametrize("args, match", [
    (("attribution/../x", 0, 0), "no result"),          # only the run's own result groups are read
    (("attribution/occlusion_token", 0, 0), "no result"),
    (("attribution/ig", 7, 0), "outside"),
    (("attribution/ig", 0, 3), "outside")])
def test_view_rejects_bad_selections(runs, args, match):
    with pytest.raises(v.UserError, match=match):
        av.attribution_view(runs["dir"], runs["computed"], *args)


@pytest.mark.parametrize("group", ["attribution/../text.zarr", "attribution/.x", "scores", "../attribution"])
def test_reader_refuses_groups_outside_attribution(runs, group):
    with pytest.raises(v.UserError):
        av._dataset(runs["dir"] / runs["computed"], group)


# ------------------------------------------------------------------------------------ uploads
def test_upload_limits(image_file, tmp_path, monkeypatch):
    img, data = av.check_upload(str(image_file))
    assert img.size == (100, 80) and data == image_file.read_bytes()
    assert "100×80 px" in av.upload_preview(str(image_file))[1]
    assert av.upload_preview(None) == (None, "")
    with pytest.raises(v.UserError, match="Upload an image first"):
        av.check_upload(None)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(v.UserError, match="not an image"):
        av.check_upload(str(text))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(v.UserError, match="empty"):
        av.check_upload(str(empty))
    monkeypatch.setattr(av, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(v.UserError, match=r"bytes\); the limit is 1.00 KB"):
        av.check_upload(str(image_file))
    monkeypatch.setattr(av, "MAX_UPLOAD_BYTES", 8 * 2**20)
    monkeypatch.setattr(av, "MAX_UPLOAD_PIXELS", 4000)
    with pytest.raises(v.UserError, match="8,000 pixels; the limit is 4,000"):
        av.check_upload(str(image_file))


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(big)             # 20 MP, a few kB on disk
    import workbench.image as wi

    monkeypatch.setattr(wi, "load_image", lambda *a, **k: pytest.fail("decoded a too-large image"))
    with pytest.raises(v.UserError, match="20,000,000 pixels"):
        av.check_upload(str(big))


# ------------------------------------------------------------------------------------ compute
def test_compute_inputs_are_checked(model):
    ok = av.check_compute_inputs(model, "What is it?", " cat", ["ig"], 8, "mean")
    assert ok == ("<|image|>What is it?", " cat", ["ig"], 8, "mean")
    assert av.check_compute_inputs(model, PROMPT, "", ["gxi"], "4", "zero")[1] is None    # empty → greedy
    for args, match in [(("<|image|>a<|image|>", " x", ["ig"], 8, "mean"), "one image"),
                        (("<|patch|>", " x", ["ig"], 8, "mean"), "patch"),
                        (("x" * 2000, " x", ["ig"], 8, "mean"), "limit"),
                        ((PROMPT, "a long answer", ["ig"], 8, "mean"), "tokens; the limit"),
                        ((PROMPT, " x", [], 8, "mean"), "at least one"),
                        ((PROMPT, " x", ["occlusion"], 8, "mean"), "CLI"),
                        ((PROMPT, " x", ["ig"], 1, "mean"), "between 2"),
                        ((PROMPT, " x", ["ig"], 999, "mean"), "between 2"),
                        ((PROMPT, " x", ["ig"], "many", "mean"), "whole number"),
                        ((PROMPT, " x", ["ig"], 8, "black"), "Baseline")]:
        with pytest.raises(v.UserError, match=match):
            av.check_compute_inputs(model, *args)


def test_computed_run_holds_results_image_and_provenance(runs, image_file):
    d, name = runs["dir"], runs["computed"]
    assert name.startswith("attr-") and "IG completeness error" in runs["summary"]
    meta = av.inputs_attrs(d / name)
    assert meta["prompt"] == PROMPT and meta["target"] == " <b>&" and meta["steps"] == 8
    assert meta["model"] == "tiny-vision" and meta["methods"] == ["ig", "gxi", "ablation"]
    assert av.stored_image(d / name).size == (100, 80)


def test_compute_greedy_target_new_run_each_time(model, image_file, tmp_path):
    steps = []
    a, _ = av.compute_attribution(model, threading.Lock(), tmp_path, str(image_file), "", "", ["gxi"],
                                  progress=lambda f, s: steps.append((f, s)))
    b, _ = av.compute_attribution(model, threading.Lock(), tmp_path, str(image_file), "", "", ["gxi"])
    assert a != b and set(av.attribution_runs(tmp_path)) == {a, b}
    n = len(av.attribution_controls(tmp_path, a)["targets"])
    assert 1 <= n <= av.GREEDY_TARGET_TOKENS and av.inputs_attrs(tmp_path / a)["target"] is None
    assert steps[-1] == (1.0, "done") and [f for f, _ in steps] == sorted(f for f, _ in steps)


def test_compute_failure_leaves_nothing_behind(model, image_file, tmp_path, monkeypatch):
    import probes.attribution as pa

    def boom(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(pa, "attribute", boom)
    with pytest.raises(RuntimeError):
        av.compute_attribution(model, threading.Lock(), tmp_path, str(image_file), PROMPT, " x", ["gxi"])
    assert list(tmp_path.iterdir()) == []


def test_compute_refuses_a_text_only_model_honestly(model, image_file, tmp_path):
    with pytest.raises(v.UserError, match="needs a vision model"):
        av.compute_attribution(model.language_model, threading.Lock(), tmp_path, str(image_file), PROMPT, " x",
                               ["ig"], model_source="tiny")
    note = av.text_only_note("<tiny>")
    assert "&lt;tiny&gt;" in note and "workbench app --model tiny-vision" in note and "viewer" in note


# ------------------------------------------------------------------------------------ the app wiring
def _api_names(demo) -> set:
    return {getattr(f, "api_name", None) for f in demo.fns.values()}


def test_app_builds_for_vision_and_text_models(model, runs):
    pytest.importorskip("gradio")
    from apps.workbench_app import build_app

    demo = build_app(model, runs["dir"], model_source="tiny-vision")
    assert {"attribution_view", "attribute", "live", "moe_journey"} <= _api_names(demo)
    assert model.language_model.tokenizer is model.tokenizer                  # text tabs use the LM
    text = build_app(workbench.load_model("tiny"), runs["dir"], model_source="tiny")
    names = _api_names(text)
    assert "attribution_view" in names and "attribute" not in names


def test_app_with_a_text_model_and_a_vision_model(model, image_file, tmp_path):
    """Text tabs on `tiny`, the Attribution tab on the vision model: an attribution computed through the
    app's endpoint functions comes from the vision model, a live run from the text model."""
    pytest.importorskip("gradio")
    from apps.workbench_app import build_app
    from workbench.store import open_run

    text = workbench.load_model("tiny")
    demo = build_app(text, tmp_path, model_source="tiny", vision_model=model, vision_source="tiny-vision")
    fns = {f.api_name: f.fn for f in demo.fns.values()}
    assert {"attribute", "attribution_view", "chat", "live"} <= set(fns)
    name, listed, summary, _ = fns["attribute"](str(image_file), "What is it?", " ab", ["gxi", "ig"], 4, "mean")
    assert listed["value"] == name and "gxi" in summary and "IG completeness" in summary
    meta = av.inputs_attrs(tmp_path / name)
    assert meta["model"] == "tiny-vision" and meta["methods"] == ["gxi", "ig"]
    ds = av._dataset(tmp_path / name, "attribution/gxi")
    assert ds["scores"].shape == (3, 20)                            # " ab": three byte tokens × 20 image tokens
    method, target, image, fig, info, *_ = fns["attribution_view"](name, "attribution/gxi", 1, 0, 0.5, None)
    assert target["value"] == 1 and "stored with the run" in info and fig.data[0].type == "image"
    live_name, *_ = fns["live"]("Hello there", 0)
    from apps import private_runs  # a live run is private to its session (apps/private_runs.py)
    assert open_run(private_runs.resolve(tmp_path, live_name)).attrs["config"] == text.config.to_hf()
    with pytest.raises(ValueError, match="text-only"):
        build_app(text, tmp_path, model_source="tiny", vision_model=text, vision_source="tiny")
    # a text model alone: the compute panel is absent, the viewer still lists the run
    alone = build_app(text, tmp_path, model_source="tiny")
    assert "attribute" not in _api_names(alone) and name in av.attribution_runs(tmp_path)


def test_cli_app_takes_a_vision_model(monkeypatch, tmp_path):
    wa = pytest.importorskip("apps.workbench_app")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()                # --runs must name an existing directory
    from workbench.cli import build_parser, main

    defaults = build_parser().parse_args(["app"])          # the bundled trained models, like `make demo`
    assert (defaults.model, defaults.vision_model) == ("tiny-moe", "tiny-vlm")
    calls, real_launch = [], wa.launch
    monkeypatch.setattr(wa, "launch", lambda **kw: calls.append(kw))
    assert main(["app", "--vision-model", "none"]) == 0 and calls.pop()["vision_model"] is None
    assert main(["app", "--model", "tiny-moe", "--vision-model", "tiny-vlm", "--runs", "r"]) == 0
    assert calls[0]["model"] == "tiny-moe" and calls[0]["vision_model"] == "tiny-vlm" and calls[0]["runs"] == "r"
    loaded = []
    monkeypatch.setattr(workbench, "load_model", lambda src: loaded.append(src) or src)
    monkeypatch.setattr(wa, "build_app", lambda *a, **k: loaded.append(k) or "demo")
    monkeypatch.setattr(wa, "serve", lambda *a, **k: None)
    real_launch(model="tiny-moe", vision_model="tiny-vlm")
    assert loaded == ["tiny-moe", "tiny-vlm", {"model_source": "tiny-moe", "vision_model": "tiny-vlm",
                                               "vision_source": "tiny-vlm"}]
    assert av.compute_defaults("tiny-vlm")[0].count("<|image|>") == 1 and av.compute_defaults("x")[1] == " cat"

"""End to end: launch the app on a free local port and drive it with gradio_client, as a script or a
second user would (per-session runs, errors that leave the app running, every tab's endpoint)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import served_app

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

import workbench  # noqa: E402
from apps import private_runs  # noqa: E402

AppError = gradio_client.exceptions.AppError
pytestmark = pytest.mark.slow          # starts a real server and a model: ~30 s on two shared cores


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = workbench.load_model("tiny")
    runs = tmp_path_factory.mktemp("runs")
    workbench.record(model, [{"text": "Routing <explorer> test. " * 3, "domain": "a", "id": "a"},
                             {"text": "second document", "domain": "b", "id": "b"}],
                     runs / "example.zarr", probes=("router", "router_logits", "entropy"), progress=False,
                     model_source="tiny")
    with served_app(model, runs, "tiny") as (demo, url, _):
        yield demo, url, runs


def client(url):
    return gradio_client.Client(url, verbose=False)


def plot(value) -> dict:
    assert value["type"] == "plotly", value
    return json.loads(value["plot"])


def tokens_text(highlighted) -> str:
    return "".join(item["token"] for item in value(highlighted))


def value(x):
    """A component update (value + new properties, e.g. the colour map) or a plain value."""
    return x["value"] if isinstance(x, dict) and x.get("__type__") == "update" else x


def test_binds_localhost_without_share(app):
    demo, url, _ = app
    assert url.startswith("http://127.0.0.1:") and demo.share is False


def test_runs_open_tokens_and_path(app):
    _, url, _ = app
    c = client(url)
    df, _ = c.predict(api_name="/runs")
    assert [r[0] for r in df["data"]] == ["example.zarr"]
    summary = c.predict("example.zarr", api_name="/open_run")
    assert "example.zarr" in summary
    hl, grid, load, first_path, _ = c.predict(document=0, first_token=0, n_tokens=16, moe_layer=1,
                                              api_name="/tokens")
    assert "token #0" in plot(first_path)["layout"]["title"]["text"]
    assert len(value(hl)) == 16 and tokens_text(hl).startswith("<|begin_of_text|>Routing <exp")
    assert {item["class_or_confidence"] for item in value(hl)} <= {"E0", "E1", "E2", "E3"}
    assert set(hl["color_map"]) == {"E0", "E1", "E2", "E3"}
    assert plot(grid)["data"][0]["type"] == "heatmap" and "layer 1" in plot(load)["layout"]["title"]["text"]
    fig, table = c.predict(7, api_name="/token_path")
    assert "token #7" in table and len(plot(fig)["data"]) == 2
    trans, _ = c.predict(from_layer=0, to_layer=3, normalize=True, api_name="/transitions")
    assert "layer 0 → layer 3" in plot(trans)["layout"]["title"]["text"]
    prof = c.predict(layers="kind:nope-global", head_index="all", statistic="normalized", n_bins=64,
                     api_name="/entropy_profile")
    assert "H / ln n" in plot(prof)["layout"]["title"]["text"]
    heat, _ = c.predict("normalized_mean", api_name="/layer_head")
    assert plot(heat)["data"][0]["type"] == "heatmap"


def test_concurrent_users_see_their_own_live_run(app):
    _, url, runs = app
    a, b = client(url), client(url)
    ja = a.submit("aaaa aaaa", 0, api_name="/live")
    jb = b.submit("bbbb bbbb bbbb", 0, api_name="/live")
    (_, run_a, text_a, _), (_, run_b, text_b, _) = ja.result(), jb.result()
    run_a, run_b = value(run_a), value(run_b)
    assert run_a != run_b and private_runs.resolve(runs, run_a) != private_runs.resolve(runs, run_b)
    assert text_a.endswith("aaaa aaaa") and text_b.endswith("bbbb bbbb bbbb")
    for c, letter in ((a, "a"), (b, "b")):
        hl, *_ = c.predict(document=0, first_token=0, n_tokens=64, moe_layer=0, api_name="/tokens")
        text = tokens_text(hl)
        other = "b" if letter == "a" else "a"
        assert letter * 4 in text and other * 4 not in text


def test_errors_are_messages_and_the_app_keeps_running(app):
    _, url, _ = app
    c = client(url)
    with pytest.raises(AppError, match="Invalid run name"):
        c.predict("../example.zarr", api_name="/open_run")
    with pytest.raises(AppError, match="limit is"):
        c.predict("x" * 5000, 0, api_name="/live")
    with pytest.raises(AppError, match="Choose a run first"):
        c.predict(3, api_name="/token_path")                         # fresh session: no run open
    with pytest.raises(AppError, match="fewer than"):
        c.predict(mask=["E0", "E1", "E2", "E3"], api_name="/moe_journey")
    assert "example.zarr" in c.predict("example.zarr", api_name="/open_run")


def test_teaching_endpoints(app):
    _, url, _ = app
    c = client(url)
    j, n, summary = c.predict(prompt="The router picks", position=3, moe_layer=1, top_k=2, mask=["E1"],
                              drop_shared=True, everywhere=False, api_name="/moe_journey")
    assert "router logits" in json.dumps(plot(j)["layout"]) and "KL" in plot(n)["layout"]["title"]["text"]
    assert "drop_shared" in summary
    md, p = c.predict(preset_name="maverick", experts=128, top_k=1, api_name="/params")
    assert "maverick" in md and plot(p)["layout"]["barmode"] == "stack"
    assert len(plot(c.predict(32, 8, api_name="/mask"))["data"]) == 2
    assert "RoPE" in plot(c.predict(1, 6, 2, api_name="/rope"))["layout"]["title"]["text"]
    assert "Qwen" in json.dumps(plot(c.predict(64, 0.2, api_name="/temperature"))["data"])
    live = plot(c.predict(64, True, 16, 0.3, api_name="/live_entropy"))
    assert "tuning on" in live["layout"]["title"]["text"]


# ------------------------------------------------------------------------------------ a vision model beside
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """The app on `tiny` (text tabs) with `tiny-vision` as its vision model, served on a free local port."""
    from conftest import free_port

    from apps.workbench_app import build_app, serve

    runs = tmp_path_factory.mktemp("runs2")
    demo = build_app(workbench.load_model("tiny"), runs, model_source="tiny",
                     vision_model=workbench.load_model("tiny-vision"), vision_source="tiny-vision")
    _, url, _ = serve(demo, "127.0.0.1", free_port(), share=False, block=False)
    yield url, runs
    demo.close()


def test_attribution_and_image_chat_use_the_vision_model(two_models, tmp_path):
    from conftest import random_image

    from apps import attribution_views as av
    from workbench.store import open_run

    url, runs = two_models
    img = tmp_path / "img.png"
    random_image().save(img)
    c = client(url)
    listed, summary, _ = c.predict(gradio_client.handle_file(str(img)), "What is it?", " ab", ["gxi"], 4, "mean",
                                   api_name="/attribute")
    name = value(listed)
    assert name in summary and name in av.attribution_runs(runs)
    assert av.inputs_attrs(runs / name)["model"] == "tiny-vision"
    bot, msg, note, routing, entropy, runs_df, _ = c.predict(
        "", "What is it?", 4, 0.0, gradio_client.handle_file(str(img)), "vision", api_name="/chat")
    assert bot[0]["content"] in ("[image 100×80] What is it?", [{"type": "text", "text": "[image 100×80] What is it?"}])
    assert not any("chat-" in r[0] for r in runs_df["data"])            # private to this session
    chat = re.search(r"run \*\*(@[0-9a-f]{32}/chat-[\w-]+\.zarr)\*\*", note).group(1)
    run = open_run(private_runs.resolve(runs, chat))
    assert run.attrs["model_source"] == "tiny-vision" and "5 image tiles" in note
    assert plot(routing)["data"][0]["type"] == "heatmap"
    with pytest.raises(AppError, match="Images need a vision model"):
        client(url).predict("", "What is it?", 4, 0.0, gradio_client.handle_file(str(img)), "text", api_name="/chat")
    assert chat.split("/")[-1] in c.predict(chat, api_name="/open_run")
    sankey = plot(c.predict(0, 3, True, "path", api_name="/transitions")[0])           # MoE layers 0 → 1 → 3
    assert sankey["data"][0]["type"] == "sankey" and sum(sankey["data"][0]["link"]["value"]) == 2 * run.n_tokens


def test_chat_prompt_format_through_the_client(two_models, tmp_path):
    """/chat takes the prompt format last: "plain" sends the message alone (no chat template), and the
    run's generation note says so."""
    from conftest import random_image

    from workbench.store import open_run

    url, runs = two_models
    img = tmp_path / "img.png"
    random_image().save(img)
    bot, msg, note, *_, runs_df, _ = client(url).predict(
        "Ignored.", "Question: What is it?\n<|image|>\nAnswer:", 3, 0.0, gradio_client.handle_file(str(img)),
        "vision", "plain", api_name="/chat")
    assert "Plain prompt" in note and msg == ""
    chat = re.search(r"run \*\*(@[0-9a-f]{32}/chat-[\w-]+\.zarr)\*\*", note).group(1)     # private
    run = open_run(private_runs.resolve(runs, chat))
    gen = run.attrs["generations"]["turn-0"]
    assert gen["prompt_format"] == "plain" and gen["image_tiles"] == 5
    tokenizer = workbench.load_model("tiny-vision").tokenizer
    prompt = tokenizer.decode(run.tokens(0)[:gen["n_prompt"]].tolist(), skip_special=False)
    assert prompt.startswith("<|begin_of_text|>Question: What is it?\n<|image_start|>") and "header" not in prompt


def test_demo_no_launch_writes_both_example_runs(tmp_path):
    """`make demo` on a fresh runs dir: the tiny-moe routing run and the tiny-vlm attribution run (the
    trained models; a missing tiny-vlm fails here rather than skipping)."""
    import importlib.util

    import numpy as np
    from conftest import REPO

    from apps import attribution_views as av
    from workbench.bundled import MODELS_DIR
    from workbench.store import open_run
    from workbench.train import scenes

    assert (MODELS_DIR / "tiny-vlm" / "config.json").is_file(), "tiny-vlm is not trained/bundled yet"
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--runs", str(tmp_path), "--no-launch"]) == 0
    text = open_run(tmp_path / "example-tiny-moe.zarr")
    assert text.n_docs >= 6 and text.attrs["model_source"] == "tiny-moe"
    name = "example-attribution-tiny-vlm.zarr"
    assert av.attribution_runs(tmp_path) == [name]
    groups = [g for _, g in av.method_choices(tmp_path, name)]
    assert set(groups) == {f"attribution/{m}" for m in ("ig", "ablation_token", "ablation_tile", "occlusion_token",
                                                         "occlusion_tile")}
    ex = scenes.example(*demo.EXAMPLE_SCENE)
    meta = av.inputs_attrs(tmp_path / name)
    assert meta["target"] == " " + ex.answer and meta["prompt"] == scenes.prompt_text(ex.question)
    assert meta["model"] == "tiny-vlm" and av.stored_image(tmp_path / name).size == ex.image.size
    fig, info, targets, scores, _ = av.attribution_view(tmp_path, name, "attribution/ig", 0, 0)
    assert "stored with the run" in info and len(scores) > 0
    ds = av._dataset(tmp_path / name, "attribution/ig")
    assert float(np.exp(ds["logprob"].values[0])) > 0.5          # tiny-vlm answers the colour question
    top = int(np.argmax(ds["scores"].values[0]))                  # and IG points at the asked-about object
    assert scenes.box_hit(ds["pixel_box"].values[top], ex.target.box)
    stamp = (tmp_path / name / "zarr.json").stat().st_mtime_ns
    assert demo.main(["--runs", str(tmp_path), "--no-launch"]) == 0             # once: nothing is redone
    assert (tmp_path / name / "zarr.json").stat().st_mtime_ns == stamp

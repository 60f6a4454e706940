"""The Chat tab: callbacks called directly, then through the served app with gradio_client.  A turn
streams a reply and appends one document (tokens = prompt + reply) to the session's run, whose
arrays equal `run_document` on that sequence."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from conftest import served_app

import workbench
from apps import chat_views as cv
from apps import private_runs
from apps import views as v
from workbench.recording import run_document
from workbench.store import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


def assert_run_doc_is_the_turn(model, path, doc, turn):
    run = open_run(path)
    tokens = turn.reply.prompt_ids + turn.reply.ids
    np.testing.assert_array_equal(run.tokens(doc), tokens)
    assert run.read("doc_id")[doc] == f"turn-{doc}" and run.read("doc_domain")[doc] == "chat"
    want = run_document(model, tokens, cv.CHAT_PROBES)
    sl = run.doc_slice(doc)
    for name, w in want.items():
        got = np.asarray(run.array(name)[..., sl] if name.startswith("attention/") else run.array(name)[:, sl])
        if name.endswith("experts") or name == "attention/n_keys":
            np.testing.assert_array_equal(got, w, err_msg=name)
        else:
            np.testing.assert_allclose(got, w, rtol=0, atol=1e-5, err_msg=name)


def test_turns_are_recorded_into_one_run_per_session(model, tmp_path):
    lock = threading.Lock()
    pieces = []
    t0 = cv.chat_turn(model, lock, tmp_path, None, "Be brief.", "Hello there", 6, 0.0, on_text=pieces.append,
                      model_source="tiny")
    assert t0.reply.text and "".join(pieces) == t0.reply.text and t0.doc == 0
    assert t0.session["messages"] == [{"role": "user", "content": "Hello there"},
                                      {"role": "assistant", "content": t0.reply.text}]
    assert_run_doc_is_the_turn(model, private_runs.path_for(tmp_path, t0.run), 0, t0)
    t1 = cv.chat_turn(model, lock, tmp_path, t0.session, "Be brief.", "And again?", 5, 0.0, model_source="tiny")
    assert t1.run == t0.run and t1.doc == 1 and len(t1.session["messages"]) == 4
    assert_run_doc_is_the_turn(model, private_runs.path_for(tmp_path, t1.run), 1, t1)
    run = open_run(private_runs.path_for(tmp_path, t1.run))
    assert run.n_docs == 2 and run.attrs["model_source"] == "tiny"
    assert run.attrs["generations"]["turn-1"]["n_prompt"] == len(t1.reply.prompt_ids)
    assert t1.run not in v.runs_table(tmp_path)["name"].tolist()       # private to its session
    other = cv.chat_turn(model, lock, tmp_path, None, "", "Hi", 3, 0.0)      # a new session, a new run
    assert other.run != t0.run and open_run(private_runs.path_for(tmp_path, other.run)).n_docs == 1


def test_stream_turn_yields_growing_text_then_the_turn(model, tmp_path):
    seen = list(cv.stream_turn(model, threading.Lock(), tmp_path, None, "", "Stream me", 8, 0.0))
    *partial, (text, turn) = seen
    assert turn is not None and text == turn.reply.text and all(t is None for _, t in partial)
    assert all(turn.reply.text.startswith(p) for p, _ in partial)
    routing, entropy = cv.turn_figures(model, turn)
    assert routing.data[0].type == "heatmap"
    assert np.asarray(routing.data[0].z).shape == (len(model.config.moe_layer_index), len(turn.recording.new_ids))
    assert len(entropy.data) == model.config.num_hidden_layers
    assert "turn-0" in cv.turn_note(turn) and turn.run in cv.turn_note(turn)
    assert cv.history(turn.session, "next", "par")[-2:] == [{"role": "user", "content": "next"},
                                                          {"role": "assistant", "content": "par"}]


@pytest.mark.parametrize("args,match", [(("", "", 4, 0.0), "Type a message"),
                                        (("", "x" * 5000, 4, 0.0), "limit is"),
                                        (("", "hi", 0, 0.0), "between 1 and"),
                                        (("", "hi", 4, -1), "Temperature"),
                                        (("", "hi", "many", 0), "must be numbers")])
def test_bad_requests_are_user_errors(model, tmp_path, args, match):
    with pytest.raises(v.UserError, match=match):
        cv.stream_turn(model, threading.Lock(), tmp_path, None, *args)
    assert not list(tmp_path.iterdir())                      # nothing ran, no run was created


@pytest.mark.slow
def test_chat_through_the_served_app(model, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    with served_app(model, tmp_path, "tiny") as (_, url, _):
        c = gradio_client.Client(url, verbose=False)
        job = c.submit("Be brief.", "Hello app", 6, 0.0, api_name="/chat")
        bot, msg, note, routing, entropy, runs_df, _ = job.result()
        reply = bot[-1]["content"]
        reply = reply[0]["text"] if isinstance(reply, list) else reply       # gradio 6 message content parts
        assert bot[-2]["role"] == "user" and msg == ""
        assert not any("chat-" in r[0] for r in runs_df["data"])       # private: listed to no session
        name = re.search(r"run \*\*(@[0-9a-f]{32}/chat-[\w-]+\.zarr)\*\*", note).group(1)
        assert name in note and json.loads(routing["plot"])["data"][0]["type"] == "heatmap"
        assert len(json.loads(entropy["plot"])["data"]) == model.config.num_hidden_layers
        run = open_run(private_runs.resolve(tmp_path, name))
        assert run.n_docs == 1
        tokens = run.tokens(0).tolist()
        gen = run.attrs["generations"]["turn-0"]
        body = tokens[gen["n_prompt"]:len(tokens) - (gen["stop_id"] is not None)]     # the reply, stop excluded
        assert model.tokenizer.decode(body, skip_special=False) == reply
        for name_, w in run_document(model, tokens, cv.CHAT_PROBES).items():
            got = np.asarray(run.array(name_)[...])
            if got.dtype.kind == "f":
                np.testing.assert_allclose(got, w, rtol=0, atol=1e-5, err_msg=name_)
            else:
                np.testing.assert_array_equal(got, w, err_msg=name_)
        assert name.split("/")[-1] in c.predict(api_name="/chat_open_run")     # the session's chat run opens
        with pytest.raises(gradio_client.exceptions.AppError, match="Send a message first"):
            gradio_client.Client(url, verbose=False).predict(api_name="/chat_open_run")   # a new session: none


# ------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def vision():
    return workbench.load_model("tiny-vision")


def test_image_turns_on_a_vision_model(vision, tmp_path):
    from conftest import random_image

    from workbench.chat import prepare_chat

    img = random_image()
    t0 = cv.chat_turn(vision, threading.Lock(), tmp_path, None, "Be brief.", "What is it?", 5, 0.0, image=img,
                      model_source="tiny-vision")
    user = t0.session["messages"][0]["content"]
    assert [i["type"] for i in user] == ["image", "text"] and t0.session["model"] == "tiny-vision"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
    c = prepare_chat(vision, msgs)
    tokens = t0.reply.prompt_ids + t0.reply.ids
    assert t0.reply.prompt_ids == c.ids and c.ids.count(vision.config.image_token_index) == 20
    run = open_run(private_runs.path_for(tmp_path, t0.run))
    np.testing.assert_array_equal(run.tokens(0), tokens)
    for name, w in run_document(vision, tokens, cv.CHAT_PROBES, pixel_values=c.pixel_values).items():
        got = np.asarray(run.array(name)[...])
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, w, rtol=0, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)
    assert "5 image tiles" in cv.turn_note(t0)
    assert cv.history(t0.session)[0]["content"] == "[image 100×80] What is it?"
    # the next turn, text only, still shows the model the image (it is part of the conversation)
    t1 = cv.chat_turn(vision, threading.Lock(), tmp_path, t0.session, "Be brief.", "Sure?", 3, 0.0,
                      model_source="tiny-vision")
    assert t1.run == t0.run and t1.reply.prompt_ids.count(vision.config.image_token_index) == 20
    assert open_run(private_runs.path_for(tmp_path, t0.run)).attrs["generations"]["turn-1"]["image_tiles"] == 5
    # the image where the text says <|image|> (a model's trained prompt format)
    fmt = cv.user_content("Question: What colour is it?\n<|image|>\nAnswer:", img)
    assert [i["type"] for i in fmt] == ["text", "image", "text"] and fmt[2]["text"] == "\nAnswer:"


def test_image_requests_that_cannot_run_are_user_errors(model, vision, tmp_path):
    from conftest import random_image

    img, lock = random_image(), threading.Lock()
    with pytest.raises(v.UserError, match="Images need a vision model"):
        cv.stream_turn(model, lock, tmp_path, None, "", "What is it?", 4, 0.0, image=img, model_source="tiny")
    with pytest.raises(v.UserError, match="one image"):
        cv.stream_turn(vision, lock, tmp_path, None, "", "<|image|> or <|image|>?", 4, 0.0, image=img)
    with pytest.raises(v.UserError, match="1 <\\|image\\|> placeholders but 0 images"):
        cv.stream_turn(vision, lock, tmp_path, None, "", "Where is <|image|>?", 4, 0.0)
    with pytest.raises(v.UserError, match="not a recognised image"):
        bad = tmp_path / "bad.png"
        bad.write_text("no")
        cv.stream_turn(vision, lock, tmp_path, None, "", "What?", 4, 0.0, image=str(bad))
    bad.unlink()
    assert not list(tmp_path.iterdir())                      # nothing ran, no run was created
    turn = cv.chat_turn(model, lock, tmp_path, None, "", "Hi", 2, 0.0, model_source="tiny")
    with pytest.raises(v.UserError, match="recorded with tiny; start a new chat"):
        cv.stream_turn(vision, lock, tmp_path, turn.session, "", "What is it?", 2, 0.0, image=img,
                       model_source="tiny-vision")
    assert cv.image_note(False, True).startswith("To chat about an image")
    assert "--vision-model" in cv.image_note(False, False)


def test_app_chat_uses_the_vision_model_for_images(model, vision, tmp_path):
    """build_app(text model, vision_model=…): the Chat tab's "vision" choice chats about an image with the
    vision model, the default "text" choice stays on the text model and refuses images."""
    gr = pytest.importorskip("gradio")
    from conftest import random_image

    from apps.workbench_app import build_app

    demo = build_app(model, tmp_path, model_source="tiny", vision_model=vision, vision_source="tiny-vision")
    fns = {f.api_name: f.fn for f in demo.fns.values()}
    *_, last = fns["chat"](None, "", "What is it?", 4, 0.0, random_image(), "vision")
    session = next(x for x in last.values() if isinstance(x, dict) and "messages" in x)
    run = open_run(private_runs.path_for(tmp_path, session["run"]))
    assert session["model"] == "tiny-vision" and run.attrs["model_source"] == "tiny-vision"
    assert run.attrs["config"] == vision.config.to_hf()
    assert (run.tokens(0) == vision.config.image_token_index).sum() == 20
    with pytest.raises(gr.Error, match="Images need a vision model"):
        list(fns["chat"](None, "", "What is it?", 4, 0.0, random_image(), "text"))
    *_, text_last = fns["chat"](None, "", "Hello", 3, 0.0, None, "text")
    text_session = next(x for x in text_last.values() if isinstance(x, dict) and "messages" in x)
    assert open_run(private_runs.path_for(tmp_path, text_session["run"])).attrs["config"] == model.config.to_hf()
    *cleared, image_update, note = fns["chat_switch"]("vision")
    assert cleared[0] == cv.new_session() and image_update["visible"] is True and "image" in note
    assert fns["chat_switch"]("text")[-2]["visible"] is False


# ------------------------------------------------------------------------------------ plain prompts
@pytest.fixture(scope="module")
def vlm():
    return workbench.load_model("tiny-vlm")


def test_plain_turn_on_tiny_vlm_answers_and_is_recorded(vlm, tmp_path):
    """tiny-vlm was trained on `Question: …\\n<|image|>\\nAnswer:`, not on the chat template: its chat
    defaults to "plain", where the message is the whole prompt, and it answers the scene's question."""
    from workbench.chat import prepare_chat
    from workbench.image import prepare
    from workbench.train import scenes

    assert cv.default_format(vlm) == "plain" and cv.message_placeholder(vlm, "tiny-vlm", "plain") == cv.PLAIN_EXAMPLE
    ex = scenes.example("t", 0, "colour")
    lock = threading.Lock()
    t0 = cv.chat_turn(vlm, lock, tmp_path, None, "Be brief.", scenes.prompt_text(ex.question), 8, 0.0,
                      image=ex.image, model_source="tiny-vlm")
    assert t0.reply.text.strip() == ex.answer and t0.reply.stop == "<|eot|>"
    trained = prepare(scenes.prompt_text(ex.question), [ex.image], vlm.tokenizer, vlm.image_processor)
    assert t0.reply.prompt_ids == trained.input_ids[0].tolist()          # no headers, no system prompt
    run = open_run(private_runs.path_for(tmp_path, t0.run))
    tokens = t0.reply.prompt_ids + t0.reply.ids
    np.testing.assert_array_equal(run.tokens(0), tokens)
    assert run.attrs["generations"]["turn-0"]["prompt_format"] == "plain" and run.attrs["model_source"] == "tiny-vlm"
    for name, w in run_document(vlm, tokens, cv.CHAT_PROBES, pixel_values=trained.pixel_values).items():
        got = np.asarray(run.array(name)[...])
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, w, rtol=0, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)
    assert "Plain prompt" in cv.turn_note(t0) and cv.history(t0.session)[-1]["content"] == t0.reply.text
    # a later plain message that says <|image|> without an upload asks about the chat's image
    q = "Question: Describe the scene.\n<|image|>\nAnswer:"
    t1 = cv.chat_turn(vlm, lock, tmp_path, t0.session, "", q, 12, 0.0, model_source="tiny-vlm")
    assert t1.run == t0.run and t1.doc == 1
    assert t1.reply.prompt_ids == prepare(q, [ex.image], vlm.tokenizer, vlm.image_processor).input_ids[0].tolist()
    assert ex.answer in t1.reply.text
    # the chat template, chosen explicitly, behaves as before: the whole conversation in the template
    t2 = cv.chat_turn(vlm, lock, tmp_path, t1.session, "Be brief.", "What colour?", 4, 0.0,
                      model_source="tiny-vlm", prompt_format="chat")
    msgs = [{"role": "system", "content": "Be brief."}] + t1.session["messages"] + [
        {"role": "user", "content": "What colour?"}]
    assert t2.reply.prompt_ids == prepare_chat(vlm, msgs).ids and "Plain prompt" not in cv.turn_note(t2)
    assert open_run(private_runs.path_for(tmp_path, t0.run)).attrs["generations"]["turn-2"]["prompt_format"] == "chat"
    with pytest.raises(v.UserError, match="Unknown prompt format"):
        cv.stream_turn(vlm, lock, tmp_path, None, "", "Hi", 2, 0.0, prompt_format="raw")


def test_text_models_default_to_the_chat_template_and_can_go_plain(model, tmp_path):
    assert cv.default_format(model, "tiny") == "chat" and cv.message_placeholder(model, "tiny", "chat") == ""
    assert "<|image|>" in cv.message_placeholder(model, "tiny", "plain")
    turn = cv.chat_turn(model, threading.Lock(), tmp_path, None, "Be brief.", "Hello there", 4, 0.0,
                        model_source="tiny", prompt_format="plain")
    assert turn.reply.prompt_ids == model.tokenizer.encode("<|begin_of_text|>Hello there", add_bos=False)
    assert_run_doc_is_the_turn(model, private_runs.path_for(tmp_path, turn.run), 0, turn)


def test_app_chat_defaults_to_plain_for_tiny_vlm(model, vlm, tmp_path):
    """build_app(tiny, vision_model=tiny-vlm): choosing the vision chat model sets the format to "plain"
    with tiny-vlm's example as the placeholder; the /chat endpoint takes the format last (None: the
    chat model's default)."""
    pytest.importorskip("gradio")
    from apps.workbench_app import build_app
    from workbench.train import scenes

    demo = build_app(model, tmp_path, model_source="tiny", vision_model=vlm, vision_source="tiny-vlm")
    fns = {f.api_name: f.fn for f in demo.fns.values()}
    fmt, msg, system = fns["chat_format_default"]("vision")
    assert fmt["value"] == "plain" and msg["placeholder"] == cv.PLAIN_EXAMPLE and system["interactive"] is False
    fmt, msg, system = fns["chat_format_default"]("text")
    assert fmt["value"] == "chat" and msg["placeholder"] == "" and system["interactive"] is True
    ex = scenes.example("t", 1, "shape")
    for prompt_format in ("plain", None):
        *_, last = fns["chat"](None, "", scenes.prompt_text(ex.question), 8, 0.0, ex.image, "vision", prompt_format)
        session = next(x for x in last.values() if isinstance(x, dict) and "messages" in x)
        assert session["messages"][-1]["content"].strip() == ex.answer and session["model"] == "tiny-vlm"
        gens = open_run(private_runs.path_for(tmp_path, session["run"])).attrs["generations"]
        assert gens["turn-0"]["prompt_format"] == "plain"

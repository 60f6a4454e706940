"""The Llama 4 chat format: `render_chat` equals the Hugging Face chat template on a set of
conversations, and `chat_generate` stops on <|eot|>/<|eom|>/<|end_of_text|>.

Source of truth: tests/fixtures/llama4_chat_template.jinja is the `chat_template` string of
transformers' `src/transformers/models/llama4/processing_llama4.py` (identical in transformers 5.24
and in huggingface/transformers @ f5d3f1e1), rendered here exactly as `apply_chat_template` renders
it (transformers' own Jinja environment: trim_blocks, lstrip_blocks, non-escaping `tojson`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.chat import EOM, EOT, chat_generate, chat_stop_ids, encode_chat, render_chat
from workbench.checkpoint import load_model, save_model
from workbench.instrument.hooks import hooks

FIXTURE = Path(__file__).parent / "fixtures" / "llama4_chat_template.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather <b>&</b> temperature in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}}

CONVERSATIONS = {
    "one_user": ([{"role": "user", "content": "Hello!"}], {}),
    "multi_turn": ([{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "What is 2+2?\n"}], {}),
    "system_is_stripped": ([{"role": "system", "content": "  Be brief.\n\n"},
                            {"role": "user", "content": "  spaces kept in user turns  "}], {}),
    "images_and_list_content": ([{"role": "system", "content": [{"type": "text", "text": " sys as a list "}]},
                                 {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare "},
                                                              {"type": "image"}, {"type": "text", "text": "these."}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "Both are cats."}]}], {}),
    "tools_in_user_message": ([{"role": "system", "content": "You can call tools."},
                               {"role": "user", "content": "  Weather in Zürich?  "},
                               {"role": "assistant", "content": "", "tool_calls": [CALL]},
                               {"role": "tool", "content": "18°C, <sunny> & dry"},
                               {"role": "assistant", "content": "It is 18°C."}], {"tools": TOOLS}),
    "tools_in_system": ([{"role": "system", "content": "Sys."},
                         {"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, CALL]},
                         {"role": "ipython", "content": {"temp": 18, "sky": "clear"}}],
                        {"tools": TOOLS, "tools_in_user_message": False}),
    "tools_without_system": ([{"role": "user", "content": "Weather?"}],
                             {"tools": TOOLS, "tools_in_user_message": False}),
    "tool_results_of_every_kind": ([{"role": "user", "content": "go"},
                                    {"role": "tool", "content": [1, 2, {"a": "b"}]},
                                    {"role": "tool", "content": 42},
                                    {"role": "ipython", "content": "plain string"}], {}),
    "empty_tool_calls_dropped": ([{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "vanishes", "tool_calls": []},
                                  {"role": "user", "content": "again"}], {}),
    "string_arguments": ([{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"function": {"name": "f", "arguments": '{"x": 1}'}}]}], {}),
}


def _reference(messages, add_generation_prompt, **kwargs) -> str:
    import transformers  # noqa: F401  (a dev dependency: a missing install must fail, not skip)
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=FIXTURE.read_text(),
                                        add_generation_prompt=add_generation_prompt, bos_token="<|begin_of_text|>",
                                        **kwargs)
    return rendered[0]


def test_fixture_is_the_template_transformers_ships():
    import transformers.models.llama4.processing_llama4 as processing
    assert FIXTURE.read_text() == processing.chat_template


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_the_hf_template(name, add_generation_prompt):
    messages, kwargs = CONVERSATIONS[name]
    ours = render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours == _reference(messages, add_generation_prompt, **kwargs)


def test_known_layout_and_meta_eom():
    text = render_chat([{"role": "user", "content": "Hi"}])
    assert text == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")
    msgs = CONVERSATIONS["tools_in_user_message"][0]
    meta = render_chat(msgs, tools=TOOLS, eom_for_tool_calls=True)
    assert meta.count(EOM) == 1 and ('"unit": "°C"}}' + EOM) in meta
    assert meta.replace(EOM, EOT) == render_chat(msgs, tools=TOOLS)
    assert "<|header_start|>ipython<|header_end|>\n\n\"18°C, <sunny> & dry\"<|eot|>" in meta


def test_documented_deviation_list_content_with_tools():
    """HF's template `trim`s the first user message for tools; for list content Jinja stringifies the
    Python list. We render the items instead (the one intended difference, see workbench/chat.py)."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": " Weather? "}, {"type": "image"}]}]
    ours = render_chat(msgs, tools=TOOLS)
    assert ours.endswith("Weather? <|image|><|eot|><|header_start|>assistant<|header_end|>\n\n")
    assert "[{'type': 'text'" in _reference(msgs, True, tools=TOOLS)


def test_render_errors():
    with pytest.raises(ValueError, match="no first user message"):
        render_chat([{"role": "system", "content": "s"}], tools=TOOLS)
    with pytest.raises(ValueError, match="content is None"):
        render_chat([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="'role'"):
        render_chat([{"content": "x"}])


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_encode_uses_special_token_ids(tiny):
    ids = encode_chat(tiny.tokenizer, [{"role": "user", "content": "Hi"}])
    tok = tiny.tokenizer
    assert ids[:2] == [tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|header_start|>")]
    assert ids[-3:] == [tok.token_to_id("<|header_end|>"), 10, 10]        # "\n\n" as bytes
    assert tok.decode(ids) == render_chat([{"role": "user", "content": "Hi"}])


def test_chat_generate_streams_and_stops_on_eot(tiny):
    msgs = [{"role": "user", "content": "Hello"}]
    pieces = []
    reply = chat_generate(tiny, msgs, max_new_tokens=6, on_text=pieces.append)
    assert reply.stop is None and len(reply.ids) == 6 and "".join(pieces) == reply.text
    assert reply.message == {"role": "assistant", "content": reply.text}
    eot = tiny.tokenizer.token_to_id(EOT)
    # steer the final hidden state along <|eot|>'s unembedding row: greedy decoding must pick it and stop
    push = tiny.lm_head.weight[eot].detach() * 1000

    with hooks(tiny, {"model.hook_final_norm": lambda v, _s: push.expand_as(v)}):
        reply = chat_generate(tiny, msgs, max_new_tokens=6)
    assert reply.ids == [eot] and reply.stop == EOT and reply.text == ""


def test_stop_ids_come_from_the_generation_config(tmp_path, tiny):
    tok = tiny.tokenizer
    assert sorted(chat_stop_ids(tiny)) == sorted(tok.token_to_id(t) for t in ("<|eot|>", "<|eom|>", "<|end_of_text|>"))
    path = save_model(tiny, tmp_path / "ck")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 264}))
    assert chat_stop_ids(load_model(path)) == [264]


def test_chat_generate_refuses_images_on_the_text_model(tiny):
    with pytest.raises(ValueError, match="images"):
        chat_generate(tiny, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])


# ------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def vision():
    return load_model("tiny-vision")


def _image_turn(img):
    return [{"role": "system", "content": "Look closely."},
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]


def test_chat_with_an_image_equals_manual_prepare_and_generate(vision):
    import torch
    from conftest import random_image

    from workbench.chat import prepare_chat
    from workbench.image import prepare
    from workbench.model.kv_cache import KVCache

    img = random_image()
    msgs = _image_turn(img)
    pieces = []
    reply = chat_generate(vision, msgs, max_new_tokens=8, stop_ids=[], on_text=pieces.append)
    want = prepare(render_chat(msgs), [img], vision.tokenizer, vision, add_bos=False)   # the manual way
    ids, cache = [], KVCache(vision.config.num_hidden_layers)
    with torch.no_grad():
        out = vision(want.input_ids, want.pixel_values, cache=cache, last_only=True)      # images: prefill only
        for _ in range(8):
            ids.append(int(out.logits[0, -1].argmax()))
            out = vision(torch.tensor([ids[-1:]]), cache=cache, last_only=True)
    assert reply.ids == ids and reply.prompt_ids == want.input_ids[0].tolist() and "".join(pieces) == reply.text
    c = prepare_chat(vision, msgs)
    assert torch.equal(c.pixel_values, want.pixel_values) and c.ids.count(vision.config.image_token_index) == 20
    assert c.ids[0] == vision.tokenizer.token_to_id("<|begin_of_text|>") and c.ids.count(c.ids[0]) == 1
    # HF style: a data-less image item + images=, and a path instead of a PIL image, give the same prompt
    hf_style = [msgs[0], {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert prepare_chat(vision, hf_style, images=[img]).ids == c.ids
    # the same turn without the image: exactly the text prompt, no pixel values
    text = [msgs[0], {"role": "user", "content": "What is it?"}]
    plain = prepare_chat(vision, text)
    assert plain.pixel_values is None and plain.ids == encode_chat(vision.tokenizer, text)


def test_image_from_a_path_and_images_in_two_turns(vision, tmp_path):
    from conftest import random_image
    from PIL import Image

    from workbench.chat import prepare_chat

    path = tmp_path / "img.png"
    random_image().save(path)
    a = prepare_chat(vision, _image_turn(str(path)))
    b = prepare_chat(vision, _image_turn(Image.open(path)))
    assert a.ids == b.ids and (a.pixel_values == b.pixel_values).all()
    small = Image.new("RGB", (40, 40), (200, 30, 30))              # one 56-px tile: 4 image tokens
    two = _image_turn(str(path)) + [{"role": "assistant", "content": "Noise."},
                                    {"role": "user", "content": [{"type": "text", "text": "And "},
                                                                 {"type": "image", "image": small}]}]
    c = prepare_chat(vision, two)
    assert c.pixel_values.shape[0] == 5 + 1 and len(c.prepared.layouts) == 2
    assert c.ids.count(vision.config.image_token_index) == 20 + 4


def test_bad_image_inputs_raise_clear_errors(vision, tiny):
    from conftest import random_image

    from workbench.chat import prepare_chat
    from workbench.image import ImageError

    img = random_image()
    with pytest.raises(ValueError, match="text-only: images need a multimodal model"):
        chat_generate(tiny, _image_turn(img), max_new_tokens=2)
    with pytest.raises(ImageError, match="1 <\\|image\\|> placeholders but 2 images"):     # more images than slots
        prepare_chat(vision, [{"role": "user", "content": [{"type": "image"}]}], images=[img, img])
    with pytest.raises(ImageError, match="2 <\\|image\\|> placeholders but 1 images"):     # typed placeholder
        prepare_chat(vision, [{"role": "user", "content": [{"type": "image", "image": img},
                                                           {"type": "text", "text": "and <|image|>"}]}])
    with pytest.raises(ValueError, match="one way"):
        prepare_chat(vision, _image_turn(img), images=[img])
    with pytest.raises(ImageError, match="no such file"):
        prepare_chat(vision, _image_turn("/nonexistent/cat.png"))
    with pytest.raises(ValueError, match="use prepare_chat"):
        from workbench.chat import chat_prompt
        chat_prompt(vision, _image_turn(img))


# ------------------------------------------------------------------------------------ plain prompts
def test_render_plain_is_the_last_message_alone():
    from workbench.chat import render_plain

    msgs = [{"role": "system", "content": "Ignored."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Question: ?\n"}, {"type": "image"},
                                         {"type": "text", "text": "\nAnswer:"}]}]
    assert render_plain(msgs) == "<|begin_of_text|>Question: ?\n<|image|>\nAnswer:"
    assert render_plain([{"role": "user", "content": "  kept as typed "}]) == "<|begin_of_text|>  kept as typed "
    with pytest.raises(ValueError, match="needs a message"):
        render_plain([])
    with pytest.raises(ValueError, match="must be a user message"):
        render_plain(msgs[:3])


def test_plain_prompt_on_the_text_model(tiny):
    from workbench.chat import prepare_chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    c = prepare_chat(tiny, msgs, prompt_format="plain")
    assert c.ids == tiny.tokenizer.encode("<|begin_of_text|>Hello", add_bos=False) and c.stops == chat_stop_ids(tiny)
    assert c.ids[0] == tiny.tokenizer.bos_token_id
    reply = chat_generate(tiny, msgs, 4, prompt_format="plain")
    assert reply.prompt_ids == c.ids and len(reply.ids) == 4
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        prepare_chat(tiny, msgs, prompt_format="raw")
    with pytest.raises(ValueError, match="no template"):
        prepare_chat(tiny, msgs, prompt_format="plain", tools=TOOLS)


def test_plain_prompt_takes_only_the_last_messages_image(vision):
    from conftest import random_image
    from PIL import Image

    from workbench.chat import prepare_chat
    from workbench.image import prepare

    small = Image.new("RGB", (40, 40), (200, 30, 30))              # one 56-px tile: 4 image tokens
    msgs = _image_turn(random_image()) + [{"role": "assistant", "content": "Noise."},
                                          {"role": "user", "content": [{"type": "text", "text": "And "},
                                                                       {"type": "image", "image": small}]}]
    c = prepare_chat(vision, msgs, prompt_format="plain")
    want = prepare("And <|image|>", [small], vision.tokenizer, vision)
    assert c.ids == want.input_ids[0].tolist() and c.ids.count(vision.config.image_token_index) == 4
    assert c.pixel_values.shape[0] == 1


@pytest.fixture(scope="module")
def vlm():
    return load_model("tiny-vlm")


def test_plain_prompt_is_tiny_vlms_trained_prompt_and_it_answers(vlm):
    """tiny-vlm learned `Question: …\\n<|image|>\\nAnswer:` → ` {answer}<|eot|>` (workbench/train/vlm.py):
    the plain prompt is exactly the training prompt, and greedy decoding answers; the chat template is
    a format it never saw."""
    from workbench.chat import prepare_chat
    from workbench.train import scenes
    from workbench.train.vlm import encode

    ex = scenes.example("t", 0, "colour")
    msgs = [{"role": "user", "content": scenes.prompt_text(ex.question)}]
    c = prepare_chat(vlm, msgs, images=[ex.image], prompt_format="plain")
    ids, labels, pixel_values, _ = encode(vlm, ex)
    n_prompt = next(i for i, lab in enumerate(labels) if lab != -100) + 1
    assert c.ids == ids[:n_prompt] and (c.pixel_values == pixel_values).all()
    reply = chat_generate(vlm, msgs, 8, images=[ex.image], prompt_format="plain")
    assert reply.text.strip() == ex.answer and reply.stop == EOT
    templated = prepare_chat(vlm, msgs, images=[ex.image])
    assert templated.ids[1] == vlm.tokenizer.token_to_id("<|header_start|>") and templated.ids != c.ids

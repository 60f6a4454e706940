"""Recorded generation: the arrays recorded step by step while generating equal `run_document` on the
finished sequence (router experts exactly, floats within tests/tolerances.py's round-off bound), the
tokens equal `generate`, and the run written equals a `record()` of the same tokens.  Decoding crosses
chunk boundaries and `floor_scale` on both configs (tiny: chunk 32, floor 16; the small one: chunk 16, floor 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ours_from_hf, random_hf_model
from test_attention_stats import CFG
from tolerances import entropy_tol

from workbench.chat import EOT, chat_generate
from workbench.checkpoint import load_model
from workbench.config import Llama4TextConfig
from workbench.generation import generate
from workbench.instrument.hooks import hooks
from workbench.live import append_generation, chat_recorded, generate_recorded
from workbench.recording import PROBES, record, run_document
from workbench.store import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


def atol(model, n_tokens: int) -> float:
    """Decode steps vs one pass over the sequence: the same maths in another order (tests/tolerances.py)."""
    return entropy_tol(getattr(model.config, "text_config", model.config), n_tokens)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def small():
    cfg = Llama4TextConfig(**dict(CFG, num_experts_per_tok=2, num_local_experts=6))
    return ours_from_hf(cfg, random_hf_model(cfg, std=0.15))


def assert_same_arrays(got: dict, want: dict, model):
    assert sorted(got) == sorted(want)
    tol = atol(model, int(want["attention/n_keys"].max()) if "attention/n_keys" in want else 1)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name.endswith("experts") or name == "attention/n_keys":
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=tol, err_msg=name)


def test_tiny_greedy_equals_generate_and_run_document(tiny):
    prompt = tiny.tokenizer.encode("Mixture of experts")
    streamed = []
    rec = generate_recorded(tiny, prompt, 50, probes=PROBES, stop_ids=[], on_token=streamed.append)
    assert len(prompt) + 50 > 2 * tiny.config.attention_chunk_size > tiny.config.floor_scale
    want = generate(tiny, prompt, 50, stop_ids=[])[0].tolist()
    assert rec.tokens == want and rec.n_prompt == len(prompt) and rec.new_ids == streamed == want[len(prompt):]
    assert rec.stop_id is None
    assert_same_arrays(rec.arrays, run_document(tiny, rec.tokens, PROBES), tiny)
    ent = rec.generated("attention/entropy")
    assert ent.shape == (tiny.config.num_hidden_layers, tiny.config.num_attention_heads, 50)
    assert rec.generated("router/experts").shape == (len(tiny.config.moe_layer_index), 50, 1)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.9, seed=3)], ids=["greedy", "sampled"])
def test_small_chunks_equal_generate_and_run_document(small, sampling):
    cfg = small.config
    prompt = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    rec = generate_recorded(small, prompt, 45, probes=("router", "router_logits", "entropy", "sink"),
                            stop_ids=[], segment=8, **sampling)          # a prefill in three segments
    assert rec.tokens == generate(small, prompt, 45, stop_ids=[], **sampling)[0].tolist()
    assert len(rec.tokens) == 66 > 4 * cfg.attention_chunk_size and cfg.floor_scale < 66
    assert_same_arrays(rec.arrays, run_document(small, rec.tokens, rec.probes), small)


def test_stops_after_recording_the_stop_token(small):
    prompt = [3, 1, 4, 1, 5]
    free = generate_recorded(small, prompt, 12, stop_ids=[])
    stop = free.new_ids[5]
    rec = generate_recorded(small, prompt, 12, stop_ids=[stop])
    first = free.new_ids.index(stop)
    assert rec.new_ids == free.new_ids[:first + 1] and rec.stop_id == stop
    assert_same_arrays(rec.arrays, run_document(small, rec.tokens, rec.probes), small)
    none = generate_recorded(small, prompt, 0)
    assert none.tokens == prompt and none.arrays["router/experts"].shape[1] == len(prompt)


def test_written_run_equals_record_of_the_same_tokens(tiny, tmp_path):
    rec = generate_recorded(tiny, tiny.tokenizer.encode("The router"), 20, stop_ids=[])
    assert append_generation(tiny, rec, tmp_path / "gen.zarr", doc_id="g0", domain="chat", model_source="tiny") == 0
    record(tiny, [{"tokens": rec.tokens, "id": "g0", "domain": "chat"}], tmp_path / "rec.zarr", progress=False,
           model_source="tiny")
    a, b = open_run(tmp_path / "gen.zarr"), open_run(tmp_path / "rec.zarr")
    assert a.n_docs == 1 and a.n_tokens == len(rec.tokens) and a.attrs["complete"]
    np.testing.assert_array_equal(a.tokens(0), rec.tokens)
    assert list(a.read("doc_id")) == ["g0"] and list(a.read("doc_domain")) == ["chat"]
    for key in ("config_hash", "model_source", "dtype", "probes", "probe_options", "layer_kinds", "input_hash",
                "layout"):
        assert a.attrs[key] == b.attrs[key], key
    for name in ("tokens", "positions", "doc_offsets", "router/experts", "router/weights", "attention/entropy",
                 "attention/entropy_no_temp", "attention/n_keys"):
        x, y = a.array(name)[...], b.array(name)[...]
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=0, atol=atol(tiny, len(rec.tokens)), err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.attrs["generations"]["g0"]["n_prompt"] == rec.n_prompt
    second = generate_recorded(tiny, [5, 6, 7], 3, stop_ids=[])        # appending: one document per call
    assert append_generation(tiny, second, tmp_path / "gen.zarr", doc_id="g1") == 1
    run = open_run(tmp_path / "gen.zarr")
    assert run.n_docs == 2 and sorted(run.attrs["generations"]) == ["g0", "g1"]
    np.testing.assert_array_equal(run.tokens(1), second.tokens)


def test_chat_turn_is_recorded_and_equals_chat_generate(tiny, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    pieces = []
    reply, rec = chat_recorded(tiny, msgs, 8, out=tmp_path / "chat.zarr", doc_id="turn-0", on_text=pieces.append)
    assert reply == chat_generate(tiny, msgs, 8) and "".join(pieces) == reply.text
    assert rec.tokens == reply.prompt_ids + reply.ids
    run = open_run(tmp_path / "chat.zarr")
    np.testing.assert_array_equal(run.tokens(0), rec.tokens)
    assert list(run.read("doc_domain")) == ["chat"]
    assert_same_arrays(rec.arrays, run_document(tiny, rec.tokens, rec.probes), tiny)
    eot = tiny.tokenizer.token_to_id(EOT)
    push = tiny.lm_head.weight[eot].detach() * 1000       # steer greedy decoding to <|eot|> (as in test_chat)
    with hooks(tiny, {"model.hook_final_norm": lambda v, _s: push.expand_as(v)}):
        reply, rec = chat_recorded(tiny, msgs, 8, out=tmp_path / "chat.zarr", doc_id="turn-1")
    assert reply.ids == [eot] and reply.stop == EOT and rec.stop_id == eot and rec.new_ids == [eot]
    assert open_run(tmp_path / "chat.zarr").n_docs == 2


def test_plain_prompt_turn_is_recorded_like_a_chat_turn(tiny, tmp_path):
    """prompt_format="plain": the last message alone is the prompt; the recording is that of any turn,
    and the run's generation note names the format."""
    msgs = [{"role": "system", "content": "Not rendered."}, {"role": "user", "content": "Hello"}]
    reply, rec = chat_recorded(tiny, msgs, 6, out=tmp_path / "chat.zarr", doc_id="turn-0", prompt_format="plain")
    assert reply == chat_generate(tiny, msgs, 6, prompt_format="plain")
    assert rec.tokens[:rec.n_prompt] == tiny.tokenizer.encode("<|begin_of_text|>Hello", add_bos=False)
    assert rec.tokens == reply.prompt_ids + reply.ids and rec.settings["prompt_format"] == "plain"
    assert_same_arrays(rec.arrays, run_document(tiny, rec.tokens, rec.probes), tiny)
    _, chat = chat_recorded(tiny, msgs, 2, out=tmp_path / "chat.zarr", doc_id="turn-1")
    run = open_run(tmp_path / "chat.zarr")
    np.testing.assert_array_equal(run.tokens(0), rec.tokens)
    notes = run.attrs["generations"]
    assert notes["turn-0"]["prompt_format"] == "plain" and notes["turn-1"]["prompt_format"] == "chat"
    assert notes["turn-0"]["n_prompt"] == rec.n_prompt < chat.n_prompt


def test_bad_inputs_raise_clear_errors(tiny, small, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        generate_recorded(tiny, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_recorded(tiny, [1, 2], -1)
    with pytest.raises(ValueError, match=r"unknown probes \['routr'\]"):
        generate_recorded(tiny, [1, 2], 2, probes=("routr",))
    with pytest.raises(ValueError, match="not a string|sequence of probe names"):
        generate_recorded(tiny, [1, 2], 2, probes="router")
    with pytest.raises(ValueError, match="one prompt"):
        generate_recorded(tiny, [[1, 2], [3, 4]], 2)
    with pytest.raises(ValueError, match="out of range"):
        generate_recorded(tiny, [10_000], 2)
    with pytest.raises(ValueError, match="temperature"):
        generate_recorded(tiny, [1, 2], 2, temperature=-1)
    rec = generate_recorded(tiny, [1, 2, 3], 2)
    append_generation(tiny, rec, tmp_path / "r.zarr", doc_id="a")
    with pytest.raises(ValueError, match="already"):
        append_generation(tiny, rec, tmp_path / "r.zarr", doc_id="a")
    other = generate_recorded(small, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="different model config"):
        append_generation(small, other, tmp_path / "r.zarr", doc_id="b")
    with pytest.raises(ValueError, match="layout mismatch"):
        append_generation(tiny, generate_recorded(tiny, [1, 2], 1, probes=("entropy",)), tmp_path / "r.zarr")
    assert open_run(tmp_path / "r.zarr").n_docs == 1


# ------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def vision():
    return load_model("tiny-vision")


def test_chat_turn_with_an_image_records_the_run_document_of_its_pixels(vision, tmp_path):
    from conftest import random_image

    from workbench.chat import prepare_chat

    img = random_image()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "image", "image": img}]}]
    pieces = []
    reply, rec = chat_recorded(vision, msgs, 12, out=tmp_path / "chat.zarr", doc_id="turn-0", probes=PROBES,
                               stop_ids=[], on_text=pieces.append, model_source="tiny-vision")
    c = prepare_chat(vision, msgs, stop_ids=[])
    assert reply == chat_generate(vision, msgs, 12, stop_ids=[]) and "".join(pieces) == reply.text
    assert rec.tokens == c.ids + reply.ids and rec.n_prompt == len(c.ids)
    assert_same_arrays(rec.arrays, run_document(vision, rec.tokens, PROBES, pixel_values=c.pixel_values), vision)
    text_only = run_document(vision, rec.tokens, ("entropy",))          # the pixels matter: not a text run
    assert np.abs(text_only["attention/entropy"] - rec.arrays["attention/entropy"]).max() > 1e-2
    run = open_run(tmp_path / "chat.zarr")
    np.testing.assert_array_equal(run.tokens(0), rec.tokens)
    assert run.attrs["generations"]["turn-0"]["image_tiles"] == 5 and run.attrs["model_source"] == "tiny-vision"


def test_segmented_prefill_keeps_the_image_in_its_first_segment(vision):
    from conftest import random_image

    from workbench.image import prepare
    from workbench.recording import prefill_spans

    p = prepare("Look: <|image|> and tell me what you see, in detail.", random_image(), vision.tokenizer, vision)
    ids = p.input_ids
    last_patch = int((ids[0] == vision.config.image_token_index).nonzero()[-1])
    spans = prefill_spans(vision, ids, 8, p.pixel_values)
    assert spans[0] == (0, last_patch + 1) and spans[-1][1] == ids.shape[1] and len(spans) > 2
    assert prefill_spans(vision, ids, 8) == [(a, min(a + 8, ids.shape[1])) for a in range(0, ids.shape[1], 8)]
    rec = generate_recorded(vision, ids, 6, probes=PROBES, stop_ids=[], segment=8, pixel_values=p.pixel_values)
    whole = generate_recorded(vision, ids, 6, probes=PROBES, stop_ids=[], pixel_values=p.pixel_values)
    assert rec.tokens == whole.tokens
    assert_same_arrays(rec.arrays, whole.arrays, vision)
    assert_same_arrays(rec.arrays, run_document(vision, rec.tokens, PROBES, segment=8, pixel_values=p.pixel_values),
                       vision)


def test_pixel_values_on_a_text_model_raise(tiny):
    import torch

    with pytest.raises(ValueError, match="no vision tower"):
        generate_recorded(tiny, [1, 2, 3], 2, pixel_values=torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match="no vision tower"):
        run_document(tiny, [1, 2, 3], ("router",), pixel_values=torch.zeros(1, 3, 56, 56))

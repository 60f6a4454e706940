"""Tokenizers: the byte tokenizer round-trips any text, puts Llama 4 special tokens at 256 + their offset
(spec llama4.md §7.1), saves/loads with checkpoints, and reads identically through HF's tokenizer class."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.checkpoint import load_model, save_model
from workbench.config import preset
from workbench.tokenizer import (
    LLAMA4_SPECIAL_BASE,
    TokenizerWrapper,
    byte_tokenizer,
    llama4_special_tokens,
    load_tokenizer,
    preset_tokenizer,
)

# spec §7.1 table: real id − 200000
SPEC_OFFSETS = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|fim_prefix|>": 2, "<|fim_middle|>": 3,
                "<|fim_suffix|>": 4, "<|header_start|>": 5, "<|header_end|>": 6, "<|eom|>": 7, "<|eot|>": 8,
                "<|step|>": 9, "<|text_post_train_reserved_special_token_0|>": 10, "<|python_start|>": 16,
                "<|python_end|>": 17, "<|finetune_right_pad|>": 18, "<|image_start|>": 80, "<|image_end|>": 81,
                "<|tile_x_separator|>": 84, "<|tile_y_separator|>": 85, "<|image|>": 90, "<|patch|>": 92}


_TOK = preset_tokenizer(preset("tiny"))      # module-level: hypothesis tests cannot take function fixtures


@pytest.fixture
def tok() -> TokenizerWrapper:
    return _TOK


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    t = _TOK
    ids = t.encode(text, add_bos=False)
    assert t.decode(ids) == text
    if "<|" not in text:                                # no special-token spelling: one id per UTF-8 byte
        assert ids == list(text.encode("utf-8"))
    assert t.encode(text) == [256] + ids


@pytest.mark.parametrize("text", ["", " ", "  leading and trailing  ", "a\r\nb\tc\x00", "é", "e\u0301",
                                  "日本語のテキスト", "🤖👩‍👩‍👧", "\U0010ffff", "ÿ\x7f\x80"])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.encode(text, add_bos=False) == list(text.encode("utf-8"))


def test_special_token_ids(tok):
    assert tok.vocab_size == 384
    assert tok.token_to_id("<|eot|>") == 264
    assert tok.token_to_id("<|patch|>") == 348
    assert tok.token_to_id("<|finetune_right_pad|>") == 274
    assert tok.bos_token_id == 256 and tok.stop_ids == [257, 263, 264]
    for name, offset in SPEC_OFFSETS.items():
        assert tok.token_to_id(name) == 256 + offset, name
    names = llama4_special_tokens(128)
    assert [tok.token_to_id(n) for n in names] == list(range(256, 384))
    assert tok.decode([264, 72, 348]) == "<|eot|>H<|patch|>"
    assert tok.decode([256, 72, 264], skip_special=True) == "H"
    assert tok.token_strings([256, 72, 195, 169]) == ["<|begin_of_text|>", "H", "\ufffd", "\ufffd"]


def test_special_token_table_matches_spec_offsets():
    names = llama4_special_tokens(2048)
    assert len(set(names)) == 2048
    for name, offset in SPEC_OFFSETS.items():
        assert names.index(name) == offset, name
    assert LLAMA4_SPECIAL_BASE + names.index("<|patch|>") == 200092       # config image_token_index


def test_special_token_text_is_one_token(tok):
    """As HF's fast tokenizer does, a special token spelled in text encodes to its id (Meta's tiktoken
    `encode` would spell it out in bytes instead); decoding round-trips either way."""
    ids = tok.encode("a<|eot|>b", add_bos=False)
    assert ids == [97, 264, 98]
    assert tok.decode(ids) == "a<|eot|>b"


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError, match="encode expects a string, got list"):
        tok.encode([1, 2])


def test_byte_tokenizer_needs_room_for_specials():
    with pytest.raises(ValueError, match=r"vocab_size=270 too small for the byte tokenizer"):
        preset_tokenizer(preset("tiny").replace(vocab_size=270, pad_token_id=None))  # pad 274 is out of vocab
    assert byte_tokenizer(19).get_vocab_size(with_added_tokens=True) == 275


def test_tokenizer_json_saved_and_loaded_with_the_checkpoint(tmp_path, tok):
    model = load_model("tiny")
    path = save_model(model, tmp_path / "ck")
    assert json.loads((path / "tokenizer.json").read_text())["added_tokens"][8]["content"] == "<|eot|>"
    back = load_model(path)
    assert back.tokenizer is not None
    text = "Héllo, wörld! 🤖 <|eot|>"
    assert back.tokenizer.encode(text) == tok.encode(text)
    assert back.tokenizer.decode(back.tokenizer.encode(text)) == "<|begin_of_text|>" + text
    assert back.tokenizer.stop_ids == [257, 263, 264] and back.tokenizer.bos_token_id == 256
    assert back.tokenizer.vocab_size == 384


def test_hf_fast_tokenizer_reads_the_same_ids(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ["Hello world", "  two  spaces", "日本語 🤖", "x<|eot|>y<|patch|>", "\n\t\r", ""]:
        ours = tok.encode(text, add_bos=False)
        assert hf.encode(text, add_special_tokens=False) == ours, text
        assert hf(text).input_ids == tok.encode(text), text          # its post-processor adds <|begin_of_text|>
        assert hf.decode(ours) == tok.decode(ours)
    assert hf.convert_tokens_to_ids("<|patch|>") == 348 and len(hf) == 384


def test_load_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None                        # no tokenizer.json: None, not an error
    byte_tokenizer(128).save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path, config_bos=256, config_eos=264)
    assert t.stop_ids == [264] and t.bos_token_id == 256
    t = load_tokenizer(tmp_path)                                   # defaults come from the token names
    assert t.stop_ids == [257, 263, 264] and t.bos_token_id == 256
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_json_in_checkpoint_is_a_clear_error(tmp_path):
    path = save_model(load_model("tiny"), tmp_path / "ck")
    (path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"ck/tokenizer\.json: not a valid tokenizer\.json"):
        load_model(path)

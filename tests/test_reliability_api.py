"""The Python API and checkpoints under bad input (issue 17, audit): generate's prompt and sampling
arguments, load_model's source, config.json values (model_type, token ids, huge ints, nesting), and
checkpoint files that are FIFOs, devices, escape the directory or hold NaN weights. Each case is a
clear error naming the argument, field or file — or correct behaviour — never a hang or traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_reliability_inputs import assert_clean_error, cli  # noqa: E402  (same CLI helpers)

import workbench
from workbench.checkpoint import CheckpointError, build_model, save_model
from workbench.config import ConfigError, Llama4TextConfig, preset
from workbench.tokenizer import preset_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return workbench.load_model("tiny")


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    model = build_model(preset("tiny"))
    model.tokenizer = preset_tokenizer(preset("tiny"))
    return save_model(model, tmp_path_factory.mktemp("ck") / "tiny", max_shard_size="100KB")   # sharded


def _copy(ck, tmp_path):
    return shutil.copytree(ck, tmp_path / "ck")


def _within(seconds, fn):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:          # noqa: BLE001
            box["e"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (hang)"
    return box.get("e")


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("prompt,pattern", [
    ({"a": 1}, "prompt must be a string, token ids, a list of those.*got dict"),
    ({1, 2}, "got set"),
    ([True, False], "prompt row 0: token ids must be integers; position 0 holds bool"),
    ([1.0, 2.0], "position 0 holds float"),
    ([[256, 104], [256, 2.5]], "prompt row 1: .*position 1 holds float"),
    (torch.tensor([1.0, 2.0]), "a token-id tensor must hold integers, got dtype torch.float32"),
    (np.array([1.5]), "a token-id array must be 1-D or 2-D of integers, got dtype float64"),
    ("look <|image|> here", r"image placeholder \(<\|image\|> or <\|patch\|>\) but no image was given"),
])
def test_generate_refuses_prompts_it_cannot_mean(tiny, prompt, pattern):
    with pytest.raises(ValueError, match=pattern):
        workbench.generate(tiny, prompt, 2)


def test_numpy_and_list_prompts_generate_the_same(tiny):
    ids = [256, 104, 105]
    a = workbench.generate(tiny, ids, 4)
    for p in (np.array(ids), np.array(ids, dtype=np.int32), np.array([ids]), torch.tensor(ids), [ids]):
        assert torch.equal(workbench.generate(tiny, p, 4), a), type(p)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"max_new_tokens": "3"}, "max_new_tokens must be an integer, got str '3'"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer, got float"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"temperature": 1.0, "seed": 10 ** 30}, r"seed 10{30} is out of range"),
    ({"temperature": 1.0, "seed": [1, True]}, "seed must be an int or one int per prompt"),
])
def test_generate_argument_errors_name_the_argument(tiny, kwargs, pattern):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        workbench.generate(tiny, "hi", kwargs.pop("max_new_tokens"), **kwargs)


@pytest.mark.parametrize("temperature,top_p", [(1e-45, 1.0), (5e-324, 1.0), (0.7, 1e-300), (1e-45, 1e-300)])
def test_extreme_sampling_settings_tend_to_greedy_instead_of_failing(tiny, temperature, top_p):
    greedy = workbench.generate(tiny, "hello", 5)
    assert torch.equal(workbench.generate(tiny, "hello", 5, temperature=temperature, top_p=top_p, seed=3), greedy)


@pytest.mark.parametrize("argv,pattern", [
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--temperature", "1e-45", "--seed", "1"], None),
    (["--top-p", "1e-300", "--temperature", "1", "--seed", "1"], None),
    (["--seed", "1" + "0" * 40, "--temperature", "1"], r"seed 10+ is out of range"),
])
def test_generate_cli_sampling_edges(argv, pattern, capsys):
    code, err = cli(["generate", "tiny", "--prompt", "hi", "--max-new-tokens", "2", *argv], capsys)
    if pattern is None:
        assert code == 0 and "Traceback" not in err, err
    else:
        assert_clean_error(code, err, pattern)


# ----------------------------------------------------------------------------- load_model / config.json
@pytest.mark.parametrize("source", [None, 3, ["tiny"]])
def test_load_model_names_its_argument(source):
    with pytest.raises(TypeError, match="load_model: source must be"):
        workbench.load_model(source)


@pytest.mark.parametrize("change,pattern", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not a Llama 4 config"),
    ({"eos_token_id": 384}, r"'eos_token_id': token id 384 is outside the vocabulary \(vocab_size=384\)"),
    ({"eos_token_id": [257, 10 ** 40]}, r"'eos_token_id': token id 10000000… \(41 digits\) is outside"),
    ({"bos_token_id": 999}, "'bos_token_id': token id 999 is outside"),
    ({"pad_token_id": 384}, "'pad_token_id': token id 384 is outside"),
    ({"eos_token_id": []}, "'eos_token_id' must be a token id"),
    ({"hidden_size": 10 ** 40}, r"'hidden_size' is 10000000… \(41 digits\), larger than 2147483647"),
    ({"num_attention_heads": 2 ** 31}, "'num_attention_heads' is 2147483648, larger than"),
    ({"rope_theta": 10 ** 400}, r"rope_theta.*too large for a number"),
    ({"rms_norm_eps": 10 ** 300}, r"rms_norm_eps must be a finite number > 0"),
])
def test_config_values_are_checked_with_field_and_value(change, pattern):
    d = preset("tiny").to_hf()
    d.update(change)
    with pytest.raises(ConfigError, match=pattern):
        Llama4TextConfig.from_hf(d, source="config.json")


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_config_json_via_cli(ck, tmp_path, capsys, depth):
    d = _copy(ck, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    text = json.dumps(cfg)[:-1] + ', "nested": ' + "[" * depth + "]" * depth + "}"
    (d / "config.json").write_text(text)
    code, err = cli(["info", d], capsys)
    if depth > 1000:
        assert_clean_error(code, err, r"config\.json: JSON nested too deeply")
    else:
        assert code == 0, err         # a nested unknown key is warned about and ignored


def test_gpt2_config_via_cli(ck, tmp_path, capsys):
    d = _copy(ck, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(*cli(["generate", d, "--prompt", "hi"], capsys), "model_type 'gpt2' is not a Llama 4")


# ----------------------------------------------------------------------------- checkpoint files
def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("name", ["/etc/passwd", "../elsewhere.safetensors", "sub/../../x.safetensors", ""])
def test_index_naming_a_path_outside_the_checkpoint_is_refused(ck, tmp_path, name):
    d = _copy(ck, tmp_path)
    idx = _index(d)
    key = next(iter(idx["weight_map"]))
    idx["weight_map"][key] = name
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="points outside the directory|is not a file name"):
        workbench.load_model(d)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory"])
def test_shard_or_config_that_is_not_a_regular_file(ck, tmp_path, kind):
    d = _copy(ck, tmp_path)
    for victim in (sorted(d.glob("model-*.safetensors"))[1], d / "config.json"):
        backup = victim.read_bytes()
        victim.unlink()
        if kind == "fifo":
            os.mkfifo(victim)
        elif kind == "directory":
            victim.mkdir()
        else:
            victim.symlink_to(kind)
        err = _within(30, lambda: workbench.load_model(d))
        assert isinstance(err, (CheckpointError, ConfigError)), err
        assert victim.name in str(err) and ("FIFO" in str(err) or "device" in str(err) or "directory" in str(err))
        (victim.rmdir() if victim.is_dir() and not victim.is_symlink() else victim.unlink())
        victim.write_bytes(backup)


def test_tokenizer_json_fifo_does_not_hang(ck, tmp_path):
    d = _copy(ck, tmp_path)
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")
    err = _within(30, lambda: workbench.load_model(d))
    assert isinstance(err, ValueError) and "tokenizer.json" in str(err) and "FIFO" in str(err), err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weights_are_refused_at_load_naming_the_tensor(ck, tmp_path, value):
    d = _copy(ck, tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds 1 NaN/inf values"):
        workbench.load_model(d)


@settings(max_examples=60, deadline=None)
@given(entry=st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2)))
def test_fuzzed_index_entries_load_or_fail_clearly(ck, tmp_path_factory, entry):
    """Any JSON value as one shard name: CheckpointError / FileNotFoundError naming it, never another error."""
    d = shutil.copytree(ck, tmp_path_factory.mktemp("fz") / "ck")
    idx = _index(d)
    idx["weight_map"][next(iter(idx["weight_map"]))] = entry
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    try:
        workbench.load_model(d)
    except (CheckpointError, FileNotFoundError):
        pass


@pytest.mark.parametrize("kwargs,pattern", [({"temperature": float("nan")}, "temperature must be a finite number"),
                                            ({"top_p": float("nan")}, "top_p must be a finite number"),
                                            ({"temperature": 1e-45, "seed": 1}, None)])
def test_recorded_generation_checks_sampling_like_generate(tiny, kwargs, pattern):
    from workbench.live import generate_recorded
    if pattern is None:
        assert generate_recorded(tiny, "hi", 3, **kwargs).new_ids == workbench.generate(tiny, "hi", 3)[0, -3:].tolist()
    else:
        with pytest.raises(ValueError, match=pattern):
            generate_recorded(tiny, "hi", 2, **kwargs)

"""Config: the per-layer schedule pinned to HF's derivation, `from_hf` spellings, validation messages,
presets (spec llama4.md §1)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from workbench.config import PRESETS, ConfigError, Llama4TextConfig, preset
from workbench.model import Llama4ForCausalLM

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4)

SCHEDULES = {
    "interval4_step1": dict(SMALL, no_rope_layer_interval=4, interleave_moe_layer_step=1),
    "interval2_step2": dict(SMALL, no_rope_layer_interval=2, interleave_moe_layer_step=2),
    "interval3_step3_odd_layers": dict(SMALL, num_hidden_layers=7, no_rope_layer_interval=3,
                                       interleave_moe_layer_step=3),
    "explicit_moe_layers": dict(SMALL, moe_layers=[0, 5, 7], interleave_moe_layer_step=2),
    "explicit_no_rope_layers": dict(SMALL, no_rope_layers=[0, 1, 1, 0, 0, 1, 0, 1]),
    "empty_moe_layers": dict(SMALL, moe_layers=[]),
    "chunk_none": dict(SMALL, attention_chunk_size=None),
    "interval1_all_nope": dict(SMALL, no_rope_layer_interval=1),
}


def _hf(kwargs):
    from transformers import Llama4TextConfig as HFConfig

    return HFConfig(**kwargs)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_hf_derivation(name):
    kw = SCHEDULES[name]
    ours, hf = Llama4TextConfig(**kw), _hf(kw)
    L = kw["num_hidden_layers"]
    assert ours.no_rope_layers == list(hf.no_rope_layers)[:L]
    assert ours.moe_layers == list(hf.moe_layers)
    # HF modeling: use_rope = no_rope_layers[i]; is_moe = i in moe_layers; mask kind = layer_types[i]
    assert ours.use_rope == [bool(hf.no_rope_layers[i]) for i in range(L)]
    assert ours.is_moe == [i in hf.moe_layers for i in range(L)]
    assert ours.is_chunked == [t == "chunked_attention" for t in hf.layer_types]
    assert ours.to_hf()["layer_types"] == list(hf.layer_types)
    assert len(ours.use_rope) == len(ours.is_chunked) == len(ours.is_moe) == L


def test_schedule_known_values():
    """Spec §1.1/§1.3: interval 4 → layers 3, 7, … NoPE; step 2 → MoE on odd layers."""
    c = Llama4TextConfig(**dict(SMALL, interleave_moe_layer_step=2))
    assert [i for i, r in enumerate(c.use_rope) if not r] == [3, 7]
    assert c.moe_layer_index == [1, 3, 5, 7] and c.num_moe_layers == 4
    assert c.layer_kinds()[:4] == ["rope-chunked/dense", "rope-chunked/moe", "rope-chunked/dense", "nope-global/moe"]
    assert Llama4TextConfig(**dict(SMALL, attention_chunk_size=None)).layer_kinds()[0] == "rope-global/moe"


def test_replace_rederives_schedule():
    c = Llama4TextConfig(**SMALL)
    c2 = c.replace(num_hidden_layers=4, no_rope_layers=None, moe_layers=None)
    assert c2.no_rope_layers == [1, 1, 1, 0] and c2.moe_layers == [0, 1, 2, 3]
    assert c.num_hidden_layers == 8          # the original is untouched


# ------------------------------------------------------------------------------------------ from_hf
def _composite_json(text_kwargs) -> dict:
    from transformers import Llama4Config

    vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return json.loads(Llama4Config(text_config=_hf(text_kwargs).to_dict(), vision_config=vc).to_json_string())


LLAMA3 = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 8192}


def test_from_hf_reads_composite_llama4config_json():
    kw = dict(SMALL, interleave_moe_layer_step=2, attention_chunk_size=32, use_qk_norm=False,
              rope_parameters=dict(LLAMA3, rope_theta=250000.0), eos_token_id=[5, 6], pad_token_id=7)
    d = _composite_json(kw)
    assert "text_config" in d and "vision_config" in d
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a real HF config has no unknown keys
        c = Llama4TextConfig.from_hf(d)
    assert (c.hidden_size, c.num_hidden_layers, c.attention_chunk_size, c.use_qk_norm) == (64, 8, 32, False)
    assert c.rope_theta == 250000.0
    assert c.rope_scaling == LLAMA3
    assert c.moe_layers == [1, 3, 5, 7] and c.eos_token_id == [5, 6] and c.pad_token_id == 7
    hf = _hf(dict(SMALL, interleave_moe_layer_step=2, attention_chunk_size=32))
    assert c.to_hf()["layer_types"] == list(hf.layer_types)


def test_from_hf_text_config_json_round_trips():
    c = preset("tiny")
    d = json.loads(json.dumps(c.to_hf()))
    c2 = Llama4TextConfig.from_hf(d)
    assert c2 == c and c2.config_hash() == c.config_hash()
    # HF accepts what we write
    from workbench.checkpoint import read_config  # noqa: F401  (same reader load_model uses)
    hf = _hf({k: v for k, v in d.items() if k not in ("model_type", "rope_scaling", "rope_theta")})
    assert list(hf.no_rope_layers) == c.no_rope_layers and list(hf.moe_layers) == c.moe_layers


@pytest.mark.parametrize("spelling", ["v4_rope_theta_rope_scaling", "v5_rope_parameters", "v4_type_key"])
def test_from_hf_rope_spellings(spelling):
    base = dict(SMALL)
    if spelling == "v4_rope_theta_rope_scaling":
        base.update(rope_theta=123456.0, rope_scaling=dict(LLAMA3))
    elif spelling == "v4_type_key":      # very old configs spell the kind `type`
        base.update(rope_theta=123456.0, rope_scaling={k if k != "rope_type" else "type": v for k, v in LLAMA3.items()})
    else:
        base.update(rope_parameters=dict(LLAMA3, rope_theta=123456.0))
    c = Llama4TextConfig.from_hf(base)
    assert c.rope_theta == 123456.0
    rs = dict(c.rope_scaling)
    assert rs.pop("rope_type", rs.pop("type", None)) == "llama3"
    assert rs == {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    assert c.rope_parameters()["rope_type"] == "llama3" and c.rope_parameters()["factor"] == 16.0


def test_from_hf_default_rope_parameters_mean_no_scaling():
    c = Llama4TextConfig.from_hf(dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    c = Llama4TextConfig.from_hf(dict(SMALL, rope_theta=20000, rope_scaling=None))
    assert c.rope_theta == 20000.0 and isinstance(c.rope_theta, float)


@pytest.mark.parametrize("value,expected", [(4, True), (0, False), (True, True), (False, False)])
def test_attn_temperature_tuning_int_from_release(value, expected):
    """v4.51 configs shipped attn_temperature_tuning = 4 (transformers#37479)."""
    c = Llama4TextConfig.from_hf(dict(SMALL, attn_temperature_tuning=value))
    assert c.attn_temperature_tuning is expected


def test_unknown_keys_are_warned_with_their_names():
    with pytest.warns(UserWarning, match=r"unknown config keys \['frobnicate', 'zz_extra'\]"):
        c = Llama4TextConfig.from_hf(dict(SMALL, frobnicate=1, zz_extra="x"), source="my/config.json")
    assert c.hidden_size == 64
    with pytest.raises(ConfigError, match="frobnicate"):
        Llama4TextConfig.from_hf(dict(SMALL, frobnicate=1), strict=True)


def test_known_bookkeeping_keys_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama4TextConfig.from_hf(dict(SMALL, architectures=["Llama4ForCausalLM"], model_type="llama4_text",
                                      transformers_version="4.51.0", torch_dtype="bfloat16", use_cache=True,
                                      router_aux_loss_coef=0.001, initializer_range=0.02))


# --------------------------------------------------------------------------------------- validation
BAD = [
    (dict(num_attention_heads=6, num_key_value_heads=4), r"num_attention_heads=6 .*num_key_value_heads=4"),
    (dict(attention_chunk_size=0), r"attention_chunk_size.*0"),
    (dict(attention_chunk_size=-16), r"attention_chunk_size.*-16"),
    (dict(head_dim=15), r"head_dim=15"),
    (dict(head_dim=0), r"'head_dim'.*0"),
    (dict(moe_layers=[0, 8]), r"moe_layers.*8.*0\.\.7"),
    (dict(moe_layers=[-1]), r"moe_layers.*-1"),
    (dict(hidden_size="64"), r"'hidden_size'.*'64'"),
    (dict(num_hidden_layers=4.0), r"'num_hidden_layers'.*4\.0"),
    (dict(rope_theta="1e4"), r"'rope_theta'.*'1e4'"),
    (dict(no_rope_layers=[1, 1, 0]), r"no_rope_layers has 3 entries.*num_hidden_layers=8"),
    (dict(no_rope_layers=[1, 1, 2, 1, 1, 1, 1, 1]), r"no_rope_layers.*2"),
    (dict(num_experts_per_tok=5), r"num_experts_per_tok=5.*num_local_experts=4"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(rms_norm_eps=0.0), r"rms_norm_eps.*0\.0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"low_freq_factor"),
    (dict(rope_scaling="llama3"), r"rope_scaling.*'llama3'"),
    (dict(use_qk_norm="false"), r"'use_qk_norm'.*'false'"),
    (dict(tie_word_embeddings="no"), r"'tie_word_embeddings'.*'no'"),
    (dict(eos_token_id="2"), r"'eos_token_id'.*'2'"),
    (dict(eos_token_id=[1, "x"]), r"'eos_token_id'.*'x'"),
    (dict(bos_token_id="1"), r"'bos_token_id'.*'1'"),
    (dict(pad_token_id=-5), r"'pad_token_id'.*-5"),
    (dict(attn_temperature_tuning="true"), r"'attn_temperature_tuning'.*'true'"),
    (dict(attention_chunk_size=True), r"attention_chunk_size.*True"),
    (dict(moe_layers=3), r"'moe_layers' must be a list, got 3"),
    (dict(moe_layers=[True]), r"moe_layers contains True"),
    (dict(no_rope_layers="1111"), r"'no_rope_layers' must be a list, got '1111'"),
]


@pytest.mark.parametrize("change,pattern", BAD, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))[:20]
                                                     for c, _ in BAD])
def test_validation_errors_name_field_and_value(change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Llama4TextConfig.from_hf(dict(SMALL, **change), source="cfg.json")


def test_validation_errors_from_constructor_too():
    with pytest.raises(ConfigError, match=r"num_attention_heads=6"):
        Llama4TextConfig(**dict(SMALL, num_attention_heads=6, num_key_value_heads=4))
    with pytest.raises(ConfigError, match=r"'hidden_size'.*'64'"):
        Llama4TextConfig(**dict(SMALL, hidden_size="64"))


def test_from_hf_error_names_the_source():
    with pytest.raises(ConfigError, match=r"^some/dir/config\.json: .*head_dim=15"):
        Llama4TextConfig.from_hf(dict(SMALL, head_dim=15), source="some/dir/config.json")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        Llama4TextConfig.from_hf([1, 2])
    with pytest.raises(ConfigError, match="'text_config' must be an object"):
        Llama4TextConfig.from_hf({"text_config": 3})


# ------------------------------------------------------------------------------------------ presets
def _param_count_from_spec(c: Llama4TextConfig) -> int:
    """Spec §5.1 tensor shapes, counted independently of the model code."""
    D, V, F, Fm, E = c.hidden_size, c.vocab_size, c.intermediate_size, c.intermediate_size_mlp, c.num_local_experts
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = 2 * q * D + 2 * kv * D + 2 * D                      # q, o, k, v, two norms
    moe = E * D + E * D * 2 * F + E * F * D + 3 * F * D         # router, gate_up, down, shared expert
    dense = 3 * Fm * D
    layers = sum(attn + (moe if m else dense) for m in c.is_moe)
    return 2 * V * D + D + layers                              # embed, lm_head (untied), final norm


@pytest.mark.parametrize("name,billions,digits", [("scout", 107.77, 2), ("maverick", 400.7, 1)])
def test_full_size_presets_parameter_counts(name, billions, digits):
    cfg = preset(name)
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == _param_count_from_spec(cfg)
    assert round(n / 1e9, digits) == billions               # spec §1.3 table
    assert abs(n / 1e9 - billions) < 0.015


def test_scout_and_maverick_schedules():
    s, m = preset("scout"), preset("maverick")
    assert s.is_moe == [True] * 48 and s.use_qk_norm and s.rope_scaling["factor"] == 16.0
    assert m.moe_layer_index == list(range(1, 48, 2)) and not m.use_qk_norm and m.rope_scaling is None
    for c in (s, m):
        assert [i for i, r in enumerate(c.use_rope) if not r] == list(range(3, 48, 4))
        assert c.num_local_experts == (16 if c is s else 128)
        assert c.eos_token_id == [200001, 200007, 200008] and c.pad_token_id == 200018


def test_tiny_preset_exercises_every_layer_type():
    c = preset("tiny")
    assert c.num_hidden_layers >= 4
    assert any(c.is_chunked) and not all(c.is_chunked)              # chunked RoPE and global NoPE
    assert any(c.is_moe) and not all(c.is_moe)                      # MoE and dense FFN
    assert c.attention_chunk_size <= 64 and c.floor_scale <= 64     # trigger in short sequences
    assert c.attn_temperature_tuning and c.temperature_scale(c.floor_scale * 2) > 1.0
    assert c.temperature_scale(c.floor_scale - 2) == 1.0
    kinds = set(c.layer_kinds())
    assert {"rope-chunked/moe", "nope-global/moe", "rope-chunked/dense"} <= kinds


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError, match=r"unknown preset 'scoot'.*maverick.*scout.*tiny"):
        preset("scoot")
    assert set(PRESETS) >= {"tiny", "scout", "maverick"}

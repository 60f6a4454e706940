"""Vision tower and early fusion: parity with `transformers` on random tiny weights (fp32, CPU), taps,
errors, configs and checkpoints (spec llama4.md §4, §5.1).

transformers 5.24's `Llama4ForConditionalGeneration.forward` raises AttributeError ('image_outputs')
whenever pixel values are given, so the reference is composed from its own modules exactly as that
forward does: get_image_features → multi_modal_projector → masked_scatter → language_model(inputs_embeds).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import hf_config
from PIL import Image
from safetensors.torch import load_file, save_file
from tolerances import multimodal_close

from workbench.checkpoint import CheckpointError
from workbench.checkpoint_vision import load_multimodal, save_multimodal
from workbench.config import ConfigError
from workbench.config_vision import Llama4Config, Llama4VisionConfig, vision_preset
from workbench.image import ImageProcessor, prepare
from workbench.instrument.hooks import hooks, run_with_cache
from workbench.model.kv_cache import KVCache
from workbench.model.multimodal import Llama4ForConditionalGeneration, multimodal_site_names
from workbench.model.vision import pixel_shuffle, vision_rotations
from workbench.tokenizer import preset_tokenizer

TOL = multimodal_close(vision_preset("tiny-vision"))   # fp32 round-off (tests/tolerances.py)


def _hf_config(cfg: Llama4Config):
    from transformers import Llama4Config as HFConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HFConfig(text_config=hf_config(cfg.text_config).to_dict(), vision_config=cfg.vision_config.to_hf(),
                        boi_token_index=cfg.boi_token_index, eoi_token_index=cfg.eoi_token_index,
                        image_token_index=cfg.image_token_index)


@pytest.fixture(scope="module")
def pair():
    """HF Llama4ForConditionalGeneration (tiny-vision, random weights) and ours on the same weights."""
    from transformers import Llama4ForConditionalGeneration as HF

    cfg = vision_preset("tiny-vision")
    torch.manual_seed(0)
    hf = HF(_hf_config(cfg)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in n else p.normal_(0, 0.08)
    ours = Llama4ForConditionalGeneration(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return cfg, hf, ours


def _reference(hf, ids, pixel_values):
    """HF's forward, minus its bug: the same module calls in the same order."""
    embeds = hf.get_input_embeddings()(ids)
    feats = hf.get_image_features(pixel_values=pixel_values.float(), return_dict=True).last_hidden_state
    proj = hf.multi_modal_projector(feats.view(-1, feats.size(-1)))
    mask = hf.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=proj)
    return proj, hf.language_model(inputs_embeds=embeds.masked_scatter(mask, proj)).logits


def _img(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _inputs(cfg, prompt, images):
    return prepare(prompt, images, preset_tokenizer(cfg.text_config), ImageProcessor.from_config(cfg))


CASES = {   # text before, between and after images; 1 tile, multi-tile + global, two images
    "one_tile": ("Look: <|image|> what is it?", [(40, 50)]),
    "multi_tile": ("Describe <|image|> please", [(100, 150)]),
    "two_images": ("First <|image|> then <|image|> compare them.", [(100, 50), (56, 56)]),
}


# ------------------------------------------------------------------------------------- parity
def test_vision_encoder_and_features_match_hf(pair):
    cfg, hf, ours = pair
    pv = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    got = {}
    h = hf.vision_model.layernorm_post.register_forward_hook(lambda m, i, o: got.__setitem__("enc", o[:, :-1]))
    try:
        with torch.no_grad():
            ref_feats = hf.vision_model(pv).last_hidden_state
            ref_proj = hf.multi_modal_projector(ref_feats.flatten(0, 1))
    finally:
        h.remove()
    with torch.no_grad():
        _, cache = run_with_cache(ours.vision_model, pv, ["hook_encoder_out", "hook_features"])
        proj = ours.get_image_features(pv)
    assert cache["hook_encoder_out"].shape == (5, 16, 32) and ref_feats.shape == (5, 4, 48)
    torch.testing.assert_close(cache["hook_encoder_out"], got["enc"], **TOL)
    torch.testing.assert_close(cache["hook_features"], ref_feats, **TOL)
    torch.testing.assert_close(proj, ref_proj, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_multimodal_logits_match_hf(pair, case):
    cfg, hf, ours = pair
    prompt, sizes = CASES[case]
    inp = _inputs(cfg, prompt, [_img(h, w, i) for i, (h, w) in enumerate(sizes)])
    n_tiles = {"one_tile": 1, "multi_tile": 7, "two_images": 4}[case]       # 2×3 + global; (2×1 + global) + 1
    assert inp.pixel_values.shape[0] == n_tiles
    with torch.no_grad():
        ref_proj, ref_logits = _reference(hf, inp.input_ids, inp.pixel_values)
        out = ours(inp.input_ids, inp.pixel_values)
    torch.testing.assert_close(out.image_features, ref_proj, **TOL)
    torch.testing.assert_close(out.logits, ref_logits, **TOL)
    assert out.image_token_mask.sum() == n_tiles * 4 == len(inp.patch_map)
    assert out.image_token_mask[0].nonzero()[:, 0].tolist() == inp.patch_map.position.tolist()


def test_greedy_decoding_with_an_image_matches_reference(pair):
    cfg, hf, ours = pair
    inp = _inputs(cfg, "Describe <|image|> now", [_img(100, 150, 3)])
    ids, ref = inp.input_ids, inp.input_ids
    cache = KVCache(cfg.num_hidden_layers)
    with torch.no_grad():
        out = ours(ids, inp.pixel_values, cache=cache, last_only=True)
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            out = ours(nxt, cache=cache, last_only=True)           # decode steps: no pixel values
            ref = torch.cat([ref, _reference(hf, ref, inp.pixel_values)[1][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, ref)


def test_rope_table_and_pixel_shuffle_match_hf():
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_shuffle

    for name in ("tiny-vision", "scout-vision"):
        vc = vision_preset(name).vision_config
        hc = _hf_config(vision_preset("tiny-vision")).vision_config
        for k, v in vc.to_hf().items():
            if k != "model_type":
                setattr(hc, k, v)
        ref = Llama4VisionRotaryEmbedding(hc).freqs_ci.squeeze(1)             # (P+1, R) complex
        cos, sin = vision_rotations(vc)
        torch.testing.assert_close(cos, ref.real, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, ref.imag, rtol=0, atol=1e-6)
        assert (cos[-1] == 1).all() and (sin[-1] == 0).all()                  # CLS is not rotated
    x = torch.randn(2, 576, 6)
    torch.testing.assert_close(pixel_shuffle(x, 2), hf_shuffle(x, 0.5), rtol=0, atol=0)
    idx = torch.arange(576.0).view(1, 576, 1)                                   # science.md §4.2: t ↔ 2×2 patches
    out = pixel_shuffle(idx, 2)[0]
    for t in (0, 13, 143):
        r, c = divmod(t, 12)
        want = [float((2 * r + dy) * 24 + 2 * c + dx) for dy in (0, 1) for dx in (0, 1)]
        assert sorted(out[t].tolist()) == sorted(want)


# ------------------------------------------------------------------------------------- behaviour
def test_count_mismatch_is_a_clear_error(pair):
    cfg, _, ours = pair
    inp = _inputs(cfg, "x <|image|> y", [_img(100, 150, 0)])
    with pytest.raises(ValueError, match=r"28 <\|patch\|> tokens .* 24 features \(6 tiles × 4"):
        ours(inp.input_ids, inp.pixel_values[:6])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        ours(inp.input_ids, torch.zeros(7, 3, 336, 336))


def test_text_only_forward_and_mask(pair):
    cfg, hf, ours = pair
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        out = ours(ids)
        torch.testing.assert_close(out.logits, hf.language_model(input_ids=ids).logits, **TOL)
    assert out.image_features is None and not out.image_token_mask.any()
    assert ours.config.image_token_id == 348 and ours.config.max_position_embeddings == 131072


def test_taps_fire_with_documented_shapes_and_are_noops(pair):
    cfg, _, ours = pair
    inp = _inputs(cfg, "a <|image|> b", [_img(100, 150, 5)])
    with torch.no_grad():
        plain = ours(inp.input_ids, inp.pixel_values).logits
        out, cache = run_with_cache(ours, inp.input_ids, ["vision_model.*", "hook_image_features",
                                                          "language_model.model.hook_embed"],
                                    pixel_values=inp.pixel_values)
    assert torch.equal(out.logits, plain)
    sites = multimodal_site_names(cfg)
    N, P, Q, I = 7, 16, 4, 28
    dims = dict(N=N, P=P, Dv=32, Q=Q, Do=48, I=I, D=64, B=1, T=inp.input_ids.shape[1])
    dims["P+1"] = P + 1
    for name, value in cache.items():
        assert name in sites, name
        assert tuple(value.shape) == tuple(dims[d] for d in sites[name][0].split()), name
    assert set(cache) >= {"vision_model.hook_patch_embed", "vision_model.hook_encoder_out",
                          "vision_model.hook_features", "vision_model.model.layers.1.hook_resid_post",
                          "hook_image_features"}
    mask = out.image_token_mask[0]
    torch.testing.assert_close(cache["language_model.model.hook_embed"][0, mask], cache["hook_image_features"])
    with torch.no_grad(), hooks(ours, {"hook_image_features": lambda v, s: torch.zeros_like(v)}):
        ablated = ours(inp.input_ids, inp.pixel_values).logits
    assert not torch.equal(ablated, plain)                     # write-interventions reach the text stream


def test_gradients_reach_pixels(pair):
    cfg, _, ours = pair
    inp = _inputs(cfg, "a <|image|> b", [_img(40, 40, 6)])
    pv = inp.pixel_values.float().requires_grad_(True)
    ours(inp.input_ids, pv).logits[0, -1].logsumexp(-1).backward()
    assert pv.grad is not None and pv.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- config
def test_config_round_trip_and_hf_dicts():
    cfg = vision_preset("tiny-vision")
    back = Llama4Config.from_hf(json.loads(json.dumps(cfg.to_hf())), strict=True)
    assert back == cfg
    hf_dict = _hf_config(cfg).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Llama4Config.from_hf(hf_dict) == cfg
    old = dict(hf_dict, vision_config={k: v for k, v in hf_dict["vision_config"].items() if k != "rope_parameters"})
    old["vision_config"]["rope_theta"] = 10000                                   # older spelling
    assert Llama4Config.from_hf(old).vision_config.rope_theta == 10000.0


def test_config_validation_names_field_and_value():
    bad = {"intermediate_size": (dict(intermediate_size=64), "intermediate_size=64 must equal"),
           "hidden_act": (dict(hidden_act="silu"), "'hidden_act' must be 'gelu'"),
           "heads": (dict(num_attention_heads=3), "not divisible by num_attention_heads=3"),
           "ratio": (dict(pixel_shuffle_ratio=0.3), "pixel_shuffle_ratio=0.3"),
           "image": (dict(image_size=50), "image_size=50 is not a multiple"),
           "proj": (dict(vision_output_dim=40), "vision_output_dim=40"),
           "square": (dict(image_size=[56, 28]), "must be square")}
    base = dict(vision_preset("tiny-vision").vision_config.to_hf())
    base.pop("model_type")
    for change, msg in bad.values():
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            Llama4VisionConfig.from_hf(dict(base, **change))
    with pytest.raises(ConfigError, match="'image_token_index' must be a token id"):
        Llama4Config(text_config=vision_preset("tiny-vision").text_config, image_token_index=-1)
    with pytest.warns(UserWarning, match="image_token_index=200092 is outside the text vocabulary"):
        Llama4Config(text_config=vision_preset("tiny-vision").text_config)
    with pytest.raises(ConfigError, match="not a multimodal"):
        Llama4Config.from_hf({"hidden_size": 8})


def test_real_size_shapes_match_spec_and_hf():
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel as HFVision

    cfg = vision_preset("scout-vision")
    vc = cfg.vision_config
    assert (vc.head_dim, vc.tokens_per_tile, vc.intermediate_size) == (88, 144, 5632)
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = HFVision(_hf_config(cfg).vision_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = {"vision_model.patch_embedding.linear.weight": (1408, 588), "vision_model.class_embedding": (1408,),
            "vision_model.positional_embedding_vlm": (577, 1408),
            "vision_model.model.layers.33.self_attn.q_proj.bias": (1408,),
            "vision_model.model.layers.0.mlp.fc1.weight": (5632, 1408),
            "vision_model.model.layers.0.mlp.fc2.weight": (1408, 5632),
            "vision_model.vision_adapter.mlp.fc1.weight": (4096, 5632),
            "vision_model.vision_adapter.mlp.fc2.weight": (4096, 4096),
            "multi_modal_projector.linear_1.weight": (5120, 4096)}
    for k, v in spec.items():
        assert shapes[k] == v, k
    ours_v = {k.removeprefix("vision_model."): v for k, v in shapes.items() if k.startswith("vision_model.")}
    assert ours_v == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


# ------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def hf_dir(pair, tmp_path_factory):
    _, hf, _ = pair
    path = tmp_path_factory.mktemp("hfmm") / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(path)
    preset_tokenizer(vision_preset("tiny-vision").text_config).save(path)
    return path


def test_load_hf_checkpoint_and_save_back(pair, hf_dir, tmp_path):
    from transformers import Llama4ForConditionalGeneration as HF

    cfg, hf, _ = pair
    inp = _inputs(cfg, "two <|image|> and <|image|>.", [_img(100, 150, 7), _img(40, 90, 8)])
    with torch.no_grad():
        ref = _reference(hf, inp.input_ids, inp.pixel_values)[1]
        ours = load_multimodal(hf_dir)
        assert ours.config == cfg and ours.dtype == torch.float32 and ours.tokenizer is not None
        torch.testing.assert_close(ours(inp.input_ids, inp.pixel_values).logits, ref, **TOL)
        for shard in ("5GB", "60KB"):
            out = save_multimodal(ours, tmp_path / shard, max_shard_size=shard)
            assert (len(list(out.glob("*.safetensors"))) > 1) == (shard == "60KB")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back_hf = HF.from_pretrained(out).eval()
            torch.testing.assert_close(_reference(back_hf, inp.input_ids, inp.pixel_values)[1], ref, **TOL)
            back = load_multimodal(out)
            assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
            assert back.image_processor == ImageProcessor.from_config(cfg)


def test_loader_reports_missing_unexpected_and_bad_shapes(hf_dir, tmp_path):
    import shutil

    ck = shutil.copytree(hf_dir, tmp_path / "ck")
    state = load_file(ck / "model.safetensors")
    state.pop("vision_model.model.layers.1.mlp.fc2.bias")
    state["vision_model.extra.weight"] = torch.zeros(1)
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    save_file(state, ck / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_multimodal(ck)
    msg = str(e.value)
    assert "missing keys (1): ['vision_model.model.layers.1.mlp.fc2.bias']" in msg
    assert "unexpected keys (1): ['vision_model.extra.weight']" in msg
    assert "multi_modal_projector.linear_1.weight: checkpoint (3, 3) vs model (64, 48)" in msg


def test_loader_rejects_text_only_and_loads_presets(tmp_path):
    from workbench.checkpoint import load_model, save_model

    text = save_model(load_model("tiny"), tmp_path / "text")
    with pytest.raises(ConfigError, match="not a multimodal"):
        load_multimodal(text)
    model = load_multimodal("tiny-vision")
    assert model.image_processor.tile_size == 56 and model.tokenizer.token_to_id("<|patch|>") == 348
    with pytest.raises(ValueError, match="full size"):
        load_multimodal("scout-vision")

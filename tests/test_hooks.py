"""Taps are bitwise no-ops, every site fires with its documented shape, hooks always come off."""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.instrument.hooks import ablate, hooks, intervene, replace, run_with_cache, taps
from workbench.instrument.sites import site_names

LETTERS = None


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


def _sizes(cfg, B, T):
    return {"B": B, "T": T, "D": cfg.hidden_size, "H": cfg.num_attention_heads, "Hkv": cfg.num_key_value_heads,
            "Dh": cfg.head_dim, "N": B * T, "E": cfg.num_local_experts, "K": cfg.num_experts_per_tok,
            "V": cfg.vocab_size}


def test_taps_are_bitwise_noops(model):
    ids = torch.randint(0, 256, (2, 70))
    with torch.no_grad():
        bare = model(ids).logits
        with hooks(model, {"*": lambda v, s: None}):
            hooked = model(ids).logits
        _, cache = run_with_cache(model, ids, "*", attn_stats=True)
        stats = model(ids, attn_stats=True).logits
    assert torch.equal(bare, hooked)
    assert torch.allclose(bare, stats, atol=1e-5)
    assert not any(m._forward_hooks for m in taps(model).values())


def test_every_site_fires_with_documented_shape(model):
    B, T = 2, 45
    sizes = _sizes(model.config, B, T)
    with torch.no_grad():
        _, cache = run_with_cache(model, torch.randint(0, 256, (B, T)), "*", attn_stats=True)
    documented = site_names(model.config)
    assert set(cache) == set(documented), set(documented) ^ set(cache)
    for name, (shape, _meaning) in documented.items():
        expect = tuple(sizes[x] for x in shape.split())
        assert tuple(cache[name].shape) == expect, (name, tuple(cache[name].shape), expect)


def test_hooks_removed_when_hook_raises(model):
    def boom(v, s):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, {"model.layers.0.hook_resid_post": boom}):
            model(torch.randint(0, 256, (1, 5)))
    assert not any(m._forward_hooks for m in taps(model).values())


def test_unknown_pattern_is_an_error(model):
    with pytest.raises(KeyError, match="hook_resid_psot"):
        with hooks(model, {"*.hook_resid_psot": lambda v, s: None}):
            pass


def test_write_interventions_change_output(model):
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        base = model(ids).logits
        with hooks(model, {"model.layers.0.hook_attn_out": ablate("zero")}):
            abl = model(ids).logits
        with hooks(model, {"model.layers.0.hook_attn_out": replace(torch.zeros(1, 20, model.config.hidden_size))}):
            rep = model(ids).logits
    assert not torch.allclose(base, abl)
    assert torch.equal(abl, rep)


def test_intervene_routing_and_restore(model):
    ids = torch.randint(0, 256, (1, 40))
    moe = model.config.moe_layer_index[0]
    site = f"model.layers.{moe}.feed_forward.hook_topk_ids"
    with torch.no_grad():
        base_out, base = run_with_cache(model, ids, site)
        with intervene(model, mask_experts={moe: [0, 1]}):
            _, masked = run_with_cache(model, ids, site)
        with intervene(model, force_experts={moe: [2]}):
            _, forced = run_with_cache(model, ids, site)
        with intervene(model, top_k=2):
            _, k2 = run_with_cache(model, ids, site)
        with intervene(model, drop_shared=True):
            dropped = model(ids).logits
        after = model(ids).logits
    assert not torch.isin(masked[site], torch.tensor([0, 1])).any()
    assert (forced[site] == 2).all()
    assert k2[site].shape[-1] == 2
    assert not torch.allclose(dropped, base_out.logits)
    assert torch.equal(after, base_out.logits)             # everything restored


def test_intervene_temperature_and_chunk(model):
    ids = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        base = model(ids).logits
        with intervene(model, temperature_tuning=False):
            off = model(ids).logits
        with intervene(model, chunk_size=None):
            glob = model(ids).logits
        with intervene(model, nope_interval=4):
            nope4 = model(ids).logits
        with intervene(model, floor_scale=1000):
            far = model(ids).logits
    cfg = model.config
    assert not torch.allclose(base, off)
    torch.testing.assert_close(off[:, : cfg.floor_scale - 1], base[:, : cfg.floor_scale - 1])
    assert not torch.allclose(base, glob)
    torch.testing.assert_close(glob[:, : cfg.attention_chunk_size], base[:, : cfg.attention_chunk_size])
    assert not torch.allclose(base, nope4)
    torch.testing.assert_close(far, off)
    with pytest.raises(ValueError, match="not MoE layers"):
        with intervene(model, mask_experts={2: [0]}):
            pass

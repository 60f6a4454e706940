"""Image-token attribution (probes/attribution.py, attribution_figures.py, workbench/attribution_store.py) and
cross-modal routing (probes/cross_modal.py) on the random tiny-vision model, CPU, fp32.

Sanity checks from issue 5 and science.md §4/§6: IG completeness at the default steps, a planted signal
(a hook makes the model depend on one image token by construction) found by every method, model
randomisation changes the maps, determinism, the pixel mapping is exact, and the store round trip.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import random_image
from PIL import Image

from probes import attribution as A
from probes.attribution_figures import export_png, heatmap_figure, render_overlay, score_grids
from workbench.attribution_store import list_attributions, read_attribution, read_patch_map
from workbench.checkpoint_vision import load_multimodal
from workbench.image import prepare
from workbench.instrument.hooks import hooks, run_with_cache

PROMPT = "<|image|>Q?"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_multimodal("tiny-vision")


@pytest.fixture(scope="module")
def image():
    return random_image()


@pytest.fixture(scope="module")
def prepared(model, image):
    return prepare(PROMPT, image, model.tokenizer, model)


@pytest.fixture(scope="module")
def target(model, prepared):
    return A.ImageTarget(model, prepared, A.target_ids(model, prepared, "ab"))


def _rank_corr(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------------------- target function
def test_target_is_the_models_log_prob(model, prepared, target):
    ids = target.ids
    with torch.no_grad():
        logits = model(ids, prepared.pixel_values).logits[0].float().log_softmax(-1)
    want = logits[target.positions, target.target]
    torch.testing.assert_close(target.logprob, want, rtol=1e-5, atol=1e-5)
    assert target.features.shape == (len(prepared.patch_map), model.config.text_config.hidden_size)


def test_pinned_routing_is_exact_at_x(target):
    with torch.no_grad(), target.routing("pinned"):
        pinned = target(target.features[None])[0]
    torch.testing.assert_close(pinned, target.logprob, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(A.input_x_gradient(target, routing="pinned").scores),
                               torch.as_tensor(A.input_x_gradient(target, routing="as-run").scores))


# ------------------------------------------------------------------------------------- sanity checks
@pytest.mark.parametrize("baseline", ["mean", "zero", "blur"])
def test_ig_completeness_at_default_steps(target, image, baseline):
    """|Σ IG − (y(x) − y(x′))| / |y(x) − y(x′)| < 5 % (science §6.8), gradients on under no_grad."""
    base = target.baseline(baseline, image)
    with torch.no_grad():                       # the caller's grad mode must not matter
        r = A.integrated_gradients(target, base, baseline_name=baseline)
    assert r.steps == 64 and r.routing == "pinned"
    assert np.all(np.abs(r.logprob - r.baseline_logprob) > 1e-3), "degenerate test: y(x) ≈ y(x′)"
    np.testing.assert_allclose(r.scores.sum(1), r.logprob - r.baseline_logprob, rtol=0.05)
    assert np.all(r.completeness_error < 0.05), r.completeness_error


def test_ig_internal_batching_does_not_change_results(target):
    base = target.baseline("zero")
    a = A.integrated_gradients(target, base, 8, internal_batch_size=3)
    b = A.integrated_gradients(target, base, 8, internal_batch_size=64)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [5, 8])        # local, non-padding tokens of tiles 1 and 2
def test_planted_signal_is_found_by_every_method(model, prepared, image, k):
    """A hook adds 20× image token k's embedding to every position: the model depends on k by construction."""
    pm = prepared.patch_map
    assert not pm.is_global[k] and not pm.padding_only[k]
    pos = int(pm.position[k])
    with hooks(model, {"language_model.model.hook_embed": lambda x, s: x + 20.0 * x[:, pos:pos + 1]}):
        t = A.ImageTarget(model, prepared, A.target_ids(model, prepared, "ab"))
        base = t.baseline("mean")
        results = {"ig": A.integrated_gradients(t, base, 16), "gxi": A.input_x_gradient(t),
                   "ablation_token": A.feature_ablation(t, base, "token"),
                   "occlusion_token": A.pixel_occlusion(t, image, "token"),   # one 28×28 cell painted white
                   "ablation_tile": A.feature_ablation(t, base, "tile"),
                   "occlusion_tile": A.pixel_occlusion(t, image, "tile")}
    for name, r in results.items():
        top = np.abs(np.nan_to_num(r.scores)).argmax(1)
        if name.endswith("tile"):
            assert np.all(pm.tile[top] == pm.tile[k]), (name, pm.tile[top])
        else:
            assert np.all(top == k), (name, top)
            s = np.sort(np.abs(np.nan_to_num(r.scores)), 1)
            assert np.all(s[:, -1] > 2 * s[:, -2]), (name, s[:, -2:])


def test_model_randomisation_changes_the_maps(model, prepared, target):
    """Adebayo et al. 2018: cascading re-initialisation from the top; maps must change."""
    ref = A.input_x_gradient(target).scores
    corr = {}
    for scope in ("language_model.lm_head", "language_model."):
        m2 = copy.deepcopy(model)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for n, p in m2.named_parameters():
                if n.startswith(scope) and "norm" not in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        s = A.input_x_gradient(A.ImageTarget(m2, prepared, target.target.tolist())).scores
        assert not np.allclose(s, ref, rtol=0.1, atol=0)
        corr[scope] = [_rank_corr(ref[j], s[j]) for j in range(len(ref))]
    assert all(c < 0.9 for c in corr["language_model.lm_head"]), corr
    assert all(abs(c) < 0.5 for c in corr["language_model."]), corr


def test_attributions_are_deterministic(model, image):
    kw = dict(methods="ig,gxi,ablation", steps=8, groups=("token",))
    a, b = (A.attribute(model, PROMPT, image, "ab", **kw) for _ in range(2))
    for key in a:
        np.testing.assert_array_equal(a[key].scores, b[key].scores)


def test_generated_targets_are_greedy(model, prepared):
    ids = A.target_ids(model, prepared, None, max_new_tokens=3)
    seq = prepared.input_ids
    for t in ids:
        with torch.no_grad():
            nxt = int(model(seq, prepared.pixel_values).logits[0, -1].argmax())
        assert nxt == t
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
    res = A.attribute(model, PROMPT, Image.new("RGB", (60, 40), "red"), None, methods="gxi", max_new_tokens=2)
    assert res["gxi"].scores.shape[0] == len(res["gxi"].target_strings) <= 2


def test_attribute_rejects_bad_input(model, image):
    with pytest.raises(ValueError, match="unknown methods"):
        A.attribute(model, PROMPT, image, "a", methods="shap")
    with pytest.raises(ValueError, match="no image"):
        A.attribute(model, "no image here", [], "a")
    with pytest.raises(ValueError, match="baseline"):
        A.attribute(model, PROMPT, image, "a", baseline="black")


# ------------------------------------------------------------------------------------- attention views
def test_attention_views_reproduce_the_model(model, prepared, target):
    _, cache = run_with_cache(model, target.ids, ["*.hook_q", "*.hook_k", "*.hook_v", "*.hook_z"],
                              pixel_values=prepared.pixel_values)
    for i, layer in enumerate(model.language_model.model.layers):
        site = f"language_model.model.layers.{i}.self_attn."
        q, k, v, z = (cache[site + n][0] for n in ("hook_q", "hook_k", "hook_v", "hook_z"))
        Aw = A.attention_probs(q, k, layer.self_attn.scaling, layer.self_attn.chunk)          # (H, T, T)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        torch.testing.assert_close(torch.einsum("hqk,khd->qhd", Aw, v), z, rtol=1e-4, atol=1e-5)
    r = A.attention_views(model, prepared, target.target.tolist())
    assert r.label == A.ATTENTION_LABEL and r.scores.shape == (2, len(prepared.patch_map))
    mass = r.extras["image_mass"][1]
    assert mass.shape == (4, 4, 2) and np.all((mass >= 0) & (mass <= 1 + 1e-6))
    assert np.all(r.scores >= 0) and np.all(r.scores.sum(1) <= 1 + 1e-6)


# ------------------------------------------------------------------------------------- pixel mapping
# (W, H): padded cells; partial cells; resized (fractional boxes); one tile, no global tile
@pytest.mark.parametrize("size", [(100, 80), (150, 90), (300, 37), (40, 40)])
def test_each_score_lies_exactly_over_its_pixel_box(model, size):
    img = Image.new("RGB", size, "gray")
    pm = prepare(PROMPT, img, model.tokenizer, model).patch_map
    W, H = size
    owner = A.pixel_token_map(pm, 0)
    assert owner.shape == (H, W) and not pm.is_global[owner].any() and not pm.padding_only[owner].any()
    cy, cx = np.mgrid[0:H, 0:W] + 0.5
    for i in np.flatnonzero(~pm.is_global & ~pm.padding_only):
        x0, y0, x1, y1 = pm.box[i]
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        assert inside.any() and np.all(owner[inside] == i) and np.all(inside[owner == i])
    scores = np.arange(len(pm), dtype=np.float64) + 1
    grids = score_grids(scores, pm)
    z, xe, ye = grids["local"]
    local = ~pm.is_global & ~pm.padding_only
    np.testing.assert_allclose(xe, np.unique(np.r_[pm.box[local, 0], W]))
    np.testing.assert_allclose(ye, np.unique(np.r_[pm.box[local, 1], H]))
    for r in range(len(ye) - 1):
        for c in range(len(xe) - 1):
            i = int(z[r, c]) - 1
            np.testing.assert_allclose(pm.box[i], [xe[c], ye[r], xe[c + 1], ye[r + 1]])
    glob = A.pixel_global_map(pm, 0)
    if pm.is_global.any():
        for i in np.flatnonzero(pm.is_global):
            x0, y0, x1, y1 = pm.box[i]
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            assert np.all(glob[inside] == i)
        assert grids["global"][0].shape == (2, 2)
    else:
        assert glob is None and grids["global"] is None


def test_figures_and_png(model, image, target):
    r = A.input_x_gradient(target)
    fig = heatmap_figure(r, image, 1)
    img_trace, heat = fig.data[0], fig.data[1]
    assert img_trace.type == "image" and heat.type == "heatmap" and heat.zmid == 0 and heat.zmin == -heat.zmax
    z, xe, _ = score_grids(r.scores[1], r.patch_map)["local"]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), z)
    np.testing.assert_allclose(heat.x, xe)
    assert len(fig.data) == 4                     # local + global panel
    # patch-exact raster: at full resolution and alpha=1 every pixel of a token box has that token's colour
    over = np.asarray(render_overlay(r, image, 1, alpha=1.0, max_side=1000))
    owner = A.pixel_token_map(r.patch_map, 0)
    for i in np.unique(owner):
        assert len(np.unique(over[owner == i], axis=0)) == 1
    png = export_png(r, image, None, 0)
    assert png.mode == "RGB" and png.size[0] > png.size[1]


# ------------------------------------------------------------------------------------- store
def test_store_round_trip(model, image, target, tmp_path):
    path = tmp_path / "run.zarr"
    ig = A.integrated_gradients(target, target.baseline("mean"), 8)
    occ = A.pixel_occlusion(target, image, "tile")
    assert ig.save(path) == "attribution" and occ.save(path, "occlusion_tile") == "attribution/occlusion_tile"
    assert list_attributions(path) == ["attribution", "attribution/occlusion_tile"]
    ds = xr.open_zarr(path, group="attribution", consolidated=False)          # plain xarray, no workbench
    assert ds["scores"].dims == ("target", "image_token") and ds["pixel_box"].dims == ("image_token", "box")
    np.testing.assert_array_equal(ds["scores"].values, ig.scores)
    np.testing.assert_array_equal(ds["target_token"].values, ig.target_ids)
    np.testing.assert_array_equal(ds["token_position"].values, ig.patch_map.position)
    np.testing.assert_array_equal(ds["tile"].values, ig.patch_map.tile)
    assert ds["scores"].dtype == np.float32 and ds["pixel_box"].dtype == np.int32 and ds["tile"].dtype == np.int16
    assert ds.attrs["method"] == "ig" and ds.attrs["baseline"] == "mean" and ds.attrs["steps"] == 8
    assert ds.attrs["target_strings"] == ["a", "b"] and ds.attrs["routing"] == "pinned"
    pm = read_patch_map(ds)
    np.testing.assert_array_equal(np.nan_to_num(pm.box, nan=-1), np.nan_to_num(ig.patch_map.box, nan=-1))
    box = ds["pixel_box"].values
    assert np.all(box[ig.patch_map.padding_only] == -1)
    ok = ~ig.patch_map.padding_only
    assert np.all(box[ok, :2] <= ig.patch_map.box[ok, :2]) and np.all(box[ok, 2:] >= ig.patch_map.box[ok, 2:])
    o = read_attribution(path, "occlusion_tile")
    assert np.isnan(o["scores"].values[:, ig.patch_map.is_global]).all() and o.attrs["groups"] == "tile"
    heatmap_figure(o, image, 0)                    # figures draw from the stored result alone
    ig.save(path)                                  # overwriting replaces, keeps the named result
    assert list_attributions(path) == ["attribution", "attribution/occlusion_tile"]
    with pytest.raises(FileExistsError):
        from workbench.attribution_store import write_attribution
        write_attribution(path, {"scores": (("target", "image_token"), ig.scores)}, {}, overwrite=False)


# ------------------------------------------------------------------------------------- cross-modal routing
def test_cross_modal_routing(model, image, tmp_path):
    from probes.cross_modal import (
        IMAGE_GLOBAL,
        IMAGE_LOCAL,
        cross_modal_routing,
        image_expert_share,
        image_preference,
        image_preference_figure,
        modality_load_figure,
        record_multimodal,
        tile_routing,
    )
    from workbench.store import open_run

    p1 = prepare(PROMPT, image, model.tokenizer, model)
    p2 = prepare("See <|image|> now", Image.new("RGB", (40, 40), "blue"), model.tokenizer, model)
    path = record_multimodal(model, [p1, p2], tmp_path / "mm.zarr", probes=("router",))
    record_multimodal(model, [p1, p2], path, probes=("router",))      # resume: nothing is duplicated
    run = open_run(path)
    T1, T2 = p1.input_ids.shape[1], p2.input_ids.shape[1]
    assert run.n_docs == 2 and run.n_tokens == T1 + T2 and run.attrs["complete"]
    ds = run.to_xarray()
    mod, tile = ds["modality"].values, ds["image_tile"].values
    pm = p1.patch_map
    np.testing.assert_array_equal(mod[pm.position], np.where(pm.is_global, IMAGE_GLOBAL, IMAGE_LOCAL))
    np.testing.assert_array_equal(tile[pm.position], pm.tile)
    assert mod[0] == 0 and (mod[T1:] == IMAGE_LOCAL).sum() == 4        # 1-tile image: its tile is local
    _, cache = run_with_cache(model, p1.input_ids, "*.feed_forward.hook_topk_ids", pixel_values=p1.pixel_values)
    for layer in model.config.text_config.moe_layer_index:
        got = run.read("router/experts", doc=0, layer=layer)
        np.testing.assert_array_equal(got, cache[f"language_model.model.layers.{layer}.feed_forward.hook_topk_ids"])
    table = cross_modal_routing(run)
    assert (table.groupby("layer")["count"].sum() == run.n_tokens).all()
    np.testing.assert_allclose(table.groupby(["layer", "modality"])["load"].sum(), 1.0)
    tiles = tile_routing(path)
    assert tiles.loc[tiles["global"], "tile"].eq(4).all()
    pref = image_preference(table)
    assert pref["preference"].dropna().between(0, 1).all()
    share = image_expert_share(pref)
    assert list(share.index) == model.config.text_config.moe_layer_index and share.between(0, 1).all()
    modality_load_figure(table)
    image_preference_figure(pref)
    # attributions live in the same run, beside the recorder's arrays, without disturbing them
    t = A.ImageTarget(model, p1, [97])
    A.input_x_gradient(t).save(path, "gxi")
    assert open_run(path).n_tokens == run.n_tokens and list_attributions(path) == ["attribution/gxi"]
    assert "attribution/gxi/scores" not in open_run(path).to_xarray()


def test_cli_attribute_writes_store(tmp_path):
    import subprocess
    import sys

    import xarray as xr
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((80, 120, 3)) * 255).astype("uint8")).save(img)
    out = tmp_path / "a.zarr"
    res = subprocess.run([sys.executable, "-m", "workbench", "attribute", "--model", "tiny-vision", "--prompt",
                          "<|image|>What is it?", "--image", str(img), "--target", " cat", "--steps", "8",
                          "--methods", "ig", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "IG completeness error" in res.stdout
    ds = xr.open_zarr(out, group="attribution/ig", consolidated=False)
    assert ds["scores"].dims == ("target", "image_token")

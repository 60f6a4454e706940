"""Image processing: pixel-exact parity with HF `Llama4ImageProcessor` / `Llama4Processor`, placeholder
formulas, bad inputs, and the patch-to-pixel map on known cases (spec llama4.md §4.5, science.md §4.2)."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.image import ImageError, ImageProcessor, load_image, patch_map, prepare
from workbench.tokenizer import TokenizerWrapper, byte_tokenizer

P336, P56 = ImageProcessor(), ImageProcessor(tile_size=56)


def _rand(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if ch == 1 else a, mode)


def _hf(tile=336, **kw):
    from transformers import Llama4ImageProcessor

    return Llama4ImageProcessor(size={"height": tile, "width": tile}, **kw)


def _hf_run(proc, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return proc(images=images, return_tensors="pt")


def _battery(tmp_path):
    """(name, our input, HF input): square, wide, tall, tiny, large, grayscale, RGBA, palette, CMYK, EXIF."""
    pal = _rand(90, 130, 3).convert("P", palette=Image.Palette.ADAPTIVE)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    exif_path = tmp_path / "exif.jpg"
    ex = Image.Exif()
    ex[0x0112] = 6                               # rotate 90° on display
    _rand(200, 450, 4).save(exif_path, exif=ex)
    from transformers.image_utils import load_image as hf_load

    cases = [("square", _rand(336, 336)), ("square2x", _rand(672, 672, 1)), ("wide", _rand(300, 1100, 2)),
             ("tall", _rand(1000, 280, 5)), ("tiny", _rand(20, 33, 6)), ("large", _rand(1500, 2000, 7)),
             ("odd", _rand(337, 335, 8)), ("gray", _rand(400, 300, 9, "L")), ("rgba", _rand(350, 500, 10, "RGBA")),
             ("palette", pal), ("palette_transparent", pal_t), ("cmyk", _rand(250, 260, 11).convert("CMYK"))]
    out = [(n, im, im) for n, im in cases]
    out.append(("exif", exif_path, hf_load(str(exif_path))))
    return out


# ------------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("tile", [336, 56])
def test_pixel_values_and_grid_equal_hf(tmp_path, tile):
    hf, ours = _hf(tile), ImageProcessor(tile_size=tile)
    for name, mine, theirs in _battery(tmp_path):
        a = _hf_run(hf, [theirs])
        pv, lay = ours([mine])
        assert pv.dtype == a["pixel_values"].dtype == torch.bfloat16, name
        assert pv.shape == a["pixel_values"].shape, (name, pv.shape, a["pixel_values"].shape)
        assert torch.equal(pv, a["pixel_values"]), name
        assert lay[0].grid == tuple(a["aspect_ratios"][0].tolist()), name


def test_batch_of_mixed_images_equals_hf(tmp_path):
    images = [_rand(100, 700), _rand(336, 336, 1), _rand(100, 700, 2), _rand(40, 40, 3)]
    a = _hf_run(_hf(56), images)
    pv, lays = P56(images)
    assert torch.equal(pv, a["pixel_values"])
    assert [lay.grid for lay in lays] == [tuple(r) for r in a["aspect_ratios"].tolist()]


def test_canvas_selection_equals_hf_on_many_sizes():
    from transformers.image_utils import SizeDict
    from transformers.models.llama4.image_processing_llama4 import (
        find_supported_resolutions,
        get_best_fit,
        get_max_res_without_distortion,
    )

    rnd = random.Random(0)
    for tile, max_patches, to_max in ((336, 16, False), (336, 16, True), (56, 6, False)):
        find_supported_resolutions.cache_clear()
        res = torch.tensor(find_supported_resolutions(max_patches, SizeDict(height=tile, width=tile)))
        ours = ImageProcessor(tile_size=tile, max_patches=max_patches, resize_to_max_canvas=to_max)
        assert ours.canvases() == [tuple(r) for r in res.tolist()]
        for _ in range(400):
            h, w = rnd.randint(1, 4000), rnd.randint(1, 4000)
            t = get_best_fit((h, w), res, resize_to_max_canvas=to_max)
            t2 = t if to_max else (min(max(h, tile), t[0]), min(max(w, tile), t[1]))
            nh, nw = get_max_res_without_distortion((h, w), t2)
            lay = ours.layout(h, w)
            assert lay.grid == (int(t[0]) // tile, int(t[1]) // tile), (h, w)
            assert lay.resized_size == (max(int(nh), 1), max(int(nw), 1)), (h, w)
    find_supported_resolutions.cache_clear()


def _hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(128), bos_token="<|begin_of_text|>")


def test_prompt_expansion_equals_hf_processor():
    from transformers import Llama4Processor

    images = [_rand(100, 150), _rand(40, 40, 1), _rand(120, 60, 2)]
    prompt = "before <|image|> between<|image|>and<|image|> after"
    for tile in (56, 336):
        hf = Llama4Processor(image_processor=_hf(tile), tokenizer=_hf_tokenizer())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = hf(text=prompt, images=images, return_tensors="pt")
        ours = prepare(prompt, images, TokenizerWrapper(byte_tokenizer(128), 256), ImageProcessor(tile_size=tile))
        assert torch.equal(ours.input_ids, a["input_ids"])
        assert torch.equal(ours.pixel_values, a["pixel_values"])
        patch = 348
        assert ours.patch_map.position.tolist() == (ours.input_ids[0] == patch).nonzero()[:, 0].tolist()


# ------------------------------------------------------------------------------------- token counts
@pytest.mark.parametrize("proc", [P336, P56], ids=["336", "56"])
def test_placeholder_token_count_formula(proc):
    P = proc.tokens_per_side ** 2
    assert P == {336: 144, 56: 4}[proc.tile_size]
    for (h, w) in [(1, 1), (1, 2), (2, 2), (3, 5), (4, 4), (1, 16)]:
        lay = proc.layout(h * proc.tile_size, w * proc.tile_size)
        assert lay.grid == (h, w)
        toks = proc.placeholder_tokens(lay)
        expected = 3 + P if h * w == 1 else 3 + P * (h * w + 1) + h * w
        assert len(toks) == lay.num_placeholder_tokens == expected
        assert toks.count("<|patch|>") == lay.num_image_tokens == P * (h * w + (h * w > 1))
        assert toks.count("<|tile_x_separator|>") == (h * (w - 1) if h * w > 1 else 0)
        assert toks.count("<|tile_y_separator|>") == (h if h * w > 1 else 0)


def test_672_square_gives_four_tiles_and_a_global_tile():
    pv, (lay,) = P336([_rand(672, 672)])
    assert lay.grid == (2, 2) and lay.n_tiles == 5 and pv.shape == (5, 3, 336, 336)
    assert lay.num_image_tokens == 720 and lay.num_placeholder_tokens == 727
    _, (one,) = P336([_rand(336, 336)])
    assert one.n_tiles == 1 and one.num_image_tokens == 144 and one.num_placeholder_tokens == 147


# ------------------------------------------------------------------------------------- bad input
def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_raise_clear_errors(tmp_path):
    good = _png_bytes(_rand(40, 40))
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(good, max_pixels=1000)
    with pytest.raises(ImageError, match="16-bit"):
        load_image(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)))
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)
    with pytest.raises(ImageError, match="image 1: .*not a recognised"):   # names which image; nothing partial
        P56([_rand(40, 40), b"junk"])


def test_modes_are_converted_like_hf():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))               # fully transparent red → white
    assert np.asarray(load_image(rgba)).tolist() == [[[255, 255, 255]] * 4] * 4
    assert load_image(_rand(5, 6, 0, "L")).mode == "RGB"
    assert load_image(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_prepare_count_mismatch_and_stray_patch_tokens():
    tok = TokenizerWrapper(byte_tokenizer(128), 256)
    with pytest.raises(ImageError, match="2 <\\|image\\|> placeholders but 1 images"):
        prepare("a<|image|>b<|image|>", [_rand(40, 40)], tok, P56)
    with pytest.raises(ImageError, match="0 <\\|image\\|> placeholders but 1 images"):
        prepare("no placeholder", [_rand(40, 40)], tok, P56)
    with pytest.raises(ImageError, match="outside image placeholders"):
        prepare("x<|patch|><|image|>", [_rand(40, 40)], tok, P56)
    text_only = prepare("just text", None, tok, P56)
    assert text_only.pixel_values is None and len(text_only.patch_map) == 0


# ------------------------------------------------------------------------------------- patch map
def _checker(h, w, cell, seed=0):
    """A checkerboard whose cell (i, j) has its own colour (so misplaced boxes are caught)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (-(-h // cell), -(-w // cell), 3), dtype=np.uint8)
    yy, xx = np.arange(h) // cell, np.arange(w) // cell
    return colours[yy[:, None], xx[None, :]], colours


def test_map_on_exact_672_checkerboard():
    arr, colours = _checker(672, 672, 28)
    pv, lays = P336([Image.fromarray(arr)])
    m = patch_map(lays)
    assert len(m) == 720 and m.is_global.sum() == 144 and not m.padding_only.any()
    assert m.tile.max() == 4 and (m.tile[m.is_global] == 4).all()
    for i in np.flatnonzero(~m.is_global):
        x0, y0, x1, y1 = m.box[i]
        assert x1 - x0 == y1 - y0 == 28
        region = arr[int(y0):int(y1), int(x0):int(x1)]
        assert (region == colours[int(y0) // 28, int(x0) // 28]).all()       # one uniform cell
        ty, tx = divmod(int(m.tile[i]), 2)                                    # and the tile pixels agree
        tile_px = pv[m.tile[i], :, m.row[i] * 28:(m.row[i] + 1) * 28, m.col[i] * 28:(m.col[i] + 1) * 28]
        expect = (torch.tensor(colours[int(y0) // 28, int(x0) // 28], dtype=torch.bfloat16) / 255 - 0.5) / 0.5
        assert torch.allclose(tile_px.float(), expect.float()[:, None, None].expand_as(tile_px), atol=1e-2)
        assert (ty * 336 + m.row[i] * 28, tx * 336 + m.col[i] * 28) == (y0, x0)
    glob = m.box[m.is_global]
    assert np.allclose(glob[:, 2] - glob[:, 0], 56) and np.allclose(glob[:, 3] - glob[:, 1], 56)
    assert m.local_grid(0).shape == (24, 24) and m.global_grid(0).shape == (12, 12)
    assert sorted(m.local_grid(0).ravel().tolist()) == np.flatnonzero(~m.is_global).tolist()


def test_occluding_one_cell_changes_exactly_one_local_token():
    arr, _ = _checker(672, 672, 28)
    occluded = arr.copy()
    occluded[28 * 7:28 * 8, 28 * 15:28 * 16] = 0                                # cell row 7, col 15
    a, lays = P336([Image.fromarray(arr)])
    b, _ = P336([Image.fromarray(occluded)])
    m = patch_map(lays)
    changed = []
    for i in np.flatnonzero(~m.is_global):
        t, r, c = m.tile[i], m.row[i], m.col[i]
        sl = (t, slice(None), slice(r * 28, (r + 1) * 28), slice(c * 28, (c + 1) * 28))
        if not torch.equal(a[sl], b[sl]):
            changed.append(i)
    assert len(changed) == 1
    assert m.box[changed[0]].tolist() == [28 * 15, 28 * 7, 28 * 16, 28 * 8]
    assert not torch.equal(a[4], b[4])            # the global tile sees it too (expected leakage)


def test_map_inverts_an_upscale():
    arr, colours = _checker(168, 168, 14)                 # 1 tile, upscaled ×2: a token covers 14×14 original px
    _, lays = P336([Image.fromarray(arr)])
    assert lays[0].resized_size == (336, 336) and lays[0].n_tiles == 1
    m = patch_map(lays)
    assert len(m) == 144 and not m.is_global.any()
    for i in range(len(m)):
        assert m.box[i].tolist() == [14 * m.col[i], 14 * m.row[i], 14 * m.col[i] + 14, 14 * m.row[i] + 14]


def test_map_marks_padding_and_covers_the_image_once():
    _, lays = P336([_rand(168, 336)])                     # fits 336×336 unscaled, bottom half is padding
    m = patch_map(lays)
    assert (m.padding_only == (m.row >= 6)).all() and np.isnan(m.box[m.padding_only]).all()
    for h, w in [(1000, 700), (333, 1234), (50, 3000)]:
        _, lays = P336([_rand(h, w)])
        m = patch_map(lays)
        local = m.box[~m.is_global & ~m.padding_only]
        area = ((local[:, 2] - local[:, 0]) * (local[:, 3] - local[:, 1])).sum()
        assert np.isclose(area, h * w), (h, w)             # the local boxes tile the original image exactly
        assert local[:, [0, 1]].min() >= 0 and local[:, 2].max() <= w + 1e-9 and local[:, 3].max() <= h + 1e-9
        if lays[0].has_global:
            glob = m.box[m.is_global]
            assert np.isclose(((glob[:, 2] - glob[:, 0]) * (glob[:, 3] - glob[:, 1])).sum(), h * w)


def test_tiny_tiles_keep_the_28px_cell():
    arr, colours = _checker(112, 168, 28)                  # 56-px tiles: 2×3 grid, 2×2 tokens per tile
    pv, lays = P56([Image.fromarray(arr)])
    assert lays[0].grid == (2, 3) and pv.shape == (7, 3, 56, 56)
    m = patch_map(lays)
    assert len(m) == 28
    for i in np.flatnonzero(~m.is_global):
        x0, y0, x1, y1 = (int(v) for v in m.box[i])
        assert (arr[y0:y1, x0:x1] == colours[y0 // 28, x0 // 28]).all()

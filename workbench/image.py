"""Llama 4 image processing: validation, tiling, normalisation, prompt expansion and the patch-to-pixel map.

Follows HF `Llama4ImageProcessor` (torchvision backend) and `Llama4Processor` (spec llama4.md §4.5),
value for value on the same machine:

1. Canvas: every (h, w) tile grid with h·w ≤ max_patches; the smallest upscale ≥ 1, else the largest
   downscale; ties by smallest area. Unless `resize_to_max_canvas`, upscaling stops at max(side, tile).
2. Resize keeping aspect ratio (bilinear, antialiased, on uint8 — torchvision's kernel choice, see
   `_resize`), pad black bottom/right to the canvas, split row-major into tiles.
3. If h·w > 1, append a global tile: the whole image resized to tile×tile, aspect ratio NOT kept.
4. Rescale by 1/255 and normalise in bfloat16, as HF does "to match the original implementation".

Images are decoded with PIL: EXIF orientation applied (as `transformers.image_utils.load_image`
does for files; HF's processor ignores it on PIL objects), transparency composited onto white
(HF `convert_to_rgb`), 16/32-bit and unreadable images rejected with a message saying why.

The patch map (science.md §4.2) gives, for every `<|patch|>` token, its image, tile (global last),
cell (row, col) in the tile's token grid, and the box of ORIGINAL-image pixels it covers: the
token's 28×28-px cell on the canvas, cropped to the resized image (padding-only tokens get NaN)
and scaled back by the resize factor. The box is the geometric footprint; the antialiasing filter
also mixes in up to one resize-step of pixels around it.
"""

from __future__ import annotations

import io
import math
import os
import platform
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

MAX_PIXELS = 89_478_485          # PIL's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
TOKENS = dict(start="<|image_start|>", end="<|image_end|>", image="<|image|>", patch="<|patch|>",
              tile_x="<|tile_x_separator|>", tile_y="<|tile_y_separator|>")


class ImageError(ValueError):
    """An image cannot be used; the message names the image and the reason."""


# ------------------------------------------------------------------------------------- decoding
def load_image(src, *, max_pixels: int = MAX_PIXELS, name: str | None = None):
    """A path, bytes, file object or PIL image → a validated 8-bit RGB PIL image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__)
    with warnings.catch_warnings():     # our max_pixels is the limit; PIL still refuses > 2·MAX_IMAGE_PIXELS
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if isinstance(src, Image.Image):
                img = src
            elif isinstance(src, (str, os.PathLike)):
                if not Path(src).is_file():
                    raise ImageError(f"image {label}: no such file")
                img = Image.open(src)
            elif isinstance(src, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(src)))
            elif hasattr(src, "read"):
                img = Image.open(src)
            else:
                raise ImageError(f"image {label}: expected a path, bytes, file object or PIL image")
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"image {label}: zero-size image ({w}×{h})")
            if w * h > max_pixels:         # checked on the header, before decoding
                raise ImageError(f"image {label}: {w}×{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                                 "(decompression-bomb guard; raise max_pixels if the image is trusted)")
            img.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {label}: rejected by PIL's decompression-bomb limit ({e})") from None
        except UnidentifiedImageError:
            raise ImageError(f"image {label}: not a recognised image format (corrupt or not an image)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"image {label}: corrupt or truncated image data ({e})") from None
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        raise ImageError(f"image {label}: mode {img.mode!r} ({'16' if ';16' in img.mode else '32'}-bit) is not "
                         "supported — the Llama 4 processor expects 8-bit images; convert it first")
    try:    # HF convert_to_rgb: composite any transparency onto white, else plain RGB conversion
        img = ImageOps.exif_transpose(img)
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    except (ValueError, OSError, SyntaxError) as e:
        raise ImageError(f"image {label}: cannot orient or convert mode {img.mode!r} to RGB ({e})") from None
    return img


# ------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ImageLayout:
    """How one image was cut: canvas grid, resized size, tiles, token counts."""
    original_size: tuple[int, int]    # (H, W) after EXIF orientation
    grid: tuple[int, int]             # (tile rows, tile cols) of the canvas
    resized_size: tuple[int, int]     # (h, w) of the aspect-preserving resize, pasted at the canvas' top-left
    tile_size: int
    tokens_per_side: int              # g: each tile is a g×g token grid

    @property
    def n_local(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def has_global(self) -> bool:
        return self.n_local > 1

    @property
    def n_tiles(self) -> int:
        return self.n_local + int(self.has_global)

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side ** 2

    @property
    def num_image_tokens(self) -> int:
        """`<|patch|>` tokens = image features for this image."""
        return self.n_tiles * self.tokens_per_tile

    @property
    def num_placeholder_tokens(self) -> int:
        """Length of the expanded placeholder: 3 + P for one tile, 3 + P·(h·w+1) + h·w otherwise."""
        return 3 + self.num_image_tokens + (self.n_local if self.has_global else 0)


@dataclass(frozen=True)
class ImageProcessor:
    """HF `Llama4ImageProcessor` defaults (preprocessor_config.json keys in comments)."""
    tile_size: int = 336               # size.height == size.width
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("tile_size", "patch_size", "max_patches", "max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ImageProcessor field {name!r} must be a positive integer, got {v!r}")
        g = self.tile_size / self.patch_size * self.pixel_shuffle_ratio
        if self.tile_size % self.patch_size or g != int(g) or g < 1:
            raise ValueError(f"tile_size={self.tile_size}, patch_size={self.patch_size}, pixel_shuffle_ratio="
                             f"{self.pixel_shuffle_ratio} do not give a whole token grid per tile")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
            raise ValueError(f"image_mean/image_std need 3 values, std non-zero: {self.image_mean}, {self.image_std}")

    @classmethod
    def from_config(cls, config, **overrides) -> ImageProcessor:
        """From a `Llama4Config` or `Llama4VisionConfig`: tile = image_size, same patch and shuffle ratio."""
        vc = getattr(config, "vision_config", config)
        return cls(**dict(dict(tile_size=vc.image_size, patch_size=vc.patch_size,
                               pixel_shuffle_ratio=vc.pixel_shuffle_ratio), **overrides))

    @classmethod
    def from_hf(cls, d: dict, config=None) -> ImageProcessor:
        """From a `preprocessor_config.json` dict (patch size and ratio from `config` when given)."""
        size = d.get("size", {"height": 336, "width": 336})
        if size.get("height") != size.get("width"):
            raise ValueError(f"preprocessor size must be square, got {size}")
        kw = {} if config is None else dict(patch_size=getattr(config, "vision_config", config).patch_size,
                                           pixel_shuffle_ratio=getattr(config, "vision_config",
                                                                       config).pixel_shuffle_ratio)
        for k in ("max_patches", "resize_to_max_canvas", "rescale_factor"):
            if k in d:
                kw[k] = d[k]
        for k in ("image_mean", "image_std"):
            if k in d:
                kw[k] = tuple(d[k]) if isinstance(d[k], (list, tuple)) else (d[k],) * 3
        return cls(tile_size=size["height"], **kw)

    def to_hf(self) -> dict:
        return {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
                "size": {"height": self.tile_size, "width": self.tile_size}, "max_patches": self.max_patches,
                "resize_to_max_canvas": self.resize_to_max_canvas, "rescale_factor": self.rescale_factor,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std), "resample": 2,
                "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}

    @property
    def tokens_per_side(self) -> int:
        return round(self.tile_size / self.patch_size * self.pixel_shuffle_ratio)

    # ---------------------------------------------------------------- canvas
    def canvases(self) -> list[tuple[int, int]]:
        """Candidate canvases in pixels, in HF `find_supported_resolutions` order (it decides area ties)."""
        by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
        for n in range(self.max_patches, 0, -1):
            for f in sorted({d for d in range(1, n + 1) if n % d == 0}):
                by_ratio[f / (n // f)].append((f, n // f))
        return [(h * self.tile_size, w * self.tile_size) for grids in by_ratio.values() for h, w in grids]

    def layout(self, height: int, width: int) -> ImageLayout:
        """Canvas grid and resized size for an image of (height, width) — HF `get_best_fit` and
        `get_max_res_without_distortion`. The canvas sides are float32 tensors there while image sides
        are Python ints, so its scale arithmetic (and thus floor()) is float32 or float64 depending on
        which side binds; we keep the same types to reproduce its rounding exactly."""
        res = torch.tensor(self.canvases())
        scale_h, scale_w = res[:, 0] / height, res[:, 1] / width
        scales = torch.where(scale_h > scale_w, scale_w, scale_h)
        up = scales[scales >= 1]
        if len(up):
            sel = up.max() if self.resize_to_max_canvas else up.min()
        else:
            sel = scales[scales < 1].max()
        chosen = res[scales == sel]
        canvas = chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
        th, tw = canvas[0], canvas[1]
        if not self.resize_to_max_canvas:
            th, tw = min(max(height, self.tile_size), th), min(max(width, self.tile_size), tw)
        sw, sh = tw / width, th / height
        if sw < sh:
            new_w, new_h = tw, min(math.floor(height * sw), th)
        else:
            new_h, new_w = th, min(math.floor(width * sh), tw)
        grid = (int(canvas[0]) // self.tile_size, int(canvas[1]) // self.tile_size)
        return ImageLayout((height, width), grid, (max(int(new_h), 1), max(int(new_w), 1)), self.tile_size,
                           self.tokens_per_side)

    # ---------------------------------------------------------------- pixels
    def _normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        # HF Llama4ImageProcessor.rescale_and_normalize: bf16 multiply, then torchvision normalize in bf16
        x = x_u8.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub(mean).div_(std)

    def tiles(self, image) -> tuple[torch.Tensor, ImageLayout]:
        """One validated image → (n_tiles, 3, S, S) bfloat16 tiles (global last) and its layout."""
        img = load_image(image, max_pixels=self.max_pixels)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()      # (3, H, W) uint8
        lay = self.layout(x.shape[1], x.shape[2])
        (gh, gw), S = lay.grid, self.tile_size
        canvas = F.pad(_resize(x, lay.resized_size), (0, gw * S - lay.resized_size[1], 0, gh * S - lay.resized_size[0]))
        t = rearrange(self._normalize(canvas), "c (gh s1) (gw s2) -> (gh gw) c s1 s2", gh=gh, gw=gw)  # row-major tiles
        if lay.has_global:
            t = torch.cat([t, self._normalize(_resize(x, (S, S)))[None]])
        return t, lay

    def __call__(self, images) -> tuple[torch.Tensor, list[ImageLayout]]:
        """Images → pixel_values (N_tiles, 3, S, S) bfloat16 (all images' tiles concatenated) and layouts.
        Every image is validated before anything is returned."""
        images = _as_list(images)
        out = []
        for i, im in enumerate(images):
            try:
                out.append(self.tiles(im))
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from None
        S = self.tile_size
        pv = torch.cat([t for t, _ in out]) if out else torch.zeros(0, 3, S, S, dtype=torch.bfloat16)
        return pv, [lay for _, lay in out]

    # ---------------------------------------------------------------- prompt
    def placeholder_tokens(self, layout: ImageLayout) -> list[str]:
        """HF `_prompt_split_image`: rows of tiles joined by x/y separators, then the global tile."""
        P = [TOKENS["patch"]] * layout.tokens_per_tile
        out = [TOKENS["start"]]
        if layout.has_global:
            for _ in range(layout.grid[0]):
                for x in range(layout.grid[1]):
                    out += P + ([TOKENS["tile_x"]] if x < layout.grid[1] - 1 else [])
                out.append(TOKENS["tile_y"])
        return out + [TOKENS["image"]] + P + [TOKENS["end"]]

    def placeholder(self, layout: ImageLayout) -> str:
        return "".join(self.placeholder_tokens(layout))


def _resize(x_CHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision `resize(antialias=True)` bilinear on uint8: on CPUs with AVX2/AVX512 (or ARM) it runs
    torch's native uint8 kernel, elsewhere float32 then round — we make the same choice so the pixels
    equal HF's on the machine they run on."""
    if tuple(size) == tuple(x_CHW.shape[-2:]):
        return x_CHW
    native = x_CHW.device.type == "cpu" and (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                                             or platform.machine() in ("aarch64", "arm64"))
    x = x_CHW[None] if native else x_CHW[None].float()
    y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    return y if native else y.round_().to(torch.uint8)


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


# ------------------------------------------------------------------------------------- patch map
@dataclass
class PatchMap:
    """One row per `<|patch|>` token, in the order image features fill them (= input order).

    box: (x0, y0, x1, y1) in original-image pixel coordinates (x1, y1 exclusive, fractional after a
    resize); NaN where the token covers only padding. tile == n_local of its image for the global tile."""
    position: np.ndarray          # (I,) index into input_ids[0] (-1 if built without a prompt)
    image: np.ndarray             # (I,)
    tile: np.ndarray              # (I,) row-major local tiles, then the global tile
    is_global: np.ndarray         # (I,) bool
    row: np.ndarray               # (I,) cell row within the tile's g×g token grid
    col: np.ndarray               # (I,)
    box: np.ndarray               # (I, 4) float64
    padding_only: np.ndarray      # (I,) bool
    layouts: list[ImageLayout] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image)

    def token(self, i: int) -> dict:
        return {k: (getattr(self, k)[i].tolist()) for k in
                ("position", "image", "tile", "is_global", "row", "col", "box", "padding_only")}

    def local_grid(self, image: int) -> np.ndarray:
        """(g·rows, g·cols) array of map indices laid out over the canvas (science.md §4.2 step 3)."""
        lay, idx = self.layouts[image], np.flatnonzero((self.image == image) & ~self.is_global)
        g, (gh, gw) = lay.tokens_per_side, lay.grid
        out = np.empty((gh * g, gw * g), dtype=np.int64)
        out[(self.tile[idx] // gw) * g + self.row[idx], (self.tile[idx] % gw) * g + self.col[idx]] = idx
        return out

    def global_grid(self, image: int) -> np.ndarray | None:
        """(g, g) map indices of the global tile (which covers the whole image), or None for 1-tile images."""
        idx = np.flatnonzero((self.image == image) & self.is_global)
        if not len(idx):
            return None
        g = self.layouts[image].tokens_per_side
        out = np.empty((g, g), dtype=np.int64)
        out[self.row[idx], self.col[idx]] = idx
        return out


def patch_map(layouts: list[ImageLayout], positions=None) -> PatchMap:
    """Build the map for images cut as `layouts`; `positions` (optional) are the `<|patch|>` indices."""
    cols: dict[str, list] = defaultdict(list)
    for i, lay in enumerate(layouts):
        g, S, (H, W), (nh, nw) = lay.tokens_per_side, lay.tile_size, lay.original_size, lay.resized_size
        cell = S / g
        r, c = np.divmod(np.arange(g * g), g)
        for t in range(lay.n_tiles):
            glob = lay.has_global and t == lay.n_local
            if glob:
                box = np.stack([c * W / g, r * H / g, (c + 1) * W / g, (r + 1) * H / g], 1)
                pad = np.zeros(g * g, bool)
            else:
                ty, tx = divmod(t, lay.grid[1])
                y0, x0 = ty * S + r * cell, tx * S + c * cell
                pad = (y0 >= nh) | (x0 >= nw)
                box = np.stack([x0 * W / nw, y0 * H / nh, np.minimum(x0 + cell, nw) * W / nw,
                                np.minimum(y0 + cell, nh) * H / nh], 1)
                box[pad] = np.nan
            for k, v in (("image", np.full(g * g, i)), ("tile", np.full(g * g, t)),
                         ("is_global", np.full(g * g, glob)), ("row", r), ("col", c), ("box", box),
                         ("padding_only", pad)):
                cols[k].append(v)
    cat = {k: np.concatenate(cols[k]) if cols[k] else np.zeros((0, 4) if k == "box" else 0)
           for k in ("image", "tile", "is_global", "row", "col", "box", "padding_only")}
    n = len(cat["image"])
    pos = np.full(n, -1, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
    if len(pos) != n:
        raise ValueError(f"{len(pos)} positions given for {n} image tokens")
    return PatchMap(pos, cat["image"].astype(np.int64), cat["tile"].astype(np.int64), cat["is_global"].astype(bool),
                    cat["row"].astype(np.int64), cat["col"].astype(np.int64), cat["box"].astype(np.float64),
                    cat["padding_only"].astype(bool), list(layouts))


# ------------------------------------------------------------------------------------- prompts
@dataclass
class Prepared:
    input_ids: torch.Tensor              # (1, T) long
    pixel_values: torch.Tensor | None    # (N_tiles, 3, S, S) bfloat16, or None without images
    patch_map: PatchMap
    layouts: list[ImageLayout]


def prepare(prompt: str, images, tokenizer, processor=None, *, add_bos: bool = True) -> Prepared:
    """Expand each `<|image|>` in `prompt` into its placeholder and tokenize; process the images.

    `processor`: an ImageProcessor, a multimodal model (its `image_processor`), or a Llama4Config /
    Llama4VisionConfig to build one from (default: the released 336-px processor). The counts of
    `<|image|>` and images must match; every image is validated before anything is returned."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(getattr(processor, "image_processor", None), ImageProcessor):
        processor = processor.image_processor
    elif processor is None or not isinstance(processor, ImageProcessor):
        processor = ImageProcessor() if processor is None else ImageProcessor.from_config(processor)
    images = [] if images is None else _as_list(images)
    segments = prompt.split(TOKENS["image"])
    if len(segments) - 1 != len(images):
        raise ImageError(f"the prompt has {len(segments) - 1} {TOKENS['image']} placeholders but {len(images)} "
                         "images were given; they must match")
    ids_of = {k: tokenizer.token_to_id(t) for k, t in TOKENS.items()}
    absent = [TOKENS[k] for k, v in ids_of.items() if v is None]
    if absent:
        raise ValueError(f"the tokenizer lacks the image tokens {absent}")
    pixel_values, layouts = processor(images)
    ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    positions = []
    for k, seg in enumerate(segments):
        text_ids = tokenizer.encode(seg, add_bos=False)
        if ids_of["patch"] in text_ids:
            raise ImageError(f"the prompt text contains {TOKENS['patch']} outside image placeholders; those "
                             "positions would receive image features")
        ids += text_ids
        if k < len(layouts):
            toks = [ids_of[_KEY[t]] for t in processor.placeholder_tokens(layouts[k])]
            positions += [len(ids) + j for j, t in enumerate(toks) if t == ids_of["patch"]]
            ids += toks
    return Prepared(torch.tensor([ids], dtype=torch.long), pixel_values if images else None,
                    patch_map(layouts, positions), layouts)


_KEY = {v: k for k, v in TOKENS.items()}

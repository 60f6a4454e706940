"""Image-token attributions drawn over the original image: plotly figures and a PIL PNG export.

Per target token, two panels (science.md §4.2):
  local   the local tiles stitched into the canvas' token grid, the zero-padded cells cropped away and
          the grid stretched back onto the ORIGINAL image: each cell is drawn exactly over its token's
          `patch_map.box` (the heatmap's cell edges are the box edges, in original pixels).
  global  the global tile's g×g grid over the whole image (which it sees squashed to one tile), a
          panel of its own — never summed into the local map. One-tile images have no global panel.
Signed scores, diverging colormap centred at 0 (red = raises log p(target), blue = lowers it), one
scale for both panels: the 99th percentile of |score| of that target (robust to outliers), or `scale=`.
NaN scores (e.g. occlusion on the global tile) stay transparent.

Builders take an `AttributionResult` or a Dataset read back by `workbench.attribution_store.read_attribution`,
plus the original image (path or PIL). `export_png` composes the same view with PIL, no kaleido.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.attribution import ATTENTION_LABEL, pixel_global_map, pixel_token_map
from workbench.image import PatchMap, load_image

COLORSCALE = "RdBu_r"          # diverging; centred at 0 by zmid / symmetric limits

__all__ = ["score_scale", "score_grids", "heatmap_figure", "heatmap_figures", "render_overlay", "export_png",
           "attention_mass_figure", "COLORSCALE"]


def _unpack(result) -> tuple[np.ndarray, PatchMap, list[str], str, str]:
    """(scores (J, I), patch map, target strings, method, label) from a result or a stored Dataset."""
    if hasattr(result, "patch_map"):
        return (np.asarray(result.scores, dtype=np.float64), result.patch_map, list(result.target_strings),
                result.method, result.label)
    from workbench.attribution_store import read_patch_map

    a = result.attrs
    return (np.asarray(result["scores"].values, dtype=np.float64), read_patch_map(result),
            list(a.get("target_strings", [])), str(a.get("method", "")), str(a.get("label", "attribution")))


def score_scale(scores, q: float = 99.0) -> float:
    """Symmetric colour limit: the q-th percentile of |finite scores| (1.0 when all are zero/NaN)."""
    v = np.abs(np.asarray(scores, dtype=np.float64))
    v = v[np.isfinite(v)]
    s = float(np.percentile(v, q)) if v.size else 0.0
    return s if s > 0 else (float(v.max()) if v.size and v.max() > 0 else 1.0)


def score_grids(scores_I, pm: PatchMap, image: int = 0) -> dict:
    """{"local": (z, x_edges, y_edges), "global": … or None}: heatmap grids in original-pixel coordinates.

    local z is the canvas token grid cropped to the cells the resized image touches; edge k of a cell
    column is k·cell·W/new_w (the last clipped to W) — exactly the boxes of `patch_map`."""
    s = np.asarray(scores_I, dtype=np.float64)
    lay = pm.layouts[image]
    (H, W), (nh, nw), cell = lay.original_size, lay.resized_size, lay.tile_size / lay.tokens_per_side
    rows, cols = int(np.ceil(nh / cell)), int(np.ceil(nw / cell))
    xe = np.minimum(np.arange(cols + 1) * cell, nw) * W / nw
    ye = np.minimum(np.arange(rows + 1) * cell, nh) * H / nh
    out = {"local": (s[pm.local_grid(image)[:rows, :cols]], xe, ye), "global": None}
    grid = pm.global_grid(image)
    if grid is not None:
        g = lay.tokens_per_side
        out["global"] = (s[grid], np.arange(g + 1) * W / g, np.arange(g + 1) * H / g)
    return out


def _data_uri(img, max_side: int) -> tuple[str, float, float]:
    """A PNG data URI of the image downsized to ≤ max_side, and its pixel size in original pixels (dx, dy)."""
    f = max(1.0, max(img.size) / max_side)
    small = img.resize((max(1, round(img.size[0] / f)), max(1, round(img.size[1] / f))))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return uri, img.size[0] / small.size[0], img.size[1] / small.size[1]


def heatmap_figure(result, image, target: int = 0, *, image_index: int = 0, alpha: float = 0.5,
                   scale: float | None = None, max_side: int = 512, title: str | None = None) -> go.Figure:
    """Scores of one target token over the original image: local panel and (if any) global panel."""
    scores, pm, strings, method, label = _unpack(result)
    img = load_image(image)
    lay = pm.layouts[image_index]
    if tuple(img.size[::-1]) != tuple(lay.original_size):
        raise ValueError(f"image is {img.size[1]}×{img.size[0]} but the attribution was made on "
                         f"{lay.original_size[0]}×{lay.original_size[1]}")
    s = scores[target]
    lim = scale or score_scale(s[pm.image == image_index])
    grids = score_grids(s, pm, image_index)
    panels = [("local tiles (stitched, padding cropped)", grids["local"])]
    if grids["global"] is not None:
        panels.append(("global tile (whole image in one tile)", grids["global"]))
    fig = make_subplots(1, len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.06)
    uri, dx, dy = _data_uri(img, max_side)
    H, W = lay.original_size
    for c, (_, (z, xe, ye)) in enumerate(panels, start=1):
        fig.add_trace(go.Image(source=uri, x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip"), 1, c)
        fig.add_trace(go.Heatmap(z=z, x=xe, y=ye, zmin=-lim, zmax=lim, zmid=0, colorscale=COLORSCALE,
                                 opacity=alpha, showscale=c == 1, colorbar_title="score",
                                 hovertemplate="x %{x:.0f} y %{y:.0f}: %{z:.4g}<extra></extra>"), 1, c)
        fig.update_xaxes(range=[0, W], showgrid=False, row=1, col=c)
        fig.update_yaxes(range=[H, 0], showgrid=False, scaleanchor=f"x{'' if c == 1 else c}", row=1, col=c)
    tok = strings[target] if target < len(strings) else str(target)
    kind = "" if label == "attribution" else f" [{label}]"
    fig.update_layout(title=title or f"{method}{kind}: target {target} {tok!r}", height=420,
                      width=380 * len(panels) + 120)
    return fig


def heatmap_figures(result, image, **kw) -> list[go.Figure]:
    """One `heatmap_figure` per target token."""
    return [heatmap_figure(result, image, j, **kw) for j in range(len(_unpack(result)[0]))]


def _colorize(v, lim: float) -> np.ndarray:
    """Scores → RGB float (…, 3) on the plotly colorscale, symmetric in [-lim, lim]; NaN → NaN."""
    stops = pcolors.get_colorscale(COLORSCALE)
    pos = np.array([p for p, _ in stops])
    rgb = np.array([pcolors.unlabel_rgb(c) for _, c in stops], dtype=np.float64)
    u = np.clip((np.asarray(v, dtype=np.float64) / lim + 1) / 2, 0, 1)
    out = np.stack([np.interp(u, pos, rgb[:, k]) for k in range(3)], -1)
    out[~np.isfinite(v)] = np.nan
    return out


def render_overlay(result, image, target: int = 0, *, image_index: int = 0, alpha: float = 0.5,
                   scale: float | None = None, max_side: int = 512, panel: str = "local"):
    """One panel as a PIL image: the image (≤ max_side) with each display pixel coloured by the score of
    the token that owns it (nearest = patch-exact), blended with `alpha`."""
    from PIL import Image

    scores, pm, *_ = _unpack(result)
    img = load_image(image)
    f = max(1.0, max(img.size) / max_side)
    w, h = max(1, round(img.size[0] / f)), max(1, round(img.size[1] / f))
    s = scores[target]
    owner = (pixel_token_map if panel == "local" else pixel_global_map)(pm, image_index, (h, w))
    if owner is None:
        raise ValueError("this image has one tile: there is no global panel")
    col = _colorize(s[owner], scale or score_scale(s[pm.image == image_index]))
    base = np.asarray(img.resize((w, h)), dtype=np.float64)
    out = np.where(np.isnan(col), base, (1 - alpha) * base + alpha * np.nan_to_num(col))
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def export_png(result, image, path=None, target: int = 0, *, image_index: int = 0, alpha: float = 0.5,
               scale: float | None = None, max_side: int = 384):
    """The figure's view as a PNG with PIL (no kaleido): title, local panel, global panel, colour bar.
    Returns the PIL image; writes it to `path` when given."""
    from PIL import Image, ImageDraw

    scores, pm, strings, method, label = _unpack(result)
    lim = scale or score_scale(scores[target][pm.image == image_index])
    kw = dict(image_index=image_index, alpha=alpha, scale=lim, max_side=max_side)
    panels = [render_overlay(result, image, target, panel="local", **kw)]
    if pm.global_grid(image_index) is not None:
        panels.append(render_overlay(result, image, target, panel="global", **kw))
    pad, head, bar = 8, 22, 14
    W = sum(p.size[0] for p in panels) + pad * (len(panels) + 1)
    H = head + max(p.size[1] for p in panels) + 2 * pad + bar + 14
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    tok = strings[target] if target < len(strings) else str(target)
    kind = "" if label == "attribution" else f" [{label}]"
    draw.text((pad, 4), f"{method}{kind}: target {target} {tok!r}", fill="black")
    x = pad
    for p, name in zip(panels, ("local", "global")):
        canvas.paste(p, (x, head))
        draw.text((x, head + p.size[1] + 1), name, fill="gray")
        x += p.size[0] + pad
    y = H - bar - 14
    ramp = (_colorize(np.linspace(-lim, lim, W - 2 * pad)[None].repeat(bar, 0), lim)).round().astype(np.uint8)
    canvas.paste(Image.fromarray(ramp), (pad, y))
    draw.text((pad, y + bar), f"{-lim:.3g}", fill="black")
    draw.text((W // 2 - 3, y + bar), "0", fill="black")
    draw.text((W - pad - 40, y + bar), f"{lim:.3g}", fill="black")
    if path is not None:
        canvas.save(path, format="PNG")
    return canvas


def attention_mass_figure(result, target: int = 0) -> go.Figure:
    """The attention companion (NOT an attribution): mass of the target row on image tokens, layer × head."""
    extras = getattr(result, "extras", None)
    mass = extras["image_mass"][1] if extras else np.asarray(result["image_mass"].values)     # (L, H, J)
    fig = go.Figure(go.Heatmap(z=mass[:, :, target], colorscale="Viridis", zmin=0, zmax=1,
                               colorbar_title="mass",
                               hovertemplate="layer %{y} head %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Attention mass on image tokens, target {target} — {ATTENTION_LABEL}",
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed")
    return fig

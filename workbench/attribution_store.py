"""Attribution results inside a run: arrays under `attribution[/NAME]/`, written directly with zarr.

    RUN.zarr/attribution[/NAME]/
      scores            float32 [target, image_token]   per-token score (NaN: not attributed)
      target_token      int32   [target]                target token id
      target_position   int32   [target]                sequence row whose logits predict it
      logprob           float32 [target]                log p(target) on the real input, y(x)
      baseline_logprob  float32 [target]                y(x′)                     (ig only)
      delta             float32 [target]                Σ IG − (y(x) − y(x′))     (ig only)
      token_position    int32   [image_token]           index of the <|patch|> token in input_ids
      image, tile       int16   [image_token]           image index; tile (local row-major, global = n_local)
      row, col          int16   [image_token]           cell in the tile's token grid
      is_global         bool    [image_token]
      pixel_box         int32   [image_token, box]      (x0, y0, x1, y1) in original pixels, rounded
                                                        outward (floor, ceil); -1 for padding-only tokens
      … plus any extras the method adds (e.g. attention views: image_mass [layer, head, target]).

    attrs: method, label, baseline, steps, groups, routing, target_strings, … and `layouts` (one dict per
    image), from which `read_patch_map` rebuilds the exact fractional boxes and the tile grids.

The group is a sibling of the run's own arrays; the run reader ignores it and `Run.to_xarray()` does
not merge it. Read it with `read_attribution(path)` or plain `xr.open_zarr(path, group="attribution")`.
Only numpy, zarr and workbench.image are imported (xarray inside `read_attribution`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

from workbench.image import ImageLayout, PatchMap, patch_map

ROOT = "attribution"


def patch_map_arrays(pm: PatchMap) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """The patch map as store arrays: name -> (dims, values)."""
    box = np.where(np.isnan(pm.box), -1, np.concatenate([np.floor(pm.box[:, :2]), np.ceil(pm.box[:, 2:])], 1))
    it = ("image_token",)
    return {"token_position": (it, pm.position.astype(np.int32)), "image": (it, pm.image.astype(np.int16)),
            "tile": (it, pm.tile.astype(np.int16)), "row": (it, pm.row.astype(np.int16)),
            "col": (it, pm.col.astype(np.int16)), "is_global": (it, pm.is_global.astype(bool)),
            "pixel_box": (("image_token", "box"), box.astype(np.int32))}


def layouts_attr(layouts: list[ImageLayout]) -> list[dict]:
    return [dict(original_size=list(lay.original_size), grid=list(lay.grid), resized_size=list(lay.resized_size),
                 tile_size=lay.tile_size, tokens_per_side=lay.tokens_per_side) for lay in layouts]


def _group(store, mode: str = "a") -> zarr.Group:
    if isinstance(store, zarr.Group):
        return store
    return zarr.open_group(Path(store), mode=mode, zarr_format=3, use_consolidated=False)


def _json_safe(value):
    """NaN/inf → None and numpy scalars/arrays → Python, so attributes are strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_store_model(store, model, label: str = "this model") -> None:
    """Refuse to write attributions of `model` into a run recorded from another model: a workbench run at
    `store` names its model by config_hash (text or full config) and model_source, the identity the run
    writer checks on resume; a plain group, or no store, is fine."""
    import json
    from pathlib import Path

    from workbench.safe_files import read_bounded
    from workbench.store.schema import config_hash

    meta = Path(store) / "zarr.json"
    if not meta.is_file():
        return
    try:
        attrs = json.loads(read_bounded(meta, 16 << 20, "zarr.json")).get("attributes", {})
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"--out {store}: unreadable zarr.json ({e})") from None
    have = attrs.get("config_hash") if isinstance(attrs, dict) else None
    if have is None:
        return
    cfg = model.config
    mine = {config_hash(cfg.to_hf())}
    if hasattr(cfg, "text_config"):
        mine.add(config_hash(cfg.text_config.to_hf()))
    source = attrs.get("model_source")
    if have not in mine or (isinstance(source, str) and source and source != str(label)):
        raise ValueError(f"--out {store} is a run recorded from another model ({attrs.get('model_source')!r}, "
                         f"config_hash {str(have)[:12]}…); the attributions of {label!r} would be mixed into it: "
                         "choose another --out")


def write_attribution(store, arrays: Mapping[str, tuple[tuple[str, ...], np.ndarray]], attrs: dict, *,
                      patch_map: PatchMap | None = None, name: str | None = None, overwrite: bool = True) -> str:
    """Write `arrays` (name -> (dims, values)) and `attrs` under `attribution[/name]` of the Zarr group
    `store` (a run path, created as a plain group if absent, or an open zarr.Group). Returns the group path."""
    path = ROOT if not name else f"{ROOT}/{name}"
    if name and ("/" in name or name.startswith(".")):
        raise ValueError(f"attribution name must be a plain name, got {name!r}")
    if "scores" not in arrays:
        raise ValueError("write_attribution: arrays need 'scores' [target, image_token]")
    sizes: dict[str, int] = {}
    for key, (dims, values) in arrays.items():
        shape = np.shape(values)
        if len(shape) != len(dims):
            raise ValueError(f"array {key!r}: {len(shape)} axes but dims {tuple(dims)}")
        for d, n in zip(dims, shape):
            if sizes.setdefault(d, n) != n:
                raise ValueError(f"array {key!r}: dim {d!r} has length {n}, elsewhere {sizes[d]}")
    root = _group(store)
    if path in root and "scores" in root[path] and not overwrite:
        raise FileExistsError(f"{path} already exists in {root.store}; pass overwrite=True to replace it")
    if name:
        g = root.require_group(ROOT).create_group(name, overwrite=True)
    else:       # the root of `attribution` may hold named results below it: replace only its own arrays
        g = root.require_group(ROOT)
        for key in list(g.array_keys()):
            del g[key]
    for key, (dims, values) in arrays.items():
        values = np.asarray(values)
        fill = np.nan if values.dtype.kind == "f" else (False if values.dtype == bool else -1)
        arr = g.create_array(key, shape=values.shape, dtype=values.dtype, dimension_names=tuple(dims),
                             fill_value=fill, overwrite=True)
        arr[...] = values
    meta = dict(attrs)
    if patch_map is not None:
        meta["layouts"] = layouts_attr(patch_map.layouts)
    meta = _json_safe(meta)
    json.dumps(meta, allow_nan=False)           # strict JSON or fail before writing
    g.attrs.put(meta)
    return path


def list_attributions(store) -> list[str]:
    """Group paths holding attribution results (`attribution`, `attribution/NAME`, …)."""
    root = _group(store, "r")
    if ROOT not in root:
        return []
    g = root[ROOT]
    out = [ROOT] if "scores" in g else []
    return out + [f"{ROOT}/{k}" for k in sorted(g.group_keys()) if "scores" in g[k]]


def read_attribution(store, name: str | None = None):
    """The result at `attribution[/name]` as a lazy xarray Dataset (dims target, image_token, box, …)."""
    import xarray as xr

    path = ROOT if not name else f"{ROOT}/{name}"
    if isinstance(store, zarr.Group):
        return xr.open_zarr(store.store, group=f"{store.path}/{path}".strip("/"), consolidated=False)
    return xr.open_zarr(Path(store), group=path, consolidated=False)


def read_patch_map(ds_or_group) -> PatchMap:
    """Rebuild the exact PatchMap (fractional boxes, grids) from a stored result's `layouts` attribute."""
    attrs = ds_or_group.attrs
    layouts = [ImageLayout(tuple(d["original_size"]), tuple(d["grid"]), tuple(d["resized_size"]), d["tile_size"],
                           d["tokens_per_side"]) for d in attrs["layouts"]]
    return patch_map(layouts, np.asarray(ds_or_group["token_position"][...]))

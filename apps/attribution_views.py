"""Pure callbacks of the Attribution tab: browse stored image-token attributions, and compute new ones.

Nothing here imports gradio (tests call these functions directly); `UserError` messages are shown to
the person at the browser as they are.

Viewer. Any directory directly inside the runs directory whose Zarr store holds `attribution/…`
result groups (written by `AttributionResult.save`, `workbench attribute --out` or this tab) is an
*attribution run* — it need not be a recorded run. For a chosen result group (method), output token
and image, the view is `probes.attribution_figures.heatmap_figure` (local tiles stitched over the
original image + the global tile panel, diverging colours centred at 0), the per-target table (log p,
Σ scores, IG completeness error), the per-image-token score table, and method / baseline / steps /
routing from the group's attributes. Attention-based results (`attention_rollout`) are labelled as
NOT attributions, and their attention-mass figure is shown beside them.

The original image. The stores written by the library hold scores and the patch map but not the
pixels. This tab stores the image it attributed as raw file bytes under `RUN.zarr/attribution_inputs/
image_<k>` (with the prompt and target in that group's attributes). For runs without it, the user may
supply the original image (its size must match the recorded one); otherwise the heatmap is drawn on a
neutral grey canvas of the recorded size, and the view says so.

Compute. When the app's model is multimodal, an uploaded image (≤ MAX_UPLOAD_BYTES bytes and
≤ MAX_UPLOAD_PIXELS pixels, checked on the file size and the image header before decoding) + prompt +
target run `probes.attribution.attribute` with a small step count under the app's model lock, into a
new, unguessably named attribution run in the runs directory (written under a hidden temporary name
and renamed when complete, so no session ever lists a half-written run).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from apps.views import UserError, lru_get, resolve_run
from probes.teaching import display_token

MAX_UPLOAD_BYTES = 8 * 1024 * 1024      # the server itself refuses files over 10 MB
MAX_UPLOAD_PIXELS = 16_000_000          # checked on the header, before decoding (decompression bombs)
MAX_ATTR_PROMPT_CHARS = 1000
MAX_TARGET_CHARS = 200
MAX_TARGET_TOKENS = 8                   # one IG run per target token
GREEDY_TARGET_TOKENS = 4                # target left empty: attribute the first greedy tokens
COMPUTE_METHODS = ("ig", "gxi", "ablation")   # occlusion re-runs the vision tower per cell: CLI only
DEFAULT_STEPS = 16                       # tiny-vision: completeness error ≤ 0.03 % at 16, ~1 % at 8
MAX_STEPS = 64
BASELINES = ("mean", "zero", "blur")
INPUTS = "attribution_inputs"           # sibling group: the attributed image(s) and the prompt
COMPLETENESS_WARN = 0.05

METHOD_NAMES = {"ig": "integrated gradients", "gxi": "gradient × input", "ablation": "feature ablation",
                "occlusion": "pixel occlusion", "attention_rollout": "attention rollout"}


# The compute panel's starting prompt and answer: the trained tiny-vlm knows only its scene questions
# (workbench/train/scenes.py), any other model starts from a generic question.
PROMPT_DEFAULTS = {"tiny-vlm": ("Question: What colour is the circle?\n<|image|>\nAnswer:", " red")}
GENERIC_DEFAULTS = ("<|image|>What is in this picture?", " cat")


def compute_defaults(model_source) -> tuple[str, str]:
    return PROMPT_DEFAULTS.get(str(model_source), GENERIC_DEFAULTS)


def is_multimodal(model) -> bool:
    return hasattr(model, "vision_model") and getattr(model, "image_processor", None) is not None


def text_only_note(model_source: str) -> str:
    return (f"**Computing attributions needs a vision model.** The app's live model "
            f"(`{html.escape(str(model_source))}`) is text-only, so this panel cannot run one. Launch the app "
            "with a multimodal model (`workbench app --model tiny-vision`, or a Llama 4 checkpoint with its "
            "vision tower), or compute offline with `workbench attribute --model tiny-vision --prompt "
            "\"<|image|>…\" --image IMG --target \" cat\" --out RUNS_DIR/NAME.zarr`. The viewer above works on "
            "stored attribution runs either way.")


# ------------------------------------------------------------------------------------ listing
def _has_attribution(path: Path) -> bool:
    from workbench.attribution_store import list_attributions

    if not (path / "attribution" / "zarr.json").is_file():
        return False
    try:
        return bool(list_attributions(path))
    except Exception:                   # an unreadable store is simply not listed
        return False


def attribution_runs(runs_dir: str | Path) -> list[str]:
    """Names of the attribution runs directly inside `runs_dir`, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        try:
            path = resolve_run(root, p.name)     # the same safety rules as the Runs tab
        except UserError:
            continue
        if _has_attribution(path):
            found.append((path.stat().st_mtime_ns, p.name))
    return [n for _, n in sorted(found, key=lambda t: (-t[0], t[1]))]


def _run_path(runs_dir, run: str | None) -> Path:
    path = resolve_run(runs_dir, run)
    if not _has_attribution(path):
        raise UserError(f"Run {run!r} holds no attribution results (attribution/… groups).")
    return path


def method_label(group: str, attrs: dict) -> str:
    """'ig — integrated gradients · baseline mean · 8 steps' for the method dropdown."""
    name = group.split("/", 1)[1] if "/" in group else "(unnamed)"
    method = str(attrs.get("method", ""))
    bits = [METHOD_NAMES.get(method, method)]
    if attrs.get("groups"):
        bits.append(f"per {attrs['groups']}")
    if attrs.get("baseline"):
        bits.append(f"baseline {attrs['baseline']}")
    if attrs.get("steps"):
        bits.append(f"{attrs['steps']} steps")
    if str(attrs.get("label", "attribution")) != "attribution":
        bits.append("NOT an attribution")
    return f"{name} — " + " · ".join(bits)


def method_choices(runs_dir, run: str) -> list[tuple[str, str]]:
    """[(label, group path)] of the result groups in a run, IG first."""
    from workbench.attribution_store import list_attributions

    path = _run_path(runs_dir, run)
    groups = list_attributions(path)
    order = {"ig": 0, "gxi": 1}
    groups.sort(key=lambda g: (order.get(g.split("/")[-1], 2), g))
    return [(method_label(g, dict(_dataset(path, g).attrs)), g) for g in groups]


# ------------------------------------------------------------------------------------ reading
_LOCK = threading.Lock()
_DS: OrderedDict = OrderedDict()
_IMAGES: OrderedDict = OrderedDict()


def _stamp(path: Path) -> int:
    f = path / "zarr.json"
    return f.stat().st_mtime_ns if f.exists() else 0


def _dataset(path: Path, group: str):
    """The result group as an in-memory xarray Dataset (results are small: targets × image tokens)."""
    from workbench.attribution_store import ROOT, read_attribution

    if group != ROOT and not group.startswith(ROOT + "/"):
        raise UserError(f"Unknown attribution group {group!r}.")
    name = group[len(ROOT) + 1:] or None
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise UserError(f"Unknown attribution group {group!r}.")
    gdir = path / group
    if not (gdir / "zarr.json").is_file() or not (gdir / "scores").exists():
        raise UserError(f"Run {path.name} has no attribution group {group!r}.")

    def load():
        try:
            return read_attribution(path, name).load()
        except Exception as e:
            raise UserError(f"Cannot read {group} of {path.name}: {e}") from e
    return lru_get(_DS, _LOCK, (str(path), group, _stamp(gdir)), load, 32)


def result_dataset(runs_dir, run: str, group: str):
    """The attribution result `group` of `run` (cached xarray Dataset); clear errors for unknown ones."""
    return _dataset(_run_path(runs_dir, run), group)


def _inputs_group(path: Path):
    import zarr

    if not (path / INPUTS / "zarr.json").is_file():
        return None
    try:
        return zarr.open_group(path, mode="r", zarr_format=3, use_consolidated=False)[INPUTS]
    except Exception:
        return None


def stored_image(path: Path, index: int = 0):
    """The attributed image `index` stored by this tab (a PIL image), or None."""
    from workbench.image import ImageError, load_image

    def load():
        g = _inputs_group(path)
        key = f"image_{int(index)}"
        if g is None or key not in g:
            return None
        try:
            return load_image(bytes(np.asarray(g[key][...], dtype=np.uint8)), max_pixels=MAX_UPLOAD_PIXELS,
                              name=f"{path.name}/{INPUTS}/{key}")
        except ImageError:
            return None
    return lru_get(_IMAGES, _LOCK, (str(path), int(index), _stamp(path / INPUTS)), load, 8)


def inputs_attrs(path: Path) -> dict:
    g = _inputs_group(path)
    return dict(g.attrs) if g is not None else {}


# ------------------------------------------------------------------------------------ controls
def attribution_controls(runs_dir, run: str, group: str | None = None, target: int | None = None,
                         image: int | None = None) -> dict[str, Any]:
    """Valid selections for a run: method choices and group, target choices and index, image choices
    and index (keeping the requested ones when they exist in the run)."""
    methods = method_choices(runs_dir, run)
    groups = [g for _, g in methods]
    group = group if group in groups else groups[0]
    ds = _dataset(_run_path(runs_dir, run), group)
    strings = list(ds.attrs.get("target_strings") or [])
    lp = np.asarray(ds["logprob"].values) if "logprob" in ds else None
    n_t = int(ds.sizes["target"])
    targets = [(f"{j}: {strings[j]!r}" if j < len(strings) else f"{j}: #{int(ds['target_token'][j])}")
               + (f"  (log p {lp[j]:.3f})" if lp is not None else "") for j in range(n_t)]
    n_img = len(ds.attrs.get("layouts") or [None])
    t = int(target) if target is not None and str(target).lstrip("-").isdigit() else 0
    i = int(image) if image is not None and str(image).lstrip("-").isdigit() else 0
    return {"methods": methods, "group": group, "targets": [(lab, j) for j, lab in enumerate(targets)],
            "target": t if 0 <= t < n_t else 0, "images": [(f"image {k}", k) for k in range(n_img)],
            "image": i if 0 <= i < n_img else 0}


# ------------------------------------------------------------------------------------ the view
def _completeness(ds) -> np.ndarray | None:
    if not {"delta", "logprob", "baseline_logprob"} <= set(ds.data_vars):
        return None
    gap = np.abs(ds["logprob"].values.astype(np.float64) - ds["baseline_logprob"].values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(ds["delta"].values.astype(np.float64)) / gap


def targets_table(ds) -> pd.DataFrame:
    """One row per output token: log p, baseline log p, Σ scores, captum delta, IG completeness error."""
    strings = list(ds.attrs.get("target_strings") or [])
    n = int(ds.sizes["target"])
    scores = ds["scores"].values.astype(np.float64)
    df = pd.DataFrame({"target": np.arange(n),
                       "token": [repr(strings[j]) if j < len(strings) else "" for j in range(n)],
                       "token id": ds["target_token"].values.astype(int) if "target_token" in ds else -1,
                       "log p": ds["logprob"].values.astype(np.float64) if "logprob" in ds else np.nan,
                       "Σ score": np.nansum(scores, axis=1)})
    if "baseline_logprob" in ds:
        df["baseline log p"] = ds["baseline_logprob"].values.astype(np.float64)
    if "delta" in ds:
        df["delta"] = [float(f"{x:.3g}") for x in ds["delta"].values.astype(np.float64)]
    err = _completeness(ds)
    if err is not None:
        df["completeness error"] = [f"{e:.2%}" if np.isfinite(e) else "n/a" for e in err]
    return df.round({"log p": 4, "baseline log p": 4, "Σ score": 5})


def scores_table(ds, target: int, image: int | None = None) -> pd.DataFrame:
    """Per image token of one output token, ordered by |score| (NaN last): where it sits and its score."""
    s = ds["scores"].values[int(target)].astype(np.float64)
    img = ds["image"].values.astype(int)
    tile = ds["tile"].values.astype(int)
    glob = ds["is_global"].values.astype(bool)
    box = ds["pixel_box"].values.astype(int)
    df = pd.DataFrame({"image token": np.arange(len(s)), "position": ds["token_position"].values.astype(int),
                       "image": img,
                       "tile": ["global" if g else f"local {t}" for g, t in zip(glob, tile)],
                       "row": ds["row"].values.astype(int), "col": ds["col"].values.astype(int),
                       "pixels x0,y0,x1,y1": [", ".join(map(str, b)) if b[0] >= 0 else "padding" for b in box],
                       "score": s})
    if image is not None:
        df = df[df["image"] == int(image)]
    order = np.argsort(-np.nan_to_num(np.abs(df["score"].values), nan=-1.0), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    df["score"] = [float(f"{x:.4g}") for x in df["score"]]          # 4 significant digits for display
    return df


def _check_override(override, lay: dict):
    """A user-supplied original image for a run that does not store it; its size must match."""
    img, _ = check_upload(override)
    H, W = lay["original_size"]
    if img.size != (W, H):
        raise UserError(f"The image you gave is {img.size[0]}×{img.size[1]} px, but this attribution was made on "
                        f"a {W}×{H} image; give the same image that was attributed.")
    return img


def attribution_view(runs_dir, run: str, group: str, target: int = 0, image: int = 0, alpha: float = 0.5,
                     override=None) -> tuple[go.Figure, str, pd.DataFrame, pd.DataFrame, go.Figure | None]:
    """(heatmap figure, info markdown, targets table, per-token scores, attention-mass figure or None)."""
    from PIL import Image

    from probes.attribution_figures import attention_mass_figure, heatmap_figure

    path = _run_path(runs_dir, run)
    c = attribution_controls(runs_dir, run, group, target, image)
    if c["group"] != group:
        raise UserError(f"Run {run!r} has no result {group!r}.")
    ds = _dataset(path, group)
    n_t = int(ds.sizes["target"])
    if not 0 <= int(target) < n_t:
        raise UserError(f"Output token {target} outside 0..{n_t - 1}.")
    layouts = ds.attrs.get("layouts") or []
    if not 0 <= int(image) < len(layouts):
        raise UserError(f"Image {image} outside 0..{len(layouts) - 1}.")
    target, image = int(target), int(image)
    alpha = float(min(max(alpha if alpha is not None else 0.5, 0.0), 1.0))
    lay = layouts[image]
    H, W = lay["original_size"]
    img, where = stored_image(path, image), "the attributed image, stored with the run"
    if img is not None and img.size != (W, H):
        img = None
    if img is None and override is not None:
        img, where = _check_override(override, lay), "the image you supplied"
    if img is None:
        img = Image.new("RGB", (W, H), (206, 206, 206))
        where = ("**a grey canvas**: this run does not store the original image (the attribution library and CLI "
                 "write scores only); supply the original image below to see it under the heatmap")
    a = dict(ds.attrs)
    strings = list(a.get("target_strings") or [])
    tok = strings[target] if target < len(strings) else f"#{int(ds['target_token'][target])}"
    method = str(a.get("method", ""))
    attention = str(a.get("label", "attribution")) != "attribution"
    fig = heatmap_figure(ds, img, target, image_index=image, alpha=alpha, title=(
        f"{html.escape(method)}{' (NOT an attribution)' if attention else ''} — output token {target} "
        f"“{display_token(tok)}”, image {image}"))
    fig.update_layout(margin=dict(l=30, r=30, t=80, b=30))

    e = html.escape
    rows = [("method", f"{method} ({METHOD_NAMES.get(method, method)})"), ("baseline", a.get("baseline")),
            ("steps", a.get("steps")), ("groups", a.get("groups")), ("routing", a.get("routing")),
            ("score", a.get("score")), ("output", a.get("output"))]
    meta = " · ".join(f"**{k}** {e(str(v))}" for k, v in rows if v not in (None, ""))
    lines = [f"Run **{e(run)}**, result `{e(group)}`: {meta}."]
    if attention:
        lines.append("⚠ **Attention-based, NOT an attribution**: attention weights say where the target row "
                     "looked, not what changed its probability.")
    lp = float(ds["logprob"].values[target]) if "logprob" in ds else float("nan")
    scores = ds["scores"].values[target].astype(np.float64)
    lines.append(f"Output token {target} <code>{e(repr(tok))}</code>: log p = {lp:.4f}; Σ scores = "
                 f"{np.nansum(scores):.4g} over {int(np.isfinite(scores).sum())} of {len(scores)} image tokens.")
    err = _completeness(ds)
    if err is not None:
        y0 = float(ds["baseline_logprob"].values[target])
        msg = (f"**IG completeness error** |Σ IG − (y(x) − y(x′))| / |y(x) − y(x′)| = **{err[target]:.2%}** for "
               f"this token (y(x′) = {y0:.4f}; max over tokens {np.nanmax(err):.2%}).")
        if np.isfinite(err[target]) and err[target] > COMPLETENESS_WARN:
            msg += (f" That is above {COMPLETENESS_WARN:.0%}: the scores do not add up to the change in log p; "
                    + ("recompute with more steps" if a.get("routing") == "pinned" else
                       "recompute with pinned routing (an expert switch along the path breaks completeness) and "
                       "more steps") + " before reading them quantitatively.")
        lines.append(msg)
    elif method == "ig":
        lines.append("IG completeness error: not stored with this result.")
    if method == "occlusion":
        lines.append("Occlusion paints pixel cells of the original image, so global-tile tokens own no cell and "
                     "are left blank (NaN) in the global panel.")
    lines.append(f"Red raises log p(target), blue lowers it; one colour scale for both panels (99th percentile of "
                 f"|score|). Under the heatmap: {where}.")
    meta_in = inputs_attrs(path)
    if meta_in.get("prompt"):
        lines.append(f"Prompt <code>{e(str(meta_in['prompt']))}</code> · target "
                     f"<code>{e(repr(meta_in.get('target')))}</code> · model <code>{e(str(meta_in.get('model')))}"
                     "</code>")
    mass = attention_mass_figure(ds, target) if "image_mass" in ds else None
    return fig, "\n\n".join(lines), targets_table(ds), scores_table(ds, target, image), mass


# ------------------------------------------------------------------------------------ uploads
def _upload_path(upload) -> Path:
    if upload is None or upload == "":
        raise UserError("Upload an image first.")
    p = upload if isinstance(upload, (str, os.PathLike)) else getattr(upload, "path", None) or \
        getattr(upload, "name", None) or (upload.get("path") if isinstance(upload, dict) else None)
    if p is None:
        raise UserError("Unrecognised upload; upload an image file.")
    path = Path(p)
    if not path.is_file():
        raise UserError("The uploaded file is gone; upload it again.")
    return path


def check_upload(upload) -> tuple[Any, bytes]:
    """(validated RGB PIL image, the file's bytes), or UserError naming the limit it breaks.
    Bytes are checked on the file size and pixels on the header, both before decoding."""
    from PIL import Image, UnidentifiedImageError

    from workbench.image import ImageError, load_image
    from workbench.params import human_bytes

    path = _upload_path(upload)
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise UserError(f"The image file is {human_bytes(size)} ({size:,} bytes); the limit is "
                        f"{human_bytes(MAX_UPLOAD_BYTES)}. Downscale or recompress it.")
    if size == 0:
        raise UserError("The uploaded file is empty.")
    try:
        with Image.open(path) as probe:
            w, h = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise UserError("The uploaded file is not an image PIL can read (PNG, JPEG, WebP, …).") from None
    if w * h > MAX_UPLOAD_PIXELS:
        raise UserError(f"The image is {w}×{h} = {w * h:,} pixels; the limit is {MAX_UPLOAD_PIXELS:,}. "
                        "Downscale it first.")
    data = path.read_bytes()
    try:
        img = load_image(data, max_pixels=MAX_UPLOAD_PIXELS, name="upload")
    except ImageError as e:
        raise UserError(str(e)) from None
    return img, data


def upload_preview(upload) -> tuple[Any, str]:
    """(the image, a one-line description) for the compute panel; rejections raise UserError."""
    if upload is None:
        return None, ""
    img, data = check_upload(upload)
    return img, f"{img.size[0]}×{img.size[1]} px, {len(data) / 1024:.0f} KiB — within the limits."


# ------------------------------------------------------------------------------------ compute
def attribution_run_name() -> str:
    """A fresh, unguessable name: concurrent sessions never write into each other's runs."""
    return f"attr-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}.zarr"


def check_compute_inputs(model, prompt: str | None, target: str | None, methods, steps, baseline):
    """Normalised (prompt, target text or None, methods, steps, baseline), or UserError."""
    text = (prompt or "").strip()
    if len(text) > MAX_ATTR_PROMPT_CHARS:
        raise UserError(f"The prompt has {len(text)} characters; the limit here is {MAX_ATTR_PROMPT_CHARS}.")
    n_img = text.count("<|image|>")
    if n_img == 0:
        text = "<|image|>" + text        # one image: put it first when the prompt does not place it
    elif n_img > 1:
        raise UserError(f"The prompt has {n_img} <|image|> placeholders; this panel attributes one image. "
                        "Use the CLI (`workbench attribute --image A B`) for several.")
    if "<|patch|>" in text:
        raise UserError("The prompt may not contain <|patch|>: those positions receive image features.")
    tgt = target if target is not None else ""
    if len(tgt) > MAX_TARGET_CHARS:
        raise UserError(f"The target has {len(tgt)} characters; the limit is {MAX_TARGET_CHARS}.")
    if tgt.strip():
        n = len(model.tokenizer.encode(tgt, add_bos=False))
        if n > MAX_TARGET_TOKENS:
            raise UserError(f"The target is {n} tokens; the limit here is {MAX_TARGET_TOKENS} "
                            "(one attribution per token).")
    else:
        tgt = None
    methods = [m for m in (methods or []) if m]
    if not methods:
        raise UserError(f"Choose at least one method ({', '.join(COMPUTE_METHODS)}).")
    bad = sorted(set(methods) - set(COMPUTE_METHODS))
    if bad:
        raise UserError(f"Unknown method(s) {bad}; this panel offers {list(COMPUTE_METHODS)} (occlusion: use the CLI).")
    try:
        steps = int(steps)
    except (TypeError, ValueError):
        raise UserError(f"Steps must be a whole number, got {steps!r}.") from None
    if not 2 <= steps <= MAX_STEPS:
        raise UserError(f"Steps must be between 2 and {MAX_STEPS} here, got {steps} (use the CLI for more).")
    if baseline not in BASELINES:
        raise UserError(f"Baseline must be one of {list(BASELINES)}, got {baseline!r}.")
    return text, tgt, methods, steps, baseline


def save_inputs(store: Path, images: list[bytes], attrs: dict) -> None:
    """The attributed image file(s), byte for byte, under `attribution_inputs/image_<k>`, with `attrs`."""
    import zarr

    root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
    g = root.require_group(INPUTS)
    for k, data in enumerate(images):
        buf = np.frombuffer(data, dtype=np.uint8)
        arr = g.create_array(f"image_{k}", shape=buf.shape, dtype=np.uint8, dimension_names=("byte",),
                             overwrite=True)
        arr[...] = buf
    json.dumps(attrs, allow_nan=False)
    g.attrs.put(attrs)


def compute_attribution(model, lock: threading.Lock, runs_dir: str | Path, upload, prompt: str, target: str,
                        methods=("ig", "gxi"), steps: int = DEFAULT_STEPS, baseline: str = "mean",
                        progress: Callable[[float, str], None] | None = None,
                        model_source: str | None = None) -> tuple[str, str]:
    """Upload + prompt + target → `attribute(...)` → a new attribution run in `runs_dir`.
    Returns (run name, a markdown summary). The model is shared: its passes hold `lock`."""
    if not is_multimodal(model):
        raise UserError(text_only_note(model_source or getattr(model, "source", "")).replace("**", ""))
    img, data = check_upload(upload)
    text, tgt, methods, steps, baseline = check_compute_inputs(model, prompt, target, methods, steps, baseline)
    return write_attribution_run(model, lock, runs_dir, attribution_run_name(), img, data, text, tgt, methods,
                                 steps, baseline, progress=progress, model_source=model_source)


def write_attribution_run(model, lock: threading.Lock, runs_dir: str | Path, name: str, img, data: bytes,
                          prompt: str, target: str | None, methods, steps: int = DEFAULT_STEPS,
                          baseline: str = "mean", progress: Callable[[float, str], None] | None = None,
                          model_source: str | None = None,
                          written_by: str = "workbench app (Attribution tab)") -> tuple[str, str]:
    """Attribute `target` (None: the greedy tokens) to the image `img` (its file bytes `data` are stored
    with the run) under `prompt`, with `methods` (any of probes.attribution's), into `runs_dir/name`:
    written under a hidden temporary name and renamed when complete. Returns (name, markdown summary)."""
    from probes.attribution import attribute, target_ids
    from workbench.image import ImageError, prepare

    say = progress or (lambda f, d: None)
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_dir / f".tmp-{name}"
    results: dict = {}
    say(0.02, "waiting for the model" if lock.locked() else "preparing the image")
    try:
        with lock:
            try:
                prepared = prepare(prompt, img, model.tokenizer, model)
                ids = target_ids(model, prepared, target, GREEDY_TARGET_TOKENS)
            except ImageError as e:
                raise UserError(str(e)) from None
            for k, m in enumerate(methods):
                say(0.05 + 0.85 * k / len(methods), f"{METHOD_NAMES[m]} ({k + 1}/{len(methods)}, "
                    f"{len(ids)} target tokens{f', {steps} steps' if m == 'ig' else ''})")
                results.update(attribute(model, prompt, img, ids, methods=[m], baseline=baseline, steps=steps))
        say(0.92, "writing the run")
        for key, res in results.items():
            res.save(tmp, key)
        save_inputs(tmp, [data], {"prompt": prompt, "target": target, "target_ids": [int(i) for i in ids],
                                  "methods": list(methods), "steps": steps, "baseline": baseline,
                                  "model": str(model_source or getattr(model, "source", "")),
                                  "created": _dt.datetime.now().isoformat(timespec="seconds"),
                                  "written_by": written_by})
        os.replace(tmp, runs_dir / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(1.0, "done")
    errs = [f"{k}: {float(np.nanmax(r.completeness_error)):.2%}" for k, r in results.items()
            if r.completeness_error is not None]
    summary = (f"Computed {', '.join(results)} for {len(ids)} output token(s) into **{html.escape(name)}**"
               + (f" (IG completeness error, max over tokens — {'; '.join(errs)})" if errs else "") + ".")
    return name, summary

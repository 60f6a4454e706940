"""Do image tokens use different experts than text tokens? Router telemetry split by token modality.

`record_multimodal` records a multimodal prompt (image features scattered in, as the model runs it)
into an ordinary run store, then adds two per-token arrays next to the run's own, with zarr:

    modality    int8  [token]   0 text · 1 image patch, local tile · 2 image patch, global tile ·
                                3 image marker (<|image_start|>, <|image|>, tile separators, <|image_end|>:
                                they carry no pixels, science.md §4.2 step 1) · -1 unknown
    image_tile  int16 [token]   tile of a patch token within its image (local row-major, global =
                                n_local), -1 otherwise

Analyses (streamed over token chunks like `probes.routing`):
  cross_modal_routing   expert load P(expert | modality) per MoE layer (long DataFrame)
  tile_routing          the same per image tile (local tiles and the global tile)
  image_preference      per expert: P(e|image patch) / (P(e|image patch) + P(e|text)), the share of its
                        assignments that are image patches (depends on the token mix), and
  image_expert_share    per layer: the share of experts used mostly by image tokens (preference > ½,
                        i.e. chosen relatively more often by image patches than by text)
plus plotly figures. Legend: M MoE layers, T tokens, K top-k, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import zarr
from plotly.subplots import make_subplots

from probes import as_store, token_chunks
from workbench.image import TOKENS, Prepared

MODALITIES = ("text", "image_local", "image_global", "image_marker")
TEXT, IMAGE_LOCAL, IMAGE_GLOBAL, IMAGE_MARKER = range(4)

__all__ = ["MODALITIES", "token_modality", "record_multimodal", "modality_expert_counts", "cross_modal_routing",
           "tile_routing", "image_preference", "image_expert_share", "modality_load_figure",
           "image_preference_figure"]


# ------------------------------------------------------------------------------------- recording
def token_modality(prepared: Prepared, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(modality int8 (T,), image_tile int16 (T,)) for a prepared prompt, from its patch map."""
    ids = prepared.input_ids[0].cpu().numpy()
    pm = prepared.patch_map
    modality = np.zeros(len(ids), dtype=np.int8)
    markers = [tokenizer.token_to_id(t) for k, t in TOKENS.items() if k != "patch"]
    modality[np.isin(ids, [m for m in markers if m is not None])] = IMAGE_MARKER
    tile = np.full(len(ids), -1, dtype=np.int16)
    if len(pm):
        modality[pm.position] = np.where(pm.is_global, IMAGE_GLOBAL, IMAGE_LOCAL)
        tile[pm.position] = pm.tile
    return modality, tile


class _WithImages(torch.nn.Module):
    """The multimodal model seen through `workbench.recording.run_document`'s text-model interface:
    taps keep their full names (`language_model.model.layers.…`), `config` is the text config, and
    every call carries the prompt's pixel values (so the prompt must run as one segment)."""

    def __init__(self, model, pixel_values):
        super().__init__()
        self.language_model, self.vision_model = model.language_model, model.vision_model
        self.multi_modal_projector, self.hook_image_features = model.multi_modal_projector, model.hook_image_features
        self.config = model.config.text_config
        self._call = model.__call__
        self._check = model.check_inputs
        self.pixel_values = None if pixel_values is None else pixel_values.to(model.device, model.dtype)

    @property
    def device(self):
        return self.language_model.device

    def check_inputs(self, ids, start: int = 0):
        self._check(ids, start)

    def forward(self, ids, **kw):
        return self._call(ids, self.pixel_values, **kw)


def record_multimodal(model, prepared: Prepared | Sequence[Prepared], out, probes: Sequence[str] = ("router",), *,
                      doc_ids: Sequence | None = None, model_source: str | None = None) -> Path:
    """Record multimodal prompt(s) into the run at `out` (created, or resumed/appended to), then write
    `modality` and `image_tile` [token] for every document it knows. Probes as `workbench.recording`."""
    from workbench.recording import layout_for, run_document
    from workbench.store import RunWriter

    items = [prepared] if isinstance(prepared, Prepared) else list(prepared)
    ids = [str(i) for i in (doc_ids if doc_ids is not None else range(len(items)))]
    if len(ids) != len(items) or len(set(ids)) != len(ids):
        raise ValueError(f"need one distinct doc id per prompt, got {ids} for {len(items)} prompts")
    text = model.language_model
    attrs = dict(model_source=model_source or str(getattr(model, "source", "")), config=model.config.to_hf(),
                 dtype=str(model.dtype).replace("torch.", ""), device=str(model.device), probes=list(probes),
                 probe_options={"segment": "whole prompt", "entropy_units": "nats", "multimodal": True},
                 layer_kinds=text.config.layer_kinds())
    per_doc = {}
    with RunWriter.create(out, attrs=attrs, layout=layout_for(text, probes), exist_ok=True) as w:
        for did, p in zip(ids, items):
            per_doc[did] = token_modality(p, model.tokenizer)
            if did in w.done_ids:
                continue
            tokens = p.input_ids[0].tolist()
            arrays = run_document(_WithImages(model, p.pixel_values), tokens, probes, segment=len(tokens))
            w.append({"tokens": np.asarray(tokens, dtype=np.int32), "doc_id": did, **arrays})
        w.finish()
    g = zarr.open_group(Path(out), mode="r+", zarr_format=3, use_consolidated=False)
    n, offsets = g.attrs["n_tokens"], g["doc_offsets"][: g.attrs["n_docs"] + 1]
    modality, tile = np.full(n, -1, dtype=np.int8), np.full(n, -1, dtype=np.int16)
    for d, did in enumerate(g["doc_id"][: g.attrs["n_docs"]]):
        if str(did) in per_doc:
            modality[offsets[d]:offsets[d + 1]], tile[offsets[d]:offsets[d + 1]] = per_doc[str(did)]
    for name, values in (("modality", modality), ("image_tile", tile)):
        g.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=("token",), fill_value=-1,
                       overwrite=True)[...] = values
    g.update_attributes({"modality_codes": dict(enumerate(MODALITIES))})
    return Path(out)


# ------------------------------------------------------------------------------------- analyses
def modality_expert_counts(experts_MTK, modality_T, n_experts: int, n_classes: int = len(MODALITIES)) -> np.ndarray:
    """(M, n_classes, E) int64: top-k assignments per layer, token class (modality or tile) and expert.
    Tokens with a negative class are skipped."""
    e = np.asarray(experts_MTK).astype(np.int64)
    c = np.asarray(modality_T).astype(np.int64)
    keep = c >= 0
    e, c = e[:, keep], c[keep]
    M, _, K = e.shape
    flat = (np.arange(M)[:, None, None] * n_classes + c[None, :, None]) * n_experts + e       # (M, T, K)
    return np.bincount(flat.ravel(), minlength=M * n_classes * n_experts).reshape(M, n_classes, n_experts)


def _group(run):
    if isinstance(run, (str, Path)):
        return zarr.open_group(Path(run), mode="r", zarr_format=3, use_consolidated=False)
    if hasattr(run, "path") and hasattr(run, "layout"):       # workbench.store.Run: extra arrays are not in it
        return zarr.open_group(Path(run.path), mode="r", zarr_format=3, use_consolidated=False)
    return run


def _counts(run, key: str, n_classes: int, chunk_tokens: int | None):
    view = as_store(_group(run))
    if key not in view:
        raise KeyError(f"run has no {key!r} array; record it with probes.cross_modal.record_multimodal")
    experts = view["router/experts"]
    E = int(view.layout.get("n_experts") or view.config.get("text_config", {}).get("num_local_experts"))
    layers = np.asarray(view["router/layer_index"][...])
    total = np.zeros((experts.shape[0], n_classes, E), dtype=np.int64)
    for t0, t1 in token_chunks(view.n_tokens, chunk_tokens or 65536):
        total += modality_expert_counts(experts[:, t0:t1], view[key][t0:t1], E, n_classes)
    return total, layers


def _long(counts, layers, names, column: str) -> pd.DataFrame:
    M, C, E = counts.shape
    tot = counts.sum(-1, keepdims=True)
    load = np.divide(counts, tot, out=np.full(counts.shape, np.nan), where=tot > 0)
    idx = pd.MultiIndex.from_product([range(M), range(C), range(E)], names=["moe_layer", column, "expert"])
    df = pd.DataFrame({"count": counts.ravel(), "load": load.ravel()}, index=idx).reset_index()
    df.insert(1, "layer", layers[df["moe_layer"]])
    df[column] = np.asarray(names, dtype=object)[df[column]]
    return df[df.groupby(["moe_layer", column])["count"].transform("sum") > 0].reset_index(drop=True)


def cross_modal_routing(run, chunk_tokens: int | None = None) -> pd.DataFrame:
    """Long table: moe_layer, layer (decoder index), modality, expert, count, load = P(expert | modality)."""
    counts, layers = _counts(run, "modality", len(MODALITIES), chunk_tokens)
    return _long(counts, layers, MODALITIES, "modality")


def tile_routing(run, chunk_tokens: int | None = None) -> pd.DataFrame:
    """Long table per image tile (patch tokens only): moe_layer, layer, tile, expert, count, load.
    The global tile is the highest index of its image (n_local); a `global` column marks it."""
    g = _group(run)
    n = int(g.attrs["n_tokens"])
    tiles, mod = np.asarray(g["image_tile"][:n]), np.asarray(g["modality"][:n])
    n_tiles = int(tiles.max()) + 1 if (tiles >= 0).any() else 0
    counts, layers = _counts(run, "image_tile", max(n_tiles, 1), chunk_tokens)
    df = _long(counts, layers, np.arange(max(n_tiles, 1)), "tile")
    glob = set(tiles[mod == IMAGE_GLOBAL].tolist())
    df["global"] = df["tile"].isin(glob)
    return df


def image_preference(table: pd.DataFrame) -> pd.DataFrame:
    """Per (moe_layer, layer, expert): load_text, load_image (P(e|modality), image = local + global
    patches), preference = load_image / (load_image + load_text) (½ = no preference), and
    image_fraction = share of the expert's assignments that are image patches."""
    t = table.assign(kind=table["modality"].map({"text": "text", "image_local": "image", "image_global": "image"}))
    t = t.dropna(subset=["kind"])
    c = t.pivot_table(index=["moe_layer", "layer", "expert"], columns="kind", values="count", aggfunc="sum",
                      fill_value=0)
    for k in ("text", "image"):
        if k not in c:
            c[k] = 0
    per_layer = c.groupby(level="moe_layer")[["text", "image"]].transform("sum")
    load = c[["text", "image"]] / per_layer.where(per_layer > 0)
    out = pd.DataFrame({"load_text": load["text"], "load_image": load["image"]})
    out["preference"] = out["load_image"] / (out["load_image"] + out["load_text"])
    out["image_fraction"] = c["image"] / (c["image"] + c["text"]).where(c["image"] + c["text"] > 0)
    return out.reset_index()


def image_expert_share(pref: pd.DataFrame, threshold: float = 0.5) -> pd.Series:
    """Per decoder layer: share of (used) experts with image preference > threshold."""
    used = pref.dropna(subset=["preference"])
    return used.groupby("layer")["preference"].apply(lambda p: float((p > threshold).mean())).rename("image_share")


# ------------------------------------------------------------------------------------- figures
def modality_load_figure(table: pd.DataFrame, modalities: Sequence[str] = ("text", "image_local", "image_global")
                         ) -> go.Figure:
    """One heatmap per modality: layer × expert load relative to uniform (P(e|modality)·E; 1 = balanced)."""
    mods = [m for m in modalities if m in set(table["modality"])]
    if not mods:
        raise ValueError(f"modality_load_figure: none of {list(modalities)} in the table")
    E = int(table["expert"].max()) + 1
    fig = make_subplots(1, len(mods), subplot_titles=mods, shared_yaxes=True, horizontal_spacing=0.04)
    for c, m in enumerate(mods, start=1):
        z = table[table["modality"] == m].pivot(index="layer", columns="expert", values="load").reindex(
            columns=range(E))
        fig.add_trace(go.Heatmap(z=z.values * E, x=z.columns, y=[str(v) for v in z.index], coloraxis="coloraxis",
                                 hovertemplate=f"{m}: layer %{{y}} expert %{{x}}: %{{z:.2f}}× uniform<extra></extra>"),
                      1, c)
        fig.update_xaxes(title_text="expert", row=1, col=c)
    fig.update_yaxes(title_text="layer", type="category", autorange="reversed", row=1, col=1)
    fig.update_layout(title="Expert load by token modality (1 = uniform)",
                      coloraxis=dict(colorscale="RdBu_r", cmid=1.0, colorbar_title="load × E"))
    return fig


def image_preference_figure(pref: pd.DataFrame, threshold: float = 0.5) -> go.Figure:
    """Layer × expert image preference (½ = routed alike; > ½ = chosen more by image patches), with the
    per-layer share of image-preferring experts on the y labels."""
    share = image_expert_share(pref, threshold)
    z = pref.pivot(index="layer", columns="expert", values="preference")
    labels = [f"{layer} ({share.get(layer, float('nan')):.0%} image)" for layer in z.index]
    fig = go.Figure(go.Heatmap(z=z.values, x=z.columns, y=labels, zmin=0, zmax=1, zmid=0.5, colorscale="RdBu_r",
                               colorbar_title="P(e|img)/(P(e|img)+P(e|txt))",
                               hovertemplate="layer %{y} expert %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(title="Image vs text routing preference per expert", xaxis_title="expert",
                      yaxis_title="layer (share of image-preferring experts)", yaxis_type="category",
                      yaxis_autorange="reversed")
    return fig

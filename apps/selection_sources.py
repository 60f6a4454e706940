"""More sources and targets of the linked selection (issue 18 §2), pure (no gradio):

- **references** "RUN#TOKEN" (or "#TOKEN" for the open run): what the JS bridge sends when a token of a
  figure that belongs to another run (a chat turn's routing grid) is clicked or hovered;
- **chat replies**: the generated tokens of a recorded chat turn as a clickable strip, each mapped to its
  global index in the chat's run;
- **attribution tables**: a row (an image token of an attribution result) selects that token of the
  attribution's input, with the image patch it covers; `highlight_patch` outlines it on the heatmap.
  Such a selection has `space="attribution"`: its index counts tokens of the attribution's prompt, not
  of a recorded run, so the recorded-run views (`selection_views.check_selection`) ignore it;
- **hover previews**: one line (token, expert path, mean entropy per layer) for the token under the
  pointer, shown under the selection bar without changing the selection.
"""

from __future__ import annotations

import html
import re
from typing import Any

import numpy as np
import plotly.graph_objects as go

from apps import selection_views as sv
from apps import views as v

REF = re.compile(r"^(?P<run>[^#]*)#(?P<token>-?\d+)$")


def parse_ref(ref, default_run: str | None) -> tuple[str, int]:
    """(run name, token index) of "RUN#TOKEN" or "#TOKEN" (the open run `default_run`)."""
    m = REF.match(str(ref or "").strip())
    if m is None:
        raise v.UserError(f"Cannot read the token reference {str(ref)[:80]!r}: expected RUN#TOKEN or #TOKEN.")
    name = m["run"] or default_run
    if not name:
        raise v.UserError("Open a run first: the token reference names no run.")
    return name, int(m["token"])


def checked_token(run, token: int) -> int:
    if not 0 <= int(token) < run.n_tokens:
        raise v.UserError(f"Token {int(token)} is outside run {run.path.name} (0–{run.n_tokens - 1}).")
    return int(token)


def select_ref(ref, default_run: str | None, get_run) -> dict[str, Any]:
    """The (locked) selection a reference names; clear errors for a bad reference, run or index."""
    name, t = parse_ref(ref, default_run)
    checked_token(get_run(name), t)
    return sv.make_selection(name, t)


# ------------------------------------------------------------------------------------ chat replies
def chat_reply_tokens(run, doc: int, n_prompt: int, tokenizer=None) -> tuple[list[tuple[str, str | None]], int]:
    """The generated tokens of chat turn `doc` (prompt of `n_prompt` tokens) as (text, first-choice expert
    at the first MoE layer) pairs for a HighlightedText, and the global index of the first one."""
    if not 0 <= int(doc) < run.n_docs:
        raise v.UserError(f"Run {run.path.name} has no turn {doc} (it has {run.n_docs}).")
    lo, hi = int(run.doc_offsets[doc]), int(run.doc_offsets[doc + 1])
    base = lo + int(n_prompt)
    if not lo <= base <= hi:
        raise v.UserError(f"Turn {doc} of {run.path.name} has {hi - lo} tokens, fewer than its {n_prompt}-token "
                          "prompt.")
    text = v.token_text(tokenizer, run.array("tokens")[base:hi]) if hi > base else []
    labels: list[str | None] = [None] * len(text)
    if run.has("router/experts") and hi > base:
        labels = [f"E{int(e)}" for e in np.asarray(run.array("router/experts")[0, base:hi, 0])]
    return list(zip(text, labels)), base


def chat_figure_meta(fig: go.Figure | None, run_name: str, base: int) -> go.Figure | None:
    """Let the JS bridge map a click/hover on a chat turn's per-generated-token figure to the chat run."""
    if fig is not None:
        fig.update_layout(meta={"wb_token_offset": int(base), "wb_run": run_name})
    return fig


# ------------------------------------------------------------------------------------ attribution rows
def attribution_selection(ds, run_name: str, group: str, position) -> dict[str, Any]:
    """Select the image token at input position `position` of an attribution result (xarray Dataset of
    `workbench.attribution_store`), with its image patch: image, tile, cell and pixel box."""
    pos = np.asarray(ds["token_position"].values, dtype=np.int64)
    try:
        p = int(position)
    except (TypeError, ValueError):
        raise v.UserError(f"Not a token position: {position!r}.") from None
    hit = np.flatnonzero(pos == p)
    if not len(hit):
        raise v.UserError(f"Position {p} is not an image token of {run_name} ({group}); image tokens sit at "
                          f"{int(pos.min())}–{int(pos.max())}.")
    k = int(hit[0])
    box = [int(x) for x in np.asarray(ds["pixel_box"].values[k])]
    glob = bool(ds["is_global"].values[k])
    return {"run": run_name, "token": p, "locked": True, "space": "attribution", "group": group,
            "image_token": k, "image": int(ds["image"].values[k]),
            "tile": "global" if glob else f"local {int(ds['tile'].values[k])}",
            "row": int(ds["row"].values[k]), "col": int(ds["col"].values[k]),
            "box": box if box[0] >= 0 else None}


def attribution_html(sel: dict) -> str:
    """The selection bar for an attribution selection (escaped)."""
    e = html.escape
    where = (f"pixels x {sel['box'][0]}–{sel['box'][2]}, y {sel['box'][1]}–{sel['box'][3]}" if sel.get("box")
             else "padding only (no pixels)")
    lock = "locked" if sel.get("locked") else "preview"
    return (f"<span class='wb-sel' data-token='{int(sel['token'])}'>Selected image token at position "
            f"<b>#{int(sel['token'])}</b> of the attribution input of <code>{e(str(sel['run']))}</code>: image "
            f"{int(sel['image'])}, {e(str(sel['tile']))} tile, row {int(sel['row'])} col {int(sel['col'])} — {where} "
            f"(outlined on the Attribution heatmap) — {lock}</span>")


def highlight_patch(fig: go.Figure, sel, run_name: str, image: int) -> go.Figure:
    """Outline the selected image token's patch on an attribution heatmap (`heatmap_figure`: local panel
    on axes x/y, global panel on x2/y2, both in original pixels): solid on the token's own panel and
    dashed over the same pixels on the other panel (where they fall in the other tiling)."""
    if (not isinstance(sel, dict) or sel.get("space") != "attribution" or sel.get("run") != run_name
            or sel.get("image") != int(image) or not sel.get("box") or fig is None):
        return fig
    x0, y0, x1, y1 = sel["box"]
    own = 2 if sel["tile"] == "global" else 1
    panels = sorted({getattr(t, "xaxis", None) or "x" for t in fig.data})
    for xa in panels:
        n = 1 if xa == "x" else int(xa[1:])
        fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, xref=xa, yref=xa.replace("x", "y"),
                      line=dict(color="#00c853", width=3 if n == own else 2, dash="solid" if n == own else "dash"),
                      fillcolor="rgba(0,0,0,0)", name=f"selected patch #{int(sel['token'])}")
    return fig


# ------------------------------------------------------------------------------------ hover preview
def preview_html(run, token: int | None, tokenizer=None) -> str:
    """One line for the token under the pointer: text, place, expert path and mean entropy per layer.
    Hovering never changes the selection; an empty string when nothing is hovered."""
    if run is None or token is None:
        return ""
    t = checked_token(run, token)
    d, p = sv.locate(run, t)
    s = v.token_text(tokenizer, run.array("tokens")[t:t + 1])[0]
    parts = [f"Preview (hover; click to select): token #{t} {s!r} (document {d}, position {p})"]
    if run.has("router/experts"):
        ex = np.asarray(run.array("router/experts")[:, t, 0])
        parts.append("path " + " → ".join(f"L{li}:E{int(e)}" for li, e in zip(run.layout.moe_layer_index, ex)))
    if run.has("attention/entropy"):
        h = np.asarray(run.array("attention/entropy")[:, :, t], np.float64).mean(axis=1)     # (L,) mean over heads
        parts.append("mean H per layer " + " ".join(f"{x:.2f}" for x in h))
    return f"<span class='wb-preview' data-token='{t}'>{html.escape(' · '.join(parts))}</span>"


# ------------------------------------------------------------------------------------ image tokens of runs
def run_image_patch(run, token: int) -> dict[str, Any] | None:
    """The image patch of token `token` of a recorded run, when it is an image token of a turn whose
    generation note keeps the patch map (`image_layouts` and `image_token_positions`, written by
    `workbench.live.chat_recorded` for turns with images): {"doc", "image", "tile", "row", "col", "box"
    (original pixels, None for padding), "prompt_format"}; None for a text token or a run without the map."""
    from workbench.image import ImageLayout, patch_map

    t = checked_token(run, token)
    d, p = sv.locate(run, t)
    notes = run.attrs.get("generations") or {}
    note = notes.get(str(np.asarray(run.array("doc_id")[d]).item())) if notes else None
    if not note or not note.get("image_layouts") or p not in (note.get("image_token_positions") or []):
        return None
    lays = [ImageLayout(original_size=tuple(x["original_size"]), grid=tuple(x["grid"]),
                        resized_size=tuple(x["resized_size"]), tile_size=int(x["tile_size"]),
                        tokens_per_side=int(x["tokens_per_side"])) for x in note["image_layouts"]]
    pm = patch_map(lays, note["image_token_positions"])
    k = int(np.flatnonzero(pm.position == p)[0])
    box = None if pm.padding_only[k] else [int(np.floor(pm.box[k, 0])), int(np.floor(pm.box[k, 1])),
                                           int(np.ceil(pm.box[k, 2])), int(np.ceil(pm.box[k, 3]))]
    return {"doc": d, "image": int(pm.image[k]), "tile": "global" if pm.is_global[k] else f"local {int(pm.tile[k])}",
            "row": int(pm.row[k]), "col": int(pm.col[k]), "box": box,
            "prompt_format": note.get("prompt_format", "chat")}


def patch_line(patch: dict | None) -> str:
    """" · image token: image i, tile, cell, pixels" for the selection bar (plain text)."""
    if not patch:
        return ""
    where = (f"pixels x {patch['box'][0]}–{patch['box'][2]}, y {patch['box'][1]}–{patch['box'][3]}" if patch["box"]
             else "padding only")
    return (f" · image token: image {patch['image']} of its turn, {patch['tile']} tile, row {patch['row']} "
            f"col {patch['col']}, {where}")


def image_patch_figure(image, patch: dict | None, title: str = "") -> go.Figure | None:
    """The image (PIL) with the selected image token's patch outlined; None without a patch or image."""
    if image is None or not patch or not patch.get("box"):
        return None
    from probes.attribution_figures import _data_uri

    uri, dx, dy = _data_uri(image, 512)
    W, H = image.size
    x0, y0, x1, y1 = patch["box"]
    fig = go.Figure(go.Image(source=uri, x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip"))
    fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color="#00c853", width=3))
    fig.update_xaxes(range=[0, W], showgrid=False)
    fig.update_yaxes(range=[H, 0], showgrid=False, scaleanchor="x")
    fig.update_layout(title=title or f"Patch of the selected image token ({patch['tile']} tile, row {patch['row']} "
                                     f"col {patch['col']})", height=360)
    return fig


def turn_images(session: dict | None, doc: int, prompt_format: str = "chat") -> list:
    """The images (PIL) that entered chat turn `doc`'s prompt, in order, from the chat session's messages
    (one user + one assistant message per turn): with the chat template every image of turns 0..doc, in
    plain format those of turn `doc` alone (or, when it has none, the chat's last earlier image, as
    `apps.chat_views` brings it along)."""
    users = [m for m in (session or {}).get("messages", []) if m.get("role") == "user"]
    imgs = [[c.get("image") for c in m["content"] if c.get("type") == "image"] if isinstance(m["content"], list)
            else [] for m in users]
    if not 0 <= int(doc) < len(imgs):
        return []
    if prompt_format != "plain":
        return [im for turn in imgs[:doc + 1] for im in turn]
    if imgs[doc]:
        return imgs[doc]
    earlier = [im for turn in imgs[:doc] for im in turn]
    return earlier[-1:]

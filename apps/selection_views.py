"""Pure views of the linked selection (issue 18 §2): one token selected anywhere in the app is shown
everywhere.  The selection is a small dict {"run": name, "token": global token index, "locked": bool},
held in one gr.State for the whole session, so it survives tab switches.  No gradio here.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import plotly.graph_objects as go

from apps import views as v
from apps.private_runs import PRIVATE_DIR


def make_selection(run_name: str | None, token, locked: bool = True) -> dict[str, Any] | None:
    if not run_name or token in (None, ""):
        return None
    return {"run": run_name, "token": int(token), "locked": bool(locked), "space": "run"}


def names_run(name, run) -> bool:
    """Whether a session's run name is `run`: "x.zarr" for a shared run, "@<token>/x.zarr" for a session's
    private chat/live run (`apps.private_runs`: RUNS/.private/<token>/x.zarr)."""
    if not isinstance(name, str):
        return False
    private = run.path.parent.parent.name == PRIVATE_DIR
    if name.startswith("@") and "/" in name:
        token, base = name[1:].split("/", 1)
        return private and run.path.name == base and run.path.parent.name == token
    return not private and run.path.name == name


def check_selection(run, sel) -> int | None:
    """The selected token index when it belongs to `run` and lies inside it, else None."""
    if not isinstance(sel, dict) or not names_run(sel.get("run"), run) or sel.get("space", "run") != "run":
        return None                 # an attribution selection counts tokens of the attribution's input
    t = sel.get("token")
    return int(t) if isinstance(t, (int, np.integer)) and 0 <= int(t) < run.n_tokens else None


def locate(run, token: int) -> tuple[int, int]:
    """(document, position within it) of a global token index."""
    d = int(np.searchsorted(run.doc_offsets, token, side="right") - 1)
    return d, int(token - run.doc_offsets[d])


def selection_html(run, sel, tokenizer=None) -> str:
    """The selection bar: which token is selected (escaped), where, and its expert path in one line."""
    if isinstance(sel, dict) and sel.get("space") == "attribution":
        from apps.selection_sources import attribution_html
        return attribution_html(sel)
    t = check_selection(run, sel) if run is not None else None
    if t is None:
        return "<span class='wb-sel'>No token selected — click a token (routing text, search results, top contexts) " \
               "to select it in every tab.</span>"
    d, p = locate(run, t)
    s = v.token_text(tokenizer, run.array("tokens")[t:t + 1])[0]
    path = ""
    if run.has("router/experts"):
        ex = np.asarray(run.array("router/experts")[:, t, 0])
        path = " · path " + " → ".join(f"L{li}:E{int(e)}" for li, e in zip(run.layout.moe_layer_index, ex))
    from apps.selection_sources import patch_line, run_image_patch
    path += patch_line(run_image_patch(run, t))          # an image token of a chat turn: its patch
    lock = "locked" if sel.get("locked") else "preview"
    return (f"<span class='wb-sel' data-token='{t}'>Selected token <b>#{t}</b> <code>{html.escape(repr(s))}</code> "
            f"(document {d}, position {p}){html.escape(path)} — {lock}</span>")


def token_entropy_view(run, sel) -> go.Figure:
    """The selected token's attention entropy across layers × heads (and ΔH from temperature when
    stored) — its "entropy row" in every layer."""
    t = check_selection(run, sel)
    fig = go.Figure()
    if t is None or not run.has("attention/entropy"):
        fig.update_layout(title="Select a token to see its entropy in every layer and head", height=260)
        return fig
    h = np.asarray(run.array("attention/entropy")[:, :, t], np.float64)            # (L, H)
    nk = np.asarray(run.array("attention/n_keys")[:, t])
    kinds = v.run_info(run)["kinds"]
    fig.add_trace(go.Heatmap(z=h, x=np.arange(h.shape[1]), y=[f"{i} {k.split('/')[0]}" for i, k in enumerate(kinds)],
                             colorscale="Viridis", colorbar_title="H (nats)",
                             customdata=np.repeat(nk[:, None], h.shape[1], 1),
                             hovertemplate="layer %{y} head %{x}: H %{z:.3f} nats (n = %{customdata} keys)"
                                           "<extra></extra>"))
    d, p = locate(run, t)
    fig.update_layout(title=f"Entropy of token #{t} (document {d}, position {p}) per layer and head",
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed", height=320)
    return fig


def profile_marker(fig: go.Figure, run, sel) -> go.Figure:
    """Mark the selected token's position on an entropy-vs-position figure."""
    t = check_selection(run, sel)
    if t is not None and fig is not None:
        _, p = locate(run, t)
        fig.add_vline(x=p, line_color="#1f77b4", line_width=2, annotation_text=f"#{t}", annotation_position="top")
    return fig


def highlight_sankey(fig: go.Figure, run, sel) -> go.Figure:
    """On a routing Sankey (`probes.routing_figures.transition_sankey`), draw the links the selected token
    takes (its first choice at each MoE layer) dark and fade the others."""
    t = check_selection(run, sel) if run is not None else None
    if t is None or not fig.data or fig.data[0].type != "sankey" or not run.has("router/experts"):
        return fig
    ex = np.asarray(run.array("router/experts")[:, t, 0])
    on = {f"L{li} E{int(e)}" for li, e in zip(run.layout.moe_layer_index, ex)}
    tr = fig.data[0]
    labels = list(tr.node.label)
    hit = [labels[s] in on and labels[d] in on for s, d in zip(tr.link.source, tr.link.target)]
    tr.link.color = ["rgba(20,20,20,0.85)" if h else "rgba(180,180,180,0.25)" for h in hit]
    fig.update_layout(title=f"{fig.layout.title.text} — dark: the path of token #{t}")
    return fig

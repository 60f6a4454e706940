"""Long-context views (issue 18 §5): per NoPE layer, attention mass on the document's first token
(sink) vs position, binned with the bin width stated on the figure, with chunk boundaries and the
`floor_scale` temperature steps marked.  Reads one layer at a time in token chunks (bounded memory,
responsive on 64K+ tokens).  The attended-distance histogram needs per-query distance statistics the
store does not record yet; the figure says so.  No gradio here.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from apps import views as v
from probes import entropy as pe
from probes import token_chunks


def sink_profile(run, layer: int, n_bins: int = 512):
    """Binned min/mean/max of the head-mean sink mass vs position for one layer (a position_profile frame)."""
    sink, pos = run.array("attention/sink_mass"), run.array("positions")
    n = run.n_tokens
    max_pos = max([int(np.max(pos[a:b])) for a, b in token_chunks(n, 1 << 16)] or [0])
    acc = pe.BinAccumulator(pe.linear_bin_edges(max_pos, n_bins))
    for a, b in token_chunks(n, 1 << 16):
        acc.update(np.asarray(sink[layer, :, a:b], np.float64).mean(0), np.asarray(pos[a:b]))
    return acc.frame()


def sink_view(run, n_bins: int = 512):
    """Sink mass vs position, one line per NoPE (global) layer; chunk and temperature steps marked."""
    info = v.run_info(run)
    if not run.has("attention/sink_mass"):
        raise v.UserError(f"Run {info['name']} has no sink-mass recordings (probe 'sink').")
    n_bins = int(max(16, min(int(n_bins), 4096)))
    layers = [i for i, k in enumerate(info["kinds"]) if pe.attention_kind(k) == "nope-global"] or \
        list(range(info["n_layers"]))
    fig = go.Figure()
    width = 1
    for layer in layers:
        p = v.memo(run, "sink_profile", (layer, n_bins), lambda layer=layer: sink_profile(run, layer, n_bins))
        width = int((p["pos_hi"] - p["pos_lo"]).max()) if len(p) else 1
        fig.add_trace(go.Scatter(x=(p["pos_lo"] + p["pos_hi"] - 1) / 2, y=p["mean"], mode="lines",
                                 name=f"layer {layer}"))
    x_hi = int(p["pos_hi"].max()) if len(p) else 1
    for step, name, color, off in ((info["chunk_size"], "chunk boundary", "black", 0),
                                   (info["floor_scale"] if info["tuning"] else None, "temperature step", "red", -1)):
        if step:                         # one trace of None-separated segments: cheap for thousands of lines
            xs = np.arange(step, x_hi + 1, step) + off
            xs = xs[(xs > 0) & (xs < x_hi)][:4096]
            fig.add_trace(go.Scatter(x=np.column_stack([xs, xs, np.full(len(xs), np.nan)]).ravel(),
                                     y=np.tile([0.0, 1.0, np.nan], len(xs)), mode="lines", name=name,
                                     hoverinfo="skip", line=dict(color=color, width=1, dash="dot")))
    fig.update_layout(title=f"Attention mass on the first token (sink) vs position, NoPE layers {layers} — "
                            f"head mean, bins of {width} position{'s' if width > 1 else ''}; "
                            "attended-distance histogram: not recorded by this store",
                      xaxis_title="position", yaxis_title="sink mass", yaxis_range=[0, 1])
    return fig

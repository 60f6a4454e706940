"""Figure export, colour-blind-safe palettes and the URL state of the app (issue 18 §4).  Pure: no gradio.

Export: PNG and SVG are rendered on the server by kaleido (plotly's static-image engine) driving the
Debian Chromium at /usr/bin/chromium (kaleido finds it on PATH; a persistent kaleido server is started
on first use, ≈6 s, then ≈0.3 s an image).  CSV holds the figure's data, one row per point (heatmaps:
one row per cell; Sankey: one row per link).  Every export also writes `figure.json` and a Python
snippet: the figure's own `meta.wb_code` (the library calls that reproduce it from the run path) when
the view set one, else code that reloads the JSON.

URL state: `parse_state(query, valid)` turns a query string into the view state, dropping unknown or
stale values with a note each (never an error); `state_query(state)` writes it back.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

# ------------------------------------------------------------------------------------ palettes
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
PALETTES = ("default", "colour-blind safe")
_SWAP = {"Turbo": "Cividis", "RdBu_r": "PuOr_r", "RdBu": "PuOr", "Jet": "Cividis", "Rainbow": "Cividis"}


def _normalised(name: str):
    return go.Heatmap(colorscale=name).colorscale       # plotly stores named scales as explicit tuples


_SWAP_NORM: dict = {}


def _swap(scale):
    if not _SWAP_NORM:
        _SWAP_NORM.update({_normalised(k): _normalised(v) for k, v in _SWAP.items()})
    return _SWAP_NORM.get(scale)


def categorical(n: int, palette: str = "default") -> list[str]:
    """n colours for experts: plotly's defaults, or Okabe–Ito (≤ 8) / Cividis samples (colour-blind safe)."""
    import plotly.colors as pc

    if palette == "colour-blind safe":
        if n <= len(OKABE_ITO):
            return OKABE_ITO[:n]
        return pc.sample_colorscale("Cividis", [i / max(n - 1, 1) for i in range(n)])
    return pc.sample_colorscale("Turbo", [i / max(n - 1, 1) for i in range(n)]) if n > 1 else ["rgb(48,18,59)"]


def discrete_scale(colors: list[str]) -> list[list]:
    """A stepped plotly colorscale: value i of 0..n-1 (zmin −0.5, zmax n−0.5) gets colors[i]."""
    n = len(colors)
    return [[x, c] for i, c in enumerate(colors) for x in (i / n, (i + 1) / n)]


def apply_palette(fig: go.Figure | None, palette: str = "default") -> go.Figure | None:
    """The figure with colour-blind-safe scales when asked: rainbow (Turbo/Jet) → Cividis, red–blue
    diverging → purple–orange, and the A/B line colours → Okabe–Ito blue/vermillion.  Returns `fig`."""
    if fig is None or palette != "colour-blind safe":
        return fig
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; choose one of {PALETTES}")
    for tr in fig.data:
        scale = getattr(tr, "colorscale", None) if tr.type in ("heatmap", "histogram2d", "contour") else None
        if scale is not None:
            new = _swap(tuple(tuple(x) for x in scale))
            if new is not None:
                tr.colorscale = new
            elif any("rgb(48,18,59)" in str(c) for _, c in scale):     # sampled Turbo (expert colours)
                tr.colorscale = "Cividis"
        if tr.type == "scatter" and getattr(tr.line, "color", None) in ("rgb(31,119,180)", "rgb(214,39,40)"):
            tr.line.color = "#0072B2" if tr.line.color == "rgb(31,119,180)" else "#D55E00"
    fig.update_layout(meta={**(fig.layout.meta or {}), "palette": palette} if isinstance(fig.layout.meta, dict)
                      else {"palette": palette})
    return fig


# ------------------------------------------------------------------------------------ export
def _arr(v) -> np.ndarray | None:
    """A trace array as numpy: plain lists, or plotly's base64 typed array {dtype, bdata, shape} (what a
    figure's JSON holds for numpy data since plotly 6)."""
    if v is None:
        return None
    if isinstance(v, dict) and "bdata" in v:
        import base64

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        return a.reshape([int(x) for x in str(shape).split(",")]) if shape is not None else a
    return np.asarray(v, dtype=object)


def figure_rows(fig: go.Figure) -> tuple[list[str], list[list[Any]]]:
    """The figure's data as (header, rows): trace, name, x, y, z/value, text — one row per point/cell/link."""
    header = ["trace", "name", "x", "y", "value", "text"]
    rows: list[list[Any]] = []
    for i, tr in enumerate(fig.data):
        name = getattr(tr, "name", None) or tr.type
        if tr.type == "heatmap":
            z = _arr(tr.z)
            if z is None or z.ndim != 2:
                continue
            xs = list(_arr(tr.x)) if tr.x is not None else list(range(z.shape[1]))
            ys = list(_arr(tr.y)) if tr.y is not None else list(range(z.shape[0]))
            for r in range(z.shape[0]):
                for c in range(z.shape[1]):
                    rows.append([i, name, xs[c] if c < len(xs) else c, ys[r] if r < len(ys) else r, z[r, c], ""])
        elif tr.type == "sankey":
            lab = list(tr.node.label or [])
            for s, t, val in zip(_arr(tr.link.source), _arr(tr.link.target), _arr(tr.link.value)):
                s, t = int(s), int(t)
                rows.append([i, name, lab[s] if s < len(lab) else s, lab[t] if t < len(lab) else t, val, "link"])
        else:
            xs = list(_arr(tr.x)) if getattr(tr, "x", None) is not None else []
            ys = list(_arr(tr.y)) if getattr(tr, "y", None) is not None else []
            texts = tr.text if isinstance(getattr(tr, "text", None), (list, tuple, np.ndarray)) else None
            for j in range(max(len(xs), len(ys))):
                x = xs[j] if j < len(xs) else j
                y = ys[j] if j < len(ys) else None
                if x is None and y is None:
                    continue                              # None-separated line segments
                rows.append([i, name, x, y, "", texts[j] if texts is not None and j < len(texts) else ""])
    return header, rows


def figure_csv(fig: go.Figure) -> str:
    header, rows = figure_rows(fig)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(["" if (isinstance(x, float) and np.isnan(x)) else x for x in r] for r in rows)
    return buf.getvalue()


_KALEIDO_LOCK = threading.Lock()
_KALEIDO_STARTED = False


def _start_kaleido() -> None:
    global _KALEIDO_STARTED
    with _KALEIDO_LOCK:
        if not _KALEIDO_STARTED:
            try:
                import kaleido
            except ImportError as e:
                raise RuntimeError("PNG/SVG export needs kaleido (pip install 'kaleido>=1') and a Chromium; "
                                   "CSV and code export work without it") from e
            try:
                kaleido.start_sync_server(silence_warnings=True)
            except Exception as e:                      # no Chromium: say which one kaleido looks for
                raise RuntimeError(f"kaleido could not start a browser ({type(e).__name__}: {e}); install Debian "
                                   "chromium (`apt-get install chromium`) for PNG/SVG export") from e
            _KALEIDO_STARTED = True


def render(fig: go.Figure, fmt: str, width: int = 1000, height: int = 600) -> bytes:
    """PNG or SVG bytes of `fig` (kaleido)."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"image format must be 'png' or 'svg', got {fmt!r}")
    _start_kaleido()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fig.to_image(format=fmt, width=width, height=height, scale=2 if fmt == "png" else 1)


def code_snippet(fig: go.Figure, stem: str) -> str:
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    if meta.get("wb_code"):
        return str(meta["wb_code"])
    return ("import plotly.io as pio\n"
            f"fig = pio.read_json({stem + '.json'!r})   # the exported figure, data and layout\nfig.show()\n")


def safe_stem(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name or "figure")).strip("-.")[:80]
    return s or "figure"


def export_figure(fig: go.Figure | dict | str | None, out_dir: str | Path, name: str = "figure",
                  images: bool = True) -> tuple[list[Path], str]:
    """Write NAME.png, NAME.svg (when `images`), NAME.csv and NAME.json into out_dir; returns (paths,
    code snippet).  `fig`: a figure, its dict, or its JSON (what a gr.Plot sends back)."""
    if fig is None:
        raise ValueError("there is no figure to export yet: draw it first")
    if isinstance(fig, str):
        fig = pio.from_json(fig)
    elif isinstance(fig, dict):
        fig = go.Figure(fig)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_stem(name)
    paths = []
    if images:
        for fmt in ("png", "svg"):
            p = out / f"{stem}.{fmt}"
            p.write_bytes(render(fig, fmt))
            paths.append(p)
    p = out / f"{stem}.csv"
    p.write_text(figure_csv(fig))
    paths.append(p)
    p = out / f"{stem}.json"
    p.write_text(fig.to_json())
    paths.append(p)
    return paths, code_snippet(fig, stem)


# ------------------------------------------------------------------------------------ URL state
STATE_KEYS = ("run", "tab", "layer", "head", "token", "expert", "q", "doc", "b", "palette")


def parse_state(query: str | dict | None, valid: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The state a URL asks for, checked against `valid` (key -> list of allowed values, or a callable
    returning True for a valid value); unknown keys and invalid values are dropped with a note."""
    if isinstance(query, dict):
        items = list(query.items())
    else:
        items = parse_qsl((query or "").lstrip("?"), keep_blank_values=False)
    state: dict[str, Any] = {}
    notes: list[str] = []
    for k, val in items:
        if k not in STATE_KEYS:
            if k not in ("__theme", "view"):               # gradio's own parameters
                notes.append(f"unknown URL parameter {k!r} ignored")
            continue
        ok = valid.get(k)
        good = ok(val) if callable(ok) else (ok is None or val in [str(x) for x in ok])
        if good:
            state[k] = val
        else:
            notes.append(f"{k}={val!r} is not available here; using the default")
    return state, notes


def state_query(state: dict[str, Any]) -> str:
    """Query string of the non-empty state entries, in STATE_KEYS order."""
    return urlencode([(k, str(state[k])) for k in STATE_KEYS if state.get(k) not in (None, "", "all")])

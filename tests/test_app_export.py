"""Figure export, palettes and URL state (`apps.export`, pure): CSV holds every point of a figure after the
JSON round trip a browser makes, PNG/SVG render through kaleido with Debian chromium, unknown or stale
URL values fall back with a note, and the colour-blind palette swaps rainbow and red-blue scales."""

from __future__ import annotations

import csv
import io
import shutil

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from apps import export as ex


def _figure():
    fig = go.Figure(go.Heatmap(z=np.arange(6, dtype=np.float64).reshape(2, 3), x=[10, 11, 12], y=["a", "b"],
                               colorscale="RdBu_r"))
    fig.add_trace(go.Scatter(x=np.array([0, 1, np.nan, 2]), y=np.array([1.5, 2.5, np.nan, 3.5]), name="line",
                             line_color="rgb(31,119,180)"))
    fig.add_trace(go.Sankey(node=dict(label=["E0", "E1"]), link=dict(source=[0], target=[1], value=[7])))
    return fig


def test_csv_has_every_point_after_the_json_round_trip():
    fig = pio.from_json(_figure().to_json())             # numpy arrays travel as base64 typed arrays
    rows = list(csv.reader(io.StringIO(ex.figure_csv(fig))))
    assert rows[0] == ["trace", "name", "x", "y", "value", "text"]
    cells = [r for r in rows[1:] if r[0] == "0"]
    assert [(r[2], r[3], float(r[4])) for r in cells] == [(str(x), y, float(v)) for y, row in
                                                         zip("ab", np.arange(6).reshape(2, 3))
                                                         for x, v in zip([10, 11, 12], row)]
    line = [r for r in rows[1:] if r[0] == "1"]
    assert [(float(r[2]), float(r[3])) for r in line if r[2]] == [(0.0, 1.5), (1.0, 2.5), (2.0, 3.5)]
    assert [r[2:5] for r in rows[1:] if r[0] == "2"] == [["E0", "E1", "7"]]


def test_export_writes_files_and_code(tmp_path):
    fig = _figure()
    fig.update_layout(meta={"wb_code": "from workbench.store import open_run\n"})
    paths, code = ex.export_figure(fig.to_json(), tmp_path, "a b/../c", images=False)
    assert [p.suffix for p in paths] == [".csv", ".json"] and code.startswith("from workbench.store")
    assert all(p.parent == tmp_path and "/" not in p.name for p in paths)
    with pytest.raises(ValueError, match="no figure"):
        ex.export_figure(None, tmp_path)


@pytest.mark.skipif(not shutil.which("chromium") and not shutil.os.path.exists("/usr/bin/chromium"),
                    reason="PNG/SVG export needs Debian chromium (kaleido drives it)")
def test_png_and_svg_render(tmp_path):
    paths, _ = ex.export_figure(_figure(), tmp_path, "fig")
    by = {p.suffix: p.read_bytes() for p in paths}
    assert by[".png"][:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in by[".svg"][:200]
    with pytest.raises(ValueError, match="png"):
        ex.render(_figure(), "gif")


def test_palette_swaps_scales():
    fig = ex.apply_palette(_figure(), "colour-blind safe")
    assert tuple(fig.data[0].colorscale) == tuple(go.Heatmap(colorscale="PuOr_r").colorscale)
    assert fig.data[1].line.color == "#0072B2"
    turbo = go.Figure(go.Heatmap(z=[[0, 1]], colorscale="Turbo"))
    assert tuple(ex.apply_palette(turbo, "colour-blind safe").data[0].colorscale) == \
        tuple(go.Heatmap(colorscale="Cividis").colorscale)
    assert ex.apply_palette(_figure(), "default").data[0].colorscale == _figure().data[0].colorscale
    assert ex.categorical(3, "colour-blind safe") == ex.OKABE_ITO[:3]
    assert len(ex.categorical(12, "colour-blind safe")) == 12


def test_url_state_falls_back_with_notes():
    valid = {"run": ["a.zarr"], "tab": ["compare", "experts"], "layer": [0, 1, 3], "token": str.isdigit}
    state, notes = ex.parse_state("?run=a.zarr&tab=nope&layer=3&token=x1&foo=1&__theme=dark", valid)
    assert state == {"run": "a.zarr", "layer": "3"}
    assert len(notes) == 3 and any("tab='nope'" in n for n in notes) and any("foo" in n for n in notes)
    assert ex.state_query({"run": "a b.zarr", "tab": "experts", "head": "all", "token": 5, "q": "x&y"}) == \
        "run=a+b.zarr&tab=experts&token=5&q=x%26y"
    assert ex.parse_state(ex.state_query({"run": "a.zarr", "q": "x&y"}), {"run": ["a.zarr"]})[0] == \
        {"run": "a.zarr", "q": "x&y"}


def test_discrete_scale_maps_each_expert_to_its_colour():
    import plotly.colors as pcol

    cols = ex.categorical(4, "colour-blind safe")
    scale = ex.discrete_scale(cols)
    for e in range(4):                                   # zmin −0.5, zmax 3.5: expert e sits at (e + 0.5) / 4
        x = (e + 0.5) / 4
        lo = max(p for p, _ in scale if p <= x)
        assert {c for p, c in scale if p == lo} & {cols[e]}
    assert pcol.validate_colors([c for _, c in scale])

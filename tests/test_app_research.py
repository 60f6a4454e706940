"""The app as a research instrument, in a real browser (headless Debian Chromium via Playwright), the
"Done when" list of issue 18: a run compared with its temperature-off twin recorded from the Compare tab
(the divergence strip and ΔH equal the library's numbers), a token selected in the routing explorer
highlighted in the entropy explorer and the Compare tab, an expert dashboard opened from a search
result, a figure exported to PNG/SVG/CSV (files checked), and a copied URL restoring the same view in a
fresh page.  Screenshots of the new tabs go to artifacts/screenshots/ (docs/app.md uses them)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import numpy as np
import pytest
from conftest import served_app
from test_app_browser import (  # noqa: F401  (fixtures and helpers shared with the tab tests)
    SHOTS,
    browser,
    choose,
    figure,
    new_page,
    no_console_errors,
    open_tab,
    shot,
    wait_changed,
    wait_figure,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import workbench

    model = workbench.load_model("tiny")
    runs = tmp_path_factory.mktemp("runs")
    docs = [{"text": t, "domain": d, "id": f"{d}{i}"} for i, (d, t) in enumerate([
        ("prose", "The river bends twice before it reaches the old mill, where the water slows. " * 3),
        ("code", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 2)])]
    workbench.record(model, docs, runs / "example.zarr", probes=("router", "router_logits", "entropy", "norms", "sink"),
                     progress=False, model_source="tiny")
    with served_app(model, runs, "tiny") as (_, address, _):
        yield address, runs


@pytest.fixture(scope="module")
def page(browser, served):  # noqa: F811
    pg = new_page(browser, served[0], "#run-summary table")
    yield pg
    pg.close()



def z(pg, elem_id, trace: int = 0) -> np.ndarray:
    """A heatmap's z as the page holds it: plain lists, or plotly's base64 typed array {dtype, bdata, shape}."""
    raw = json.loads(pg.locator(f"#{elem_id} .js-plotly-plot").first.evaluate(
        f"el => JSON.stringify(el.data[{trace}].z)"))
    if isinstance(raw, dict) and "bdata" in raw:
        arr = np.frombuffer(base64.b64decode(raw["bdata"]), dtype=np.dtype(raw["dtype"]))
        shape = [int(x) for x in str(raw.get("shape", len(arr))).split(",")]
        return arr.reshape(shape).astype(float)
    return np.asarray([[np.nan if x is None else x for x in row] for row in raw], float)


def has_text(pg, selector: str, text: str, timeout: int = 30_000) -> None:
    """Wait until the element exists and its text includes `text` (elements of hidden tabs may be absent)."""
    pg.wait_for_function("([s, t]) => { const el = document.querySelector(s); "
                         "return !!el && el.innerText.includes(t); }", arg=[selector, text], timeout=timeout)


def run(runs, name):
    from workbench.store import open_run

    return open_run(runs / name)


def test_compare_with_temperature_off_twin(page, served):
    from probes import compare as pc

    runs = served[1]
    open_tab(page, "Compare")
    page.locator("#cmp-twin").get_by_text("Record B as an intervention of A").click()
    page.locator("#cmp-temp-off input").check()
    before = figure(page, "cmp-divergence")
    page.locator("#cmp-record-twin").click()
    strip = json.loads(wait_changed(page, "cmp-divergence", before, timeout=120))
    note = page.locator("#cmp-note").inner_text()
    assert "token by token" in note and "temperature_tuning" in note
    twin = next(p.name for p in runs.iterdir() if p.name.startswith("example-iv-"))
    a, b = pc.span(run(runs, "example.zarr")), pc.span(run(runs, twin))
    want = pc.divergence_strip(a, b, 0, 64)
    assert strip["d"][0]["type"] == "heatmap"
    assert np.array_equal(z(page, "cmp-divergence"), want["differs"].astype(int))
    wait_figure(page, "cmp-dh-heat")
    table = pc.entropy_difference(a, b)
    grid = table.pivot(index="layer", columns="head", values="delta").to_numpy()
    np.testing.assert_allclose(z(page, "cmp-dh-heat"), grid, rtol=1e-6, atol=1e-9)
    assert np.abs(grid).max() > 0                          # temperature off changes the NoPE layers' entropy
    np.testing.assert_allclose(z(page, "cmp-dh-strip"), pc.delta_h_window(a, b, 0, 64),
                               rtol=1e-6, atol=1e-9)
    shot(page, "5-compare")


def test_selection_follows_across_tabs(page, served):
    open_tab(page, "Routing explorer")
    wait_figure(page, "grid-plot")
    path = figure(page, "path-plot")
    page.locator("#routing-tokens .token").nth(7).click()
    wait_changed(page, "path-plot", path)
    has_text(page, "#sel-bar", "#7", 30_000)
    open_tab(page, "Entropy explorer")
    has_text(page, "#sel-bar", "#7")
    tok = json.loads(wait_figure(page, "token-entropy-plot"))
    assert "#7" in tok["t"]["text"]
    prof_shapes = page.locator("#profile-plot .js-plotly-plot").first.evaluate(
        "el => (el.layout.shapes || []).map(s => s.x0)")
    assert 7 in prof_shapes                                 # the selected token's position is marked
    open_tab(page, "Compare")
    page.wait_for_function(
        "(() => { const el = document.querySelector('#cmp-divergence .js-plotly-plot');"
        " return el && (el.layout.shapes || []).some(s => s.x0 === 7); })()", timeout=60_000)
    open_tab(page, "Routing explorer")                      # a click on the tokens × layers heatmap selects too
    page.locator("#grid-plot .js-plotly-plot").first.evaluate("el => el.emit('plotly_click', {points: [{x: 9}]})")
    has_text(page, "#sel-bar", "#9", 30_000)
    open_tab(page, "Entropy explorer")
    has_text(page, "#token-entropy-plot", "#9", 30_000)
    page.locator("#sel-unlock").click()                     # a visible control unlocks
    has_text(page, "#sel-bar", "No token selected")
    shot(page, "6-selection")


def test_expert_dashboard_from_a_search_result(page, served):
    runs = served[1]
    open_tab(page, "Experts")
    wait_figure(page, "experts-load")
    page.locator("#experts-query textarea, #experts-query input").first.fill("e")
    page.locator("#experts-search").click()
    has_text(page, "#experts-search-note", "matching", 60_000)
    cell = page.locator("#experts-results [data-testid=cell-0-0]")          # first result, "token" column
    token = int(cell.inner_text())
    load = figure(page, "experts-load")
    cell.click()
    wait_changed(page, "experts-load", load)
    r = run(runs, "example.zarr")
    expert = int(r.read("router/experts")[0, token, 0])
    has_text(page, "#experts-summary", f"E{expert} at layer 0", 30_000)
    assert f"#{token}" in page.locator("#sel-bar").inner_text()           # selected everywhere
    assert page.locator("#experts-contexts mark").count() > 0               # highlighted contexts
    shot(page, "7-experts")


def test_export_png_svg_csv(page, served):
    open_tab(page, "Compare")
    wait_figure(page, "cmp-divergence")
    page.locator("#export-divergence-strip").get_by_text("Export this figure").click()
    page.locator("#export-btn-divergence-strip").click()
    links = page.locator("#export-files-divergence-strip a")
    links.first.wait_for(timeout=120_000)
    page.wait_for_function("document.querySelectorAll('#export-files-divergence-strip a').length >= 4",
                           timeout=60_000)
    got = {}
    for i in range(links.count()):
        href = links.nth(i).get_attribute("href")
        name = re.sub(r".*/", "", href.split("?")[0])
        got[name.rsplit(".", 1)[-1]] = page.request.get(href).body()
    assert got["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in got["svg"][:200]
    rows = list(csv.reader(io.StringIO(got["csv"].decode())))
    assert rows[0] == ["trace", "name", "x", "y", "value", "text"] and len(rows) > 64
    code = page.locator("#export-code-divergence-strip").inner_text()
    assert "read_json" in code or "open_run" in code


def test_url_restores_the_view(page, served, browser):  # noqa: F811
    open_tab(page, "Experts")
    choose(page, "experts-expert", "E2")
    page.wait_for_function("location.search.includes('expert=E2') && location.search.includes('tab=experts')",
                           timeout=30_000)
    page.locator("#sel-token input").fill("11")
    page.locator("#sel-token input").press("Enter")
    page.wait_for_function("location.search.includes('token=11')", timeout=30_000)
    url = page.url
    fresh = new_page(browser, url, "#sel-bar")
    try:
        has_text(fresh, "#experts-summary", "E2 at layer", 60_000)
        assert "#11" in fresh.locator("#sel-bar").inner_text()
        assert fresh.get_by_role("tab", name="Experts", exact=True).first.get_attribute("aria-selected") == "true"
        stale = new_page(browser, served[0] + "?run=gone.zarr&layer=99&tab=experts&bogus=1", "#sel-bar")
        has_text(stale, "#url-note", "not available", 30_000)
        note = stale.locator("#url-note").inner_text()
        assert "gone.zarr" in note and "99" in note and "bogus" in note
        assert stale.errors == []
        stale.close()
        assert fresh.errors == []
    finally:
        fresh.close()

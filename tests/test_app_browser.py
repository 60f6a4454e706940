"""A real browser (headless Debian Chromium via Playwright) opens every tab of the app, performs its
main interaction, checks that the figure changed and that the page logged no console errors, and
saves a screenshot per tab to artifacts/screenshots/."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")
if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import workbench
    from apps.workbench_app import build_app, serve

    model = workbench.load_model("tiny")
    runs = tmp_path_factory.mktemp("runs")
    docs = [{"text": t, "domain": d, "id": f"{d}{i}"} for i, (d, t) in enumerate([
        ("prose", "The river bends twice before it reaches the old mill, where the water slows. " * 3),
        ("code", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 2),
        ("prose", "She kept the <letters> in a tin box under the stairs, tied with string. " * 3)])]
    workbench.record(model, docs, runs / "example.zarr", probes=("router", "router_logits", "entropy", "norms"),
                     progress=False, model_source="tiny")
    demo = build_app(model, runs, model_source="tiny")
    _, address, _ = serve(demo, "127.0.0.1", free_port(), share=False, block=False)
    yield address
    demo.close()


@pytest.fixture(scope="module")
def page(url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.errors = []
        pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
        pg.goto(url, wait_until="load")
        pg.wait_for_selector("#run-summary table", timeout=60_000)       # first load opened the run
        yield pg
        browser.close()


@pytest.fixture(autouse=True)
def no_console_errors(request):
    if "page" not in request.fixturenames:
        yield
        return
    pg = request.getfixturevalue("page")
    before = len(pg.errors)
    yield
    assert pg.errors[before:] == [], "the page logged errors"


def figure(pg, elem_id: str):
    """A fingerprint of the plotly figure inside #elem_id (None while the plot is empty)."""
    loc = pg.locator(f"#{elem_id} .js-plotly-plot")
    if loc.count() == 0:
        return None
    return loc.first.evaluate("el => JSON.stringify({d: el.data, t: el.layout && el.layout.title, "
                              "a: ((el.layout && el.layout.annotations) || []).map(a => a.text)})")


def wait_changed(pg, elem_id: str, before, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        now = figure(pg, elem_id)
        if now is not None and now != before:
            return now
        pg.wait_for_timeout(200)
    raise AssertionError(f"figure #{elem_id} did not change within {timeout:.0f} s")


def wait_figure(pg, elem_id: str, timeout: float = 60.0):
    return wait_changed(pg, elem_id, None, timeout)


def title(fig_json: str) -> str:
    return (json.loads(fig_json)["t"] or {}).get("text", "")


def open_tab(pg, name: str):
    pg.get_by_role("tab", name=name).click()
    pg.wait_for_timeout(300)


def set_slider(pg, elem_id: str, value):
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(pg, elem_id: str, option: str):
    pg.locator(f"#{elem_id} input[role=combobox]").click()
    pg.get_by_role("option", name=option, exact=True).click()


def shot(pg, name: str):
    pg.wait_for_timeout(400)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_runs_tab_opens_a_run(page):
    open_tab(page, "Runs")
    assert "example.zarr" in page.locator("#run-summary").inner_text()
    page.locator("#runs-table").get_by_text("example.zarr").filter(visible=True).first.click()
    page.locator("#open-run").click()
    page.wait_for_timeout(500)
    assert "prose" in page.locator("#run-summary").inner_text()
    shot(page, "1-runs")


def test_routing_tab_layer_and_token_click(page):
    open_tab(page, "Routing explorer")
    grid = wait_figure(page, "grid-plot")
    load = wait_figure(page, "load-plot")
    path = wait_figure(page, "path-plot")
    assert "layer" in title(load)
    choose(page, "routing-layer", "3")                                  # select a layer
    load = wait_changed(page, "load-plot", load)
    assert "layer 3" in title(load)
    tokens = page.locator("#routing-tokens .token")
    assert tokens.count() == 64
    assert "<letters>" not in page.locator("#routing-tokens").inner_html()     # escaped by the component
    tokens.nth(5).click()                                               # click a token
    path = wait_changed(page, "path-plot", path)
    assert "#5" in title(path)
    page.locator("#routing-doc input[role=combobox]").click()           # another document
    page.get_by_role("option").nth(1).click()
    wait_changed(page, "grid-plot", grid)
    shot(page, "2-routing")


def test_entropy_tab_statistic_and_layers(page):
    open_tab(page, "Entropy explorer")
    prof = wait_figure(page, "profile-plot")
    wait_figure(page, "layer-head-plot")
    page.locator("#entropy-stat").get_by_text("H / ln n").click()        # change the statistic
    prof = wait_changed(page, "profile-plot", prof)
    assert "H / ln n" in title(prof)
    choose(page, "entropy-group", "layer 0 · rope-chunked/moe")
    prof = wait_changed(page, "profile-plot", prof)
    assert "layer 0" in title(prof) and "chunk boundary" in prof
    shot(page, "3-entropy")


def test_attribution_tab_is_an_honest_placeholder(page):
    open_tab(page, "Attribution")
    text = page.locator("#attribution").inner_text()
    assert "not available yet" in text and "vision model" in text
    assert page.locator("#attribution .js-plotly-plot").count() == 0    # no invented data
    shot(page, "4-attribution")


def test_teach_moe_sliders_rerun_the_model(page):
    open_tab(page, "Teach MoE")
    journey = wait_figure(page, "journey-plot")
    nxt = wait_figure(page, "next-plot")
    params = wait_figure(page, "params-plot")
    set_slider(page, "moe-topk", 2)                                     # move a slider
    journey = wait_changed(page, "journey-plot", journey)
    page.locator("#moe-drop-shared input").check()                      # drop the shared expert
    nxt = wait_changed(page, "next-plot", nxt)
    assert "KL" in title(nxt)
    set_slider(page, "params-topk", 2)
    assert "top-2" in title(wait_changed(page, "params-plot", params))
    shot(page, "5-teach-moe")


def test_teach_irope_sliders_and_live_model(page):
    open_tab(page, "Teach iRoPE")
    mask = wait_figure(page, "mask-plot")
    rope = wait_figure(page, "rope-plot")
    temp = wait_figure(page, "temp-plot")
    set_slider(page, "mask-chunk", 8)                                   # chunk slider
    assert "C = 8" in wait_changed(page, "mask-plot", mask)
    set_slider(page, "rope-delta", 7)
    assert "m + 7" in title(wait_changed(page, "rope-plot", rope))
    set_slider(page, "attn-scale", 0.3)
    assert "attn_scale=0.3" in wait_changed(page, "temp-plot", temp)
    assert figure(page, "live-entropy-plot") is None
    page.locator("#live-entropy-run").click()                           # run the live model
    live = wait_figure(page, "live-entropy-plot")
    assert "tuning on" in title(live)
    shot(page, "6-teach-irope")


def test_live_prompt_records_a_run_and_views_follow(page):
    open_tab(page, "Runs")
    page.locator("#live-prompt textarea").fill("Experts <b>route</b> tokens.")
    set_slider(page, "live-new-tokens", 4)
    page.locator("#live-run").click()                                   # run a live prompt
    page.wait_for_function("document.querySelector('#run-summary').innerText.includes('live-')", timeout=60_000)
    assert "Experts <b>route</b> tokens." in page.locator("#live-text textarea").input_value()
    shot(page, "7-live-run")
    open_tab(page, "Routing explorer")
    page.wait_for_function("document.querySelector('#routing-note').innerText.includes('live-')", timeout=30_000)
    shot(page, "8-routing-live-run")

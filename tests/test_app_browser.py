"""A real browser (headless Debian Chromium via Playwright) opens every tab of the app, performs its
main interaction, checks that the figure changed and that the page logged no console errors, and
saves a screenshot per tab to artifacts/screenshots/.

The app under test runs the text-only `tiny` model over a runs directory whose example run also holds
an image-token attribution precomputed on `tiny-vision` with the library (a few IG steps); a second app
on `tiny-vision` takes an image upload in the Attribution tab's compute panel."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import free_port, random_image, served_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"

import playwright.sync_api as sync_api  # noqa: E402  (dev extra; `make test` installs it and chromium)

if not CHROMIUM.exists() and os.environ.get("WORKBENCH_ALLOW_NO_BROWSER") != "1":
    raise RuntimeError("Debian chromium is not installed at /usr/bin/chromium (`make browser` or "
                       "apt-get install chromium); set WORKBENCH_ALLOW_NO_BROWSER=1 to skip the browser tests")
if not CHROMIUM.exists():
    pytest.skip("WORKBENCH_ALLOW_NO_BROWSER=1 and no chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import workbench

    model = workbench.load_model("tiny")
    runs = tmp_path_factory.mktemp("runs")
    docs = [{"text": t, "domain": d, "id": f"{d}{i}"} for i, (d, t) in enumerate([
        ("prose", "The river bends twice before it reaches the old mill, where the water slows. " * 3),
        ("code", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 2),
        ("prose", "She kept the <letters> in a tin box under the stairs, tied with string. " * 3)])]
    workbench.record(model, docs, runs / "example.zarr", probes=("router", "router_logits", "entropy", "norms"),
                     progress=False, model_source="tiny")
    precomputed_attribution(runs / "example.zarr")
    with served_app(model, runs, "tiny") as (_, address, _):
        yield address


def precomputed_attribution(store: Path):
    """IG and G×I of " cat" for an image, with the library on tiny-vision, into `store` (and the image)."""
    import torch

    import workbench
    from apps.attribution_views import save_inputs
    from probes.attribution import attribute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vm = workbench.load_model("tiny-vision")
        for key, res in attribute(vm, "<|image|>What is it?", random_image(), " cat", methods="ig,gxi",
                                  steps=8).items():
            res.save(store, key)
    finally:
        torch.set_num_threads(threads)
    buf = io.BytesIO()
    random_image().save(buf, format="PNG")
    save_inputs(store, [buf.getvalue()], {"prompt": "<|image|>What is it?", "target": " cat", "model": "tiny-vision"})


def new_page(browser, url, ready: str):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
    pg.goto(url, wait_until="load")
    pg.wait_for_selector(ready, timeout=60_000)
    return pg


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, url):
    pg = new_page(browser, url, "#run-summary table")       # first load opened the run
    yield pg
    pg.close()


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
    """Click the tab `name`. Gradio renders tabs that do not fit the row a second time in an overflow
    menu ("…"): click the visible button, opening that menu first when the tab sits only there."""
    tabs = pg.get_by_role("tab", name=name, exact=True)
    if tabs.filter(visible=True).count() == 0:
        pg.locator(".overflow-menu > button").first.click()
    tabs.filter(visible=True).first.click()
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


def pick_option(pg, elem_id: str, index: int):
    pg.locator(f"#{elem_id} input[role=combobox]").click()
    pg.get_by_role("option").nth(index).click()


def test_attribution_tab_shows_the_stored_attribution(page):
    open_tab(page, "Attribution")
    fig = wait_figure(page, "attr-plot")
    assert title(fig).startswith("ig") and "output token 0" in title(fig)
    traces = [t["type"] for t in json.loads(fig)["d"]]
    assert traces == ["image", "heatmap", "image", "heatmap"]             # local tiles + global tile
    assert page.locator("#attr-run input").input_value() == "example.zarr"
    info = page.locator("#attr-info").inner_text()
    assert "IG completeness error" in info and "baseline mean" in info and "steps 8" in info
    assert "stored with the run" in info
    scores = page.locator("#attr-scores").inner_text()                   # per-token scores
    assert "pixels x0,y0,x1,y1" in scores and "local 0" in scores and "global" in scores
    assert "completeness error" in page.locator("#attr-targets").inner_text()
    assert "needs a vision model" in page.locator("#attr-compute-note").inner_text()   # text-only app: honest
    pick_option(page, "attr-target", 2)                                   # another output token
    fig = wait_changed(page, "attr-plot", fig)
    assert "output token 2" in title(fig)
    pick_option(page, "attr-method", 1)                                   # another method
    fig = wait_changed(page, "attr-plot", fig)
    assert title(fig).startswith("gxi") and "output token 2" in title(fig)
    assert "IG completeness" not in page.locator("#attr-info").inner_text()
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


def test_selecting_teach_moe_keeps_the_teach_irope_tab(browser, url):
    """Regression: a gr.State created late inside the Attribution tab made Gradio re-render the tab button
    after a selected tab as a second copy of it (Teach iRoPE became a second Teach MoE)."""
    pg = new_page(browser, url, "#run-summary table")
    try:
        open_tab(pg, "Teach MoE")
        pg.wait_for_timeout(2000)
        labels = pg.evaluate("() => [...document.querySelectorAll('button[role=tab]')].map(b => b.textContent.trim())")
        assert labels.count("Teach MoE") == 1 and "Teach iRoPE" in labels, labels
    finally:
        pg.close()


def test_teach_irope_sliders_and_live_model(browser, url):
    page = new_page(browser, url, "#run-summary table")
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
    irope = wait_figure(page, "irope-plot")                             # tiny-irope's panel, filled on first open
    assert "tiny-irope" in title(irope) and "temperature on" in title(irope)
    assert "the model answers" in page.locator("#irope-answer").inner_text()
    assert figure(page, "live-entropy-plot") is None
    page.locator("#live-entropy-run").click()                           # run the live model
    live = wait_figure(page, "live-entropy-plot")
    assert "tuning on" in title(live)
    shot(page, "6-teach-irope")
    page.close()


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



# the run is private to the session (apps/private_runs.py): "@<token>/chat-….zarr"; its summary shows the plain name
CHAT_RUN = re.compile(r"Turn recorded in run (?:@[0-9a-f]{32}/)?(chat-\d{8}-\d{6}-[0-9a-f]{6}\.zarr) as document 0")


def send_chat(pg, message: str, timeout: float = 60.0) -> str:
    """Type `message` in the Chat tab, send it, wait for the turn note and return the run it names."""
    pg.locator("#chat-msg textarea").fill(message)
    pg.locator("#chat-send").click()
    pg.wait_for_function("document.querySelector('#chat-note').innerText.includes('Turn recorded')",
                         timeout=timeout * 1000)
    note = pg.locator("#chat-note").inner_text()
    run = CHAT_RUN.search(note)
    assert run, note
    assert pg.locator("#chat-msg textarea").input_value() == ""          # the message box cleared
    return run.group(1)


def test_chat_tab_replies_records_a_run_and_plots_it(page):
    open_tab(page, "Chat")
    assert figure(page, "chat-routing") is None and figure(page, "chat-entropy") is None
    assert not page.locator("#chat-image").is_visible()                  # text-only model: no upload
    assert "Images need a vision model" in page.locator("#chat-image-note").inner_text()
    set_slider(page, "chat-new-tokens", 6)
    run = send_chat(page, "Which expert routes this?")
    user = page.locator("#chat-bot [data-testid=user]")
    bot = page.locator("#chat-bot [data-testid=bot]")
    assert user.count() == 1 and bot.count() == 1
    assert user.inner_text().strip() == "Which expert routes this?"
    assert bot.inner_text().strip()                                      # a reply appeared
    routing = wait_figure(page, "chat-routing")
    entropy = wait_figure(page, "chat-entropy")
    assert "expert per MoE layer (turn 0)" in title(routing)
    assert "Attention entropy per generated token" in title(entropy)
    assert page.locator("#chat-routing .main-svg").count() and page.locator("#chat-entropy .main-svg").count()
    shot(page, "10-chat")
    page.locator("#chat-open").click()                                   # open the chat's run
    open_tab(page, "Runs")
    page.wait_for_function(f"document.querySelector('#run-summary').innerText.includes('{run}')", timeout=30_000)
    assert "chat" in page.locator("#run-summary").inner_text()


@pytest.fixture(scope="module")
def vision_url(tmp_path_factory):
    import workbench

    model = workbench.load_model("tiny-vision")
    with served_app(model, tmp_path_factory.mktemp("vision-runs"), "tiny-vision") as (_, address, _):
        yield address


def test_vision_app_computes_an_attribution_from_an_upload(browser, vision_url, tmp_path):
    pg = new_page(browser, vision_url, "#run-summary")
    try:
        open_tab(pg, "Attribution")
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        pg.locator("#attr-upload input[type=file]").set_input_files(str(bad))    # rejected, clearly
        pg.wait_for_function("document.querySelector('#attr-upload-check').innerText.includes('Rejected')",
                             timeout=30_000)
        assert "not an image" in pg.locator("#attr-upload-check").inner_text()
        pg.wait_for_selector("#attr-upload input[type=file]", state="attached")  # the rejected file is gone
        good = tmp_path / "cat.png"
        random_image().save(good)
        pg.locator("#attr-upload input[type=file]").set_input_files(str(good))
        pg.wait_for_function("document.querySelector('#attr-upload-check').innerText.includes('100×80')",
                             timeout=30_000)
        assert figure(pg, "attr-plot") is None
        set_slider(pg, "attr-steps", 4)
        pg.locator("#attr-compute").click()                                   # run the model
        fig = wait_figure(pg, "attr-plot", timeout=120)
        assert title(fig).startswith("ig")
        assert "Computed" in pg.locator("#attr-compute-result").inner_text()
        assert pg.locator("#attr-run input").input_value().startswith("attr-")
        assert "stored with the run" in pg.locator("#attr-info").inner_text()
        shot(pg, "9-attribution-compute")
        assert pg.errors == [], "the page logged errors"
    finally:
        pg.close()



@pytest.fixture(scope="module")
def chat_vision_url(tmp_path_factory):
    """The app as `workbench app` serves it by default: tiny-moe for the text tabs, tiny-vlm to chat about images."""
    import workbench
    from apps.workbench_app import build_app, serve

    demo = build_app(workbench.load_model("tiny-moe"), tmp_path_factory.mktemp("chat-runs"), model_source="tiny-moe",
                     vision_model=workbench.load_model("tiny-vlm"), vision_source="tiny-vlm")
    _, address, _ = serve(demo, "127.0.0.1", free_port(), share=False, block=False)
    yield address
    demo.close()


def test_vision_chat_answers_a_question_about_an_uploaded_scene(browser, chat_vision_url, tmp_path):
    """tiny-vlm, chosen in the Chat tab, answers its trained question (plain prompt) about an uploaded scene."""
    from workbench.train import scenes

    ex = scenes.example("t", 0, "colour")
    ex.image.save(tmp_path / "scene.png")
    pg = new_page(browser, chat_vision_url, "#run-summary")
    try:
        open_tab(pg, "Chat")
        assert not pg.locator("#chat-image").is_visible()                 # the text model is chosen first
        pg.locator("#chat-model").get_by_text("tiny-vlm (vision)").click()     # pick the vision chat model
        pg.wait_for_selector("#chat-image input[type=file]", state="attached", timeout=30_000)
        assert pg.locator("#chat-format input[value=plain]").is_checked()     # tiny-vlm's own format
        assert "<|image|>" in pg.locator("#chat-msg textarea").get_attribute("placeholder")
        pg.locator("#chat-image input[type=file]").set_input_files(str(tmp_path / "scene.png"))
        pg.wait_for_selector("#chat-image img", timeout=30_000)             # uploaded: the preview shows
        send_chat(pg, scenes.prompt_text(ex.question))
        assert "image tokens included" in pg.locator("#chat-note").inner_text()
        assert "Plain prompt" in pg.locator("#chat-note").inner_text()
        user = pg.locator("#chat-bot [data-testid=user]").inner_text()
        assert ex.question in user and "[image 64×64]" in user             # the image went with the turn
        assert pg.locator("#chat-bot [data-testid=bot]").inner_text().strip() == ex.answer
        wait_figure(pg, "chat-routing")
        wait_figure(pg, "chat-entropy")
        pg.wait_for_selector("#chat-image img", state="detached", timeout=30_000)   # the upload cleared
        shot(pg, "11-chat-vision")
        assert pg.errors == [], "the page logged errors"
    finally:
        pg.close()

"""The linked selection's other sources in a real browser (headless Debian Chromium via Playwright),
issue 18 §2: a token of a chat reply selected across tabs, an attribution-table row selecting its image
token and outlining its patch, and a hover preview that does not lock (click locks, Unlock clears).
The app and its runs (example.zarr with a stored attribution) are test_app_browser's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_app_browser import (  # noqa: F401  (fixtures and helpers shared with the tab tests)
    browser,
    chat_vision_url,
    figure,
    new_page,
    no_console_errors,
    open_tab,
    set_slider,
    shot,
    url,
    wait_changed,
    wait_figure,
)
from test_app_research import has_text

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(browser, url):  # noqa: F811
    pg = new_page(browser, url, "#run-summary table")
    yield pg
    pg.close()


def bar_token(pg) -> int | None:
    el = pg.locator("#sel-bar .wb-sel").first
    t = el.get_attribute("data-token")
    return None if t is None else int(t)


def test_hover_previews_without_locking_click_locks_unlock_clears(page):
    open_tab(page, "Routing explorer")
    wait_figure(page, "grid-plot")
    assert bar_token(page) is None
    grid = page.locator("#grid-plot .js-plotly-plot").first
    grid.evaluate("el => el.emit('plotly_hover', {points: [{x: 5}]})")      # the heatmap
    has_text(page, "#sel-preview", "token #5")
    preview = page.locator("#sel-preview").inner_text()
    assert "path L" in preview and "mean H per layer" in preview and "click to select" in preview
    page.wait_for_timeout(500)
    assert bar_token(page) is None and "No token selected" in page.locator("#sel-bar").inner_text()
    page.locator("#routing-tokens .token").nth(3).hover()                     # the token strip
    has_text(page, "#sel-preview", "token #3")
    assert bar_token(page) is None                                            # hovering never locks
    page.locator("#sel-unlock").hover()                                       # leaving the strip clears it
    page.wait_for_function("!document.querySelector('#sel-preview').innerText.includes('token #')",
                           timeout=30_000)
    path = figure(page, "path-plot")
    page.locator("#routing-tokens .token").nth(3).click()                     # a click locks
    has_text(page, "#sel-bar", "#3")
    assert "locked" in page.locator("#sel-bar").inner_text()
    wait_changed(page, "path-plot", path)
    grid.evaluate("el => el.emit('plotly_hover', {points: [{x: 6}]})")        # a preview while locked
    has_text(page, "#sel-preview", "token #6")
    assert bar_token(page) == 3                                               # the lock holds
    page.locator("#sel-unlock").click()
    has_text(page, "#sel-bar", "No token selected")
    shot(page, "11-hover-preview")


def test_a_chat_reply_token_is_selected_in_every_tab(page):
    open_tab(page, "Chat")
    set_slider(page, "chat-new-tokens", 6)
    page.locator("#chat-msg textarea").fill("Which expert routes this?")
    page.locator("#chat-send").click()
    page.wait_for_function("document.querySelector('#chat-note').innerText.includes('Turn recorded')",
                           timeout=60_000)
    strip = page.locator("#chat-tokens .token")
    strip.first.wait_for(timeout=30_000)
    n = strip.count()
    assert n >= 1
    strip.nth(n - 1).click()                                                  # the reply's last token
    page.wait_for_function("!!document.querySelector('#sel-bar .wb-sel[data-token]')", timeout=30_000)
    t = bar_token(page)
    assert "locked" in page.locator("#sel-bar").inner_text()
    has_text(page, "#run-summary", "chat-")                                   # the chat's run was opened
    open_tab(page, "Routing explorer")
    has_text(page, "#routing-note", "chat-")
    page.wait_for_function(f"(() => {{ const el = document.querySelector('#path-plot .js-plotly-plot');"
                           f" return el && JSON.stringify(el.layout.title || '').includes('#{t}'); }})()",
                           timeout=60_000)
    open_tab(page, "Entropy explorer")
    has_text(page, "#token-entropy-plot", f"#{t}", 60_000)                    # its entropy row everywhere
    open_tab(page, "Chat")                                                    # a cell of the turn's routing grid
    chat_grid = page.locator("#chat-routing .js-plotly-plot").first
    meta = json.loads(chat_grid.evaluate("el => JSON.stringify(el.layout.meta)"))
    assert meta["wb_token_offset"] == t - (n - 1) and meta["wb_run"].endswith(".zarr")
    chat_grid.evaluate("el => el.emit('plotly_click', {points: [{x: 0}]})")
    has_text(page, "#sel-bar", f"#{t - (n - 1)}")
    chat_grid.evaluate("el => el.emit('plotly_hover', {points: [{x: 1}]})")  # hover previews in the chat run
    has_text(page, "#sel-preview", f"token #{t - (n - 1) + 1}")
    assert bar_token(page) == t - (n - 1)
    shot(page, "12-chat-selection")
    page.locator("#sel-unlock").click()
    has_text(page, "#sel-bar", "No token selected")


def test_an_attribution_row_selects_its_token_and_patch(page):
    open_tab(page, "Attribution")
    wait_figure(page, "attr-plot")
    row = page.locator("#attr-scores [data-testid=cell-0-1]")                 # first row, "position" column
    position = int(row.inner_text())
    pixels = page.locator("#attr-scores [data-testid=cell-0-6]").inner_text()
    tile = page.locator("#attr-scores [data-testid=cell-0-3]").inner_text()
    row.click()
    has_text(page, "#sel-bar", f"#{position}")
    bar = page.locator("#sel-bar").inner_text()
    assert "image token" in bar and tile in bar and "locked" in bar
    page.wait_for_function("(() => { const el = document.querySelector('#attr-plot .js-plotly-plot');"
                           " return el && (el.layout.shapes || []).length === 2; })()", timeout=60_000)
    shapes = json.loads(page.locator("#attr-plot .js-plotly-plot").first.evaluate(
        "el => JSON.stringify(el.layout.shapes)"))
    box = [int(x) for x in pixels.split(",")]
    assert sorted(s["xref"] for s in shapes) == ["x", "x2"]                   # both panels, the same pixels
    assert all([s["x0"], s["y0"], s["x1"], s["y1"]] == box for s in shapes)
    own = "x2" if tile == "global" else "x"
    assert next(s for s in shapes if s["xref"] == own)["line"]["dash"] == "solid"
    shot(page, "13-attribution-selection")
    open_tab(page, "Routing explorer")                                        # not a token of the recorded run
    page.wait_for_timeout(500)
    assert "image token" in page.locator("#sel-bar").inner_text()
    page.locator("#sel-unlock").click()
    has_text(page, "#sel-bar", "No token selected")
    open_tab(page, "Attribution")
    page.wait_for_function("(() => { const el = document.querySelector('#attr-plot .js-plotly-plot');"
                           " return el && !(el.layout.shapes || []).length; })()", timeout=60_000)


def test_an_image_token_of_a_vision_chat_shows_its_patch(browser, chat_vision_url, tmp_path):  # noqa: F811
    """tiny-vlm answers about an uploaded scene; a token of its reply opens the chat's run, then one of the
    prompt's image tokens, selected by index, names its patch in the bar and is outlined on the image."""
    import workbench
    from apps import chat_views as cv
    from workbench.chat import prepare_chat
    from workbench.train import scenes

    ex = scenes.example("t", 0, "colour")
    ex.image.save(tmp_path / "scene.png")
    text = scenes.prompt_text(ex.question)
    pm = prepare_chat(workbench.load_model("tiny-vlm"), [{"role": "user", "content": cv.user_content(text, ex.image)}],
                      prompt_format="plain").prepared.patch_map
    k = int(np.flatnonzero(~pm.padding_only & ~pm.is_global)[0])
    box = [int(np.floor(pm.box[k, 0])), int(np.floor(pm.box[k, 1])), int(np.ceil(pm.box[k, 2])),
           int(np.ceil(pm.box[k, 3]))]
    pg = new_page(browser, chat_vision_url, "#run-summary")
    try:
        open_tab(pg, "Chat")
        pg.locator("#chat-model").get_by_text("tiny-vlm (vision)").click()
        pg.wait_for_selector("#chat-image input[type=file]", state="attached", timeout=30_000)
        pg.locator("#chat-image input[type=file]").set_input_files(str(tmp_path / "scene.png"))
        pg.wait_for_selector("#chat-image img", timeout=30_000)
        pg.locator("#chat-msg textarea").fill(text)
        pg.locator("#chat-send").click()
        pg.locator("#chat-tokens .token").first.wait_for(timeout=60_000)
        pg.locator("#chat-tokens .token").first.click()                  # opens the chat's run, selects
        has_text(pg, "#run-summary", "chat-")
        pg.wait_for_function("!!document.querySelector('#sel-bar .wb-sel[data-token]')", timeout=30_000)
        pg.locator("#sel-token input").fill(str(int(pm.position[k])))      # an image token of the prompt
        pg.locator("#sel-token input").press("Enter")
        has_text(pg, "#sel-bar", "image token: image 0 of its turn")
        pg.wait_for_function("(() => { const el = document.querySelector('#chat-patch .js-plotly-plot');"
                             " return el && (el.layout.shapes || []).length === 1; })()", timeout=60_000)
        rect = json.loads(pg.locator("#chat-patch .js-plotly-plot").first.evaluate(
            "el => JSON.stringify(el.layout.shapes[0])"))
        assert [rect["x0"], rect["y0"], rect["x1"], rect["y1"]] == box
        shot(pg, "14-chat-image-patch")
        assert pg.errors == [], "the page logged errors"
    finally:
        pg.close()

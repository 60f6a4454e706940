"""Gradio wiring of the app-wide state: the linked selection bar and the URL (issue 18 §2, §4).

- `selection_bar()` (called above the tabs) builds the bar every tab shares: the selected token, a
  number box to select a token by index, a visible **Unlock** button that clears the selection, the
  palette setting, a copy-link button and the note that reports URL values that were not usable.
- `url_wiring(...)` restores the view from the page's query string on load (run, tab, layer, head,
  token, expert, search text, run B, palette; unknown or stale values fall back to the defaults with a
  visible note) and keeps the address bar in step with the view via `history.replaceState`, so a
  copied link reopens the same view.  Parsing is the pure `apps.export.parse_state`.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from apps import export as ex
from apps import selection_views as sv
from apps import views as v

TAB_IDS = ("runs", "routing", "entropy", "compare", "experts", "attribution", "teach-moe", "teach-irope", "chat")

URL_JS = """(q) => { const u = new URL(window.location.href); u.search = q ? '?' + q : '';
  window.history.replaceState(null, '', u.toString()); return []; }"""
COPY_JS = """() => { const s = window.location.href; if (navigator.clipboard) { navigator.clipboard.writeText(s)
  .catch(() => {}); } const box = document.querySelector('#url-copy textarea');
  return s; }"""


# plotly clicks select tokens: a figure whose layout.meta has wb_token_offset maps a clicked x to the token
# index offset + x, typed into the "select token #" box and submitted (the same path as typing it).
CLICK_JS = """() => {
  if (window.__wbClick) { return []; }
  window.__wbClick = true;
  const hook = (el) => {
    if (el.__wbHooked || typeof el.on !== 'function') { return; }
    el.__wbHooked = true;
    el.on('plotly_click', (ev) => {
      const meta = (el.layout && el.layout.meta) || {};
      if (meta.wb_token_offset === undefined || !ev || !ev.points || !ev.points.length) { return; }
      const box = document.querySelector('#sel-token input');
      if (!box) { return; }
      box.value = String(meta.wb_token_offset + Math.round(Number(ev.points[0].x)));
      box.dispatchEvent(new Event('input', {bubbles: true}));
      for (const type of ['keydown', 'keypress']) {
        box.dispatchEvent(new KeyboardEvent(type, {key: 'Enter', code: 'Enter', keyCode: 13, bubbles: true}));
      }
    });
  };
  const all = () => document.querySelectorAll('.js-plotly-plot').forEach(hook);
  new MutationObserver(all).observe(document.body, {childList: true, subtree: true});
  all();
  return [];
}"""


def selection_bar() -> dict:
    with gr.Row(equal_height=True):
        bar = gr.HTML(sv.selection_html(None, None), elem_id="sel-bar")
        pick = gr.Number(label="select token #", precision=0, minimum=0, scale=0, min_width=120, elem_id="sel-token")
        unlock = gr.Button("Unlock selection", size="sm", scale=0, min_width=140, elem_id="sel-unlock")
        palette = gr.Radio(list(ex.PALETTES), value="default", label="palette", scale=0, min_width=260,
                           elem_id="palette")
        copy = gr.Button("Copy link", size="sm", scale=0, min_width=100, elem_id="copy-link")
    link = gr.Textbox(label="Link to this view", visible=False, interactive=False, elem_id="url-copy")
    note = gr.Markdown("", elem_id="url-note")
    query = gr.Textbox(visible="hidden", elem_id="url-query")
    pending = gr.State({})          # what the URL asked for; the tabs' open handlers apply it
    current_tab = gr.State("runs")
    return {"current_tab": current_tab, "bar": bar, "pick": pick, "unlock": unlock, "palette": palette, "copy": copy,
            "link": link,
            "note": note, "query": query, "pending": pending}


def selection_wiring(ui: dict, *, selected: gr.State, session: gr.State, get_run: Callable, tokenizer,
                     wire: Callable) -> None:
    def show(sel, name):
        run = get_run(name) if name else None
        return sv.selection_html(run, sel, v.run_tokenizer(run, tokenizer) if run is not None else None)

    def by_index(name, t):
        if not name or t is None:
            return gr.update()
        run = get_run(name)
        if not 0 <= int(t) < run.n_tokens:
            raise v.UserError(f"Token {int(t)} is outside run {name} (0–{run.n_tokens - 1}).")
        return sv.make_selection(name, t)

    wire([selected.change, session.change], show, [selected, session], [ui["bar"]])
    wire([ui["pick"].submit], by_index, [session, ui["pick"]], [selected], api="select_token")
    wire([ui["unlock"].click], lambda: None, None, [selected], api="unlock")
    ui["copy"].click(None, None, [ui["link"]], js=COPY_JS).then(lambda: gr.update(visible=True), None, [ui["link"]])


TAB_LABELS = {"Runs": "runs", "Routing explorer": "routing", "Entropy explorer": "entropy", "Compare": "compare",
              "Experts": "experts", "Attribution": "attribution", "Teach MoE": "teach-moe",
              "Teach iRoPE": "teach-irope", "Chat": "chat"}


def pending_value(pending, key: str, choices) -> str | None:
    """A URL value waiting for a tab's open handler, when it is one of `choices`."""
    val = (pending or {}).get(key) if isinstance(pending, dict) else None
    return val if val is not None and str(val) in [str(c) for c in choices] else None


def restore(params: dict, names: list[str], get_run: Callable, moe: list[int], n_heads: int,
            n_experts: int) -> dict:
    """The view a URL's query parameters ask for: run name (default: the newest run), pending state,
    selection, tab and a note listing every value that was unknown or stale (never an error)."""
    valid = {"run": names, "b": names, "tab": TAB_IDS, "layer": moe, "head": ["all"] + list(range(n_heads)),
             "expert": [f"E{i}" for i in range(n_experts)], "q": lambda s: len(s) <= 200,
             "token": lambda s: s.isdigit(), "doc": lambda s: s.isdigit() or s == "all", "palette": ex.PALETTES}
    state, notes = ex.parse_state(params or {}, valid)
    name = state.get("run") or (names[0] if names else None)
    sel = None
    if "token" in state and name:
        run = get_run(name)
        if int(state["token"]) < run.n_tokens:
            sel = sv.make_selection(name, state["token"])
        else:
            notes.append(f"token={state['token']} is outside run {name} ({run.n_tokens} tokens); no selection")
    note = ("⚠ This link asked for something not available: " + "; ".join(notes) + ".") if notes else ""
    return {"state": state, "run": name, "selected": sel, "tab": state.get("tab", "runs"), "note": note,
            "palette": state.get("palette", "default"), "q": state.get("q", "")}


def load_outputs(ui: dict, tabs: gr.Tabs, selected: gr.State, experts: dict) -> list:
    """What the app's load handler sets from `restore`, in `load_values` order."""
    return [ui["pending"], selected, tabs, ui["current_tab"], ui["note"], ui["palette"], experts["query"]]


def load_values(r: dict) -> list:
    """Only what the URL named changes: a tab clicked while the page loads is not switched back."""
    st = r["state"]
    return [st, r["selected"] if "token" in st else gr.update(),
            gr.Tabs(selected=r["tab"]) if "tab" in st else gr.update(), r["tab"] if "tab" in st else gr.update(),
            r["note"], r["palette"] if "palette" in st else gr.update(), r["q"] if "q" in st else gr.update()]


def url_wiring(ui: dict, *, tabs: gr.Tabs, session: gr.State, selected: gr.State, routing_layer, head,
               experts: dict, compare: dict, wire: Callable) -> None:
    """Keep the URL in step with the view (tab, run, layer, head, selection, expert, search, run B, palette)."""
    current_tab = ui["current_tab"]

    def on_tab(evt: gr.SelectData):
        return TAB_LABELS.get(str(evt.value), "runs")

    tabs.select(on_tab, None, [current_tab], api_visibility="undocumented")

    def query(name, tab, layer, hd, sel, e_layer, e_exp, q, b, pal):
        st = {"run": name, "tab": tab, "layer": e_layer if tab == "experts" else layer, "head": hd,
              "token": sel.get("token") if isinstance(sel, dict) and sel.get("run") == name else None,
              "expert": e_exp if tab == "experts" else None, "q": q if tab == "experts" else None,
              "b": b if tab == "compare" else None, "palette": pal if pal != "default" else None}
        return ex.state_query(st)

    q_in = [session, current_tab, routing_layer, head, selected, experts["layer"], experts["expert"],
            experts["query"], compare["run_b"], ui["palette"]]
    wire([c.change for c in q_in], query, q_in, [ui["query"]], trigger_mode="always_last")
    ui["query"].change(None, [ui["query"]], None, js=URL_JS)

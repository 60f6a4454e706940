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
from apps import selection_sources as ss
from apps import selection_views as sv
from apps import views as v

TAB_IDS = ("runs", "routing", "entropy", "compare", "experts", "attribution", "teach-moe", "teach-irope", "chat")

URL_JS = """(q) => { const u = new URL(window.location.href); u.search = q ? '?' + q : '';
  window.history.replaceState(null, '', u.toString()); return []; }"""
COPY_JS = """() => { const s = window.location.href; if (navigator.clipboard) { navigator.clipboard.writeText(s)
  .catch(() => {}); } const box = document.querySelector('#url-copy textarea');
  return s; }"""


# The JS bridge of the linked selection.  Plotly figures whose layout.meta has wb_token_offset map a point's
# x to the token index offset + x (wb_run, when set, names the run: a chat turn's figures).  A click is typed
# into the "select token #" box (or, with wb_run, "RUN#TOKEN" into the hidden #sel-ref box) and submitted,
# the same path as typing it: it locks.  A hover (plotly_hover, or the pointer over a token of a strip
# whose offset is its figure's) writes "RUN#TOKEN" into the hidden #sel-hover box, whose change shows the
# preview line; leaving clears it.  Hovering never touches the selection.
CLICK_JS = """() => {
  if (window.__wbClick) { return []; }
  window.__wbClick = true;
  const send = (id, value, submit) => {
    const box = document.querySelector('#' + id + ' textarea, #' + id + ' input');
    if (!box || (!submit && box.value === value)) { return; }
    box.value = value;
    box.dispatchEvent(new Event('input', {bubbles: true}));
    if (!submit) { return; }
    for (const type of ['keydown', 'keypress']) {
      box.dispatchEvent(new KeyboardEvent(type, {key: 'Enter', code: 'Enter', keyCode: 13, bubbles: true}));
    }
  };
  const token = (meta, x) => meta.wb_token_offset + Math.round(Number(x));
  const ref = (meta, x) => (meta.wb_run || '') + '#' + token(meta, x);
  const metaOf = (el) => (el && el.layout && el.layout.meta) || {};
  const hook = (el) => {
    if (el.__wbHooked || typeof el.on !== 'function') { return; }
    el.__wbHooked = true;
    el.on('plotly_click', (ev) => {
      const meta = metaOf(el);
      if (meta.wb_token_offset === undefined || !ev || !ev.points || !ev.points.length) { return; }
      if (meta.wb_run) { send('sel-ref', ref(meta, ev.points[0].x), true); }
      else { send('sel-token', String(token(meta, ev.points[0].x)), true); }
    });
    el.on('plotly_hover', (ev) => {
      const meta = metaOf(el);
      if (meta.wb_token_offset === undefined || !ev || !ev.points || !ev.points.length) { return; }
      send('sel-hover', ref(meta, ev.points[0].x), false);
    });
    el.on('plotly_unhover', () => { if (metaOf(el).wb_token_offset !== undefined) { send('sel-hover', '', false); } });
  };
  // token strips whose first token is their figure's offset: hover previews the token under the pointer
  const STRIPS = [['#routing-tokens', '#grid-plot'], ['#chat-tokens', '#chat-routing']];
  const stripToken = (target) => {
    for (const [strip, fig] of STRIPS) {
      const tok = target && target.closest ? target.closest(strip + ' .token') : null;
      if (!tok) { continue; }
      const i = Array.from(document.querySelectorAll(strip + ' .token')).indexOf(tok);
      const meta = metaOf(document.querySelector(fig + ' .js-plotly-plot'));
      return meta.wb_token_offset === undefined || i < 0 ? null : ref(meta, i);
    }
    return null;
  };
  document.addEventListener('mouseover', (e) => {
    const r = stripToken(e.target);
    if (r) { send('sel-hover', r, false); }
  });
  document.addEventListener('mouseout', (e) => {
    if (stripToken(e.target) && !stripToken(e.relatedTarget)) { send('sel-hover', '', false); }
  });
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
    preview = gr.HTML("", elem_id="sel-preview")          # hover preview: never changes the selection
    ref = gr.Textbox(visible="hidden", elem_id="sel-ref")      # "RUN#TOKEN" from the JS bridge (click)
    hover = gr.Textbox(visible="hidden", elem_id="sel-hover")  # "RUN#TOKEN" or "#TOKEN" under the pointer
    link = gr.Textbox(label="Link to this view", visible=False, interactive=False, elem_id="url-copy")
    note = gr.Markdown("", elem_id="url-note")
    query = gr.Textbox(visible="hidden", elem_id="url-query")
    pending = gr.State({})          # what the URL asked for; the tabs' open handlers apply it
    current_tab = gr.State("runs")
    return {"current_tab": current_tab, "bar": bar, "pick": pick, "unlock": unlock, "palette": palette, "copy": copy,
            "link": link, "preview": preview, "ref": ref, "hover": hover,
            "note": note, "query": query, "pending": pending}


def selection_wiring(ui: dict, *, selected: gr.State, session: gr.State, get_run: Callable, tokenizer,
                     wire: Callable, open_run: Callable | None = None, summary=None) -> None:
    """`open_run(name)` -> (name, summary html) and the Runs tab's `summary`: a reference to a token of
    another run (a chat turn's figure) opens that run, then selects the token."""
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

    def by_ref(name, ref):                  # "RUN#TOKEN": open RUN when it is not the open run, select TOKEN
        sel = ss.select_ref(ref, name, get_run)
        if sel["run"] == name or open_run is None:
            return gr.update(), gr.update(), sel
        return (*open_run(sel["run"]), sel)

    def preview(name, ref):                 # the hover preview line; nothing (not an error) for a stale ref
        if not ref:
            return ""
        try:
            run_name, t = ss.parse_ref(ref, name)
            run = get_run(run_name)
            return ss.preview_html(run, t, v.run_tokenizer(run, tokenizer))
        except (v.UserError, ValueError, KeyError, FileNotFoundError):
            return ""

    out = [session, summary if summary is not None else gr.State(None), selected]
    wire([ui["ref"].submit], by_ref, [session, ui["ref"]], out, api="select_ref")
    wire([ui["hover"].change], preview, [session, ui["hover"]], [ui["preview"]], api="hover_preview",
         trigger_mode="always_last")
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
              "token": sel.get("token") if isinstance(sel, dict) and sel.get("run") == name
              and sel.get("space", "run") == "run" else None,
              "expert": e_exp if tab == "experts" else None, "q": q if tab == "experts" else None,
              "b": b if tab == "compare" else None, "palette": pal if pal != "default" else None}
        return ex.state_query(st)

    q_in = [session, current_tab, routing_layer, head, selected, experts["layer"], experts["expert"],
            experts["query"], compare["run_b"], ui["palette"]]
    wire([c.change for c in q_in], query, q_in, [ui["query"]], trigger_mode="always_last")
    ui["query"].change(None, [ui["query"]], None, js=URL_JS)

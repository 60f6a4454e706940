"""The Experts tab of the workbench app: wiring only.  Callbacks are the pure functions of
`apps.experts_views`, which read the run index (`workbench index RUN`; small runs are indexed on first use).

Top: search and filter tokens (text or regex, expert, MoE layer, document, modality, position range,
chunk); clicking a result selects that token everywhere (linked selection) and opens the dashboard of
the expert it was routed to.  Below: the dashboard of one (MoE layer, expert) — load over the run,
top-activating contexts (±N tokens, highlighted), preferred vocabulary, domain/modality mix and
next-layer co-firing.  Endpoints: `experts_dashboard`, `experts_search`, `experts_build_index`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gradio as gr

from apps import experts_views as ev
from apps import export as ex
from apps import views as v
from apps.export_ui import export_pair, export_row
from apps.state_ui import pending_value


def experts_tab(*, runs_dir: Path, session: gr.State, selected: gr.State, palette: gr.Radio, pending: gr.State,
                moe: list[int], n_experts: int, guard: Callable, wire: Callable, tokenizer=None) -> dict:
    """Build the tab and wire its events; returns the components the URL state reads and sets."""
    with gr.Tab("Experts", id="experts") as tab:
        note = gr.Markdown("Open a run in the Runs tab.", elem_id="experts-note")
        gr.Markdown("#### Search tokens")
        with gr.Row():
            q = gr.Textbox(label="token text (substring; or a regex)", scale=3, elem_id="experts-query")
            regex = gr.Checkbox(label="regex", scale=1)
            f_layer = gr.Dropdown(["any"] + moe, value="any", label="MoE layer", scale=1, allow_custom_value=True,
                                  elem_id="experts-search-layer")
            f_expert = gr.Dropdown(["any"] + [f"E{i}" for i in range(n_experts)], value="any", label="expert",
                                   scale=1, allow_custom_value=True)
            f_doc = gr.Textbox(label="document #", scale=1)
            f_mod = gr.Dropdown(["any", "text", "image"], value="any", label="modality", scale=1)
        with gr.Row():
            f_lo = gr.Textbox(label="position from", scale=1)
            f_hi = gr.Textbox(label="position to", scale=1)
            f_chunk = gr.Textbox(label="attention chunk #", scale=1)
            s_btn = gr.Button("Search", variant="primary", scale=1, elem_id="experts-search")
        s_note = gr.Markdown(elem_id="experts-search-note")
        results = gr.Dataframe(label="Results (click a row: select the token, open its expert)", interactive=False,
                               max_height=300, elem_id="experts-results")
        gr.Markdown("#### Expert dashboard")
        with gr.Row():
            layer = gr.Dropdown(moe, value=moe[0] if moe else None, label="MoE layer", allow_custom_value=True,
                                elem_id="experts-layer")
            expert = gr.Dropdown([f"E{i}" for i in range(n_experts)], value="E0", label="expert",
                                 allow_custom_value=True, elem_id="experts-expert")
            n_ctx = gr.Slider(0, ev.MAX_CONTEXT, value=5, step=1, label="± context tokens")
            n_top = gr.Slider(5, 64, value=20, step=1, label="top contexts")
            idx_btn = gr.Button("Build index", size="sm", elem_id="experts-build-index")
        summary = gr.Markdown(elem_id="experts-summary")
        load_plot = gr.Plot(label="Load over the run", elem_id="experts-load")
        export_row(load_plot, "expert-load", guard)
        contexts = gr.HTML(elem_id="experts-contexts")
        with gr.Row():
            top_df = gr.Dataframe(label="Top-activating tokens (click: select)", interactive=False, max_height=300,
                                  elem_id="experts-top")
            vocab = gr.Dataframe(label="Preferred vocabulary (count = routed here, N_x = occurrences)",
                                 interactive=False, max_height=300, elem_id="experts-vocab")
        with gr.Row():
            mix = gr.Plot(label="Domain / modality mix", elem_id="experts-mix")
            cofire = gr.Plot(label="Co-firing with the next MoE layer", elem_id="experts-cofire")
        export_pair(mix, "expert-mix", cofire, "expert-cofire", guard)

    def get(name):
        return v.open_cached(v.resolve_run(runs_dir, name))

    def on_open(name, pend):
        if not name:
            return "Open a run in the Runs tab.", gr.update(), gr.update(), gr.update()
        run = get(name)
        info = v.run_info(run)
        if not info["has_router"]:
            return (f"Run `{name}` has no router recordings: the Experts tab needs probe 'router'.",
                    gr.update(), gr.update(), gr.update())
        ml = info["moe_layers"]
        exps = ev.expert_choices(run)
        lay = pending_value(pend, "layer", ml)
        return (f"Run **{name}**: {info['n_tokens']} tokens, {info['n_experts']} experts at MoE layers {ml}.",
                gr.update(choices=ml, value=int(lay) if lay is not None else ml[0]),
                gr.update(choices=exps, value=pending_value(pend, "expert", exps) or exps[0]),
                gr.update(choices=["any"] + ml, value="any"))

    def dashboard(name, lay, exp, ctx, top, pal):
        if not name or lay is None or not exp:
            return [gr.update()] * 8
        d = ev.expert_dashboard(get(name), lay, exp, ctx, top, v.run_tokenizer(get(name), tokenizer))
        return (d["summary"], ex.apply_palette(d["load"], pal), d["contexts"], d["top"], d["vocab"],
                ex.apply_palette(d["mix"], pal), ex.apply_palette(d["cofire"], pal), "")

    def do_search(name, text, rx, lay, exp, doc, mod, lo, hi, chunk):
        if not name:
            raise v.UserError("Open a run in the Runs tab first.")
        run = get(name)
        df, msg = ev.search(run, text, rx, lay, exp, doc, mod, lo, hi, chunk, v.run_tokenizer(run, tokenizer))
        return df, msg

    def pick(evt: gr.SelectData, name, df, lay):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        t, dec_layer, e = ev.hit_expert(get(name), df.iloc[int(row)].to_dict(), lay)
        return {"run": name, "token": t, "locked": True}, dec_layer, e

    def pick_top(evt: gr.SelectData, name, df):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return {"run": name, "token": int(df.iloc[int(row)]["token"]), "locked": True}

    def build(name):
        if not name:
            raise v.UserError("Open a run in the Runs tab first.")
        ev.get_index(get(name), build=True)
        gr.Info("Index built")
        return "Index built."

    d_in = [session, layer, expert, n_ctx, n_top, palette]
    d_out = [summary, load_plot, contexts, top_df, vocab, mix, cofire, s_note]
    wire([session.change], on_open, [session, pending], [note, layer, expert, f_layer]).then(
        guard(dashboard), d_in, d_out)
    wire([layer.change, expert.change, n_ctx.release, n_top.release, palette.change], dashboard, d_in, d_out,
         api="experts_dashboard", trigger_mode="always_last")
    wire([s_btn.click, q.submit], do_search, [session, q, regex, f_layer, f_expert, f_doc, f_mod, f_lo, f_hi, f_chunk],
         [results, s_note], api="experts_search", trigger_mode="always_last")
    wire([results.select], pick, [session, results, f_layer], [selected, layer, expert])
    wire([top_df.select], pick_top, [session, top_df], [selected])
    wire([idx_btn.click], build, [session], [s_note], api="experts_build_index", concurrency_limit=1).then(
        guard(dashboard), d_in, d_out)
    return {"tab": tab, "layer": layer, "expert": expert, "query": q, "search": s_btn}

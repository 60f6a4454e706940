"""The Compare tab of the workbench app: wiring only.  Callbacks are the pure functions of
`apps.compare_views` (numbers from `probes.compare`); `apps.workbench_app.build_app` calls `compare_tab`
inside its gr.Tabs.

Pick run A and run B (and optionally one document of each) and press Compare.  Same token sequence:
share of tokens whose expert differs per MoE layer, the divergence strip (first split marked), per-token
ΔH; always: expert-load difference, transition matrices side by side, entropy profiles on one axis and
the ΔH layer × head heatmap.  "Record B as an intervention of A" reruns A on the live model with the
chosen edits and compares the pair at once.  The selected token (linked selection) is marked.
Endpoints: `compare`, `compare_record_twin`, `compare_kl`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from apps import compare_views as cv
from apps import export as ex
from apps import views as v
from apps.export_ui import export_pair, export_row
from apps.state_ui import pending_value


def _note_figure(text: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(xaxis_visible=False, yaxis_visible=False, height=220)
    return fig


def compare_tab(*, model, lock: threading.Lock, runs_dir: Path, model_source: str, session: gr.State,
                selected: gr.State, pending: gr.State, palette: gr.Radio, run_choices: Callable, guard: Callable,
                wire: Callable,                tokenizer=None) -> dict:
    """Build the tab and wire its events; returns the components other wiring needs (run B for the URL)."""
    cfg = model.config
    moe = cfg.moe_layer_index
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown("### Run A vs run B\nThe same text under two settings compares **token by token**; "
                    "different texts compare **as distributions**. Differences are B − A.")
        with gr.Row():
            run_a = gr.Dropdown(label="Run A", choices=[], allow_custom_value=True, scale=3, elem_id="cmp-run-a")
            doc_a = gr.Dropdown(label="A: document", choices=[("whole run", "all")], value="all",
                                allow_custom_value=True, scale=2, elem_id="cmp-doc-a")
            run_b = gr.Dropdown(label="Run B", choices=[], allow_custom_value=True, scale=3, elem_id="cmp-run-b")
            doc_b = gr.Dropdown(label="B: document", choices=[("whole run", "all")], value="all",
                                allow_custom_value=True, scale=2, elem_id="cmp-doc-b")
            go_btn = gr.Button("Compare", variant="primary", scale=1, elem_id="cmp-go")
        with gr.Accordion("Record B as an intervention of A (live model)", open=False, elem_id="cmp-twin"):
            gr.Markdown("Reruns run A's documents on the app's model with these edits (every MoE layer) and "
                        "records them as a new run B next to A; B remembers the edits, so per-token KL can be "
                        "recomputed. A must be recorded with the app's model.")
            with gr.Row():
                t_temp = gr.Checkbox(label="temperature tuning off (NoPE layers)", elem_id="cmp-temp-off")
                t_mask = gr.Dropdown([f"E{i}" for i in range(cfg.num_local_experts)], multiselect=True,
                                     label="mask experts")
                t_drop = gr.Checkbox(label="drop the shared expert")
                t_topk = gr.Number(label="top-k (0 = keep)", value=0, precision=0, minimum=0,
                                   maximum=cfg.num_local_experts)
                t_chunk = gr.Number(label="chunk size (0 = keep)", value=0, precision=0, minimum=0)
                twin_btn = gr.Button("Record B", variant="primary", elem_id="cmp-record-twin")
        note = gr.Markdown("Choose two runs and press Compare.", elem_id="cmp-note")
        with gr.Row():
            share_plot = gr.Plot(label="Tokens whose expert differs", elem_id="cmp-share")
            table = gr.Dataframe(label="Per MoE layer (share_differs = expert set differs)", interactive=False,
                                 max_height=300, elem_id="cmp-table")
        export_row(share_plot, "compare-share", guard)
        with gr.Row():
            start = gr.Number(label="first token (offset in A)", value=0, precision=0, minimum=0, scale=1)
            window = gr.Slider(8, v.MAX_WINDOW, value=64, step=8, label="tokens shown", scale=2)
            head = gr.Dropdown(["all"] + [str(h) for h in range(cfg.num_attention_heads)], value="all",
                               label="head", scale=1)
            group = gr.Dropdown(label="entropy layers", choices=[], allow_custom_value=True, scale=2,
                                elem_id="cmp-group")
        div_plot = gr.Plot(label="Divergence strip", elem_id="cmp-divergence")
        export_row(div_plot, "divergence-strip", guard)
        dh_strip = gr.Plot(label="Per-token ΔH", elem_id="cmp-dh-strip")
        export_row(dh_strip, "delta-h-strip", guard)
        with gr.Row():
            profile = gr.Plot(label="Entropy vs position, A and B", elem_id="cmp-profile")
            dh_heat = gr.Plot(label="ΔH per layer × head", elem_id="cmp-dh-heat")
        export_pair(profile, "entropy-profiles", dh_heat, "delta-h-heatmap", guard)
        dh_table = gr.Dataframe(label="Entropy per layer and head (nats)", interactive=False, max_height=260)
        load_plot = gr.Plot(label="Expert load difference", elem_id="cmp-load")
        export_row(load_plot, "load-difference", guard)
        with gr.Row():
            la = gr.Dropdown(moe, value=moe[0] if moe else None, label="transition from layer", allow_custom_value=True)
            lb = gr.Dropdown(moe, value=moe[min(1, len(moe) - 1)] if moe else None, label="to layer",
                             allow_custom_value=True)
            norm = gr.Checkbox(value=True, label="row-normalise P(b | a)")
        trans_plot = gr.Plot(label="Transitions, A and B", elem_id="cmp-transitions")
        export_row(trans_plot, "transitions-ab", guard)
        with gr.Row():
            kl_doc = gr.Number(label="document for KL", value=0, precision=0, minimum=0)
            kl_btn = gr.Button("Per-token KL of next-token distributions (recompute live)", elem_id="cmp-kl-btn")
        kl_plot = gr.Plot(label="Per-token KL(P_A ‖ P_B)", elem_id="cmp-kl")
        export_row(kl_plot, "kl", guard)

    def get(name):
        return v.open_cached(v.resolve_run(runs_dir, name))

    def on_session(name, pend):
        names = run_choices()
        twin = next((n for n in names if name and n.startswith(Path(name).stem + "-iv-")), None)
        b = pending_value(pend, "b", names) or twin or next((n for n in names if n != name), name)
        return gr.update(choices=names, value=name), gr.update(choices=names, value=b)

    def docs(name):
        if not name:
            return gr.update(choices=[("whole run", "all")], value="all")
        return gr.update(choices=cv.doc_choices(get(name)), value="all")

    def groups(name):
        if not name or not get(name).has("attention/entropy"):
            return gr.update(choices=[], value=None)
        g = v.layer_groups(get(name))
        return gr.update(choices=g, value=next((x for _, x in g if x == "kind:nope-global"), g[0][1]))

    def compare(a, da, b, db, first, n_tok, hd, grp, l_a, l_b, normalize, pal, sel):
        if not a or not b:
            return ["Choose run A and run B, then press Compare."] + [gr.update()] * 9
        ra, rb = get(a), get(b)
        text, tab_ = cv.overview(ra, da, rb, db)
        tok = v.run_tokenizer(ra, tokenizer)
        mark = sel.get("token") if isinstance(sel, dict) and sel.get("run") == a \
            and sel.get("space", "run") == "run" else None
        out = [text, tab_, cv.share_figure(tab_)]
        for fn in (lambda: cv.divergence_view(ra, da, rb, db, first, n_tok, tok, mark)[0],
                   lambda: cv.delta_h_strip_view(ra, da, rb, db, first, n_tok, hd, mark)):
            try:
                out.append(fn())
            except v.UserError as e:
                out.append(_note_figure(str(e)))
        try:
            p, h, df = cv.entropy_compare_view(ra, da, rb, db, grp or "", hd, 512)
        except v.UserError as e:
            p, h, df = _note_figure(str(e)), _note_figure(str(e)), None
        out += [p, h, df]
        out.append(cv.load_diff_view(ra, da, rb, db))
        out.append(cv.transitions_view(ra, da, rb, db, l_a, l_b, normalize))
        return [ex.apply_palette(x, pal) if isinstance(x, go.Figure) else x for x in out]

    def record_twin(a, temp_off, mask, drop, topk, chunk):
        spec = cv.intervention_spec(temp_off, mask, drop, topk, chunk, cfg.num_local_experts, cfg.num_local_experts)
        name = cv.record_intervention(model, lock, runs_dir, a, spec, model_source=model_source)
        gr.Info(f"Recorded {name}")
        names = run_choices()
        return gr.update(choices=names, value=name), gr.update(choices=names, value=a)

    def kl(a, b, d, pal):
        return ex.apply_palette(cv.kl_view(model, lock, get(a), get(b), d), pal)

    ins = [run_a, doc_a, run_b, doc_b, start, window, head, group, la, lb, norm, palette, selected]
    outs = [note, table, share_plot, div_plot, dh_strip, profile, dh_heat, dh_table, load_plot, trans_plot]
    wire([session.change], on_session, [session, pending], [run_a, run_b])
    wire([run_a.change], docs, [run_a], [doc_a])
    wire([run_b.change], docs, [run_b], [doc_b])
    wire([run_a.change], groups, [run_a], [group])
    wire([go_btn.click, start.submit, window.release, head.change, group.change, la.change, lb.change, norm.change,
          palette.change, selected.change, tab.select], compare, ins, outs, api="compare",
         trigger_mode="always_last")
    wire([twin_btn.click], record_twin, [run_a, t_temp, t_mask, t_drop, t_topk, t_chunk], [run_b, run_a],
         api="compare_record_twin", concurrency_limit=1).then(guard(compare), ins, outs)
    wire([kl_btn.click], kl, [run_a, run_b, kl_doc, palette], [kl_plot], api="compare_kl", concurrency_limit=1)
    return {"run_b": run_b, "tab": tab}

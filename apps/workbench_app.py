"""The workbench Gradio app: wiring only.  Callbacks are the pure functions of `apps.views` and
`apps.teach_views`; figures come from `probes`.  The Attribution and Chat tabs are wired in
`apps.attribution_tab` and `apps.chat_tab`, with this module's `guard` and `wire`.

    workbench app [--runs DIR] [--model SOURCE] [--vision-model SOURCE] [--host 127.0.0.1] [--port 7860] [--share]

Tabs: Runs (browse, open, live prompt → new run) · Routing explorer · Entropy explorer ·
Attribution (stored image-token attributions over the image; compute new ones with a vision model) ·
Teach MoE · Teach iRoPE · Chat (streamed replies; every turn recorded into the session's run; chat template
or plain prompt, `apps.chat_views`).

With a multimodal model (`--model tiny-vision` or a Llama 4 checkpoint with its vision tower) the text
tabs use its language model and the Attribution tab can compute attributions of uploaded images; with a
text-only model the Attribution tab still shows stored attribution runs and says why it cannot compute.
A second, multimodal `vision_model` (`--vision-model tiny-vlm`) serves the Attribution tab and image chat
while the text tabs keep the text model (`make demo`: tiny-moe + tiny-vlm).

The models are loaded once per process and shared by every session; their forward passes hold one lock.
Which run a session looks at lives in that session's gr.State, so concurrent users each see their
own live run.  Any failure reaches the user as a gr.Error (message escaped) and the app keeps going.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from apps import attribution_views as av  # noqa: E402
from apps import export as ex  # noqa: E402
from apps import longctx_views as lv  # noqa: E402
from apps import selection_views as sv  # noqa: E402
from apps import state_ui  # noqa: E402
from apps import teach_views as tv  # noqa: E402
from apps import views as v  # noqa: E402
from apps.attribution_tab import attribution_tab  # noqa: E402
from apps.chat_tab import chat_tab  # noqa: E402
from apps.compare_tab import compare_tab  # noqa: E402
from apps.experts_tab import experts_tab  # noqa: E402
from apps.export_ui import export_row  # noqa: E402

log = logging.getLogger("workbench.app")

CSS = """
.wb-summary td, .wb-summary th {padding: 2px 8px; font-size: 0.9em}
.wb-tokens {line-height: 2.1em; font-family: ui-monospace, monospace}
.wb-tok {border: 1px solid #ccd; border-radius: 4px; padding: 1px 3px; margin: 1px; white-space: pre}
.wb-tok sub {color: #889; margin-right: 2px}
.wb-contexts mark.wb-hit {background: #ffd54f; font-weight: bold}
.wb-ctx {font-family: ui-monospace, monospace; white-space: pre}
"""
THEME = gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "monospace"])   # system fonts: no external requests


def guard(fn):
    """Turn every exception into an escaped gr.Error so one bad request never takes the app down."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except v.UserError as e:
            raise gr.Error(html.escape(str(e))) from None
        except (ValueError, KeyError, IndexError, FileNotFoundError) as e:
            raise gr.Error(html.escape(f"{type(e).__name__}: {e}")) from None
        except Exception as e:
            log.exception("callback %s failed", fn.__name__)
            raise gr.Error(html.escape(f"Internal error ({type(e).__name__}: {e}). The app is still running; "
                                       "try another setting.")) from None
    return inner


def wire(triggers, fn, inputs, outputs, api: str | None = None, **kw):
    """One guarded endpoint for all `triggers`; only named ones are documented in the API."""
    return gr.on(triggers, guard(fn), inputs, outputs, api_name=api or fn.__name__,
                 api_visibility="public" if api else "undocumented", **kw)


def build_app(model, runs_dir: str | Path = "runs", model_source: str = "tiny", vision_model=None,
              vision_source: str | None = None, irope_model="tiny-irope") -> gr.Blocks:
    """The app on `model` (text tabs: its language model). `vision_model` (multimodal, optional) computes
    attributions and chats about images instead of `model`; without it a multimodal `model` does."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    if isinstance(irope_model, str):        # the Teach iRoPE live panel's recall-trained model (None: off)
        irope_model = tv.load_irope_model()
    multimodal = av.is_multimodal(model)
    text_model = model.language_model if multimodal else model     # the text tabs run the language model
    if multimodal:
        if getattr(text_model, "tokenizer", None) is None:
            text_model.tokenizer = model.tokenizer
        if not getattr(text_model, "source", None):
            text_model.source = getattr(model, "source", model_source)
    if vision_model is not None and not av.is_multimodal(vision_model):
        raise ValueError(f"vision model {vision_source!r} is text-only (no vision tower or image processor)")
    vision = vision_model if vision_model is not None else model if multimodal else None
    vision_source = str(vision_source or getattr(vision_model, "source", "") or "vision model") \
        if vision_model is not None else model_source
    # the Chat tab's models: (model, source); a multimodal app model chats whole, so images work
    chat_models = {"text": (model if multimodal else text_model, model_source)}
    if vision_model is not None:
        chat_models["vision"] = (vision_model, vision_source)
    cfg = text_model.config
    moe = cfg.moe_layer_index
    tok = text_model.tokenizer

    def get_run(name):
        return v.open_cached(v.resolve_run(runs_dir, name))

    def run_choices():
        return v.runs_table(runs_dir)["name"].tolist()

    def open_run(name):
        return name, v.run_summary_html(get_run(name))

    with gr.Blocks(title="Llama 4 Workbench", analytics_enabled=False) as demo:
        session = gr.State(None)          # name of the run this session has open
        selected = gr.State(None)         # linked selection: {"run", "token", "locked"}, shared by every tab
        gr.Markdown(f"## Llama 4 Workbench\nModel **{html.escape(model_source)}** · runs in "
                    f"`{html.escape(str(runs_dir))}` · {cfg.num_hidden_layers} layers ({', '.join(cfg.layer_kinds())})"
                    + (f" · vision model **{html.escape(vision_source)}** (attribution, image chat)"
                       if vision_model is not None else
                       " · vision tower loaded (image attribution available)" if multimodal else ""))
        ui = state_ui.selection_bar()
        with gr.Tabs(elem_id="main-tabs") as tabs:
            # ------------------------------------------------------------------ Runs
            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    with gr.Column(scale=3):
                        runs_df = gr.Dataframe(label="Recorded runs (click a row to pick it)", interactive=False,
                                               max_height=260, elem_id="runs-table")
                        with gr.Row():
                            run_pick = gr.Dropdown(label="Run", choices=run_choices(), scale=3, allow_custom_value=True,
                                                   elem_id="run-pick")
                            open_btn = gr.Button("Open", variant="primary", scale=1, elem_id="open-run")
                            refresh_btn = gr.Button("Refresh list", scale=1)
                            share_btn = gr.Button("Save to shared runs", scale=1, elem_id="share-run")
                        summary = gr.HTML("<p>No run open yet.</p>", elem_id="run-summary")
                    with gr.Column(scale=2):
                        gr.Markdown("### Live run\nThe model reads your prompt (and optionally continues it); "
                                    "the pass is recorded as a new run and opened here, for you only.")
                        prompt = gr.Textbox(label=f"Prompt (≤ {v.MAX_PROMPT_CHARS} characters)", lines=4,
                                            max_length=v.MAX_PROMPT_CHARS,
                                            value="Mixture-of-experts layers route each token to an expert.",
                                            elem_id="live-prompt")
                        n_new = gr.Slider(0, v.MAX_NEW_TOKENS, value=8, step=1, label="new tokens to generate",
                                          elem_id="live-new-tokens")
                        live_btn = gr.Button("Run and record", variant="primary", elem_id="live-run")
                        live_text = gr.Textbox(label="Recorded text", interactive=False, lines=3, elem_id="live-text")
            # ------------------------------------------------------------------ Routing
            with gr.Tab("Routing explorer", id="routing"):
                routing_note = gr.Markdown("Open a run in the Runs tab.", elem_id="routing-note")
                with gr.Row():
                    doc = gr.Dropdown(label="Document", choices=[], scale=3, allow_custom_value=True,
                                      elem_id="routing-doc")
                    start = gr.Number(label="first token", value=0, precision=0, minimum=0, scale=1)
                    window = gr.Slider(8, v.MAX_WINDOW, value=64, step=8, label="tokens shown", scale=2)
                    layer = gr.Dropdown(label="MoE layer (text colour)", choices=moe, value=moe[0] if moe else None,
                                        scale=1, allow_custom_value=True, elem_id="routing-layer")
                tokens = gr.HighlightedText(label="Tokens coloured by their expert — click a token for its path",
                                            show_legend=True, combine_adjacent=False, interactive=False,
                                            elem_id="routing-tokens")
                token_base = gr.State(0)
                path_index = gr.Number(visible=False, precision=0)   # the path view by global index (API)
                with gr.Row():
                    path_plot = gr.Plot(label="Expert path of the clicked token", elem_id="path-plot")
                    path_html = gr.HTML()
                grid_plot = gr.Plot(label="Tokens × MoE layers", elem_id="grid-plot")
                export_row(grid_plot, "routing-grid", guard)
                with gr.Row():
                    load_plot = gr.Plot(label="Expert load", elem_id="load-plot")
                    load_heat = gr.Plot(label="Relative load, all layers", elem_id="load-heat")
                load_df = gr.Dataframe(label="Load metrics per MoE layer", interactive=False)
                with gr.Row():
                    layer_a = gr.Dropdown(label="transition from layer", choices=moe, value=moe[0] if moe else None,
                                          allow_custom_value=True)
                    layer_b = gr.Dropdown(label="to layer", choices=moe,
                                          value=moe[min(1, len(moe) - 1)] if moe else None, allow_custom_value=True)
                    norm = gr.Checkbox(value=True, label="row-normalise P(b | a) (matrix)")
                    trans_kind = gr.Radio(list(v.TRANSITION_VIEWS), value="matrix", label="show as",
                                          elem_id="trans-kind")
                with gr.Row():
                    trans_plot = gr.Plot(label="Cross-layer transitions", elem_id="trans-plot")
                    nmi_df = gr.Dataframe(label="Consecutive MoE layers: mutual information", interactive=False)
                export_row(trans_plot, "transitions", guard)
                domain_md = gr.Markdown()
                domain_plot = gr.Plot(label="Domain specialization", elem_id="domain-plot")
                consec_plot = gr.Plot(label="Consecutive tokens, same expert", elem_id="consec-plot")
                gr.Markdown(v.MODALITY_NOTE)
            # ------------------------------------------------------------------ Entropy
            with gr.Tab("Entropy explorer", id="entropy"):
                entropy_note = gr.Markdown("Open a run in the Runs tab. Long runs are read lazily and "
                                           "binned (min / mean / max per bin).")
                with gr.Row():
                    group = gr.Dropdown(label="Layers", choices=[], scale=3, allow_custom_value=True,
                                        elem_id="entropy-group")
                    head = gr.Dropdown(label="Head", choices=["all"], value="all", scale=1, allow_custom_value=True)
                    stat = gr.Radio([("entropy", "entropy"), ("H / ln n", "normalized"), ("KL to uniform", "kl"),
                                     ("ΔH (temp off − on)", "delta")], value="entropy", label="statistic", scale=3,
                                     elem_id="entropy-stat")
                    bins = gr.Slider(16, 4096, value=512, step=16, label="position bins", scale=2)
                profile_plot = gr.Plot(label="Entropy vs position", elem_id="profile-plot")
                export_row(profile_plot, "entropy-profile", guard)
                token_ent = gr.Plot(label="The selected token in every layer and head", elem_id="token-entropy-plot")
                summary_value = gr.Radio(["normalized_mean", "entropy_mean", "kl_mean", "delta_mean", "delta_max"],
                                         value="normalized_mean", label="layer × head summary")
                with gr.Row():
                    lh_plot = gr.Plot(label="Layer × head", elem_id="layer-head-plot")
                    lh_df = gr.Dataframe(label="Per head (collapsed = near one-hot attention)", interactive=False,
                                         max_height=360)
                export_row(lh_plot, "layer-head", guard)
                sink_plot = gr.Plot(label="Long context: sink mass vs position (NoPE layers)", elem_id="sink-plot")
                export_row(sink_plot, "sink-mass", guard)
            cmp_ui = compare_tab(model=text_model, lock=lock, runs_dir=runs_dir, model_source=model_source,
                                 session=session, selected=selected, pending=ui["pending"], palette=ui["palette"],
                                 run_choices=run_choices, guard=guard, wire=wire, tokenizer=tok)
            exp_ui = experts_tab(runs_dir=runs_dir, session=session, selected=selected, palette=ui["palette"],
                                 pending=ui["pending"], moe=moe, n_experts=cfg.num_local_experts, guard=guard,
                                 wire=wire, tokenizer=tok)
            attribution_tab(demo, runs_dir=runs_dir, session=session, vision=vision,
                            vision_source=vision_source, model_source=model_source, lock=lock, wire=wire,
                            selected=selected)
            # ------------------------------------------------------------------ Teach MoE
            with gr.Tab("Teach MoE", id="teach-moe"):
                gr.Markdown("### One token's journey through a Llama 4 MoE layer\nRouter logits → top-k → "
                            "sigmoid gate scales the expert's **input** → expert → plus the always-on shared "
                            "expert.  Every control reruns the live model; the right plot shows how the "
                            "next-token distribution moves.")
                with gr.Row():
                    t_prompt = gr.Textbox(label="Prompt", value="The router picks one expert per token.", scale=3)
                    t_pos = gr.Slider(0, 64, value=4, step=1, label="token position", scale=2)
                    t_layer = gr.Dropdown(label="MoE layer", choices=moe, value=moe[0] if moe else None, scale=1,
                                          allow_custom_value=True)
                t_tokens = gr.HTML()
                with gr.Row():
                    t_topk = gr.Slider(1, cfg.num_local_experts, value=cfg.num_experts_per_tok, step=1, label="top-k",
                                       elem_id="moe-topk")
                    t_mask = gr.Dropdown([f"E{i}" for i in range(cfg.num_local_experts)], multiselect=True,
                                         label="mask experts")
                    t_drop = gr.Checkbox(label="drop the shared expert", elem_id="moe-drop-shared")
                    t_all = gr.Checkbox(label="apply edits to every MoE layer")
                journey_plot = gr.Plot(label="Journey", elem_id="journey-plot")
                journey_html = gr.HTML()
                next_plot = gr.Plot(label="Next-token distribution", elem_id="next-plot")
                gr.Markdown("### Active vs total parameters")
                with gr.Row():
                    p_preset = gr.Dropdown(["tiny", "scout", "maverick"], value="scout", label="preset")
                    p_experts = gr.Slider(1, 256, value=16, step=1, label="routed experts")
                    p_topk = gr.Slider(1, 8, value=1, step=1, label="top-k", elem_id="params-topk")
                p_md = gr.Markdown()
                p_plot = gr.Plot(label="Parameters", elem_id="params-plot")
            # ------------------------------------------------------------------ Teach iRoPE
            with gr.Tab("Teach iRoPE", id="teach-irope"):
                gr.Markdown("### Chunked attention on RoPE layers, global attention on NoPE layers")
                with gr.Row():
                    m_len = gr.Slider(8, tv.MAX_MASK_TOKENS, value=48, step=1, label="sequence length")
                    chunk0, chunk_max = tv.mask_defaults(cfg, 48)
                    m_chunk = gr.Slider(1, chunk_max, value=chunk0, step=1, label="chunk size",
                                        elem_id="mask-chunk")
                mask_plot = gr.Plot(value=tv.mask_view(48, chunk0), label="Masks",
                                    elem_id="mask-plot")
                gr.Markdown("### RoPE: rotation by position, and why only the distance matters")
                with gr.Row():
                    r_pair = gr.Slider(0, cfg.head_dim // 2 - 1, value=0, step=1, label="rotation pair i")
                    r_m = gr.Slider(0, 64, value=5, step=1, label="query position m")
                    r_delta = gr.Slider(0, 32, value=3, step=1, label="distance Δ = n − m", elem_id="rope-delta")
                rope_plot = gr.Plot(value=tv.rope_view(cfg, 0, 5, 3), label="RoPE", elem_id="rope-plot")
                gr.Markdown("### The temperature step on NoPE layers vs Qwen log-n and YaRN")
                with gr.Row():
                    f_scale = gr.Slider(16, 16384, value=cfg.floor_scale, step=16, label="floor_scale")
                    a_scale = gr.Slider(0.0, 0.5, value=cfg.attn_scale, step=0.01, label="attn_scale",
                                        elem_id="attn-scale")
                temp_plot = gr.Plot(value=tv.temperature_view(cfg.floor_scale, cfg.attn_scale), label="Temperature",
                                    elem_id="temp-plot")
                gr.Markdown("### Entropy vs length on the live model (NoPE layers)")
                with gr.Row():
                    e_len = gr.Slider(16, tv.MAX_LIVE_ENTROPY_TOKENS, value=256, step=16, label="tokens")
                    e_tune = gr.Checkbox(value=True, label="temperature tuning on")
                    e_btn = gr.Button("Run the model", variant="primary", elem_id="live-entropy-run")
                live_plot = gr.Plot(label="Entropy vs position", elem_id="live-entropy-plot")
                gr.Markdown("### Retrieval and entropy vs length on tiny-irope (trained on associative recall at a "
                            "short length; floor_scale just above it)")
                with gr.Row():
                    lo, hi, n0, step = tv.irope_length_slider(irope_model)
                    i_len = gr.Slider(lo, hi, value=n0, step=step, label="length (tokens)", elem_id="irope-len")
                    i_tune = gr.Checkbox(value=True, label="temperature tuning on", elem_id="irope-tune")
                    i_scale = gr.Slider(0.0, 1.0, value=tv.IROPE_ATTN_SCALE, step=0.05, label="attn_scale",
                                        elem_id="irope-attn-scale")
                    i_btn = gr.Button("Run tiny-irope", elem_id="irope-run")
                i_md = gr.Markdown(elem_id="irope-answer")
                i_plot = gr.Plot(label="Retrieval and entropy vs length", elem_id="irope-plot")
                gr.Markdown("### Architecture experiments (`workbench experiment run`): the comparison")
                with gr.Row():
                    x_pick = gr.Dropdown(tv.list_experiments(runs_dir), label="experiment", elem_id="exp-pick",
                                         value=(tv.list_experiments(runs_dir) or [None])[0])
                    x_btn = gr.Button("Show", elem_id="exp-show")
                x_acc = gr.Plot(label="Retrieval vs length", elem_id="exp-acc")
                x_ent = gr.Plot(label="NoPE entropy vs length", elem_id="exp-entropy")
                x_md = gr.Markdown(elem_id="exp-report")
            chat_tab(chat_models=chat_models, lock=lock, runs_dir=runs_dir, session=session, summary=summary,
                     runs_df=runs_df, run_pick=run_pick, open_run=open_run, guard=guard, wire=wire,
                     selected=selected)

        # ---------------------------------------------------------------------- events: runs
        def refresh():
            df = v.runs_table(runs_dir)
            return df, gr.update(choices=df["name"].tolist())

        def pick_row(evt: gr.SelectData, df):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            return df.iloc[int(row)]["name"]

        def first_load(current, request: gr.Request):
            df = v.runs_table(runs_dir)
            url = state_ui.restore(dict(request.query_params) if request is not None else {}, df["name"].tolist(),
                                   get_run, moe, cfg.num_attention_heads, cfg.num_local_experts)
            name = current or url["run"]
            html_ = v.run_summary_html(get_run(name)) if name else "<p>No runs yet: record one with Live run.</p>"
            return [df, gr.update(choices=df["name"].tolist(), value=name), name, html_] + state_ui.load_values(url)

        def live(prompt_text, new_tokens, progress=gr.Progress()):  # noqa: B008 (gradio injects progress so)
            name, text = v.record_live(text_model, lock, runs_dir, prompt_text, new_tokens,
                                       progress=lambda f, d: progress(f, desc=d), model_source=model_source)
            df = v.runs_table(runs_dir)
            gr.Info(f"Recorded {name}")
            return name, df, gr.update(choices=df["name"].tolist(), value=name), text, \
                v.run_summary_html(get_run(name))

        wire([demo.load], first_load, [session], [runs_df, run_pick, session, summary]
             + state_ui.load_outputs(ui, tabs, selected, exp_ui))
        state_ui.selection_wiring(ui, selected=selected, session=session, get_run=get_run, tokenizer=tok, wire=wire,
                                  open_run=open_run, summary=summary)
        demo.load(None, None, None, js=state_ui.CLICK_JS)       # token figures: click selects, hover previews
        state_ui.url_wiring(ui, tabs=tabs, session=session, selected=selected, routing_layer=layer, head=head,
                            experts=exp_ui, compare=cmp_ui, wire=wire)
        wire([refresh_btn.click], refresh, None, [runs_df, run_pick], api="runs")
        wire([runs_df.select], pick_row, [runs_df], [run_pick])
        wire([open_btn.click], open_run, [run_pick], [session, summary], api="open_run")

        def share_run(name):        # a session's chat / live run is private until saved here on purpose
            from apps import private_runs
            if not private_runs.is_private(name):
                raise v.UserError("Open a chat or live run made in this session first; "
                                  "shared runs are shared already.")
            try:
                shared = private_runs.publish(runs_dir, name)
            except private_runs.PrivateRunError as e:
                raise v.UserError(str(e)) from None
            df = v.runs_table(runs_dir)
            gr.Info(f"Saved as {shared}: every session now lists it")
            return (shared, df, gr.update(choices=df["name"].tolist(), value=shared),
                    v.run_summary_html(get_run(shared)))

        wire([share_btn.click], share_run, [session], [session, runs_df, run_pick, summary], api="share_run")
        wire([live_btn.click, prompt.submit], live, [prompt, n_new],
             [session, runs_df, run_pick, live_text, summary], api="live", concurrency_limit=2)

        # ---------------------------------------------------------------------- events: routing
        def on_routing_open(name, pend=None):
            if not name:
                return ["Open a run in the Runs tab."] + [gr.update()] * 12
            run = get_run(name)
            info = v.run_info(run)
            if not info["has_router"]:
                return [f"Run `{html.escape(name)}` has no router recordings."] + [gr.update()] * 12
            ml = info["moe_layers"]
            bar, heat, table = v.load_views(run, ml[0])
            tfig, nmi = v.transition_view(run, ml[0], ml[min(1, len(ml) - 1)])
            dfig, dmd = v.domain_view(run, ml[0])
            note = (f"Run **{html.escape(name)}**: {info['n_tokens']} tokens in {info['n_docs']} documents, "
                    f"{info['n_experts']} experts, top-{info['top_k']}, MoE layers {ml}.")
            first = state_ui.pending_value(pend, "layer", ml)
            return [note, gr.update(choices=info["docs"], value=0),
                    gr.update(choices=ml, value=int(first) if first is not None else ml[0]),
                    bar, heat, table, gr.update(choices=ml, value=ml[0]),
                    gr.update(choices=ml, value=ml[min(1, len(ml) - 1)]), tfig, nmi, dmd,
                    gr.update(value=dfig, visible=dfig is not None), v.consecutive_view(run)]

        wire([session.change], on_routing_open, [session, ui["pending"]], [
            routing_note, doc, layer, load_plot, load_heat, load_df, layer_a, layer_b, trans_plot, nmi_df,
            domain_md, domain_plot, consec_plot])

        def show_tokens(name, document, first_token, n_tokens, moe_layer, pal="default"):
            if not name or document is None or moe_layer is None:
                return gr.update(), gr.update(), gr.update(), 0, gr.update(), gr.update()
            run = get_run(name)
            hl, colors, fig, t0 = v.routing_tokens(run, document, first_token or 0, n_tokens, moe_layer,
                                                   v.run_tokenizer(run, tok))
            bar, _, _ = v.load_views(run, moe_layer)
            path_fig, path_table = v.token_path_view(run, t0, v.run_tokenizer(run, tok))
            if pal != "default":        # the same expert colours in the text and the grid
                cols = ex.categorical(len(colors), pal)
                colors = dict(zip(colors, cols))
                fig.data[0].colorscale = ex.discrete_scale(cols)
            return gr.update(value=hl, color_map=colors), fig, bar, t0, path_fig, path_table

        wire([doc.change, layer.change, window.change, start.submit, start.blur, ui["palette"].change], show_tokens,
             [session, doc, start, window, layer, ui["palette"]],
             [tokens, grid_plot, load_plot, token_base, path_plot, path_html],
             api="tokens", trigger_mode="always_last")

        def click_token(evt: gr.SelectData, name, base):       # click locks the selection (Unlock clears it)
            return sv.make_selection(name, int(base) + int(evt.index))

        def selected_path(sel, name):
            t = sv.check_selection(get_run(name), sel) if name else None
            if t is None:
                return gr.update(), gr.update()
            run = get_run(name)
            return v.token_path_view(run, t, v.run_tokenizer(run, tok))

        def token_path(name, index):           # the same view by global token index (API / tests)
            run = get_run(name)
            return v.token_path_view(run, int(index), v.run_tokenizer(run, tok))

        wire([tokens.select], click_token, [session, token_base], [selected])
        wire([selected.change], selected_path, [selected, session], [path_plot, path_html])
        wire([path_index.change], token_path, [session, path_index], [path_plot, path_html], api="token_path")

        def transitions(name, from_layer, to_layer, normalize, view="matrix", sel=None):
            if not name:
                return gr.update(), gr.update()
            fig, nmi = v.transition_view(get_run(name), from_layer, to_layer, normalize, view)
            return sv.highlight_sankey(fig, get_run(name), sel), nmi

        def domains(name, moe_layer):
            if not name:
                return gr.update(), gr.update()
            fig, md = v.domain_view(get_run(name), moe_layer)
            return md, gr.update(value=fig, visible=fig is not None)

        wire([layer_a.change, layer_b.change, norm.change, trans_kind.change, selected.change], transitions,
             [session, layer_a, layer_b, norm, trans_kind, selected], [trans_plot, nmi_df], api="transitions",
             trigger_mode="always_last")
        wire([layer.change], domains, [session, layer], [domain_md, domain_plot])

        # ---------------------------------------------------------------------- events: entropy
        def on_entropy_open(name, pend=None):
            if not name:
                return ["Open a run in the Runs tab."] + [gr.update()] * 6
            run = get_run(name)
            info = v.run_info(run)
            if not info["has_entropy"]:
                return [f"Run `{html.escape(name)}` has no entropy recordings."] + [gr.update()] * 6
            groups = v.layer_groups(run)
            first = next((g for _, g in groups if g == "kind:nope-global"), groups[0][1])
            fig = v.entropy_profile_view(run, first, "all", "entropy", 512)
            value = v.summary_default(run)
            lh, df = v.layer_head_view(run, value)
            note = (f"Run **{html.escape(name)}**: {info['n_tokens']} tokens; "
                    f"layer kinds {sorted(set(info['kinds']))}; chunk {info['chunk_size']}, "
                    f"floor_scale {info['floor_scale']}. Dotted gray: ln n (uniform attention).")
            return [note, gr.update(choices=groups, value=first),
                    gr.update(choices=["all"] + [str(h) for h in range(info["n_heads"])],
                              value=state_ui.pending_value(pend, "head", ["all"] + list(range(info["n_heads"])))
                              or "all"),
                    fig, lh, df, value]

        def profile(name, layers, head_index, statistic, n_bins, sel, pal):
            if not name or not layers:
                return gr.update()
            fig = v.entropy_profile_view(get_run(name), layers, head_index, statistic, n_bins)
            return ex.apply_palette(sv.profile_marker(fig, get_run(name), sel), pal)

        def token_entropy(sel, name):
            return sv.token_entropy_view(get_run(name), sel) if name else gr.update()

        def sink(name):
            if not name or not get_run(name).has("attention/sink_mass"):
                return gr.update(visible=False)
            return gr.update(value=lv.sink_view(get_run(name)), visible=True)

        def layer_head(name, value):
            return v.layer_head_view(get_run(name), value) if name else (gr.update(), gr.update())

        wire([session.change], on_entropy_open, [session, ui["pending"]],
             [entropy_note, group, head, profile_plot, lh_plot, lh_df, summary_value])
        wire([group.change, head.change, stat.change, bins.change, selected.change, ui["palette"].change], profile,
             [session, group, head, stat, bins, selected, ui["palette"]], [profile_plot], api="entropy_profile",
             trigger_mode="always_last")
        wire([selected.change, session.change], token_entropy, [selected, session], [token_ent])
        wire([session.change], sink, [session], [sink_plot], api="sink")
        wire([summary_value.change], layer_head, [session, summary_value], [lh_plot, lh_df], api="layer_head")

        # ---------------------------------------------------------------------- events: teach MoE
        def on_prompt(prompt, position):
            n, chips = tv.prompt_tokens(text_model, prompt)
            return gr.update(maximum=max(n - 1, 1), value=min(int(position), n - 1)), chips

        def journey(prompt, position, moe_layer, top_k, mask, drop_shared, everywhere):
            return tv.moe_journey_view(text_model, lock, prompt, position, moe_layer, top_k, mask, drop_shared,
                                       everywhere)

        j_in = [t_prompt, t_pos, t_layer, t_topk, t_mask, t_drop, t_all]
        j_out = [journey_plot, next_plot, journey_html]
        wire([demo.load, t_prompt.submit, t_prompt.blur], on_prompt, [t_prompt, t_pos], [t_pos, t_tokens]).then(
            guard(journey), j_in, j_out, api_visibility="undocumented")
        wire([c.change for c in (t_pos, t_layer, t_topk, t_mask, t_drop, t_all)], journey, j_in, j_out,
             api="moe_journey", trigger_mode="always_last")

        def params(preset_name, experts, top_k):
            fig, md = tv.params_view(preset_name, experts, top_k)
            return md, fig

        def preset_defaults(name):
            from workbench.config import preset
            c = preset(name)
            return gr.update(value=c.num_local_experts), gr.update(value=c.num_experts_per_tok)

        wire([p_preset.change], preset_defaults, [p_preset], [p_experts, p_topk])
        wire([demo.load, p_experts.change, p_topk.change], params, [p_preset, p_experts, p_topk], [p_md, p_plot],
             api="params", trigger_mode="always_last")

        # ---------------------------------------------------------------------- events: teach iRoPE
        def rope(pair, m, delta):
            return tv.rope_view(cfg, pair, m, delta)

        def live_entropy(n_tokens, tuning, floor_scale, attn_scale):
            return tv.live_entropy_view(text_model, lock, n_tokens, tuning, floor_scale, attn_scale)

        wire([m_len.change, m_chunk.change], tv.mask_view, [m_len, m_chunk], [mask_plot], api="mask",
             trigger_mode="always_last")
        wire([r_pair.change, r_m.change, r_delta.change], rope, [r_pair, r_m, r_delta], [rope_plot], api="rope",
             trigger_mode="always_last")
        wire([f_scale.change, a_scale.change], tv.temperature_view, [f_scale, a_scale], [temp_plot],
             api="temperature", trigger_mode="always_last")
        wire([e_btn.click, e_tune.change], live_entropy, [e_len, e_tune, f_scale, a_scale], [live_plot],
             api="live_entropy", trigger_mode="always_last")

        def irope_recall(length, tuning, attn_scale):
            return tv.irope_recall_view(irope_model, lock, length, tuning, attn_scale)

        def experiment_report(name):
            return tv.experiment_report_view(runs_dir, name)

        wire([x_btn.click], experiment_report, [x_pick], [x_md, x_acc, x_ent], api="experiment_report")
        first_open = [demo.load] if irope_model is not None else []      # defaults that show the effect
        wire([*first_open, i_btn.click, i_tune.change, i_scale.release], irope_recall, [i_len, i_tune, i_scale],
             [i_plot, i_md], api="irope_recall", trigger_mode="always_last")

    demo.queue(default_concurrency_limit=4)
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          block: bool = True):
    """Launch with the app's theme and safe defaults (local bind, no share link, no SSR/node)."""
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       theme=THEME, css=CSS, show_error=True, ssr_mode=False, max_file_size="10mb",
                       quiet=not block, footer_links=["api", "settings"])


def launch(runs: str | Path = "runs", model: str = "tiny-moe", host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True, vision_model: str | None = None):
    """Load `model` (and `vision_model`, when given) once — presets, bundled models or checkpoint
    directories — and serve the app over `runs`."""
    import workbench

    if share:
        log.warning("share=True: the app gets a public gradio.live URL; anyone with it can run the model")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the app is reachable from other machines on this network, and anyone "
                    "who reaches it can run the model and read the runs directory", host)
    m = workbench.load_model(model)
    vm = workbench.load_model(vision_model) if vision_model else None
    demo = build_app(m, runs, model_source=str(model), vision_model=vm, vision_source=vision_model)
    serve(demo, host, port, share, block)
    return demo

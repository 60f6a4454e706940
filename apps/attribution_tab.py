"""The Attribution tab of the workbench app: wiring only.  Callbacks are the pure functions of
`apps.attribution_views`; `apps.workbench_app.build_app` calls `attribution_tab` inside its gr.Tabs.

The viewer lists the attribution runs of the runs directory and shows one output token's scores over
the image.  With a vision model (`vision`) a second panel computes new attributions of an uploaded
image; without one it says why it cannot.  Endpoints: `attribution_view`, and `attribute` with a
vision model.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from apps import attribution_views as av
from apps import selection_sources as ss
from apps import views as v


def attribution_tab(demo: gr.Blocks, *, runs_dir: Path, session: gr.State, vision, vision_source: str,
                    model_source: str, lock: threading.Lock, wire: Callable,
                    selected: gr.State | None = None) -> None:
    """Build the tab in the current gr.Tabs and wire its events.  `session` holds the run the Runs tab
    opened (an attribution run opened there is shown here); `vision` (None: text-only) computes new
    attributions under `lock`; `wire(triggers, fn, inputs, outputs, api=…)` is the app's guarded `gr.on`.
    `selected` (the app's linked selection): a row of the per-token table selects that image token (the bar
    shows its patch) and the heatmap outlines its patch."""
    with gr.Tab("Attribution", id="attribution"):
        attr_session = gr.State(None)    # the attribution run this session computed last
        outlined = gr.State(False)       # whether the heatmap shows an outline now
        gr.Markdown("### Which image tokens made the model say this?\nScores of one output token over "
                    "the image: the local tiles stitched back onto the original picture, and the global "
                    "tile (the whole image squashed into one tile) in a panel of its own. Red raises "
                    "log p(token), blue lowers it.")
        attr_note = gr.Markdown("Looking for attribution runs…", elem_id="attribution")
        with gr.Row():
            a_run = gr.Dropdown(label="Run with attribution results", choices=[], scale=3,
                                allow_custom_value=True, elem_id="attr-run")
            a_method = gr.Dropdown(label="Method", choices=[], scale=3, allow_custom_value=True,
                                   elem_id="attr-method")
            a_target = gr.Dropdown(label="Output token", choices=[], scale=2, allow_custom_value=True,
                                   elem_id="attr-target")
            a_image = gr.Dropdown(label="Image", choices=[], scale=1, allow_custom_value=True,
                                  elem_id="attr-image")
            with gr.Column(scale=1, min_width=120):
                a_alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="heatmap opacity", elem_id="attr-alpha")
                a_refresh = gr.Button("Refresh runs", size="sm")
        a_plot = gr.Plot(label="Heatmap over the image", elem_id="attr-plot")
        a_info = gr.Markdown(elem_id="attr-info")
        with gr.Row():
            a_targets = gr.Dataframe(label="Output tokens (log p, Σ scores, IG completeness)",
                                     interactive=False, max_height=360, elem_id="attr-targets", scale=2)
            a_scores = gr.Dataframe(label="Per image token, by |score| — click a row to select the token and "
                                          "outline its patch", interactive=False, max_height=360,
                                    elem_id="attr-scores", scale=3)
        a_mass = gr.Plot(label="Attention mass on image tokens (attention, NOT an attribution)",
                         visible=False, elem_id="attr-mass")
        with gr.Accordion("Original image for runs that do not store it", open=False):
            a_override = gr.File(label="The image that was attributed (same size)", file_types=["image"],
                                 type="filepath", elem_id="attr-override")
        with gr.Accordion("Compute a new attribution", open=True):
            if vision is not None:
                gr.Markdown(
                    f"Upload an image (≤ {av.MAX_UPLOAD_BYTES // 2**20} MiB, ≤ {av.MAX_UPLOAD_PIXELS:,} "
                    f"pixels), write a prompt and the answer to explain. The model "
                    f"(**{html.escape(vision_source)}**) runs captum's methods on the image tokens and the "
                    "result is stored as a new attribution run, opened here for you.")
                with gr.Row():
                    with gr.Column(scale=2):
                        c_upload = gr.File(label="Image", file_types=["image"], type="filepath",
                                           elem_id="attr-upload")
                        c_preview = gr.Image(label="Uploaded image", type="pil", interactive=False,
                                             height=180, elem_id="attr-preview")
                        c_check = gr.Markdown(elem_id="attr-upload-check")
                    with gr.Column(scale=3):
                        c_prompt = gr.Textbox(label="Prompt (<|image|> marks the image; put first if absent)",
                                              value=av.compute_defaults(vision_source)[0],
                                              max_length=av.MAX_ATTR_PROMPT_CHARS, elem_id="attr-prompt")
                        c_target = gr.Textbox(label="Answer to explain (empty: the model's own next tokens)",
                                              value=av.compute_defaults(vision_source)[1],
                                              max_length=av.MAX_TARGET_CHARS,
                                              elem_id="attr-answer")
                        with gr.Row():
                            c_methods = gr.CheckboxGroup(
                                [(f"{m} ({av.METHOD_NAMES[m]})", m) for m in av.COMPUTE_METHODS],
                                value=["ig", "gxi"], label="methods", elem_id="attr-methods")
                            c_baseline = gr.Radio(list(av.BASELINES), value="mean",
                                                  label="baseline (ig, ablation)")
                        c_steps = gr.Slider(2, av.MAX_STEPS, value=av.DEFAULT_STEPS, step=1, label="IG steps",
                                            elem_id="attr-steps")
                        c_btn = gr.Button("Compute attribution", variant="primary", elem_id="attr-compute")
                        c_result = gr.Markdown(elem_id="attr-compute-result")
            else:
                gr.Markdown(av.text_only_note(model_source), elem_id="attr-compute-note")

    # -------------------------------------------------------------------------- events: viewer
    def attr_list(prefer, current):
        names = av.attribution_runs(runs_dir)
        pick = next((n for n in (prefer, current) if n and n in names), names[0] if names else None)
        note = (f"{len(names)} attribution run{'s' if len(names) != 1 else ''} in `{html.escape(str(runs_dir))}`."
                if names else
                f"No attribution runs in `{html.escape(str(runs_dir))}` yet. "
                + ("Compute one below, or " if vision is not None else "")
                + "write one with `workbench attribute … --out RUNS_DIR/NAME.zarr`.")
        return gr.update(choices=names, value=pick), note

    def attr_refresh(computed, current):
        return attr_list(computed, current)

    def attr_follow(opened, current):      # a run opened in the Runs tab that holds attributions
        return attr_list(opened, current)

    attr_outs = [a_method, a_target, a_image, a_plot, a_info, a_targets, a_scores, a_mass]

    def attribution_view(run, method, target, image, alpha, override, sel=None):
        if not run:
            return [gr.update(choices=[], value=None)] * 3 + [None, "", None, None, gr.update(visible=False)]
        c = av.attribution_controls(runs_dir, run, method, target, image)
        fig, info, targets, scores, mass = av.attribution_view(runs_dir, run, c["group"], c["target"],
                                                               c["image"], alpha, override)
        return [gr.update(choices=c["methods"], value=c["group"]),
                gr.update(choices=c["targets"], value=c["target"]),
                gr.update(choices=c["images"], value=c["image"], interactive=len(c["images"]) > 1),
                ss.highlight_patch(fig, sel, run, c["image"]), info, targets, scores,
                gr.update(value=mass, visible=mass is not None)]

    wire([demo.load, a_refresh.click], attr_refresh, [attr_session, a_run], [a_run, attr_note])
    wire([session.change], attr_follow, [session, a_run], [a_run, attr_note])
    view_in = [a_run, a_method, a_target, a_image, a_alpha, a_override] + ([selected] if selected is not None else [])
    wire([a_run.change, a_method.change, a_target.change, a_image.change, a_alpha.release, a_override.change],
         attribution_view, view_in, attr_outs, api="attribution_view", trigger_mode="always_last")

    if selected is not None:
        def select_row(evt: gr.SelectData, run, method, table):     # a click locks; Unlock clears
            if not run or not method or table is None or not len(table):
                raise v.UserError("Pick an attribution run first.")
            row = int(evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index)
            return ss.attribution_selection(av.result_dataset(runs_dir, run, method), run, method,
                                            table.iloc[row]["position"])

        def outline(run, method, target, image, alpha, override, sel, shown):
            """Only the heatmap follows the selection (tables keep their scroll), and only when an outline
            appears or goes: a token selected in a recorded run leaves this tab alone."""
            want = bool(run) and isinstance(sel, dict) and sel.get("space") == "attribution" and sel.get("run") == run
            if not want and not shown:
                return gr.update(), False
            return attribution_view(run, method, target, image, alpha, override, sel)[3], want

        wire([a_scores.select], select_row, [a_run, a_method, a_scores], [selected])
        wire([selected.change], outline, view_in + [outlined], [a_plot, outlined], trigger_mode="always_last")

    if vision is None:
        return

    # -------------------------------------------------------------------------- events: compute
    def check_upload(upload):
        """Preview an upload within the limits; a rejected one is removed, with the reason shown."""
        try:
            img, msg = av.upload_preview(upload)
            return img, msg, gr.update()
        except v.UserError as e:
            gr.Warning(html.escape(str(e)))
            return None, f"**Rejected:** {html.escape(str(e))}", None

    def clear_upload():
        return None, ""

    def attribute(upload, prompt_text, answer, methods, steps, baseline,
                  progress=gr.Progress()):  # noqa: B008 (gradio injects progress so)
        name, md = av.compute_attribution(vision, lock, runs_dir, upload, prompt_text, answer, methods,
                                          steps, baseline, progress=lambda f, d: progress(f, desc=d),
                                          model_source=vision_source)
        gr.Info(f"Computed {name}")
        names = av.attribution_runs(runs_dir)
        return name, gr.update(choices=names, value=name), md, f"{len(names)} attribution runs."

    wire([c_upload.upload], check_upload, [c_upload], [c_preview, c_check, c_upload])
    wire([c_upload.clear], clear_upload, None, [c_preview, c_check])
    wire([c_btn.click], attribute, [c_upload, c_prompt, c_target, c_methods, c_steps, c_baseline],
         [attr_session, a_run, c_result, attr_note], api="attribute", concurrency_limit=1)

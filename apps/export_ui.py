"""Gradio wiring of figure export (the pure part is `apps.export`): a row of controls under a gr.Plot.

    plot = gr.Plot(...)
    export_row(plot, "divergence-strip", guard)      # "Export PNG · SVG · CSV" + files + "copy as code"

Clicking the button sends the plot's current figure back to the server, which writes NAME.png,
NAME.svg (kaleido), NAME.csv (the figure's data) and NAME.json into a fresh temporary directory and
offers them as downloads, with a Python snippet reproducing the figure from the run path.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import gradio as gr

from apps import export as ex


def _figure_json(payload) -> str | None:
    if payload is None:
        return None
    plot = getattr(payload, "plot", None)
    if plot is None and isinstance(payload, dict):
        plot = payload.get("plot")
    return plot if isinstance(plot, str) else None


def export_row(plot: gr.Plot, name: str, guard: Callable) -> None:
    """A button beside `plot` exporting it as PNG, SVG, CSV (+ JSON) and showing a copy-as-code snippet."""
    with gr.Accordion("Export this figure (PNG, SVG, CSV, code)", open=False, elem_id=f"export-{name}"):
        btn = gr.Button("Export PNG · SVG · CSV", size="sm", elem_id=f"export-btn-{name}")
        files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id=f"export-files-{name}")
        code = gr.Code(label="Copy as code (reproduces the figure in a notebook)", language="python",
                       elem_id=f"export-code-{name}")

    def run_export(payload):
        fig = _figure_json(payload)
        if fig is None:
            raise gr.Error("There is no figure to export yet: draw it first.")
        paths, snippet = ex.export_figure(fig, tempfile.mkdtemp(prefix="wb-export-"), name)
        return [str(p) for p in paths], snippet

    btn.click(guard(run_export), [plot], [files, code], api_name=f"export_{name.replace('-', '_')}",
              api_visibility="undocumented", concurrency_limit=1)


def export_pair(left: gr.Plot, left_name: str, right: gr.Plot, right_name: str, guard: Callable) -> None:
    """Export rows for two plots standing side by side in a row, each under its own plot."""
    with gr.Row():
        for plot, name in ((left, left_name), (right, right_name)):
            with gr.Column():
                export_row(plot, name, guard)

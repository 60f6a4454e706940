"""Gradio apps over the workbench library: wiring only (STYLE rule 16).

    apps/
      workbench_app.py  the gr.Blocks app and `launch` (the `workbench app` command)
      views.py          pure callbacks: runs (safe paths, live recording), routing, entropy, attribution
      teach_views.py    pure callbacks of the Teach MoE / Teach iRoPE tabs
"""

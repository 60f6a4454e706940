"""Gradio apps over the workbench library: wiring only (STYLE rule 16).

    apps/
      workbench_app.py     the gr.Blocks app and `launch` (the `workbench app` command)
      views.py             pure callbacks: runs (safe paths, live recording), routing, entropy
      chat_tab.py          wiring of the Chat tab (chat template or plain prompt; every turn recorded)
      chat_views.py        pure callbacks of the Chat tab
      attribution_tab.py   wiring of the Attribution tab (stored runs + compute on the vision model)
      attribution_views.py pure callbacks of the Attribution tab
      teach_views.py       pure callbacks of the Teach MoE / Teach iRoPE tabs
"""

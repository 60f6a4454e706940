"""Retrieval and NoPE entropy vs length on a recall-trained model (tiny-irope): the numbers and the figure
behind the Teach iRoPE tab's live panel and notebooks 20/21/41.

    rows = length_sweep(model, task, max_length, temperature_tuning=True, attn_scale=0.3)
    fig = recall_length_figure(rows, train_length=task.train_length, floor_scale=model.config.floor_scale)
    ex = answer_example(model, task, length=512, attn_scale=0.3)    # one recall query, answered

Every length is evaluated on fresh data drawn per the model's task.json (`RecallTask.batch`); entropy
is the NoPE layers' at the answer positions, as run and with temperature off, in the same pass.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.experiment.evaluate import evaluate_recall
from workbench.experiment.recall import RecallTask
from workbench.instrument.hooks import intervene


def sweep_lengths(train_length: int, max_length: int) -> list[int]:
    """train_length × 1, 2, 4, … up to max_length (at least the training length)."""
    out, n = [], train_length
    while n <= max(max_length, train_length):
        out.append(n)
        n *= 2
    return out


def length_sweep(model, task: RecallTask, max_length: int, *, temperature_tuning: bool = True,
                 attn_scale: float | None = None, floor_scale: int | None = None, sequences: int = 16,
                 distractor_density: float = 0.05, seed: int = 0) -> list[dict]:
    """`evaluate_recall` rows at train_length × 2^k ≤ max_length under the given inference knobs."""
    knobs = {"temperature_tuning": bool(temperature_tuning)}
    if attn_scale is not None:
        knobs["attn_scale"] = float(attn_scale)
    if floor_scale is not None:
        knobs["floor_scale"] = int(floor_scale)
    ev = {"sequences": sequences, "needle_sequences": 4, "distractor_density": distractor_density, "batch": 8}
    return evaluate_recall(model, task, sweep_lengths(task.train_length, max_length), ev, knobs, seed=seed)


@torch.no_grad()
def answer_example(model, task: RecallTask, length: int, *, temperature_tuning: bool = True,
                   attn_scale: float | None = None, distractor_density: float = 0.0, seed: int = 0) -> dict:
    """One sequence of `length` tokens: for its last query, the key, the planted value, where the pair
    sits, the model's answer and its probability."""
    x, y, pair_pos = task.batch(1, length, torch.Generator().manual_seed(seed),
                                distractor_density=distractor_density)
    knobs = {"temperature_tuning": bool(temperature_tuning)}
    if attn_scale is not None:
        knobs["attn_scale"] = float(attn_scale)
    with intervene(model, **knobs):
        logits = model(x).logits[0, -2].float()
    p = torch.softmax(logits, -1)
    tok = getattr(model, "tokenizer", None)

    def name(i):
        return tok.tok.id_to_token(int(i)) if tok is not None and hasattr(tok, "tok") else str(int(i))

    key, want = int(x[0, -2]), int(x[0, -1])
    got = int(p.argmax())
    return {"length": length, "key": name(key), "value": name(want), "answer": name(got), "correct": got == want,
            "p_answer": float(p[got]), "p_value": float(p[want]), "pair_position": int(pair_pos[0, -1]),
            "query_position": length - 2}


def recall_length_figure(rows: list[dict], train_length: int, floor_scale: int | None = None,
                         compare: list[dict] | None = None, title: str | None = None,
                         label: str = "temperature on", compare_label: str = "temperature off") -> go.Figure:
    """Left: accuracy (clean, with distractors) vs length; right: NoPE entropy as run and without
    temperature against ln n. `compare`: the same rows under other knobs (dotted)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "retrieval accuracy", "NoPE-layer entropy at the answer positions (nats)"))
    x = [r["length"] for r in rows]
    for rs, lab, dash in ((rows, label, None), (compare, compare_label, "dot")):
        if not rs:
            continue
        xs = [r["length"] for r in rs]
        fig.add_trace(go.Scatter(x=xs, y=[r["acc"] for r in rs], name=f"clean ({lab})", mode="lines+markers",
                                 line=dict(color="#1f77b4", dash=dash)), 1, 1)
        fig.add_trace(go.Scatter(x=xs, y=[r["acc_distractor"] for r in rs], name=f"with distractors ({lab})",
                                 mode="lines+markers", line=dict(color="#ff7f0e", dash=dash)), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=[r["entropy"] for r in rows], name=f"entropy as run ({label})",
                             mode="lines+markers", line=dict(color="#2ca02c")), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=[r["entropy_no_temp"] for r in rows], name="entropy without temperature",
                             mode="lines+markers", line=dict(color="#d62728", dash="dot")), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=[r["ln_n"] for r in rows], name="ln n", mode="lines",
                             line=dict(color="black", dash="dash")), 1, 2)
    for col in (1, 2):
        fig.add_vline(x=train_length, line=dict(color="grey", dash="dot"), row=1, col=col)
        if floor_scale:
            fig.add_vline(x=floor_scale, line=dict(color="purple", dash="dash", width=1), row=1, col=col)
    fig.update_xaxes(type="log", title_text="sequence length (tokens); grey: training length, purple: floor_scale")
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    fig.update_layout(title=title or "Retrieval and entropy vs length", height=460, width=1100,
                      legend=dict(orientation="h", y=-0.3))
    return fig

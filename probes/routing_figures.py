"""Plotly builders for the routing metrics of `probes.routing`: pure functions returning go.Figure.

Every builder takes the arrays or DataFrames the metric functions return, so an app or notebook
computes once and draws many times.  Shape legend as in `probes.routing` (M MoE layers, t tokens,
E experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probes.routing import row_normalize

__all__ = ["expert_load_figure", "expert_load_heatmap", "domain_specialization_figure",
           "transition_heatmap", "transition_sankey", "expert_grid_figure", "consecutive_rate_figure"]


def expert_load_figure(load_E, title: str | None = None) -> go.Figure:
    """Bars of one layer's expert load f_E (fractions or counts) with the uniform line 1/E."""
    f = np.asarray(load_E, dtype=np.float64)
    f = f / f.sum() if f.sum() > 0 else f
    e = len(f)
    fig = go.Figure(go.Bar(x=np.arange(e), y=f, name="load",
                           hovertemplate="expert %{x}: %{y:.2%}<extra></extra>"))
    fig.add_hline(y=1 / e, line_dash="dash", line_color="gray", annotation_text=f"uniform 1/{e}")
    fig.update_layout(title=title or "Expert load", xaxis_title="expert",
                      yaxis_title="fraction of assignments", yaxis_tickformat=".0%")
    return fig


def expert_load_heatmap(loads_ME, layer_labels: Sequence | None = None) -> go.Figure:
    """All MoE layers at once: load relative to uniform (f_i·E; 1 = balanced), layers × experts."""
    c = np.asarray(loads_ME, dtype=np.float64)
    rel = c / np.maximum(c.sum(1, keepdims=True), 1e-300) * c.shape[1]
    labels = list(range(len(c))) if layer_labels is None else [str(x) for x in layer_labels]
    fig = go.Figure(go.Heatmap(z=rel, y=labels, x=np.arange(c.shape[1]), colorscale="RdBu_r",
                               zmid=1.0, colorbar_title="load × E",
                               hovertemplate="layer %{y} expert %{x}: %{z:.2f}× uniform<extra></extra>"))
    fig.update_layout(title="Relative expert load (1 = uniform)", xaxis_title="expert",
                      yaxis_title="layer", yaxis_type="category", yaxis_autorange="reversed")
    return fig


def domain_specialization_figure(spec: pd.DataFrame, top_k: int, n_experts: int,
                                 top_n: int | None = 16, title: str | None = None) -> go.Figure:
    """Grouped bars of OLMoE domain specialization for one layer, dashed uniform line k/E.

    spec: long DataFrame with columns domain, expert, specialization (fraction) for ONE layer, e.g.
    `domain_specialization_table(run).query('moe_layer == 0')`.  top_n: keep the experts with the
    largest specialization in any domain (the OLMoE figure shows a subset), None = all.
    """
    if spec.empty:
        raise ValueError("domain_specialization_figure: empty table")
    best = spec.groupby("expert")["specialization"].max().sort_values(ascending=False)
    experts = np.sort(best.index[:top_n].to_numpy() if top_n else best.index.to_numpy())
    fig = go.Figure()
    for dom, g in spec[spec["expert"].isin(experts)].groupby("domain", sort=True):
        g = g.set_index("expert").reindex(experts)
        fig.add_trace(go.Bar(x=[str(e) for e in experts], y=g["specialization"], name=str(dom),
                             hovertemplate=f"{dom} expert %{{x}}: %{{y:.1%}}<extra></extra>"))
    fig.add_hline(y=top_k / n_experts, line_dash="dash", line_color="gray",
                  annotation_text=f"uniform k/E = {top_k / n_experts:.2%}")
    fig.update_layout(title=title or "Domain specialization (OLMoE Eq. 7)", barmode="group",
                      xaxis_title="expert", xaxis_type="category",
                      yaxis_title="share of domain tokens routed to expert", yaxis_tickformat=".0%")
    return fig


def transition_heatmap(counts_EE, normalize: bool = True, layer_a: str = "a",
                       layer_b: str = "b") -> go.Figure:
    """Heatmap of a cross-layer transition matrix: row = expert in layer a, column = layer b.

    normalize: show P(b-expert | a-expert) (`row_normalize`), else raw counts.
    """
    c = np.asarray(counts_EE)
    z = row_normalize(c) if normalize else c
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(c.shape[1]), y=np.arange(c.shape[0]), customdata=c, colorscale="Blues",
        colorbar_title="P(b | a)" if normalize else "tokens",
        hovertemplate=(f"layer {layer_a} expert %{{y}} → layer {layer_b} expert %{{x}}: "
                       "%{z:.3f} (%{customdata} tokens)<extra></extra>")))
    fig.update_layout(title=f"Expert transitions, layer {layer_a} → layer {layer_b}",
                      xaxis_title=f"expert in layer {layer_b}", yaxis_title=f"expert in layer {layer_a}",
                      yaxis_autorange="reversed")
    return fig


def _rgba(color: str, alpha: float) -> str:
    """A plotly '#rrggbb' colour as an rgba() string."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def transition_sankey(counts_SEE, layer_labels: Sequence, title: str | None = None) -> go.Figure:
    """Sankey of routing flows: a column of experts per MoE layer, a link of width n from expert i in
    layer `layer_labels[s]` to expert j in layer `layer_labels[s + 1]` for the n tokens so routed.

    counts_SEE: one [E, E] count matrix per stage (`transition_matrix(run, a, b)`, rows = first layer),
    or a single [E, E] matrix for one stage.  Each token is counted once per stage, by its first choice
    (slot 0) — the counts of `transition_matrix` and the heatmap beside it, so one stage's link values
    sum to the token count.  (Counting all k×k (choice, choice) pairs per token instead would weight each
    token k² times and mix its weaker choices into the strongest path; a top-k>1 run can pass other
    slots' matrices.)  Zero-count links are omitted; hover gives n and P(j | i)."""
    c = np.asarray(counts_SEE, dtype=np.int64)
    c = c[None] if c.ndim == 2 else c
    n_stages, e, e2 = c.shape
    if e != e2 or len(layer_labels) != n_stages + 1:
        raise ValueError(f"need [S, E, E] counts and S + 1 layer labels, got {c.shape} and {len(layer_labels)} labels")
    palette = _palette(e)
    labels = [f"L{lab} E{x}" for lab in layer_labels for x in range(e)]
    src, dst, val, share, colors = [], [], [], [], []
    for s in range(n_stages):
        p = row_normalize(c[s])
        a, b = np.nonzero(c[s])
        src += (s * e + a).tolist()
        dst += ((s + 1) * e + b).tolist()
        val += c[s][a, b].tolist()
        share += p[a, b].tolist()
        colors += [_rgba(palette[i], 0.45) for i in a]
    # fixed columns per layer, experts top to bottom (plotly needs 0 < x, y < 1 for "fixed")
    x = [0.001 + 0.998 * (i // e) / max(n_stages, 1) for i in range(len(labels))]
    y = [0.001 + 0.998 * (i % e) / max(e - 1, 1) for i in range(len(labels))]
    fig = go.Figure(go.Sankey(
        arrangement="fixed",
        node=dict(label=labels, x=x, y=y, pad=6, thickness=14, color=[palette[i % e] for i in range(len(labels))],
                  hovertemplate="%{label}: %{value} tokens<extra></extra>"),
        link=dict(source=src, target=dst, value=val, customdata=share, color=colors,
                  hovertemplate=("%{source.label} → %{target.label}: %{value} tokens "
                                 "(%{customdata:.1%} of %{source.label})<extra></extra>"))))
    path = " → ".join(f"layer {lab}" for lab in layer_labels)
    fig.update_layout(title=title or f"Routing flows (first choice), {path}", font_size=11)
    return fig


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3 + pc.qualitative.Dark24
    return [base[i % len(base)] for i in range(n)]


def expert_grid_figure(experts_Mt, gates_Mt=None, token_text: Sequence[str] | None = None,
                       layer_labels: Sequence | None = None, n_experts: int | None = None) -> go.Figure:
    """Tokens × layers grid coloured by (first-choice) expert; hover shows token, expert and gate.

    experts_Mt, gates_Mt: [M, t] (e.g. from `expert_grid`); token_text: decoded token strings [t]
    (the caller's tokenizer; ids are shown when None).
    """
    x = np.asarray(experts_Mt)
    m, t = x.shape
    n_experts = int(x.max()) + 1 if n_experts is None else n_experts
    text = [str(i) for i in range(t)] if token_text is None else [str(s) for s in token_text]
    g = np.full(x.shape, np.nan) if gates_Mt is None else np.asarray(gates_Mt, dtype=np.float64)
    tok = np.broadcast_to(np.array(text, dtype=object)[None], (m, t))
    labels = [str(v) for v in (range(m) if layer_labels is None else layer_labels)]
    fig = go.Figure(go.Heatmap(
        z=x, x=np.arange(t), y=labels, zmin=-0.5, zmax=n_experts - 0.5, colorscale="Turbo",
        customdata=np.dstack([tok, g]), colorbar_title="expert",
        hovertemplate=("token %{x} %{customdata[0]}<br>layer %{y}: expert %{z}"
                       "<br>gate %{customdata[1]:.3f}<extra></extra>")))
    if t <= 80:
        fig.update_xaxes(tickmode="array", tickvals=np.arange(t), ticktext=text, tickangle=-60)
    fig.update_layout(title="Expert per token and layer", xaxis_title="token", yaxis_title="layer",
                      yaxis_type="category", yaxis_autorange="reversed")
    return fig


def consecutive_rate_figure(rates: pd.DataFrame, domain: str = "all") -> go.Figure:
    """Mixtral Table 5 as bars per layer (first choice; first-or-any overlap when k > 1) with the
    random baselines as dashed lines.  rates: `consecutive_rates(run)`."""
    r = rates[rates["domain"] == domain]
    if r.empty:
        raise ValueError(f"no rows for domain {domain!r}; have {sorted(rates['domain'].unique())}")
    x = [str(v) for v in r["layer"]]
    fig = go.Figure(go.Bar(x=x, y=r["first_choice"], name="same first choice"))
    fig.add_hline(y=r["baseline_first"].iloc[0], line_dash="dash", line_color="rgb(31,119,180)",
                  annotation_text=f"random 1/E = {r['baseline_first'].iloc[0]:.2%}")
    if r["any_overlap"].notna().any():
        fig.add_trace(go.Bar(x=x, y=r["any_overlap"], name="top-k sets overlap"))
        fig.add_hline(y=r["baseline_any"].iloc[0], line_dash="dash", line_color="rgb(255,127,14)",
                      annotation_text=f"random {r['baseline_any'].iloc[0]:.2%}")
    fig.update_layout(title=f"Consecutive tokens routed to the same expert ({domain})",
                      barmode="group", xaxis_title="layer", xaxis_type="category",
                      yaxis_title="share of consecutive pairs", yaxis_tickformat=".0%")
    return fig

"""Pure callbacks of the Compare tab: run A vs run B, or one document against another (issue 18 §1).

The numbers come from `probes.compare` (streamed, bounded memory); this module only picks spans,
caches whole-run statistics (`apps.views.memo`) and draws.  "Record B as an intervention of A" reruns
A's documents on the live model inside `workbench.instrument.hooks.intervene` and stores what was
changed in B's `intervention` attribute, which is also what makes per-token KL recomputable.
No gradio here: tests call these functions directly.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from apps import views as v
from probes import compare as pc
from probes import entropy as pe
from probes import teaching as pt
from probes.routing_figures import transition_heatmap

MAX_RECORD_TOKENS = 16384    # "record B as an intervention of A" reruns at most this many tokens live
MAX_KL_TOKENS = 2048         # per-token KL reruns the model twice on one document
ALL = "all"


def doc_choices(run) -> list[tuple[str, Any]]:
    """Dropdown choices of a side: the whole run, then each document."""
    return [("whole run", ALL)] + list(v.run_info(run)["docs"])


def _doc(doc) -> int | None:
    if doc in (None, "", ALL):
        return None
    try:
        return int(doc)
    except (TypeError, ValueError):
        raise v.UserError(f"Unknown document {doc!r}: choose 'whole run' or a document number.") from None


def spans(run_a, doc_a, run_b, doc_b) -> tuple[pc.Span, pc.Span, bool]:
    """(span A, span B, aligned): aligned spans hold the same tokens and compare token by token."""
    for r in (run_a, run_b):
        if hasattr(r, "paths"):
            raise v.UserError("Compare takes single runs: open one run on each side (not several joined with '+').")
    try:
        a = pc.span(run_a, _doc(doc_a), "A")
        b = pc.span(run_b, _doc(doc_b), "B")
    except IndexError as e:
        raise v.UserError(str(e)) from None
    key = (str(run_b.path), run_b.n_tokens, a.t0, a.t1, b.t0, b.t1)
    ok = v.memo(run_a, "cmp_aligned", key, lambda: pc.aligned(a, b))
    return a, b, ok


def _key(a: pc.Span, b: pc.Span) -> tuple:
    return (str(b.run.run.path), b.run.n_tokens, a.t0, a.t1, b.t0, b.t1)


def code(run_a, doc_a, run_b, doc_b, call: str) -> str:
    """A notebook snippet rebuilding a Compare figure's data from the run paths (`probes.compare`)."""
    return ("from workbench.store import open_run\nfrom probes import compare as pc\n"
            f"a = pc.span(open_run({str(run_a.path)!r}), {_doc(doc_a)!r})\n"
            f"b = pc.span(open_run({str(run_b.path)!r}), {_doc(doc_b)!r})\n{call}\n")


def _label(s: pc.Span, run) -> str:
    whole = s.t0 == 0 and s.t1 == run.n_tokens
    return f"{run.path.name}" + ("" if whole else f" tokens {s.t0}–{s.t1 - 1}")


def overview(run_a, doc_a, run_b, doc_b) -> tuple[str, pd.DataFrame]:
    """A markdown note (aligned or not, what each side is, B's intervention) and the per-MoE-layer
    routing table (share of tokens whose experts differ; empty when not aligned)."""
    a, b, ok = spans(run_a, doc_a, run_b, doc_b)
    iv = run_b.attrs.get("intervention")
    src_a, src_b = (html.escape(str(r.attrs.get("model_source"))) for r in (run_a, run_b))
    lines = [f"**A** {html.escape(_label(a, run_a))} ({a.n} tokens, {src_a}) · "
             f"**B** {html.escape(_label(b, run_b))} ({b.n} tokens, {src_b})"]
    if iv:
        lines.append(f"B is A under the intervention `{html.escape(json.dumps(iv, sort_keys=True), quote=False)}`.")
    lines.append("Same token sequence: compared **token by token**." if ok else
                 "Different token sequences: compared **as distributions** (load, entropy per layer × head, "
                 "profiles); the token-by-token views need the same text.")
    table = pd.DataFrame()
    if ok and run_a.has("router/experts") and run_b.has("router/experts"):
        table = v.memo(run_a, "cmp_routing", _key(a, b), lambda: pc.routing_difference(a, b))
        worst = table.loc[table["share_differs"].idxmax()] if len(table) else None
        if worst is not None and worst["share_differs"] == 0:
            lines.append("No token changes expert at any MoE layer.")
        elif worst is not None:
            lines.append(f"Largest routing change: layer {int(worst['layer'])}, "
                         f"{worst['share_differs']:.1%} of tokens change expert.")
    return "\n\n".join(lines), table.round(4)


def share_figure(table: pd.DataFrame) -> go.Figure:
    """Bars: share of tokens whose expert (set) differs, per MoE layer."""
    fig = go.Figure()
    if len(table):
        fig.add_trace(go.Bar(x=[str(x) for x in table["layer"]], y=table["share_differs"], name="expert set differs",
                             hovertemplate="layer %{x}: %{y:.1%}<extra></extra>"))
    fig.update_layout(title="Tokens whose expert differs (B vs A), per MoE layer", xaxis_title="MoE layer",
                      xaxis_type="category", yaxis_title="share of tokens", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1])
    return fig


def divergence_view(run_a, doc_a, run_b, doc_b, start: int = 0, window: int = 64, tokenizer=None,
                    selected: int | None = None) -> tuple[go.Figure, dict]:
    """Per-token divergence strip over a window of aligned spans: MoE layers × tokens, cell = 1 where
    the expert set differs; the first layer where the two paths split is marked per token.
    `selected`: a global token index of run A to mark (linked selection).  Returns (figure, data)."""
    a, b, ok = spans(run_a, doc_a, run_b, doc_b)
    if not ok:
        raise v.UserError("The divergence strip needs the same token sequence in A and B; these differ.")
    window = max(1, min(int(window), v.MAX_WINDOW))
    start = max(0, min(int(start or 0), max(a.n - 1, 0)))
    d = pc.divergence_strip(a, b, start, start + window)
    text = v.token_text(tokenizer, d["tokens"])
    disp = [pt.display_token(s) for s in text]
    m, t = d["differs"].shape
    labels = [str(x) for x in d["layer_index"]]
    hover = np.dstack([np.broadcast_to(np.array(disp, object)[None], (m, t)), d["experts_a"], d["experts_b"]])
    fig = go.Figure(go.Heatmap(z=d["differs"].astype(int), x=np.arange(start, start + t), y=labels, zmin=0, zmax=1,
                               colorscale=[[0, "#eeeeee"], [1, "#d62728"]], showscale=False, customdata=hover,
                               hovertemplate="token %{x} %{customdata[0]}<br>layer %{y}: A E%{customdata[1]} · "
                                             "B E%{customdata[2]}<extra></extra>"))
    split = d["first_split"] >= 0
    if split.any():
        xs = np.arange(start, start + t)[split]
        fig.add_trace(go.Scatter(x=xs, y=[labels[i] for i in d["first_split"][split]], mode="markers",
                                 name="first split", marker=dict(symbol="triangle-down", size=9, color="black")))
    if selected is not None and a.t0 + start <= int(selected) < a.t0 + start + t:
        fig.add_vline(x=int(selected) - a.t0, line_color="#1f77b4", line_width=3)
    if t <= 80:
        fig.update_xaxes(tickmode="array", tickvals=np.arange(start, start + t), ticktext=disp, tickangle=-60)
    fig.update_layout(title=f"Divergence strip, {html.escape(run_b.path.name)} vs {html.escape(run_a.path.name)}: "
                            f"red = expert differs, ▼ = first MoE layer where the paths split "
                            f"({int(split.sum())}/{t} tokens split)", xaxis_title="token (offset in A's span)",
                      yaxis_title="MoE layer", yaxis_type="category", yaxis_autorange="reversed")
    d["offset"] = start
    fig.update_layout(meta={"wb_code": code(run_a, doc_a, run_b, doc_b,
                                            f"strip = pc.divergence_strip(a, b, {start}, {start + t})   "
                                            "# differs [M, t], first_split [t]")})
    return fig, d


def load_diff_view(run_a, doc_a, run_b, doc_b) -> go.Figure:
    """Expert-load difference B − A (fraction of assignments) per MoE layer and expert."""
    a, b, _ = spans(run_a, doc_a, run_b, doc_b)
    ld = v.memo(run_a, "cmp_load", _key(a, b), lambda: pc.load_difference(a, b))
    layers = [str(x) for x in v.run_info(run_a)["moe_layers"]]
    z = ld["diff"]
    lim = float(np.abs(z).max()) or 1e-9
    fig = go.Figure(go.Heatmap(z=z, y=layers, x=np.arange(z.shape[1]), zmid=0, zmin=-lim, zmax=lim,
                               colorscale="RdBu_r", colorbar_title="Δ load",
                               customdata=np.dstack([ld["load_a"], ld["load_b"]]),
                               hovertemplate="layer %{y} expert %{x}: A %{customdata[0]:.1%} → B "
                                             "%{customdata[1]:.1%} (Δ %{z:+.1%})<extra></extra>"))
    fig.update_layout(title="Expert load, B − A (share of assignments)", xaxis_title="expert", yaxis_title="MoE layer",
                      yaxis_type="category", yaxis_autorange="reversed",
                      meta={"wb_code": code(run_a, doc_a, run_b, doc_b, "diff = pc.load_difference(a, b)['diff']")})
    return fig


def transitions_view(run_a, doc_a, run_b, doc_b, layer_a: int, layer_b: int, normalize: bool = True) -> go.Figure:
    """Cross-layer transition matrices of A and B side by side (first choice)."""
    a, b, _ = spans(run_a, doc_a, run_b, doc_b)
    moe = v.run_info(run_a)["moe_layers"]
    for x in (layer_a, layer_b):
        if x is None or int(x) not in moe:
            raise v.UserError(f"Layer {x} is not an MoE layer; MoE layers are {moe}.")
    i, j = moe.index(int(layer_a)), moe.index(int(layer_b))
    ca, cb = v.memo(run_a, "cmp_trans", _key(a, b) + (i, j), lambda: pc.transition_pair(a, b, i, j))
    fig = make_subplots(1, 2, subplot_titles=("A", "B"), horizontal_spacing=0.08)
    for col, c in ((1, ca), (2, cb)):
        tr = transition_heatmap(c, normalize, str(layer_a), str(layer_b)).data[0]
        tr.update(showscale=col == 2, coloraxis=None, zmin=0, zmax=1 if normalize else max(ca.max(), cb.max()))
        fig.add_trace(tr, 1, col)
    fig.update_yaxes(autorange="reversed", title_text=f"expert at layer {layer_a}", col=1)
    fig.update_xaxes(title_text=f"expert at layer {layer_b}")
    fig.update_layout(title=f"Transitions layer {layer_a} → {layer_b}" + (" (P(b | a))" if normalize else " (counts)"),
                      meta={"wb_code": code(run_a, doc_a, run_b, doc_b,
                                            f"counts_a, counts_b = pc.transition_pair(a, b, {i}, {j})")})
    return fig


def entropy_compare_view(run_a, doc_a, run_b, doc_b, group: str = "", head="all",
                         n_bins: int = 512) -> tuple[go.Figure, go.Figure, pd.DataFrame]:
    """Entropy vs position of A and B on one axis (a layer group, one head or all), the ΔH = H_B − H_A
    layer × head heatmap and its table (`probes.compare.entropy_difference`)."""
    a, b, ok = spans(run_a, doc_a, run_b, doc_b)
    for r in (run_a, run_b):
        if not r.has("attention/entropy"):
            raise v.UserError(f"Run {r.path.name} has no attention-entropy recordings (probe 'entropy').")
    info = v.run_info(run_a)
    layers = v._group_layers(run_a, group or f"kind:{pe.attention_kind(info['kinds'][0])}")
    h = None if head in (None, "", "all") else int(head)
    if h is not None and not 0 <= h < info["n_heads"]:
        raise v.UserError(f"Head {head} outside 0..{info['n_heads'] - 1}.")
    n_bins = int(max(16, min(int(n_bins), 4096)))
    maxpos = max(a.n, b.n)        # same bins on both sides (positions restart per document)
    profs = [v.memo(r, "cmp_profile", (s.t0, s.t1, tuple(layers), h, n_bins, maxpos),
                    lambda s=s: pc.span_profile(s, layers, h, n_bins, maxpos)) for r, s in ((run_a, a), (run_b, b))]
    fig = go.Figure()
    for name, p, col in (("A", profs[0], "rgb(31,119,180)"), ("B", profs[1], "rgb(214,39,40)")):
        x = (p["pos_lo"] + p["pos_hi"] - 1) / 2
        fig.add_trace(go.Scatter(x=x, y=p["mean"], mode="lines", name=f"{name} (mean)", line_color=col))
    kinds = {pe.attention_kind(info["kinds"][i]) for i in layers}
    marks = [(info["chunk_size"], "chunk boundary", "black", 0) if "rope-chunked" in kinds else None,
             (info["floor_scale"], "temperature step", "red", -1)
             if info["tuning"] and "nope-global" in kinds else None]
    _step_lines(fig, [m for m in marks if m and m[0]], maxpos)
    step = max(1, (maxpos + 1) // len(profs[0])) if len(profs[0]) else 1
    fig.update_layout(title=f"Entropy vs position, A and B — layers {layers}, "
                            f"{'all heads' if h is None else f'head {h}'}"
                            + (f" (binned: {step} positions per bin, {len(profs[0])} bins)" if step > 1 else ""),
                      xaxis_title="position", yaxis_title="entropy (nats)", hovermode="x unified",
                      meta={"wb_code": code(run_a, doc_a, run_b, doc_b,
                                            f"prof_a = pc.span_profile(a, {layers}, {h}, {n_bins}, {maxpos})\n"
                                            f"prof_b = pc.span_profile(b, {layers}, {h}, {n_bins}, {maxpos})")})
    df = v.memo(run_a, "cmp_entropy", _key(a, b), lambda: pc.entropy_difference(a, b))
    grid = df.pivot(index="layer", columns="head", values="delta")
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) if np.isfinite(grid.to_numpy()).any() else 1.0
    heat = go.Figure(go.Heatmap(z=grid.to_numpy(), x=grid.columns, y=grid.index, zmid=0, zmin=-lim or -1e-9,
                                zmax=lim or 1e-9, colorscale="RdBu_r", colorbar_title="ΔH",
                                hovertemplate="layer %{y} head %{x}: ΔH %{z:+.4f} nats<extra></extra>"))
    heat.update_layout(title="ΔH = H_B − H_A (mean entropy, nats) per layer and head" +
                             ("" if ok else " — different texts: difference of means"),
                       xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                       meta={"wb_code": code(run_a, doc_a, run_b, doc_b, "table = pc.entropy_difference(a, b)  "
                                                                         "# delta = H_B − H_A per layer, head")})
    return fig, heat, df.round(5)


def _step_lines(fig: go.Figure, marks, x_hi: int) -> None:
    for step, name, color, off in marks:
        xs = np.arange(step, x_hi + 1, step) + off
        xs = xs[(xs > 0) & (xs < x_hi)][:4096]
        if len(xs):
            fig.add_trace(go.Scatter(x=np.column_stack([xs, xs, np.full(len(xs), np.nan)]).ravel(),
                                     y=np.tile([0.0, 1.0, np.nan], len(xs)), yaxis="y2", mode="lines", name=name,
                                     hoverinfo="skip", line=dict(color=color, width=1, dash="dot")))
    if marks:
        fig.update_layout(yaxis2=dict(overlaying="y", range=[0, 1], visible=False))


def delta_h_strip_view(run_a, doc_a, run_b, doc_b, start: int = 0, window: int = 64, head="all",
                       selected: int | None = None) -> go.Figure:
    """Per-token ΔH = H_B − H_A, layers × tokens, over the window (aligned spans only)."""
    a, b, ok = spans(run_a, doc_a, run_b, doc_b)
    if not ok:
        raise v.UserError("Per-token ΔH needs the same token sequence in A and B; these differ.")
    window = max(1, min(int(window), v.MAX_WINDOW))
    start = max(0, min(int(start or 0), max(a.n - 1, 0)))
    h = None if head in (None, "", "all") else int(head)
    z = pc.delta_h_window(a, b, start, start + window, h)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(start, start + z.shape[1]), y=np.arange(z.shape[0]), zmid=0,
                               zmin=-(lim or 1e-9), zmax=lim or 1e-9, colorscale="RdBu_r", colorbar_title="ΔH",
                               hovertemplate="token %{x} layer %{y}: ΔH %{z:+.4f}<extra></extra>"))
    if selected is not None and a.t0 + start <= int(selected) < a.t0 + start + z.shape[1]:
        fig.add_vline(x=int(selected) - a.t0, line_color="#1f77b4", line_width=3)
    fig.update_layout(title=f"Per-token ΔH = H_B − H_A, B = {html.escape(run_b.path.name)} "
                            f"({'all heads, mean' if h is None else f'head {h}'})",
                      xaxis_title="token (offset in A's span)", yaxis_title="layer", yaxis_autorange="reversed",
                      meta={"wb_code": code(run_a, doc_a, run_b, doc_b,
                                            f"dh = pc.delta_h_window(a, b, {start}, {start + z.shape[1]}, {h})")})
    return fig


# ------------------------------------------------------------------------ intervention twin
def intervention_spec(temperature_off: bool = False, mask=None, drop_shared: bool = False, top_k=None,
                      chunk_size=None, n_experts: int | None = None, max_top_k: int | None = None) -> dict:
    """The `intervene` keyword arguments for the app's controls, validated (errors name the control).
    mask: expert labels ("E3") or ids, masked at every MoE layer; chunk_size: None/0 = keep."""
    spec: dict[str, Any] = {}
    if temperature_off:
        spec["temperature_tuning"] = False
    ids = []
    for e in mask or []:
        s = str(e).lstrip("E")
        if not s.isdigit() or (n_experts is not None and int(s) >= n_experts):
            known = f" (experts E0–E{n_experts - 1})" if n_experts else ""
            raise v.UserError(f"Unknown expert {e!r} to mask{known}")
        ids.append(int(s))
    if ids:
        spec["mask_experts"] = sorted(set(ids))
    if drop_shared:
        spec["drop_shared"] = True
    if top_k not in (None, "", 0):
        k = int(top_k)
        if k < 1 or (max_top_k is not None and k > max_top_k):
            raise v.UserError(f"top-k must be between 1 and {max_top_k}, got {top_k}")
        spec["top_k"] = k
    if chunk_size not in (None, "", 0):
        c = int(chunk_size)
        if c < 1:
            raise v.UserError(f"chunk size must be a positive number of tokens, got {chunk_size}")
        spec["chunk_size"] = c
    if not spec:
        raise v.UserError("Choose at least one change (temperature off, masked experts, drop shared expert, "
                          "top-k or chunk size) to record an intervention twin.")
    return spec


def _intervene_kwargs(model, spec: dict) -> dict:
    kw = {k: spec[k] for k in ("temperature_tuning", "top_k", "chunk_size") if k in spec}
    moe = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
    if spec.get("mask_experts"):
        kw["mask_experts"] = {i: list(spec["mask_experts"]) for i in moe}
    if spec.get("drop_shared"):
        kw["drop_shared"] = True
    return kw


def record_intervention(model, lock: threading.Lock, runs_dir: str | Path, run_a_name: str, spec: dict,
                        model_source: str | None = None) -> str:
    """Rerun run A's documents on `model` under `intervene(**spec)` into a new run B next to it; returns
    B's name.  B's attributes `intervention` (the spec) and `intervention_of` (A's name) say what it is.
    Refused when A was recorded with another model, or holds more than MAX_RECORD_TOKENS tokens."""
    import zarr

    from workbench.instrument.hooks import intervene
    from workbench.recording import record

    path_a = v.resolve_run(runs_dir, run_a_name)
    run_a = v.open_cached(path_a)
    src = str(run_a.attrs.get("model_source") or "")
    model_source = model_source or str(getattr(model, "source", ""))
    if src != model_source or run_a.attrs.get("config_hash") != v_config_hash(model):
        raise v.UserError(f"Run {run_a_name} was recorded with {src!r}, not with the app's model "
                          f"{model_source!r} (same config): its intervention twin cannot be recorded here.")
    if run_a.n_tokens > MAX_RECORD_TOKENS:
        raise v.UserError(f"Run {run_a_name} holds {run_a.n_tokens} tokens; the live twin is limited to "
                          f"{MAX_RECORD_TOKENS}. Record large twins with `workbench record` inside `intervene`.")
    probes = tuple(run_a.attrs.get("probes") or v.LIVE_PROBES)
    ids, doms = run_a.read("doc_id"), run_a.read("doc_domain")
    docs = [{"tokens": run_a.tokens(i).tolist(), "id": str(ids[i]), "domain": str(doms[i])}
            for i in range(run_a.n_docs)]
    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:6]
    name = f"{Path(path_a.name).stem}-iv-{tag}.zarr"
    out = path_a.parent / name               # beside A: a session's private run keeps a private twin
    if "/" in run_a_name:
        name = f"{run_a_name.rsplit('/', 1)[0]}/{name}"
    if out.exists():
        return name                       # the same twin exists already: recording is deterministic
    with lock, intervene(model, **_intervene_kwargs(model, spec)):
        record(model, docs, out, probes=probes, progress=False, model_source=model_source)
    # provenance in B's attributes: one zarr.json rewrite, as the writer's commit does (docs/store.md)
    zarr.open_group(out, mode="r+", zarr_format=3, use_consolidated=False).update_attributes(
        {"intervention": spec, "intervention_of": run_a_name})
    return name


def v_config_hash(model) -> str:
    from workbench.store import config_hash

    return config_hash(model.config.to_hf())


def kl_view(model, lock: threading.Lock, run_a, run_b, doc: int = 0) -> go.Figure:
    """Per-token KL(P_A ‖ P_B) of the next-token distributions of document `doc`, recomputed on the live
    model: A as recorded, B under its stored `intervention`.  Raises UserError when not recomputable."""
    import torch

    from workbench.instrument.hooks import intervene

    spec = run_b.attrs.get("intervention")
    if not spec or run_b.attrs.get("intervention_of") != run_a.path.name:
        raise v.UserError("Per-token KL is recomputable only for a pair made by 'Record B as an intervention of A' "
                          "(B stores its intervention); output distributions are not stored in runs.")
    if run_a.attrs.get("config_hash") != v_config_hash(model):
        raise v.UserError("Run A was recorded with another model than the app's; KL cannot be recomputed here.")
    d = _doc(doc) or 0
    toks = run_a.tokens(d)
    if len(toks) > MAX_KL_TOKENS:
        raise v.UserError(f"Document {d} has {len(toks)} tokens; live KL is limited to {MAX_KL_TOKENS}.")
    ids = torch.tensor([toks.tolist()], dtype=torch.long, device=model.device)
    with lock, torch.no_grad():
        la = model(ids).logits[0].float().cpu().numpy()
        with intervene(model, **_intervene_kwargs(model, spec)):
            lb = model(ids).logits[0].float().cpu().numpy()
    kl = pc.kl_per_token(la, lb)
    fig = go.Figure(go.Bar(x=np.arange(len(kl)), y=kl, hovertemplate="token %{x}: KL %{y:.4g} nats<extra></extra>"))
    fig.update_layout(title=f"Per-token KL(P_A ‖ P_B) of the next-token distribution, document {d} "
                            f"(mean {kl.mean():.4g} nats)", xaxis_title="token", yaxis_title="KL (nats)")
    return fig

"""Teaching demos for MoE and iRoPE (science.md §5): computations and plotly builders.

Unlike the store-level probes, several functions here *drive a live model* (torch is imported inside
them, so `import probes.teaching` stays light).  Every figure is built from what the library's own
code computes — taps, `intervene`, `apply_rope`, the attention kernel's mask convention — so a demo
can never drift from the model it explains.

    MoE    token_journey -> journey_figure        one token through router → top-k → σ gate → experts
           recorded_path -> path_figure           one recorded token's expert at every MoE layer
           next_token_probs + next_token_figure   the next-token distribution under an intervention
           param_breakdown -> param_figure        active vs total parameters
    iRoPE  attention_mask -> mask_figure          chunked (RoPE layers) vs global causal (NoPE layers)
           rope_figure                            rotation of a q/k pair; q·k depends only on m − n
           live_entropy_profile -> live_entropy_figure  entropy vs position on the live model, tuning
                                                  on/off (a `probes.entropy.position_profile`-shaped frame)

Shape legend: T tokens, E experts, K top-k, D hidden, V vocab, M MoE layers, P rotation pairs.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "token_journey", "journey_figure", "recorded_path", "path_figure", "next_token_probs",
    "distribution_shift", "next_token_figure", "param_breakdown", "param_figure", "attention_mask",
    "mask_figure", "rope_scores", "rope_figure", "live_entropy_profile", "live_entropy_figure", "display_token",
]

CHOSEN, OTHER = "rgb(214,39,40)", "rgb(158,185,212)"


def display_token(s: str) -> str:
    """A token string safe and visible inside plotly labels/hover (which render a subset of HTML):
    HTML-escaped, with whitespace made visible."""
    s = s.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣")
    return html.escape(s, quote=True) or "∅"


# ---------------------------------------------------------------------------------------- MoE
def token_journey(model, ids: Sequence[int], position: int, layer: int, **intervention) -> dict[str, Any]:
    """One token's path through MoE layer `layer` (a decoder-layer index), read from the taps.

    Returns logits_E (raw router logits), ids_K / gates_K (chosen experts and σ(logit) gates),
    and the L2 norms of the MoE input x, of each scaled input gate·x, of each expert's output
    expert_k(gate·x), of the shared expert's output, of the routed sum and of the block output
    (shared + routed).  `intervention`: keyword arguments of `workbench.instrument.hooks.intervene`
    (top_k, mask_experts, drop_shared, ...), applied during the pass.
    """
    import torch

    from workbench.instrument.hooks import intervene, run_with_cache

    if not model.config.is_moe[layer]:
        raise ValueError(f"layer {layer} is a dense layer; MoE layers are {model.config.moe_layer_index}")
    if not 0 <= position < len(ids):
        raise ValueError(f"token position {position} outside 0..{len(ids) - 1}")
    base = f"model.layers.{layer}."
    x_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with torch.no_grad(), intervene(model, **intervention):
        _, cache = run_with_cache(model, x_ids, [base + "hook_resid_mid", base + "feed_forward.hook_*"])
        blk = model.model.layers[layer]
        x_D = blk.post_attention_layernorm(cache[base + "hook_resid_mid"])[0, position]   # MoE input
        ff = base + "feed_forward."
        ids_K = cache[ff + "hook_topk_ids"][position]
        gates_K = cache[ff + "hook_topk_gates"][position]
        expert_out = [blk.feed_forward.experts(x_D[None], ids_K[None, k:k + 1], gates_K[None, k:k + 1])[0]
                      for k in range(len(ids_K))]
        shared = cache[ff + "hook_shared_out"][position]
        routed = cache[ff + "hook_routed_out"][position]

    def norm(t) -> float:
        return float(t.float().norm())
    return {
        "layer": layer, "position": position,
        "logits_E": cache[ff + "hook_router_logits"][position].float().cpu().numpy(),
        "ids_K": ids_K.cpu().numpy(), "gates_K": gates_K.float().cpu().numpy(),
        "x_norm": norm(x_D), "scaled_norms_K": np.array([norm(g * x_D) for g in gates_K]),
        "expert_norms_K": np.array([norm(o) for o in expert_out]),
        "shared_norm": norm(shared), "routed_norm": norm(routed), "out_norm": norm(shared + routed),
    }


def journey_figure(j: dict[str, Any], token: str = "") -> go.Figure:
    """Three panels: router logits (chosen experts red), the sigmoid that turns a chosen logit into
    its gate, and the norms along the path x → gate·x → expert → (+ shared) → output."""
    fig = make_subplots(rows=1, cols=3, column_widths=[0.36, 0.26, 0.38], horizontal_spacing=0.11, subplot_titles=(
        "1 · router logits (top-k red)", "2 · gate = σ(logit)", "3 · ‖·‖ along the path"))
    e = len(j["logits_E"])
    chosen = set(int(i) for i in j["ids_K"])
    fig.add_trace(go.Bar(x=list(range(e)), y=j["logits_E"], name="router logit", showlegend=False,
                         marker_color=[CHOSEN if i in chosen else OTHER for i in range(e)],
                         hovertemplate="expert %{x}: logit %{y:.3f}<extra></extra>"), 1, 1)
    lo = min(-6.0, float(np.min(j["logits_E"])) - 1)
    hi = max(6.0, float(np.max(j["logits_E"])) + 1)
    z = np.linspace(lo, hi, 200)
    fig.add_trace(go.Scatter(x=z, y=1 / (1 + np.exp(-z)), mode="lines", line_color="gray",
                             name="σ", showlegend=False, hoverinfo="skip"), 1, 2)
    top = j["logits_E"][j["ids_K"]]
    fig.add_trace(go.Scatter(x=top, y=j["gates_K"], mode="markers+text", marker=dict(color=CHOSEN, size=10),
                             text=[f"E{i}: {g:.2f}" for i, g in zip(j["ids_K"], j["gates_K"])],
                             textposition="top left", showlegend=False,
                             hovertemplate="logit %{x:.3f} → gate %{y:.3f}<extra></extra>"), 1, 2)
    labels = ["x (MoE input)"]
    vals = [j["x_norm"]]
    for i, s, o in zip(j["ids_K"], j["scaled_norms_K"], j["expert_norms_K"]):
        labels += [f"gate·x → E{i}", f"E{i}(gate·x)"]
        vals += [s, o]
    labels += ["shared(x)", "Σ routed", "shared + routed"]
    vals += [j["shared_norm"], j["routed_norm"], j["out_norm"]]
    fig.add_trace(go.Bar(x=vals, y=labels, orientation="h", showlegend=False, marker_color="rgb(44,160,44)",
                         hovertemplate="%{y}: ‖·‖ = %{x:.3f}<extra></extra>"), 1, 3)
    fig.update_yaxes(autorange="reversed", row=1, col=3)
    fig.update_xaxes(type="log", title_text="L2 norm (log; a dropped part is 0 and not drawn)", row=1, col=3)
    fig.update_xaxes(title_text="expert", row=1, col=1)
    fig.update_xaxes(title_text="logit", row=1, col=2)
    fig.update_layout(title=f"Token {j['position']} {display_token(token)!s} in MoE layer {j['layer']}",
                      height=380, margin=dict(t=70, b=40))
    return fig


def recorded_path(run, token: int) -> dict[str, np.ndarray]:
    """A recorded token's routing at every MoE layer: experts [M, K], gates [M, K], layer_index [M],
    and logits [M, E] when the run holds router/logits (else None).  `token` is a global index."""
    from probes import as_store

    run = as_store(run)
    if not 0 <= token < run.n_tokens:
        raise IndexError(f"token {token} outside 0..{run.n_tokens - 1}")
    out = {"experts": np.asarray(run["router/experts"][:, token]),
           "gates": np.asarray(run["router/weights"][:, token]),
           "layer_index": np.asarray(run["router/layer_index"][:]),
           "logits": np.asarray(run["router/logits"][:, token]) if "router/logits" in run else None}
    return out


def path_figure(path: dict[str, np.ndarray], n_experts: int, token: str = "", index: int | None = None) -> go.Figure:
    """MoE layers × experts: router logits (or a one-hot of the choice when logits were not
    recorded) with the chosen expert(s) circled and joined through the layers."""
    m, k = path["experts"].shape
    layers = [str(v) for v in path["layer_index"]]
    if path["logits"] is not None:
        z, title = path["logits"], "router logit"
    else:
        z = np.zeros((m, n_experts))
        np.put_along_axis(z, path["experts"].astype(np.int64), path["gates"], axis=1)
        title = "gate (chosen only)"
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_experts)), y=layers, colorscale="Blues",
                               colorbar_title=title,
                               hovertemplate="layer %{y} expert %{x}: %{z:.3f}<extra></extra>"))
    for s in range(k):
        fig.add_trace(go.Scatter(
            x=path["experts"][:, s], y=layers, mode="lines+markers", name=f"choice {s + 1}",
            customdata=path["gates"][:, s], line=dict(color=CHOSEN, dash="solid" if s == 0 else "dot"),
            marker=dict(size=14, symbol="circle-open", line_width=3),
            hovertemplate="layer %{y}: expert %{x}, gate %{customdata:.3f}<extra></extra>"))
    where = "" if index is None else f" #{index}"
    fig.update_layout(title=f"Expert path of token{where} {display_token(token)}", xaxis_title="expert",
                      yaxis_title="decoder layer", yaxis_type="category", yaxis_autorange="reversed",
                      xaxis=dict(tickmode="linear", dtick=1 if n_experts <= 32 else None), height=360)
    return fig


def next_token_probs(model, ids: Sequence[int], **intervention) -> np.ndarray:
    """Softmax of the last position's logits [V] (float64), under `intervene(**intervention)`."""
    import torch

    from workbench.instrument.hooks import intervene

    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with torch.no_grad(), intervene(model, **intervention):
        logits = model(x, last_only=True).logits[0, -1].double()
    return torch.softmax(logits, -1).cpu().numpy()


def _short(s: str, n: int = 14) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def distribution_shift(p, q) -> dict[str, float]:
    """KL(p‖q) in nats, total variation ½Σ|p−q| and whether the argmax changed."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)))
    return {"kl": kl, "tv": float(0.5 * np.abs(p - q).sum()), "argmax_changed": bool(p.argmax() != q.argmax())}


def next_token_figure(p_base, p_new, token_text: Sequence[str], top_n: int = 12) -> go.Figure:
    """Grouped bars over the union of both distributions' top tokens; KL and TV in the title."""
    p_base, p_new = np.asarray(p_base), np.asarray(p_new)
    top = np.union1d(np.argsort(-p_base)[:top_n], np.argsort(-p_new)[:top_n])
    top = top[np.argsort(-(p_base[top] + p_new[top]))][: 2 * top_n]
    labels = [f"{display_token(_short(token_text[i]))} ({i})" for i in top]
    s = distribution_shift(p_base, p_new)
    fig = go.Figure([go.Bar(x=labels, y=p_base[top], name="unchanged model", marker_color=OTHER),
                     go.Bar(x=labels, y=p_new[top], name="with your edits", marker_color=CHOSEN)])
    flag = " — top token changed" if s["argmax_changed"] else ""
    fig.update_layout(title=f"Next-token distribution: KL {s['kl']:.4f} nats, TV {s['tv']:.3f}{flag}",
                      barmode="group", yaxis_title="probability", yaxis_tickformat=".1%",
                      xaxis_title="token (id)", xaxis_type="category", height=360)
    return fig


def param_breakdown(config, n_experts: int | None = None, top_k: int | None = None) -> dict[str, int]:
    """`workbench.params.count_params` of `config` with the expert count / top-k changed."""
    from workbench.params import count_params

    changes = {}
    if n_experts is not None:
        changes["num_local_experts"] = int(n_experts)
    if top_k is not None:
        changes["num_experts_per_tok"] = int(top_k)
    if changes.get("num_experts_per_tok", config.num_experts_per_tok) > changes.get(
            "num_local_experts", config.num_local_experts):
        raise ValueError(f"top-k ({changes.get('num_experts_per_tok', config.num_experts_per_tok)}) cannot exceed "
                         f"the number of experts ({changes.get('num_local_experts', config.num_local_experts)})")
    cfg = config.replace(**changes) if changes else config
    return {**count_params(cfg), "n_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok}


def param_figure(counts: dict[str, int], name: str = "") -> go.Figure:
    """Stacked bars: total vs active-per-token parameters, split into routed experts and the rest."""
    from workbench.params import human

    rest = counts["total"] - counts["routed_experts"]
    routed_active = counts["active"] - rest
    fig = go.Figure([
        go.Bar(x=["total", "active per token"], y=[rest, rest], name="attention, shared expert, dense, embeddings",
               marker_color=OTHER),
        go.Bar(x=["total", "active per token"], y=[counts["routed_experts"], routed_active],
               name="routed experts", marker_color=CHOSEN)])
    ratio = counts["active"] / counts["total"]
    fig.update_layout(barmode="stack", yaxis_title="parameters", height=340, title=(
        f"{name}: {human(counts['total'])} total, {human(counts['active'])} active "
        f"({ratio:.1%}) with top-{counts['top_k']} of {counts['n_experts']} experts"))
    return fig


# ---------------------------------------------------------------------------------------- iRoPE
def attention_mask(n: int, chunk: int | None) -> np.ndarray:
    """Bool [n, n]: key j visible to query i iff j ≤ i and, with a chunk size C, ⌊j/C⌋ = ⌊i/C⌋
    (the convention of `workbench.model.attention_kernel`; its `n_keys` equals the row sums)."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    visible = j <= i
    if chunk:
        visible &= (j // chunk) == (i // chunk)
    return visible


def mask_figure(n: int, chunk: int) -> go.Figure:
    """Chunked-causal (RoPE layers) next to global causal (NoPE layers), with keys per query."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, subplot_titles=(
        f"RoPE layers: chunked, C = {chunk}", "NoPE layers: global causal"))
    for col, c in ((1, chunk), (2, None)):
        m = attention_mask(n, c)
        nk = np.broadcast_to(m.sum(1, keepdims=True), m.shape)
        fig.add_trace(go.Heatmap(z=m.astype(np.int8), colorscale=[[0, "white"], [1, "rgb(31,119,180)"]],
                                 showscale=False, customdata=nk, xgap=0.3 if n <= 64 else 0,
                                 ygap=0.3 if n <= 64 else 0,
                                 hovertemplate="query %{y}, key %{x}: %{z} · query sees %{customdata} keys"
                                               "<extra></extra>"), 1, col)
        fig.update_yaxes(autorange="reversed", title_text="query position", constrain="domain", row=1, col=col)
        fig.update_xaxes(title_text="key position", row=1, col=col, constrain="domain",
                         scaleanchor=f"y{'' if col == 1 else 2}")
    fig.update_layout(title=f"Which keys each query sees ({n} tokens)", height=460)
    return fig


def rope_scores(config, positions: Sequence[int], deltas: Sequence[int], seed: int = 0) -> np.ndarray:
    """q·k after the library's `apply_rope` for a fixed random q, k at positions (p, p + Δ):
    scores [len(deltas), len(positions)].  Each row is constant: RoPE scores depend on Δ only."""
    import torch

    from workbench.model.rope import apply_rope, inv_freq, rotations

    g = torch.Generator().manual_seed(seed)
    d = config.head_dim
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    f = inv_freq(config)
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    out = np.zeros((len(deltas), len(pos)))
    for r, delta in enumerate(deltas):
        rq = apply_rope(q.expand(1, len(pos), 1, d), rotations(f, pos[None]))
        rk = apply_rope(k.expand(1, len(pos), 1, d), rotations(f, (pos + int(delta))[None]))
        out[r] = (rq * rk).sum(-1)[0, :, 0].double().numpy()
    return out


def rope_figure(config, pair: int, m: int, delta: int, n_positions: int = 64, seed: int = 0) -> go.Figure:
    """Three panels: (1) pair `pair` of q at position m and of k at m + Δ, before and after rotation;
    (2) q·k at (p, p + Δ) for every p — flat lines, the relative-position property; (3) the rotation
    angle θ_i·pos mod 2π per pair (fast low pairs, slow high pairs)."""
    import torch

    from workbench.model.rope import inv_freq

    n_pairs = config.head_dim // 2
    if not 0 <= pair < n_pairs:
        raise ValueError(f"pair {pair} outside 0..{n_pairs - 1} (head_dim {config.head_dim})")
    theta = inv_freq(config).double().numpy()                                       # (P,)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(config.head_dim, generator=g).numpy()[2 * pair:2 * pair + 2]
    k = torch.randn(config.head_dim, generator=g).numpy()[2 * pair:2 * pair + 2]

    def rot(v, pos):
        a = theta[pair] * pos
        return np.array([v[0] * np.cos(a) - v[1] * np.sin(a), v[0] * np.sin(a) + v[1] * np.cos(a)])

    fig = make_subplots(rows=1, cols=3, column_widths=[0.3, 0.4, 0.3], subplot_titles=(
        f"1 · pair {pair}: θ = {theta[pair]:.3g} rad/token", "2 · q·k at (p, p+Δ): depends on Δ only",
        "3 · angle θ_i·pos mod 2π"))
    for vec, pos, name, color in ((q, m, "q", "rgb(31,119,180)"), (k, m + delta, "k", "rgb(214,39,40)")):
        for v, dash, label in ((vec, "dot", f"{name} (pos 0)"), (rot(vec, pos), "solid", f"{name} at pos {pos}")):
            fig.add_trace(go.Scatter(x=[0, v[0]], y=[0, v[1]], mode="lines+markers", name=label,
                                     line=dict(color=color, dash=dash), marker=dict(size=[0, 9])), 1, 1)
    fig.update_xaxes(range=[-3, 3], row=1, col=1)
    fig.update_yaxes(range=[-3, 3], scaleanchor="x", row=1, col=1)
    pos = np.arange(n_positions)
    deltas = sorted({0, 1, 4, int(delta)})
    scores = rope_scores(config, pos, deltas, seed)
    for dl, row in zip(deltas, scores):
        fig.add_trace(go.Scatter(x=pos, y=row, mode="lines", name=f"Δ = {dl}",
                                 line_width=3 if dl == delta else 1.5), 1, 2)
    fig.update_xaxes(title_text="query position p", row=1, col=2)
    fig.update_yaxes(title_text="q·k (full head)", row=1, col=2)
    ang = np.mod(pos[:, None] * theta[None, :], 2 * np.pi)
    fig.add_trace(go.Heatmap(z=ang, x=np.arange(n_pairs), y=pos, colorscale="Twilight", showscale=False,
                             hovertemplate="pos %{y}, pair %{x}: %{z:.2f} rad<extra></extra>"), 1, 3)
    fig.update_xaxes(title_text="pair i", row=1, col=3)
    fig.update_yaxes(title_text="position", autorange="reversed", row=1, col=3)
    fig.update_layout(height=420, title=f"RoPE: rotate q at m = {m} and k at n = m + {delta}; the score "
                                        "sees only n − m", legend=dict(orientation="h", y=-0.2))
    return fig


def live_entropy_profile(model, ids: Sequence[int], *, layers: Sequence[int] | None = None,
                         temperature_tuning: bool = True, floor_scale: float | None = None,
                         attn_scale: float | None = None) -> pd.DataFrame:
    """Run the live model with streaming attention statistics and return, per position, the mean
    over `layers` (default: the NoPE layers) and heads of the entropy as run and with tuning off,
    as a unit-bin `probes.entropy.position_profile` frame (stat 'entropy'), ready for
    `probes.entropy.entropy_position_figure`."""
    import torch

    from probes.entropy import BinAccumulator
    from workbench.instrument.hooks import intervene, run_with_cache

    cfg = model.config
    layers = [i for i, r in enumerate(cfg.use_rope) if not r] if layers is None else list(layers)
    if not layers:
        raise ValueError("this model has no NoPE layers; pass layers= explicitly")
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    pats = [f"model.layers.{i}.self_attn.hook_{s}" for i in layers for s in ("entropy", "entropy_no_temp", "n_keys")]
    with torch.no_grad(), intervene(model, temperature_tuning=temperature_tuning, floor_scale=floor_scale,
                                    attn_scale=attn_scale):
        _, cache = run_with_cache(model, x, pats, attn_stats=True, last_only=True)

    def mean(stat):
        return np.mean([cache[f"model.layers.{i}.self_attn.hook_{stat}"][0].float().mean(0).cpu().numpy()
                        for i in layers], axis=0)                                   # (T,)
    logn = np.mean([np.log(np.maximum(cache[f"model.layers.{i}.self_attn.hook_n_keys"].cpu().numpy(), 1))
                    for i in layers], axis=0)
    pos = np.arange(x.shape[1])
    edges = np.arange(len(pos) + 1)
    frames = []
    for values, prefix in ((mean("entropy"), ""), (mean("entropy_no_temp"), "no_temp_"), (logn, "logn_")):
        acc = BinAccumulator(edges)
        acc.update(values, pos)
        frames.append(acc.frame(prefix))
    df = frames[0].join(frames[1].iloc[:, 3:])
    df["log_n_mean"] = frames[2]["logn_mean"]
    df.attrs.update(stat="entropy", layers=layers, heads=None)
    return df


def live_entropy_figure(profile: pd.DataFrame, floor_scale: int | None = None, title: str | None = None) -> go.Figure:
    """`probes.entropy.entropy_position_figure` of a `live_entropy_profile` frame plus ΔH = H(no temp) − H
    on a second axis: on a barely trained model every curve sits near ln n and only ΔH shows the step."""
    from probes.entropy import entropy_position_figure

    fig = entropy_position_figure(profile, None, floor_scale, title=title, show_band=False)
    fig.add_trace(go.Scatter(x=profile["pos_lo"], y=profile["no_temp_mean"] - profile["mean"], yaxis="y2",
                             mode="lines", name="ΔH = H(no temp) − H (right axis)", line=dict(color=CHOSEN)))
    fig.update_layout(yaxis2=dict(title="ΔH (nats)", overlaying="y", side="right", showgrid=False, rangemode="tozero"),
                      legend=dict(orientation="h", y=-0.25))
    return fig

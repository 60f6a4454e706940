"""Attention entropy: normalisation, temperature effect, collapsed heads, position profiles, figures.

Definitions follow science.md §2.1.  For query i with n_i allowed keys and weights a_ij:
    H_i = −Σ_j a_ij ln a_ij (nats),   0 ≤ H_i ≤ ln n_i,
    normalised H_i / ln n_i (0 when n_i = 1),   KL to uniform ln n_i − H_i,
    temperature effect ΔH_i = H_i(β=1) − H_i(β=s(pos)) ≥ 0 (science §2.1: dH/dβ ≤ 0).

Array-level functions take numpy arrays; store-level functions take a run group (zarr.Group or any
mapping with `__getitem__` returning sliceable arrays and `.attrs`) holding
    attention/entropy          float32 [L, H, T]  entropy as run (temperature applied), nats
    attention/entropy_no_temp  float32 [L, H, T]  same queries at β = 1 (optional)
    attention/n_keys           int32   [L, T]     keys each query saw
    positions                  int32   [T]        position of each token in its document
and read them one layer and one token chunk at a time, so memory is O(H · chunk_tokens + bins).

Shape legend: L layers, H query heads, T tokens, B position bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probes import as_store, dask_path, token_chunks

__all__ = [
    "COLLAPSE_THRESHOLD", "COLLAPSE_MIN_KEYS", "normalized_entropy", "kl_to_uniform",
    "temperature_delta", "entropy_from_scores", "collapsed_heads", "BinAccumulator",
    "binned_stats", "linear_bin_edges", "layer_kinds", "attention_kind", "layer_head_summary",
    "position_profile", "profile_by_kind", "entropy_position_figure", "layer_head_heatmap",
]

# A head is "collapsed" when its mean normalised entropy, over queries that see at least
# COLLAPSE_MIN_KEYS keys, is below COLLAPSE_THRESHOLD: it puts ~all mass on one key everywhere.
# Ad hoc like every public threshold (science §2.2); short rows are excluded because ln n is tiny.
COLLAPSE_THRESHOLD = 0.05
COLLAPSE_MIN_KEYS = 16

STATS = ("entropy", "normalized", "kl", "delta")


# ------------------------------------------------------------------------------------ array level
def normalized_entropy(entropy, n_keys) -> np.ndarray:
    """H / ln n, broadcasting entropy [...] against n_keys [...]; 0 where n ≤ 1 (undefined there)."""
    h = np.asarray(entropy, dtype=np.float64)
    logn = np.log(np.maximum(np.asarray(n_keys, dtype=np.float64), 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(logn > 0, h / np.where(logn > 0, logn, 1.0), 0.0)


def kl_to_uniform(entropy, n_keys) -> np.ndarray:
    """KL(a ‖ uniform over n keys) = ln n − H, in nats.  entropy, n_keys: broadcastable [...]."""
    return np.log(np.maximum(np.asarray(n_keys, dtype=np.float64), 1.0)) - np.asarray(entropy)


def temperature_delta(entropy, entropy_no_temp) -> np.ndarray:
    """ΔH = H_no_temp − H_as_run; ≥ 0 wherever the temperature multiplier is ≥ 1 (science §2.1)."""
    return np.asarray(entropy_no_temp, dtype=np.float64) - np.asarray(entropy, dtype=np.float64)


def entropy_from_scores(scores, beta=1.0, axis: int = -1) -> np.ndarray:
    """Dense reference entropy of softmax(beta·scores) along `axis`; masked keys are −inf.

    Uses H = LSE(βs) − E_a[βs] (science §2.1).  scores: [..., n]; beta broadcasts against scores
    with `axis` kept (e.g. [..., 1]).  Returns [...] in nats.  For tests and teaching, not long runs.
    """
    z = np.asarray(beta, dtype=np.float64) * np.asarray(scores, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    e = np.exp(z - m)
    l_ = e.sum(axis=axis, keepdims=True)
    zc = np.where(np.isfinite(z), z - m, 0.0)
    return np.squeeze(np.log(l_) - (e * zc).sum(axis=axis, keepdims=True) / l_, axis=axis)


def collapsed_heads(normalized_mean, threshold: float = COLLAPSE_THRESHOLD) -> np.ndarray:
    """Bool flags for heads whose mean normalised entropy is below `threshold`; NaN → False."""
    x = np.asarray(normalized_mean, dtype=np.float64)
    return np.nan_to_num(x, nan=np.inf) < threshold


def linear_bin_edges(max_position: int, n_bins: int) -> np.ndarray:
    """Integer position edges [B+1] covering 0..max_position; unit bins when n_bins > max_position."""
    n_bins = max(1, min(int(n_bins), int(max_position) + 1))
    return np.unique(np.linspace(0, max_position + 1, n_bins + 1).round().astype(np.int64))


class BinAccumulator:
    """Streaming count / min / mean / max of values grouped into position bins.

    edges: increasing int [B+1]; a position p falls in bin b when edges[b] ≤ p < edges[b+1].
    Feed chunks with `update(values_T, positions_T)`; non-finite values and positions outside the
    edges are ignored.  Memory O(B).
    """

    def __init__(self, edges) -> None:
        self.edges = np.asarray(edges, dtype=np.int64)
        nb = len(self.edges) - 1
        self.count = np.zeros(nb, np.int64)
        self.sum = np.zeros(nb)
        self.min = np.full(nb, np.inf)
        self.max = np.full(nb, -np.inf)

    def update(self, values, positions) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        p = np.asarray(positions).ravel()
        b = np.searchsorted(self.edges, p, side="right") - 1
        ok = (b >= 0) & (b < len(self.count)) & np.isfinite(v)
        b, v = b[ok], v[ok]
        nb = len(self.count)
        self.count += np.bincount(b, minlength=nb)
        self.sum += np.bincount(b, weights=v, minlength=nb)
        np.minimum.at(self.min, b, v)
        np.maximum.at(self.max, b, v)

    def frame(self, prefix: str = "") -> pd.DataFrame:
        """DataFrame [B] with pos_lo, pos_hi (exclusive), count, {prefix}min/mean/max (NaN if empty)."""
        empty = self.count == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(empty, np.nan, self.sum / np.maximum(self.count, 1))
        return pd.DataFrame({
            "pos_lo": self.edges[:-1], "pos_hi": self.edges[1:], "count": self.count,
            f"{prefix}min": np.where(empty, np.nan, self.min), f"{prefix}mean": mean,
            f"{prefix}max": np.where(empty, np.nan, self.max)})


def binned_stats(values, positions, edges) -> pd.DataFrame:
    """One-shot `BinAccumulator`: values [T], positions [T], edges [B+1] -> DataFrame [B]."""
    acc = BinAccumulator(edges)
    acc.update(values, positions)
    return acc.frame()


# ------------------------------------------------------------------------------------ store level
def layer_kinds(run: Any) -> list[str]:
    """Per-layer kind labels: attrs['layer_kinds'] (e.g. 'nope-global/moe'); else derived from
    attrs['config'] by `workbench.config` (the one place the schedule is computed, STYLE rule 3);
    else 'layer' for every layer."""
    run = as_store(run)
    n_layers = run["attention/entropy"].shape[0]
    kinds = run.attrs.get("layer_kinds")
    if kinds is not None and len(kinds) == n_layers:
        return [str(k) for k in kinds]
    try:  # torch-free import; a partial or foreign config falls through to the generic label
        import warnings

        from workbench.config import Llama4TextConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            derived = Llama4TextConfig.from_hf(run.config).layer_kinds()
        if len(derived) == n_layers and run.config:
            return derived
    except Exception:
        pass
    return ["layer"] * n_layers


def attention_kind(kind: str) -> str:
    """Attention part of a layer-kind label: 'nope-global/moe' -> 'nope-global'."""
    return kind.split("/")[0]


@dask_path("entropy_dask")
def layer_head_summary(
    run: Any,
    min_keys: int = COLLAPSE_MIN_KEYS,
    threshold: float = COLLAPSE_THRESHOLD,
    chunk_tokens: int = 1 << 16,
) -> pd.DataFrame:
    """Layer × head table, one row per (layer, head), streamed one layer and token chunk at a time.

    Columns: layer, head, kind, n_tokens, entropy_mean (all tokens, nats), entropy_no_temp_mean,
    delta_mean, delta_max (ΔH = H_no_temp − H; NaN without `attention/entropy_no_temp`),
    n_long (tokens with n_keys ≥ min_keys), normalized_mean and kl_mean over those tokens, and
    collapsed = normalized_mean < threshold.
    """
    run = as_store(run)
    ent = run["attention/entropy"]
    (n_layers, n_heads, _), n_tok = ent.shape, run.n_tokens
    ent0 = run["attention/entropy_no_temp"] if "attention/entropy_no_temp" in run else None
    nk = run["attention/n_keys"]
    kinds = layer_kinds(run)
    acc = {k: np.zeros((n_layers, n_heads)) for k in ("n", "h", "h0", "d", "nl", "norm", "kl")}
    dmax = np.full((n_layers, n_heads), -np.inf)
    for layer in range(n_layers):
        for t0, t1 in token_chunks(n_tok, chunk_tokens):
            h_HT = np.asarray(ent[layer, :, t0:t1], dtype=np.float64)
            n_T = np.asarray(nk[layer, t0:t1])
            fin = np.isfinite(h_HT)
            acc["n"][layer] += fin.sum(1)
            acc["h"][layer] += np.where(fin, h_HT, 0).sum(1)
            long_HT = fin & (n_T >= min_keys)[None]
            acc["nl"][layer] += long_HT.sum(1)
            acc["norm"][layer] += np.where(long_HT, normalized_entropy(h_HT, n_T[None]), 0).sum(1)
            acc["kl"][layer] += np.where(long_HT, kl_to_uniform(h_HT, n_T[None]), 0).sum(1)
            if ent0 is not None:
                h0_HT = np.asarray(ent0[layer, :, t0:t1], dtype=np.float64)
                d_HT = temperature_delta(h_HT, h0_HT)
                okd = np.isfinite(d_HT)
                acc["h0"][layer] += np.where(okd, h0_HT, 0).sum(1)
                acc["d"][layer] += np.where(okd, d_HT, 0).sum(1)
                dmax[layer] = np.maximum(dmax[layer], np.where(okd, d_HT, -np.inf).max(1, initial=-np.inf))
    return _summary_frame(kinds, acc, dmax, ent0 is not None, threshold)


def _summary_frame(kinds, acc: dict, dmax, no_temp: bool, threshold: float) -> pd.DataFrame:
    """layer_head_summary's rows from per-(layer, head) sums [L, H] (shared with entropy_dask.py):
    n finite tokens, h/h0/d sums, nl long tokens, norm/kl sums over them; dmax = max ΔH."""
    rows = []
    n_layers, n_heads = acc["n"].shape
    for layer in range(n_layers):
        with np.errstate(invalid="ignore", divide="ignore"):
            n, nl = acc["n"][layer], acc["nl"][layer]
            norm = acc["norm"][layer] / nl
            for head in range(n_heads):
                rows.append({
                    "layer": layer, "head": head, "kind": kinds[layer], "n_tokens": int(n[head]),
                    "entropy_mean": acc["h"][layer][head] / n[head],
                    "entropy_no_temp_mean": acc["h0"][layer][head] / n[head] if no_temp else np.nan,
                    "delta_mean": acc["d"][layer][head] / n[head] if no_temp else np.nan,
                    "delta_max": dmax[layer][head] if no_temp and np.isfinite(dmax[layer][head]) else np.nan,
                    "n_long": int(nl[head]), "normalized_mean": norm[head],
                    "kl_mean": acc["kl"][layer][head] / nl[head],
                })
    df = pd.DataFrame(rows)
    df["collapsed"] = collapsed_heads(df["normalized_mean"].to_numpy(), threshold)
    return df


def _stat(stat: str, h, h0, n):
    if stat == "entropy":
        return h
    if stat == "normalized":
        return normalized_entropy(h, n)
    if stat == "kl":
        return kl_to_uniform(h, n)
    return temperature_delta(h, h0)


@dask_path("entropy_dask")
def position_profile(
    run: Any,
    layers: Sequence[int] | int,
    heads: Sequence[int] | int | None = None,
    stat: str = "entropy",
    n_bins: int = 2048,
    edges=None,
    chunk_tokens: int = 1 << 16,
) -> pd.DataFrame:
    """Binned min/mean/max over positions of a per-token value averaged over layers × heads.

    This is what an app plots for 100K-token runs: O(B) output, O(H · chunk_tokens) memory.
    layers: one layer or several (e.g. all NoPE layers); heads: None = all heads.
    stat: 'entropy' (nats), 'normalized' (H/ln n), 'kl' (ln n − H) or 'delta' (H_no_temp − H).
    edges: int [B+1] position bin edges; default `linear_bin_edges(max position, n_bins)`.
    Returns DataFrame [B]: pos_lo, pos_hi, count, min, mean, max, the same for the no-temperature
    entropy as no_temp_min/mean/max (stats other than 'delta', when stored), and log_n_mean
    (mean ln n_keys of the tokens in the bin, the uniform-attention reference for 'entropy').
    """
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    layers = [layers] if np.isscalar(layers) else list(layers)
    run = as_store(run)
    ent, nk, pos_all = run["attention/entropy"], run["attention/n_keys"], run["positions"]
    n_tok = run.n_tokens
    # read all heads of a chunk and select in numpy: zarr basic indexing takes no index lists
    hsel = slice(None) if heads is None else ([heads] if np.isscalar(heads) else list(heads))
    has0 = "attention/entropy_no_temp" in run
    if stat == "delta" and not has0:
        raise KeyError("stat='delta' needs attention/entropy_no_temp in the run")
    ent0 = run["attention/entropy_no_temp"] if has0 else None
    if edges is None:
        max_pos = max(int(np.max(pos_all[t0:t1])) for t0, t1 in token_chunks(n_tok, chunk_tokens))
        edges = linear_bin_edges(max_pos, n_bins)
    acc, acc0, acc_logn = BinAccumulator(edges), BinAccumulator(edges), BinAccumulator(edges)
    for t0, t1 in token_chunks(n_tok, chunk_tokens):
        tot = np.zeros(t1 - t0)
        tot0 = np.zeros(t1 - t0)
        logn = np.zeros(t1 - t0)
        n_heads = 0
        for layer in layers:
            h_HT = np.asarray(ent[layer, :, t0:t1], dtype=np.float64)[hsel]
            n_T = np.asarray(nk[layer, t0:t1])
            h0_HT = np.asarray(ent0[layer, :, t0:t1], dtype=np.float64)[hsel] if has0 else None
            tot += _stat(stat, h_HT, h0_HT, n_T[None]).sum(0)
            if has0 and stat != "delta":
                tot0 += _stat(stat, h0_HT, None, n_T[None]).sum(0)
            logn += np.log(np.maximum(n_T, 1))
            n_heads += h_HT.shape[0]
        p_T = np.asarray(pos_all[t0:t1])
        acc.update(tot / n_heads, p_T)
        acc0.update(tot0 / n_heads, p_T)
        acc_logn.update(logn / len(layers), p_T)
    df = acc.frame()
    if has0 and stat != "delta":
        df = df.join(acc0.frame("no_temp_").iloc[:, 3:])
    df["log_n_mean"] = acc_logn.frame()["mean"]
    df.attrs.update(stat=stat, layers=layers, heads=None if heads is None else hsel)
    return df


@dask_path("entropy_dask")
def profile_by_kind(run: Any, stat: str = "normalized", **kwargs) -> dict[str, pd.DataFrame]:
    """`position_profile` over all layers of each attention kind ('rope-chunked', 'nope-global', …).

    Comparing kinds needs stat='normalized' or 'kl' (science §2.1: chunked layers reset n).
    """
    run = as_store(run)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(layer_kinds(run)):
        groups.setdefault(attention_kind(k), []).append(i)
    return {k: position_profile(run, ls, stat=stat, **kwargs) for k, ls in groups.items()}


# ---------------------------------------------------------------------------------------- figures
_LABEL = {"entropy": "entropy (nats)", "normalized": "H / ln n", "kl": "ln n − H (nats)",
          "delta": "ΔH = H(no temp) − H (nats)"}


def _band(fig: go.Figure, x, lo, hi, name: str, color: str) -> None:
    fig.add_trace(go.Scatter(x=x, y=hi, mode="lines", line_width=0, showlegend=False,
                             hoverinfo="skip", legendgroup=name))
    fig.add_trace(go.Scatter(x=x, y=lo, mode="lines", line_width=0, fill="tonexty",
                             fillcolor=color, name=f"{name} min–max", legendgroup=name,
                             hoverinfo="skip"))


def entropy_position_figure(
    profile: pd.DataFrame,
    chunk_size: int | None = None,
    floor_scale: int | None = None,
    title: str | None = None,
    show_band: bool = True,
) -> go.Figure:
    """Entropy vs position from a `position_profile` frame: as-run mean (+ min–max band), the
    no-temperature overlay, the ln n reference (stat 'entropy'), chunk boundaries at multiples of
    `chunk_size`, and temperature steps at pos = m·floor_scale − 1 (NoPE layers)."""
    stat = profile.attrs.get("stat", "entropy")
    x = np.where(profile["pos_hi"] - profile["pos_lo"] == 1, profile["pos_lo"],
                 (profile["pos_lo"] + profile["pos_hi"] - 1) / 2)
    fig = go.Figure()
    if show_band:
        _band(fig, x, profile["min"], profile["max"], "as run", "rgba(31,119,180,0.2)")
    fig.add_trace(go.Scatter(x=x, y=profile["mean"], mode="lines", name="as run (mean)",
                             line_color="rgb(31,119,180)"))
    if "no_temp_mean" in profile:
        fig.add_trace(go.Scatter(x=x, y=profile["no_temp_mean"], mode="lines",
                                 name="no temperature (mean)", line=dict(color="rgb(255,127,14)",
                                                                         dash="dash")))
    if stat == "entropy" and "log_n_mean" in profile:
        fig.add_trace(go.Scatter(x=x, y=profile["log_n_mean"], mode="lines", name="ln n (uniform)",
                                 line=dict(color="gray", dash="dot")))
    y_top = float(np.nanmax(profile[["max", "mean"]].to_numpy())) if len(profile) else 1.0
    x_lo, x_hi = int(profile["pos_lo"].min()), int(profile["pos_hi"].max())
    for step, name, color in ((chunk_size, "chunk boundary", "black"),
                              (floor_scale, "temperature step", "red")):
        if not step:
            continue
        off = 0 if name == "chunk boundary" else -1
        xs = np.arange(step, x_hi + 1, step) + off
        xs = xs[(xs >= x_lo) & (xs < x_hi)]
        if len(xs):  # one trace with None-separated segments: cheap even for thousands of lines
            seg_x = np.column_stack([xs, xs, np.full(len(xs), np.nan)]).ravel()
            seg_y = np.tile([0.0, y_top, np.nan], len(xs))
            fig.add_trace(go.Scatter(x=seg_x, y=seg_y, mode="lines", name=name, hoverinfo="skip",
                                     line=dict(color=color, width=1, dash="dot")))
    fig.update_layout(title=title or f"{_LABEL[stat]} vs position",
                      xaxis_title="position", yaxis_title=_LABEL[stat], hovermode="x unified")
    return fig


def layer_head_heatmap(summary: pd.DataFrame, value: str = "normalized_mean") -> go.Figure:
    """Layer × head heatmap of a `layer_head_summary` column; collapsed heads marked with ✕."""
    grid = summary.pivot(index="layer", columns="head", values=value)
    kinds = summary.groupby("layer")["kind"].first().reindex(grid.index)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=grid.columns, y=grid.index,
                               colorbar_title=value, colorscale="Viridis",
                               customdata=np.repeat(kinds.to_numpy()[:, None], grid.shape[1], 1),
                               hovertemplate="layer %{y} (%{customdata}) head %{x}: %{z:.4f}"
                                             "<extra></extra>"))
    col = summary[summary["collapsed"]]
    if len(col):
        fig.add_trace(go.Scatter(x=col["head"], y=col["layer"], mode="markers", name="collapsed",
                                 marker=dict(symbol="x", color="red", size=8)))
    fig.update_layout(title=f"{value} per layer and head", xaxis_title="head",
                      yaxis_title="layer", yaxis_autorange="reversed")
    return fig

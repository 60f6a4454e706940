"""Length-dependent attention temperature: Llama 4's step function and the schemes it is compared to.

Every function is a closed form on numpy arrays (science.md §2.3, §2.4), so the reference tables can
be re-derived in tests and drawn by `temperature_figure` / `ssmax_figure`.

Conventions
-----------
- `pos` is the 0-based absolute position of the query; `n` is the number of keys it sees.
  In a causal NoPE (global) layer n = pos + 1, which is the x-axis of the §2.3 table.
- All functions return a multiplier on the attention *logits* (q·k/√d).  Llama 4 multiplies q once,
  so its multiplier is s(pos); YaRN scales both q and k by √(1/t), so its logit factor is squared.
- Logs are natural unless stated.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

__all__ = [
    "llama4_attn_scale", "first_active_position", "qwen_logn_scale", "yarn_mscale",
    "yarn_logit_factor", "ssmax_logit_scale", "softmax_max_one_outlier", "ssmax_max_one_outlier",
    "softmax_entropy_one_outlier", "adaptive_temperature_beta", "temperature_figure",
    "ssmax_figure",
]


def llama4_attn_scale(pos, floor_scale: int = 8192, attn_scale: float = 0.1) -> np.ndarray:
    """Llama 4 NoPE-layer query multiplier s(pos) = 1 + attn_scale·ln(⌊(pos+1)/floor_scale⌋ + 1).

    pos: int array-like [...] of 0-based absolute positions.  Returns float64 [...].
    Source: llama-models `models/llama4/model.py` (attn_scales), HF `modeling_llama4.py`; it equals
    YaRN's mscale 0.1·ln(s)+1 with s = ⌊n/floor_scale⌋+1, applied once and as a step (science §2.3).
    """
    pos = np.asarray(pos)
    if np.any(pos < 0):
        raise ValueError("llama4_attn_scale: positions must be >= 0")
    return 1.0 + attn_scale * np.log(np.floor((pos + 1) / floor_scale) + 1.0)


def first_active_position(floor_scale: int = 8192) -> int:
    """First 0-based position where s(pos) > 1: pos + 1 = floor_scale, i.e. 8191 for Llama 4."""
    return floor_scale - 1


def qwen_logn_scale(n, train_len: int = 8192) -> np.ndarray:
    """Qwen(-1) logn attention: log_{train_len}(n) for n > train_len, else 1.  n: keys [...] -> [...].

    Source: Qwen `modeling_qwen.py` `logn_list` (science §2.3; Qwen's own train_len is 2048).
    """
    n = np.asarray(n, dtype=np.float64)
    return np.where(n > train_len, np.log(np.maximum(n, 1.0)) / np.log(train_len), 1.0)


def yarn_mscale(s) -> np.ndarray:
    """YaRN √(1/t) = 0.1·ln(s) + 1 for extension factor s (clamped to ≥ 1).  s: [...] -> [...]."""
    s = np.maximum(np.asarray(s, dtype=np.float64), 1.0)
    return 0.1 * np.log(s) + 1.0


def yarn_logit_factor(n, train_len: int = 8192) -> np.ndarray:
    """YaRN logit multiplier (0.1·ln s + 1)² with s = n / train_len clamped ≥ 1 (YaRN §3.4).

    Squared because YaRN scales both q and k by √(1/t).  n: keys [...] -> [...].
    """
    return yarn_mscale(np.asarray(n, dtype=np.float64) / train_len) ** 2


def ssmax_logit_scale(n, s: float = 0.43) -> np.ndarray:
    """Scalable-Softmax multiplier s·ln n: softmax_i(n^{s z}) = softmax((s·ln n)·z) (arXiv 2501.19399)."""
    return s * np.log(np.asarray(n, dtype=np.float64))


def _outlier_probs(n, gap: float, beta) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over n logits, one of them `gap` above the other n−1, all multiplied by `beta`.

    Returns (p_max, p_other), each [...], computed as 1/(1+(n−1)e^{−βΔ}) without overflow.
    """
    n = np.asarray(n, dtype=np.float64)
    w = (n - 1.0) * np.exp(-np.asarray(beta, dtype=np.float64) * gap)  # total weight of the others
    p_max = 1.0 / (1.0 + w)
    p_other = np.where(n > 1, (w / np.maximum(n - 1.0, 1.0)) * p_max, 0.0)
    return p_max, p_other


def softmax_max_one_outlier(n, high: float = 3.0, low: float = -2.0) -> np.ndarray:
    """Largest softmax weight when n−1 logits are `low` and one is `high`: 1/(1+(n−1)e^{−(high−low)}).

    SSMax Fig. 1 setting (all −2 except one +3), science §2.4.
    """
    return _outlier_probs(n, high - low, 1.0)[0]


def ssmax_max_one_outlier(n, s: float = 0.43, high: float = 3.0, low: float = -2.0) -> np.ndarray:
    """Largest SSMax weight in the same setting: 1/(1+(n−1)·n^{−s(high−low)})."""
    return _outlier_probs(n, high - low, ssmax_logit_scale(n, s))[0]


def softmax_entropy_one_outlier(n, high: float = 3.0, low: float = -2.0, beta=1.0) -> np.ndarray:
    """Entropy (nats) of softmax(beta·z) with n−1 logits `low` and one `high`; → ln n as n grows.

    H = −p log p − (n−1)·q log q with p = p_max and q the weight of each other key.
    """
    p, q = _outlier_probs(n, high - low, beta)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        hq = np.where(q > 0, -(n - 1.0) * q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return -p * np.log(p) + hq


# Veličković et al. 2024 (arXiv 2410.01104) Fig. 4 JAX code, science §2.3.
_ADAPTIVE_POLY = (-0.037, 0.481, -2.3, 4.917, -1.791)


def adaptive_temperature_beta(entropy) -> np.ndarray:
    """Adaptive inverse temperature β = max(polyval(coeffs, H), 1) if H > 0.5 else 1.  H: [...] nats."""
    h = np.asarray(entropy, dtype=np.float64)
    return np.where(h > 0.5, np.maximum(np.polyval(_ADAPTIVE_POLY, h), 1.0), 1.0)


# ----------------------------------------------------------------------------------------- figures
def _key_grid(n_max: int, floor_scale: int, n_points: int = 400, max_steps: int = 4096) -> np.ndarray:
    """Key counts for plotting on a log axis: a geometric grid plus every step edge of s(pos)."""
    grid = np.unique(np.geomspace(1, n_max, n_points).round().astype(np.int64))
    edges = np.arange(floor_scale, n_max + 1, floor_scale, dtype=np.int64)
    if len(edges) > max_steps:  # too many steps to draw one by one; the geometric grid suffices
        edges = edges[np.unique(np.geomspace(1, len(edges), max_steps).astype(np.int64)) - 1]
    return np.union1d(np.union1d(grid, edges), edges - 1)


def temperature_figure(
    n_max: int = 10_000_000,
    floor_scale: int = 8192,
    attn_scale: float = 0.1,
    train_len: int = 8192,
    log_x: bool = True,
) -> go.Figure:
    """Logit multiplier vs number of keys n = pos + 1 for Llama 4, Qwen logn and YaRN (science §2.3).

    floor_scale, attn_scale: Llama 4's config keys; train_len: L_train of Qwen/YaRN.
    """
    n = _key_grid(n_max, floor_scale)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=n, y=llama4_attn_scale(n - 1, floor_scale, attn_scale), mode="lines", line_shape="hv",
        name=f"Llama 4 step (floor_scale={floor_scale}, attn_scale={attn_scale})"))
    fig.add_trace(go.Scatter(x=n, y=qwen_logn_scale(n, train_len), mode="lines",
                             name=f"Qwen logn (L={train_len})"))
    fig.add_trace(go.Scatter(x=n, y=yarn_logit_factor(n, train_len), mode="lines",
                             name=f"YaRN (0.1 ln s + 1)², s = n/{train_len}"))
    fig.add_vline(x=floor_scale, line_dash="dot", line_color="gray")
    # plotly places annotations on a log axis at 10**x (shapes take data units), so the label's x is log10
    fig.add_annotation(x=float(np.log10(floor_scale)) if log_x else floor_scale, y=1, yref="paper",
                       text=f"pos = {first_active_position(floor_scale)}", showarrow=False, yanchor="bottom")
    fig.update_layout(title="Length-dependent logit multiplier",
                      xaxis_title="keys n = pos + 1", yaxis_title="multiplier on q·k/√d",
                      xaxis_type="log" if log_x else "linear", hovermode="x unified")
    return fig


def ssmax_figure(n_max: int = 2**20, s: float = 0.43, high: float = 3.0, low: float = -2.0) -> go.Figure:
    """SSMax Fig. 1: max attention weight and softmax entropy vs input size (science §2.4)."""
    n = np.unique(np.geomspace(2, n_max, 200).round())
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=n, y=softmax_max_one_outlier(n, high, low), name="softmax max"))
    fig.add_trace(go.Scatter(x=n, y=ssmax_max_one_outlier(n, s, high, low), name=f"SSMax max (s={s})"))
    fig.add_trace(go.Scatter(x=n, y=softmax_entropy_one_outlier(n, high, low), yaxis="y2",
                             name="softmax entropy (nats)", line_dash="dash"))
    fig.add_trace(go.Scatter(x=n, y=np.log(n), yaxis="y2", name="ln n", line_dash="dot",
                             line_color="gray"))
    fig.update_layout(title=f"Attention fading: one logit {high:+g}, the rest {low:+g}",
                      xaxis=dict(title="input size n", type="log"),
                      yaxis=dict(title="max weight", range=[0, 1.05]),
                      yaxis2=dict(title="entropy (nats)", overlaying="y", side="right"))
    return fig

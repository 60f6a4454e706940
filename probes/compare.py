"""Two recordings side by side: run A vs run B, or one document against another (issue 18 §1).

A *span* is a token range of a run: the whole run, or one document.  Two spans holding the same token
sequence are **aligned** and compare token by token (which expert differs, where two expert paths
split, ΔH per token); spans of different sequences compare as distributions (expert load, entropy per
layer × head, profiles vs position).  Everything streams over token chunks, so memory is bounded by
the chunk, not the run.

Conventions: differences are B − A.  A token's expert *differs* at a MoE layer when its top-k expert
set differs (for top-1 routing: its expert); `first_split` is the position on the MoE-layer axis of
the first layer where the two paths differ (-1 when they never do).

Shape legend: M MoE layers, L layers, H heads, T tokens, K top-k, E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from probes import StoreView, as_store, token_chunks
from probes.entropy import layer_kinds

__all__ = ["Span", "span", "aligned", "routing_difference", "divergence_strip", "load_difference",
           "transition_pair", "entropy_difference", "delta_h_window", "kl_per_token", "span_profile", "CHUNK"]

CHUNK = 1 << 16


@dataclass
class Span:
    """Token range [t0, t1) of a run (a StoreView)."""

    run: StoreView
    t0: int
    t1: int
    label: str = ""

    @property
    def n(self) -> int:
        return self.t1 - self.t0

    def chunks(self, size: int = CHUNK):
        for a, b in token_chunks(self.n, size):
            yield self.t0 + a, self.t0 + b

    def read(self, name: str, sl: tuple = ()) -> np.ndarray:
        return np.asarray(self.run[name][sl])


def span(run: Any, doc: int | None = None, label: str = "") -> Span:
    """The whole committed run (doc=None) or document `doc` of it."""
    run = as_store(run)
    if doc is None:
        return Span(run, 0, run.n_tokens, label)
    n_docs = run.n_docs
    if not 0 <= int(doc) < n_docs:
        raise IndexError(f"document {doc} out of range for a run of {n_docs} documents")
    off = np.asarray(run["doc_offsets"][int(doc):int(doc) + 2], dtype=np.int64)
    return Span(run, int(off[0]), int(off[1]), label)


def aligned(a: Span, b: Span) -> bool:
    """True when both spans hold the same token sequence (then they compare token by token)."""
    if a.n != b.n:
        return False
    for (a0, a1), (b0, b1) in zip(a.chunks(), b.chunks()):
        if not np.array_equal(a.read("tokens", (slice(a0, a1),)), b.read("tokens", (slice(b0, b1),))):
            return False
    return True


def _need_aligned(a: Span, b: Span) -> None:
    if not aligned(a, b):
        raise ValueError(f"spans hold different token sequences ({a.n} vs {b.n} tokens): token-by-token "
                         "comparison needs the same inputs; compare distributions instead")


def _router_shapes(a: Span, b: Span) -> tuple[int, int]:
    xa, xb = a.run["router/experts"], b.run["router/experts"]
    if xa.shape[0] != xb.shape[0]:
        raise ValueError(f"runs have different numbers of MoE layers: {xa.shape[0]} vs {xb.shape[0]}")
    return xa.shape[0], xa.shape[2]


def _set_differs(xa_MtK: np.ndarray, xb_MtK: np.ndarray) -> np.ndarray:
    """bool [M, t]: the top-k expert sets differ (experts are distinct within a row)."""
    if xa_MtK.shape[-1] != xb_MtK.shape[-1]:
        return np.ones(xa_MtK.shape[:2], bool)       # different top-k: the sets cannot be equal
    same = (xa_MtK[..., :, None] == xb_MtK[..., None, :]).any(-1).all(-1)
    return ~same


def routing_difference(a: Span, b: Span) -> pd.DataFrame:
    """Per MoE layer, over aligned spans: share of tokens whose expert set differs, whose first choice
    differs, and the OLMoE saturation (1/N) Σ |E_i ∩ E_i'| / k (`probes.routing.router_agreement`).

    Columns: moe_layer, layer, n_tokens, share_differs, share_top1_differs, saturation."""
    _need_aligned(a, b)
    m, k = _router_shapes(a, b)
    kb = b.run["router/experts"].shape[2]
    differs, top1, inter = np.zeros(m), np.zeros(m), np.zeros(m)
    for (a0, a1), (b0, b1) in zip(a.chunks(), b.chunks()):
        xa = a.read("router/experts", (slice(None), slice(a0, a1)))        # (M, t, K)
        xb = b.read("router/experts", (slice(None), slice(b0, b1)))
        differs += _set_differs(xa, xb).sum(1)
        top1 += (xa[..., 0] != xb[..., 0]).sum(1)
        inter += (xa[..., :, None] == xb[..., None, :]).any(-1).sum((1, 2))
    n = max(a.n, 1)
    li = _layer_index(a.run, m)
    return pd.DataFrame({"moe_layer": np.arange(m), "layer": li, "n_tokens": a.n, "share_differs": differs / n,
                         "share_top1_differs": top1 / n, "saturation": inter / (n * max(k, kb))})


def _layer_index(run: StoreView, m: int) -> list[int]:
    if "router/layer_index" in run:
        return np.asarray(run["router/layer_index"][:m]).tolist()
    return list(run.layout.get("moe_layer_index") or range(m))


def divergence_strip(a: Span, b: Span, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    """Token window [start, stop) of aligned spans (offsets inside the spans): differs [M, t] (expert
    set differs), first_split [t] (MoE-layer position of the first difference, -1 = same path),
    experts_a / experts_b [M, t] (first choice), tokens [t], layer_index [M]."""
    _need_aligned(a, b)
    m, _ = _router_shapes(a, b)
    stop = a.n if stop is None else min(int(stop), a.n)
    start = max(0, min(int(start), stop))
    xa = a.read("router/experts", (slice(None), slice(a.t0 + start, a.t0 + stop)))
    xb = b.read("router/experts", (slice(None), slice(b.t0 + start, b.t0 + stop)))
    d = _set_differs(xa, xb)
    first = np.where(d.any(0), d.argmax(0), -1)
    return {"differs": d, "first_split": first, "experts_a": xa[..., 0], "experts_b": xb[..., 0],
            "tokens": a.read("tokens", (slice(a.t0 + start, a.t0 + stop),)),
            "layer_index": np.asarray(_layer_index(a.run, m))}


def _loads(s: Span, n_experts: int) -> np.ndarray:
    x = s.run["router/experts"]
    m = x.shape[0]
    out = np.zeros((m, n_experts), np.int64)
    for t0, t1 in s.chunks():
        v = np.asarray(x[:, t0:t1], dtype=np.int64)
        out += np.bincount((np.arange(m)[:, None, None] * n_experts + v).ravel(),
                           minlength=m * n_experts).reshape(m, n_experts)
    return out


def _n_experts(run: StoreView) -> int:
    from probes.routing import router_info

    return router_info(run)["n_experts"]


def load_difference(a: Span, b: Span) -> dict[str, np.ndarray]:
    """Expert load per MoE layer as fractions of each span's assignments: load_a, load_b [M, E] and
    diff = load_b − load_a (aligned or not), plus the raw counts."""
    _router_shapes(a, b)
    e = max(_n_experts(a.run), _n_experts(b.run))
    ca, cb = _loads(a, e), _loads(b, e)
    fa = ca / np.maximum(ca.sum(1, keepdims=True), 1)
    fb = cb / np.maximum(cb.sum(1, keepdims=True), 1)
    return {"load_a": fa, "load_b": fb, "diff": fb - fa, "counts_a": ca, "counts_b": cb}


def transition_pair(a: Span, b: Span, moe_a: int, moe_b: int) -> tuple[np.ndarray, np.ndarray]:
    """First-choice transition counts [E, E] from MoE-layer position moe_a to moe_b, in each span
    (equal to `probes.routing.transition_matrix` on whole runs)."""
    from probes.routing import transition_counts

    e = max(_n_experts(a.run), _n_experts(b.run))
    out = []
    for s in (a, b):
        x = s.run["router/experts"]
        c = np.zeros((e, e), np.int64)
        for t0, t1 in s.chunks():
            c += transition_counts(x[moe_a, t0:t1, 0], x[moe_b, t0:t1, 0], e)
        out.append(c)
    return out[0], out[1]


def _entropy_means(s: Span) -> tuple[np.ndarray, np.ndarray]:
    """Mean entropy [L, H] over the span (NaN-skipping) and the mean ΔH_temp [L, H] (NaN without it)."""
    ent = s.run["attention/entropy"]
    n_layers, n_heads, _ = ent.shape
    has0 = "attention/entropy_no_temp" in s.run
    tot, cnt, dt = np.zeros((n_layers, n_heads)), np.zeros((n_layers, n_heads)), np.zeros((n_layers, n_heads))
    for layer in range(n_layers):
        for t0, t1 in s.chunks():
            h = np.asarray(ent[layer, :, t0:t1], dtype=np.float64)
            fin = np.isfinite(h)
            tot[layer] += np.where(fin, h, 0).sum(1)
            cnt[layer] += fin.sum(1)
            if has0:
                h0 = np.asarray(s.run["attention/entropy_no_temp"][layer, :, t0:t1], dtype=np.float64)
                d = h0 - h
                dt[layer] += np.where(np.isfinite(d), d, 0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tot / cnt, (dt / cnt if has0 else np.full_like(tot, np.nan))


def entropy_difference(a: Span, b: Span) -> pd.DataFrame:
    """Per (layer, head): mean entropy of each span (nats, as run) and delta = B − A.  For aligned spans
    mean_abs_delta is the mean over tokens of |H_B − H_A| (a per-token measure; NaN when not aligned).
    Aligned spans are read in one pass (each chunk of A and B once).

    Columns: layer, head, kind, entropy_a, entropy_b, delta, mean_abs_delta."""
    ea, eb = a.run["attention/entropy"], b.run["attention/entropy"]
    if ea.shape[:2] != eb.shape[:2]:
        raise ValueError(f"runs differ in (layers, heads): {ea.shape[:2]} vs {eb.shape[:2]}")
    n_layers, n_heads = ea.shape[:2]
    if aligned(a, b) and a.n:
        sa, sb, ca, cb, acc = (np.zeros((n_layers, n_heads)) for _ in range(5))
        for layer in range(n_layers):
            for (a0, a1), (b0, b1) in zip(a.chunks(), b.chunks()):
                ha = np.asarray(ea[layer, :, a0:a1], np.float64)
                hb = np.asarray(eb[layer, :, b0:b1], np.float64)
                fa, fb = np.isfinite(ha), np.isfinite(hb)
                sa[layer] += np.where(fa, ha, 0).sum(1)
                sb[layer] += np.where(fb, hb, 0).sum(1)
                ca[layer] += fa.sum(1)
                cb[layer] += fb.sum(1)
                acc[layer] += np.nansum(np.abs(hb - ha), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ma, mb = sa / ca, sb / cb
        mad = acc / a.n
    else:
        (ma, _), (mb, _) = _entropy_means(a), _entropy_means(b)
        mad = np.full((n_layers, n_heads), np.nan)
    kinds = layer_kinds(a.run)
    ll, hh = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    return pd.DataFrame({"layer": ll.ravel(), "head": hh.ravel(), "kind": np.array(kinds, object)[ll.ravel()],
                         "entropy_a": ma.ravel(), "entropy_b": mb.ravel(), "delta": (mb - ma).ravel(),
                         "mean_abs_delta": mad.ravel()})


def delta_h_window(a: Span, b: Span, start: int = 0, stop: int | None = None,
                   head: int | None = None) -> np.ndarray:
    """Per-token ΔH = H_B − H_A [L, t] over a window of aligned spans, averaged over heads (or one head)."""
    _need_aligned(a, b)
    stop = a.n if stop is None else min(int(stop), a.n)
    start = max(0, min(int(start), stop))
    hsel = slice(None) if head is None else slice(int(head), int(head) + 1)
    ha = np.asarray(a.run["attention/entropy"][:, hsel, a.t0 + start:a.t0 + stop], np.float64)
    hb = np.asarray(b.run["attention/entropy"][:, hsel, b.t0 + start:b.t0 + stop], np.float64)
    return (hb - ha).mean(1)


def kl_per_token(logits_a_TV, logits_b_TV) -> np.ndarray:
    """KL(P_A ‖ P_B) per token between the next-token distributions softmax(logits), in nats (float64)."""
    la, lb = np.asarray(logits_a_TV, np.float64), np.asarray(logits_b_TV, np.float64)
    if la.shape != lb.shape:
        raise ValueError(f"logits differ in shape: {la.shape} vs {lb.shape}")
    lpa = la - la.max(-1, keepdims=True)
    lpa -= np.log(np.exp(lpa).sum(-1, keepdims=True))
    lpb = lb - lb.max(-1, keepdims=True)
    lpb -= np.log(np.exp(lpb).sum(-1, keepdims=True))
    return (np.exp(lpa) * (lpa - lpb)).sum(-1)


def span_profile(s: Span, layers, head: int | None = None, n_bins: int = 512, max_position: int | None = None):
    """Binned (min/mean/max) entropy vs position over a span, averaged over `layers` and heads (or
    one head): the `probes.entropy.position_profile` frame for a span, so two spans share one axis
    when given the same `max_position`."""
    from probes.entropy import BinAccumulator, linear_bin_edges

    layers = [int(layers)] if np.isscalar(layers) else [int(x) for x in layers]
    hsel = slice(None) if head is None else slice(int(head), int(head) + 1)
    ent, pos = s.run["attention/entropy"], s.run["positions"]
    if max_position is None:
        max_position = max([int(np.max(pos[t0:t1])) for t0, t1 in s.chunks()] or [0])
    acc = BinAccumulator(linear_bin_edges(max_position, n_bins))
    for t0, t1 in s.chunks():
        h = np.stack([np.asarray(ent[layer, hsel, t0:t1], np.float64).mean(0) for layer in layers]).mean(0)
        acc.update(h, np.asarray(pos[t0:t1]))
    df = acc.frame()
    df.attrs.update(stat="entropy", layers=layers)
    return df

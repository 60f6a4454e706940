"""MoE routing metrics: load balance, OLMoE specialization and saturation, Mixtral consecutive-token
repeats, cross-layer transitions (science.md §1).  Figures live in `probes/routing_figures.py`.

Array-level functions take numpy arrays; store-level wrappers take a run group holding
    router/experts      int16   [M, T, K]  chosen experts, slot 0 = highest router score
    router/weights      float32 [M, T, K]  gate values (Llama 4: sigmoid of the chosen logit)
    router/logits       float32 [M, T, E]  raw router logits (optional)
    router/layer_index  int32   [M]        model layer of each MoE layer
    tokens int32 [T], doc_offsets int64 [n_docs+1], doc_domain str [n_docs]
and stream over token chunks with np.bincount, so memory is O(M · chunk · K + M · E²).

Shape legend: M MoE layers, T tokens, K experts per token (top-k), E experts, D domains,
U distinct token ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from probes import StoreView, as_store, dask_path, token_chunks

__all__ = [
    "expert_load", "load_entropy", "max_violation", "coefficient_of_variation", "router_probs",
    "switch_balance", "hf_load_balancing_loss", "domain_specialization",
    "VocabSpecialization", "vocabulary_specialization", "vocabulary_specialization_from_counts",
    "router_saturation", "transition_counts", "row_normalize", "mutual_information",
    "normalized_mutual_information", "TOP1_COACTIVATION_MESSAGE", "coactivation",
    "consecutive_same_expert", "consecutive_baselines", "router_info", "expert_loads",
    "load_table", "domain_specialization_table", "vocabulary_specialization_table",
    "consecutive_rates", "transition_matrix", "layer_transitions", "router_agreement",
    "expert_grid",
]

CHUNK_ELEMENTS = 1 << 22  # when all M layers are read at once: M·t·K ≤ 4M ids (32 MB as int64)


def _chunk_len(chunk_tokens: int | None, per_token: int) -> int:
    """Tokens per chunk: the caller's choice, else bounded so that chunk·per_token ≤ CHUNK_ELEMENTS."""
    return chunk_tokens if chunk_tokens else max(1024, CHUNK_ELEMENTS // max(per_token, 1))


# ------------------------------------------------------------------------------------ load balance
def expert_load(experts_TK, n_experts: int) -> np.ndarray:
    """f_E: fraction of all (token, slot) assignments that went to each expert (sums to 1)."""
    c = np.bincount(np.asarray(experts_TK).ravel(), minlength=n_experts).astype(np.float64)
    return c / max(c.sum(), 1.0)


def load_entropy(f_E) -> float:
    """Normalised load entropy H(f)/ln E: 1 = uniform, 0 = all tokens on one expert."""
    f = np.asarray(f_E, dtype=np.float64)
    nz = f[f > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(len(f))) if len(f) > 1 else 0.0


def max_violation(f_E) -> float:
    """MaxVio = max_i f_i / mean(f) − 1 (Wang et al. 2024, arXiv 2408.15664)."""
    f = np.asarray(f_E, dtype=np.float64)
    return float(f.max() / f.mean() - 1.0)


def coefficient_of_variation(f_E) -> float:
    """CV = std(f)/mean(f), population std."""
    f = np.asarray(f_E, dtype=np.float64)
    return float(f.std() / f.mean())


def router_probs(logits_TE, convention: str = "softmax") -> np.ndarray:
    """Per-token router distribution P_TE from raw logits.

    Llama 4's router outputs no distribution (top-1 sigmoid, science §0), so a convention is needed:
    'softmax' (HF `load_balancing_loss_func`, the default here) or 'sigmoid' = DeepSeek-V3 style
    normalised sigmoid σ(r_i)/Σ_j σ(r_j).
    """
    r = np.asarray(logits_TE)
    r = r.astype(np.result_type(r.dtype, np.float32), copy=False)  # float32 stays float32 (speed)
    if convention == "softmax":
        e = np.exp(r - r.max(-1, keepdims=True))
    elif convention == "sigmoid":
        e = 0.5 * (1.0 + np.tanh(0.5 * r))  # σ(r) without overflow
    else:
        raise ValueError(f"convention must be 'softmax' or 'sigmoid', got {convention!r}")
    return e / e.sum(-1, keepdims=True)


def switch_balance(f_E, P_E) -> float:
    """Switch-style balance E·Σ_i f_i P_i (Fedus et al. 2021 Eq. 4–6 without α).

    f_E: load fractions summing to 1 (`expert_load`); P_E: mean router probability per expert.
    1 under uniform routing, E when everything collapses onto one expert.
    """
    f, p = np.asarray(f_E, dtype=np.float64), np.asarray(P_E, dtype=np.float64)
    return float(len(f) * (f * p).sum())


def hf_load_balancing_loss(experts_TK, logits_TE) -> float:
    """HF `load_balancing_loss_func` (no coefficient): E·Σ_{k,e} f_{k,e}·P_e with softmax P.

    f_{k,e} = fraction of tokens whose slot k is e.  Equals K (not 1) under uniform routing.
    """
    x = np.asarray(experts_TK)
    n_exp = np.asarray(logits_TE).shape[-1]
    p = router_probs(logits_TE).mean(0)
    f_KE = np.stack([np.bincount(x[:, k], minlength=n_exp) for k in range(x.shape[1])]) / len(x)
    return float(n_exp * (f_KE * p[None]).sum())


# ------------------------------------------------------------------------------ OLMoE (§1.1)
def domain_specialization(counts: Mapping, n_tokens: int | None = None,
                          top_k: int | None = None) -> dict[int, float]:
    """OLMoE Eq. 7: DomSpec(E_i, D) = N^{(k)}_{E_i,D} / N_D.

    counts: expert id (int or str) -> number of (token, top-k slot) assignments in one domain and
    layer.  A token never picks an expert twice, so that is the number of domain tokens having the
    expert among its top-k.  n_tokens: N_D; when None it is Σ counts / top_k (the official notebook's
    `count/total_count*k`).  Returns expert id -> fraction in [0, 1]; the uniform value is k/E.
    """
    c = {int(e): int(v) for e, v in counts.items()}
    total = sum(c.values())
    if n_tokens is None:
        if not top_k:
            raise ValueError("domain_specialization: give n_tokens or top_k")
        n_tokens = total / top_k
    if top_k is not None and total > n_tokens * top_k:
        raise ValueError(f"counts sum to {total} > n_tokens·top_k = {n_tokens}·{top_k}: "
                         "wrong n_tokens or top_k")
    if c and max(c.values()) > n_tokens:
        raise ValueError(f"an expert has {max(c.values())} assignments > n_tokens = {n_tokens}")
    return {e: v / n_tokens for e, v in sorted(c.items())}


@dataclass
class VocabSpecialization:
    """OLMoE Eq. 8 summary.  mean: unweighted mean over token ids with N_x ≥ min_count of
    max_e N^{(k)}_{x,e}/N_x; per_token: token_id, n, expert (argmax), specialization."""

    mean: float
    n_token_ids: int
    per_token: pd.DataFrame


def vocabulary_specialization_from_counts(counts_UE, n_U, token_ids_U=None,
                                          min_count: int = 10) -> VocabSpecialization:
    """counts_UE[x, e] = occurrences of token x with e among its top-k; n_U[x] = N_x occurrences."""
    counts, n = np.asarray(counts_UE), np.asarray(n_U)
    ids = np.arange(len(n)) if token_ids_U is None else np.asarray(token_ids_U)
    keep = n >= min_count
    best = counts[keep].argmax(1)
    spec = counts[keep].max(1) / n[keep]
    df = pd.DataFrame({"token_id": ids[keep], "n": n[keep], "expert": best, "specialization": spec})
    return VocabSpecialization(float(spec.mean()) if len(spec) else float("nan"), int(keep.sum()), df)


def vocabulary_specialization(token_ids_T, experts_TK, n_experts: int,
                              min_count: int = 10) -> VocabSpecialization:
    """OLMoE Eq. 8 per token id: max_e N^{(k)}_{x,e}/N_x, then the unweighted mean over ids with
    N_x ≥ min_count (science §1.1; random baseline k/E).  This equals the official
    `max_e count(e)/(len/topk)`.  For the next-token variant pass token_ids_T = the token *after*
    each routed token (same document only; the store wrapper does this).
    """
    x = np.asarray(token_ids_T).ravel()
    e = np.asarray(experts_TK).reshape(len(x), -1)
    uniq, dense = np.unique(x, return_inverse=True)
    counts = np.bincount((dense[:, None] * n_experts + e).ravel(), minlength=len(uniq) * n_experts)
    return vocabulary_specialization_from_counts(counts.reshape(len(uniq), n_experts),
                                                 np.bincount(dense, minlength=len(uniq)), uniq,
                                                 min_count)


def router_saturation(experts_a_TK, experts_b_TK) -> float:
    """OLMoE Eq. 5: Sat = (1/N) Σ_i |E_i ∩ E_i'| / k between two routings of the same tokens
    (checkpoint vs final, base vs instruct).  For k = 1 it is the top-1 agreement rate."""
    a, b = np.asarray(experts_a_TK), np.asarray(experts_b_TK)
    if a.shape != b.shape:
        raise ValueError(f"routings differ in shape: {a.shape} vs {b.shape}")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = (a[:, :, None] == b[:, None, :]).any(2).sum(1)  # experts are distinct within a row
    return float(inter.mean() / a.shape[1])


# ------------------------------------------------------------------- transitions and co-activation
def transition_counts(src_T, dst_T, n_src: int, n_dst: int | None = None) -> np.ndarray:
    """C[i, j] = number of tokens routed to expert i in one layer and j in another.  -> [E, E]."""
    n_dst = n_src if n_dst is None else n_dst
    code = np.asarray(src_T, dtype=np.int64).ravel() * n_dst + np.asarray(dst_T).ravel()
    return np.bincount(code, minlength=n_src * n_dst).reshape(n_src, n_dst)


def row_normalize(counts) -> np.ndarray:
    """P(dst | src): rows divided by their sums; all-zero rows stay zero."""
    c = np.asarray(counts, dtype=np.float64)
    s = c.sum(1, keepdims=True)
    return np.divide(c, s, out=np.zeros_like(c), where=s > 0)


def _entropy(p) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information(counts) -> float:
    """I(A; B) in nats from a joint count table [E_a, E_b]."""
    c = np.asarray(counts, dtype=np.float64)
    p = c / c.sum()
    return _entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p.ravel())


def normalized_mutual_information(counts, average: str = "arithmetic") -> float:
    """NMI = I / mean(H(A), H(B)) with mean 'arithmetic' (sklearn's default), 'geometric', 'min' or
    'max'.  1 when one layer's choice determines the other's, 0 when independent; 1 when both
    layers use a single expert (sklearn convention)."""
    c = np.asarray(counts, dtype=np.float64)
    p = c / c.sum()
    ha, hb = _entropy(p.sum(1)), _entropy(p.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    denom = {"arithmetic": (ha + hb) / 2, "geometric": math.sqrt(ha * hb), "min": min(ha, hb),
             "max": max(ha, hb)}[average]
    return float(mutual_information(c) / denom) if denom > 0 else 0.0


TOP1_COACTIVATION_MESSAGE = (
    "Within-layer co-activation is identically zero for top-1 routing (Llama 4 routes each token to "
    "one routed expert plus the always-on shared expert): there is no second expert to co-activate. "
    "Use cross-layer co-occurrence instead: transition_counts / layer_transitions (science §1.3).")


def slot_pairs(k: int, pairs: str = "all") -> list[tuple[int, int]]:
    """The ordered (slot, slot) pairs co-activation counts over top-k slots: 'all' = every ordered pair,
    'rank_adjacent' = (s, s+1) in both directions (OLMoE's `do_correlation_analysis`)."""
    if pairs == "all":
        return [(a, b) for a in range(k) for b in range(k) if a != b]
    if pairs == "rank_adjacent":
        return [(a, a + 1) for a in range(k - 1)] + [(a + 1, a) for a in range(k - 1)]
    raise ValueError(f"pairs must be 'all' or 'rank_adjacent', got {pairs!r}")


def coactivation(experts_TK, n_experts: int, pairs: str = "all") -> np.ndarray:
    """OLMoE Eq. 6: CoAct[i, j] = N_{E_i,E_j} / N_{E_i} (row i: how often j fires when i fires).

    pairs='all' counts all K(K−1) ordered pairs per token; 'rank_adjacent' counts only slots (s, s+1)
    in both directions, as the official `do_correlation_analysis` does (`pairwise` over experts
    sorted by logit), which gives smaller values (science §1.1 caveat).  Raises ValueError for
    K = 1, where the quantity is identically zero (TOP1_COACTIVATION_MESSAGE).  -> [E, E].
    """
    x = np.asarray(experts_TK)
    x = x.reshape(len(x), -1)
    if x.shape[1] < 2:
        raise ValueError(TOP1_COACTIVATION_MESSAGE)
    joint = sum(transition_counts(x[:, a], x[:, b], n_experts) for a, b in slot_pairs(x.shape[1], pairs))
    n_i = np.bincount(x.ravel(), minlength=n_experts).astype(np.float64)
    return np.divide(joint, n_i[:, None], out=np.zeros(joint.shape), where=n_i[:, None] > 0)


# -------------------------------------------------------------------- Mixtral Table 5 (§1.2)
def _pair_hits(prev_TK: np.ndarray, next_TK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first-choice equal, any top-k overlap) per consecutive pair -> bool [T], bool [T]."""
    first = prev_TK[:, 0] == next_TK[:, 0]
    anyo = (prev_TK[:, :, None] == next_TK[:, None, :]).any((1, 2))
    return first, anyo


def consecutive_same_expert(experts_TK, doc_offsets=None) -> dict[str, float]:
    """Mixtral Table 5: share of consecutive token pairs (i, i+1) in the same document with
    top1(i) = top1(i+1) ('first_choice') and with overlapping top-k sets ('any_overlap', the
    'first or second' column for k = 2; NaN for k = 1).  Pairs across document boundaries are
    excluded.  doc_offsets: [n_docs+1] token offsets; None = one document."""
    x = np.asarray(experts_TK)
    x = x.reshape(len(x), -1)
    valid = np.ones(max(len(x) - 1, 0), bool)
    if doc_offsets is not None:
        starts = np.asarray(doc_offsets)[1:-1]
        starts = starts[(starts > 0) & (starts < len(x))]
        valid[starts - 1] = False  # pair (s-1, s) crosses into the document starting at s
    first, anyo = _pair_hits(x[:-1], x[1:])
    n = int(valid.sum())
    return {"first_choice": float(first[valid].mean()) if n else float("nan"),
            "any_overlap": float(anyo[valid].mean()) if n and x.shape[1] > 1 else float("nan"),
            "n_pairs": n}


def consecutive_baselines(n_experts: int, top_k: int) -> dict[str, float]:
    """Random-routing baselines: first choice 1/E; any overlap of two independent top-k sets
    1 − C(E−k, k)/C(E, k) (46.43 % for top-2 of 8; science §1.2)."""
    e, k = n_experts, top_k
    return {"first_choice": 1.0 / e, "any_overlap": 1.0 - math.comb(e - k, k) / math.comb(e, k)}


# ------------------------------------------------------------------------------------ store level
def router_info(run: Any) -> dict[str, Any]:
    """n_moe_layers, n_tokens (committed), top_k, n_experts and layer_index (model layer of each
    MoE layer).  n_experts: attrs layout, else config `num_local_experts`, else the logits' width,
    else max expert id + 1."""
    run = as_store(run)
    m, _, k = run["router/experts"].shape
    t = run.n_tokens
    e = run.layout.get("n_experts") or run.config.get("num_local_experts")
    if e is None and "router/logits" in run:
        e = run["router/logits"].shape[-1]
    if e is None:
        e = 1 + max(int(np.max(run["router/experts"][:, t0:t1])) for t0, t1 in token_chunks(t, _chunk_len(None, m * k)))
    if "router/layer_index" in run:
        li = np.asarray(run["router/layer_index"][:m]).tolist()
    else:
        li = list(run.layout.get("moe_layer_index") or range(m))
    return {"n_moe_layers": m, "n_tokens": t, "top_k": k, "n_experts": int(e), "layer_index": li}


def _docs(run: StoreView) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(doc_offsets [n_docs+1], domain names [D], domain code per doc [n_docs]); '' -> 'unknown'."""
    n_docs = run.n_docs
    if "doc_offsets" in run:
        off = np.asarray(run["doc_offsets"][: n_docs + 1], dtype=np.int64)
    else:
        off = np.array([0, run.n_tokens])
    if "doc_domain" in run:
        names = [str(s) or "unknown" for s in run["doc_domain"][: len(off) - 1]]
    else:
        names = ["all"] * (len(off) - 1)
    domains = sorted(set(names))
    return off, domains, np.array([domains.index(s) for s in names], dtype=np.int64)


def _doc_of(off: np.ndarray, t0: int, t1: int) -> np.ndarray:
    return np.searchsorted(off, np.arange(t0, t1), side="right") - 1


@dask_path("routing_dask")
def expert_loads(run: Any, chunk_tokens: int | None = None) -> np.ndarray:
    """Assignment counts per MoE layer and expert -> int64 [M, E]."""
    run = as_store(run)
    info = router_info(run)
    m, e = info["n_moe_layers"], info["n_experts"]
    ex = run["router/experts"]
    out = np.zeros((m, e), np.int64)
    for t0, t1 in token_chunks(info["n_tokens"], _chunk_len(chunk_tokens, m * info["top_k"])):
        x = np.asarray(ex[:, t0:t1], dtype=np.int64)  # (M, t, K)
        out += np.bincount((np.arange(m)[:, None, None] * e + x).ravel(), minlength=m * e).reshape(m, e)
    return out


@dask_path("routing_dask")
def load_table(run: Any, convention: str = "softmax", chunk_tokens: int | None = None) -> pd.DataFrame:
    """Per-MoE-layer load metrics: moe_layer, layer, n_tokens, top_k, n_experts, max_load, min_load,
    dead_experts, load_entropy (H(f)/ln E), max_vio, cv, and with router/logits also switch_balance
    (E·Σ f·P, P = mean `router_probs(convention)`), hf_aux_loss (softmax, = K at uniform) and
    convention."""
    run = as_store(run)
    info = router_info(run)
    m, e, k = info["n_moe_layers"], info["n_experts"], info["top_k"]
    counts = expert_loads(run, chunk_tokens)
    has_logits = "router/logits" in run
    if has_logits:  # mean router probabilities (convention, and softmax for HF), streamed
        lg, ex, n = run["router/logits"], run["router/experts"], info["n_tokens"]
        p_conv, p_soft, slot = np.zeros((m, e)), np.zeros((m, e)), np.zeros((m, k, e))
        for layer in range(m):
            for t0, t1 in token_chunks(n, _chunk_len(chunk_tokens, e)):
                r = np.asarray(lg[layer, t0:t1])
                p_conv[layer] += router_probs(r, convention).sum(0, dtype=np.float64)
                if convention != "softmax":
                    p_soft[layer] += router_probs(r).sum(0, dtype=np.float64)
                x = np.asarray(ex[layer, t0:t1], dtype=np.int64)
                for s in range(k):
                    slot[layer, s] += np.bincount(x[:, s], minlength=e)
        p_conv, slot = p_conv / n, slot / n
        p_soft = p_conv if convention == "softmax" else p_soft / n
    return _load_frame(info, counts, *((p_conv, p_soft, slot) if has_logits else (None, None, None)),
                       convention)


def _load_frame(info: dict, counts, p_conv, p_soft, slot, convention: str) -> pd.DataFrame:
    """load_table's rows from assignment counts [M, E] and, with logits, mean probabilities [M, E]
    (convention, softmax) and slot loads [M, K, E] (shared with probes/routing_dask.py)."""
    m, e, k = info["n_moe_layers"], info["n_experts"], info["top_k"]
    has_logits = p_conv is not None
    rows = []
    for layer in range(m):
        f = counts[layer] / max(counts[layer].sum(), 1)
        row = {"moe_layer": layer, "layer": info["layer_index"][layer], "n_tokens": info["n_tokens"],
               "top_k": k, "n_experts": e, "max_load": f.max(), "min_load": f.min(),
               "dead_experts": int((counts[layer] == 0).sum()), "load_entropy": load_entropy(f),
               "max_vio": max_violation(f), "cv": coefficient_of_variation(f)}
        if has_logits:
            row.update(switch_balance=switch_balance(f, p_conv[layer]),
                       hf_aux_loss=float(e * (slot[layer] * p_soft[layer][None]).sum()),
                       convention=convention)
        rows.append(row)
    return pd.DataFrame(rows)


@dask_path("routing_dask")
def domain_specialization_table(run: Any, chunk_tokens: int | None = None) -> pd.DataFrame:
    """OLMoE Eq. 7 per domain (from doc_domain + doc_offsets), MoE layer and expert.

    Columns: domain, moe_layer, layer, expert, count, n_tokens (N_D), specialization (count/N_D;
    uniform k/E).  Streams over token chunks with one bincount per chunk."""
    run = as_store(run)
    info = router_info(run)
    m, e = info["n_moe_layers"], info["n_experts"]
    off, domains, dom_of_doc = _docs(run)
    d = len(domains)
    ex = run["router/experts"]
    counts = np.zeros((m, d, e), np.int64)
    n_d = np.zeros(d, np.int64)
    for t0, t1 in token_chunks(info["n_tokens"], _chunk_len(chunk_tokens, m * info["top_k"])):
        dom_T = dom_of_doc[_doc_of(off, t0, t1)]
        n_d += np.bincount(dom_T, minlength=d)
        x = np.asarray(ex[:, t0:t1], dtype=np.int64)  # (M, t, K)
        code = (np.arange(m)[:, None, None] * d + dom_T[None, :, None]) * e + x
        counts += np.bincount(code.ravel(), minlength=m * d * e).reshape(m, d, e)
    return _domain_frame(info, domains, counts, n_d)


def _domain_frame(info: dict, domains: list[str], counts, n_d) -> pd.DataFrame:
    """domain_specialization_table from counts [M, D, E] and domain token counts [D]."""
    m, d, e = counts.shape
    mm, dd, ee = np.meshgrid(np.arange(m), np.arange(d), np.arange(e), indexing="ij")
    df = pd.DataFrame({"domain": np.array(domains, dtype=object)[dd.ravel()], "moe_layer": mm.ravel(),
                       "layer": np.asarray(info["layer_index"])[mm.ravel()], "expert": ee.ravel(),
                       "count": counts.ravel(), "n_tokens": n_d[dd.ravel()]})
    df["specialization"] = df["count"] / df["n_tokens"].clip(lower=1)
    df.attrs.update(top_k=info["top_k"], n_experts=e)
    return df


@dask_path("routing_dask")
def vocabulary_specialization_table(run: Any, variant: str = "input", min_count: int = 10,
                                    chunk_tokens: int | None = None) -> pd.DataFrame:
    """OLMoE Eq. 8 per MoE layer for input tokens ('input') or ground-truth next tokens ('next';
    pairs never cross a document boundary).  Columns: moe_layer, layer, variant, n_token_ids,
    vocab_specialization, baseline (k/E).  Memory O(U·E) per layer."""
    run = as_store(run)
    if variant not in ("input", "next"):
        raise ValueError(f"variant must be 'input' or 'next', got {variant!r}")
    info = router_info(run)
    m, e, n_tok = info["n_moe_layers"], info["n_experts"], info["n_tokens"]
    tok, ex = run["tokens"], run["router/experts"]
    off, _, _ = _docs(run)
    chunk = _chunk_len(chunk_tokens, info["top_k"])
    vocab = np.unique(np.concatenate([np.unique(tok[t0:t1]) for t0, t1 in token_chunks(n_tok, chunk)]))
    u = len(vocab)
    if u and vocab[0] < 0:
        raise ValueError(f"token ids must be >= 0, found {vocab[0]}")
    dense_of = np.zeros(int(vocab[-1]) + 1 if u else 1, np.int64)  # token id -> row, a gather is
    dense_of[vocab] = np.arange(u)                                 # much faster than searchsorted
    rows = []
    for layer in range(m):
        counts, n_u = np.zeros(u * e, np.int64), np.zeros(u, np.int64)
        for t0, t1 in token_chunks(n_tok, chunk):
            x = np.asarray(ex[layer, t0:t1], dtype=np.int64)  # (t, K)
            if variant == "input":
                ids = np.asarray(tok[t0:t1])
            else:  # token after each routed token, dropping the last token of every document
                ids = np.asarray(tok[t0 + 1:min(t1 + 1, n_tok)])
                doc = _doc_of(off, t0, t0 + len(ids) + 1)
                keep = doc[:-1] == doc[1:]
                x, ids = x[:len(ids)][keep], ids[keep]
            dense = dense_of[ids]
            n_u += np.bincount(dense, minlength=u)
            counts += np.bincount((dense[:, None] * e + x).ravel(), minlength=u * e)
        rows.append(_vocab_row(info, layer, variant, counts.reshape(u, e), n_u, vocab, min_count))
    return pd.DataFrame(rows)


def _vocab_row(info: dict, layer: int, variant: str, counts_UE, n_U, vocab_U, min_count: int) -> dict:
    vs = vocabulary_specialization_from_counts(counts_UE, n_U, vocab_U, min_count)
    return {"moe_layer": layer, "layer": info["layer_index"][layer], "variant": variant,
            "n_token_ids": vs.n_token_ids, "vocab_specialization": vs.mean,
            "baseline": info["top_k"] / info["n_experts"]}


@dask_path("routing_dask")
def consecutive_rates(run: Any, chunk_tokens: int | None = None) -> pd.DataFrame:
    """Mixtral Table 5 per domain (plus 'all') and MoE layer, within documents only.

    Columns: domain, moe_layer, layer, n_pairs, first_choice, any_overlap (NaN for k = 1),
    baseline_first (1/E), baseline_any (1 − C(E−k,k)/C(E,k))."""
    run = as_store(run)
    info = router_info(run)
    m, k, n_tok = info["n_moe_layers"], info["top_k"], info["n_tokens"]
    off, domains, dom_of_doc = _docs(run)
    d = len(domains)
    ex = run["router/experts"]
    n_pairs = np.zeros(d, np.int64)
    hits = np.zeros((2, m, d), np.int64)  # first choice, any overlap
    for t0, t1 in token_chunks(n_tok, _chunk_len(chunk_tokens, m * k)):
        lo = max(t0 - 1, 0)  # carry the previous chunk's last token
        x = np.asarray(ex[:, lo:t1])  # (M, t, K)
        doc = _doc_of(off, lo, t1)
        same = doc[:-1] == doc[1:]  # pair (t, t+1) inside one document
        dom = dom_of_doc[doc[1:]][same]
        n_pairs += np.bincount(dom, minlength=d)
        for layer in range(m):
            first, anyo = _pair_hits(x[layer, :-1][same], x[layer, 1:][same])
            hits[0, layer] += np.bincount(dom, weights=first, minlength=d).astype(np.int64)
            hits[1, layer] += np.bincount(dom, weights=anyo, minlength=d).astype(np.int64)
    return _consecutive_frame(info, domains, n_pairs, hits)


def _consecutive_frame(info: dict, domains: list[str], n_pairs, hits) -> pd.DataFrame:
    """consecutive_rates from pair counts per domain [D] and hits [2 (first, any), M, D]."""
    m, k, d = info["n_moe_layers"], info["top_k"], len(domains)
    base = consecutive_baselines(info["n_experts"], k)
    rows = []
    groups = [(None, "all")] + (list(enumerate(domains)) if d > 1 else [])
    for layer in range(m):
        for di, name in groups:
            n = n_pairs.sum() if di is None else n_pairs[di]
            h = hits[:, layer].sum(1) if di is None else hits[:, layer, di]
            rows.append({"domain": name, "moe_layer": layer, "layer": info["layer_index"][layer],
                         "n_pairs": int(n), "first_choice": h[0] / n if n else np.nan,
                         "any_overlap": h[1] / n if n and k > 1 else np.nan,
                         "baseline_first": base["first_choice"], "baseline_any": base["any_overlap"]})
    return pd.DataFrame(rows)


@dask_path("routing_dask")
def transition_matrix(run: Any, moe_layer_a: int, moe_layer_b: int, slot: int = 0,
                      chunk_tokens: int | None = None) -> np.ndarray:
    """Counts [E, E] of (expert in MoE layer a, expert in MoE layer b) over all tokens, using each
    token's `slot`-th choice (0 = first).  Row-normalise with `row_normalize`."""
    run = as_store(run)
    info = router_info(run)
    e, ex = info["n_experts"], run["router/experts"]
    out = np.zeros((e, e), np.int64)
    for t0, t1 in token_chunks(info["n_tokens"], _chunk_len(chunk_tokens, 1)):
        out += transition_counts(ex[moe_layer_a, t0:t1, slot], ex[moe_layer_b, t0:t1, slot], e)
    return out


@dask_path("routing_dask")
def layer_transitions(run: Any, slot: int = 0, chunk_tokens: int | None = None) -> pd.DataFrame:
    """Mutual information between consecutive MoE layers' `slot`-th choices, all pairs in one pass.

    Columns: moe_layer_a, moe_layer_b, layer_a, layer_b, mutual_information (nats), nmi (arithmetic
    mean normalisation), max_transition (largest row-normalised entry)."""
    run = as_store(run)
    info = router_info(run)
    m, e, ex = info["n_moe_layers"], info["n_experts"], run["router/experts"]
    joint = np.zeros((max(m - 1, 0), e, e), np.int64)
    for t0, t1 in token_chunks(info["n_tokens"], _chunk_len(chunk_tokens, m)):
        x = np.asarray(ex[:, t0:t1, slot], dtype=np.int64)  # (M, t)
        code = (np.arange(m - 1)[:, None] * e + x[:-1]) * e + x[1:]
        joint += np.bincount(code.ravel(), minlength=(m - 1) * e * e).reshape(m - 1, e, e)
    return _transitions_frame(info, joint)


def _transitions_frame(info: dict, joint) -> pd.DataFrame:
    """layer_transitions from joint counts [M-1, E, E] of consecutive MoE layers."""
    li = info["layer_index"]
    return pd.DataFrame([{"moe_layer_a": i, "moe_layer_b": i + 1, "layer_a": li[i], "layer_b": li[i + 1],
                          "mutual_information": mutual_information(c),
                          "nmi": normalized_mutual_information(c),
                          "max_transition": float(row_normalize(c).max())} for i, c in enumerate(joint)])


def router_agreement(run_a: Any, run_b: Any, chunk_tokens: int | None = None) -> pd.DataFrame:
    """OLMoE saturation between two runs over the same tokens (e.g. base vs instruct), per MoE layer.

    Columns: moe_layer, layer, saturation ((1/N) Σ |E_i ∩ E_i'|/k), top1_agreement."""
    run_a, run_b = as_store(run_a), as_store(run_b)
    xa, xb = run_a["router/experts"], run_b["router/experts"]
    (m, _, k), n_tok = xa.shape, run_a.n_tokens
    if (m, k, n_tok) != (xb.shape[0], xb.shape[2], run_b.n_tokens):
        raise ValueError(f"runs differ in (moe_layers, top_k, n_tokens): {(m, k, n_tok)} vs "
                         f"{(xb.shape[0], xb.shape[2], run_b.n_tokens)}")
    inter, top1 = np.zeros(m), np.zeros(m)
    for t0, t1 in token_chunks(n_tok, _chunk_len(chunk_tokens, m * k * k)):
        if not np.array_equal(run_a["tokens"][t0:t1], run_b["tokens"][t0:t1]):
            raise ValueError(f"runs hold different tokens in [{t0}, {t1}): saturation needs the same inputs")
        a, b = np.asarray(xa[:, t0:t1]), np.asarray(xb[:, t0:t1])
        inter += (a[..., :, None] == b[..., None, :]).any(-1).sum((1, 2))
        top1 += (a[..., 0] == b[..., 0]).sum(1)
    li = router_info(run_a)["layer_index"]
    return pd.DataFrame({"moe_layer": np.arange(m), "layer": li, "saturation": inter / (n_tok * k),
                         "top1_agreement": top1 / n_tok})


def expert_grid(run: Any, start: int, stop: int, slot: int = 0) -> dict[str, np.ndarray]:
    """A token window for the tokens × layers grid: experts [M, t], gates [M, t] (slot `slot`),
    tokens [t], layer_index [M]."""
    run = as_store(run)
    return {"experts": np.asarray(run["router/experts"][:, start:stop, slot]),
            "gates": np.asarray(run["router/weights"][:, start:stop, slot]),
            "tokens": np.asarray(run["tokens"][start:stop]),
            "layer_index": np.asarray(router_info(run)["layer_index"])}

"""Routing metrics over a dataset of many runs (`workbench.store.open_dataset`), computed by dask.

Every store-level metric of probes/routing.py reduces the router arrays to small count tables
(assignments per expert, per domain, per token id, per expert pair).  Here each count table is one
dask graph: a blockwise NumPy bincount on every chunk of `router/experts` (one MoE layer × a token
slab), then a tree sum over the token chunks.  The tables go through the same table builders as the
single-process chunk loops (`routing._load_frame`, …), so the numbers are the same: counts exactly,
float sums up to summation order (≤ 1e-12 relative).  Memory per task is one chunk plus its table.

Pairs of consecutive tokens (consecutive_rates, the 'next' vocabulary variant) pair every token with
its successor through a one-token shift of the arrays (`_next`); a pair counts only when both
tokens belong to the same document (`doc` coordinate, global over runs), so pairs never cross a
document or run boundary.

    graphs = {name: METRICS[name].graph(ds) ...}; dask.compute(all graphs at once)  # one read pass
    compute_metrics(ds, ["load", "domain", ...])  -> {name: DataFrame}

Shape legend: M MoE layers, T tokens, K top-k slots, E experts, D domains, U distinct token ids,
Z width of a count table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from probes import routing as R

__all__ = ["router_info", "expert_loads", "load_table", "domain_specialization_table",
           "vocabulary_specialization_table", "consecutive_rates", "transition_matrix",
           "layer_transitions", "coactivation_table", "METRICS", "metric_graphs", "compute_metrics"]

EXPERTS = "router/experts"


# ----------------------------------------------------------------------------------- helpers
def router_info(ds) -> dict[str, Any]:
    """As `routing.router_info`, from the dataset's layout and shapes (nothing is read)."""
    m, t, k = ds[EXPERTS].shape
    lay = ds.attrs.get("layout") or {}
    e = lay.get("n_experts") or (ds.attrs.get("config") or {}).get("num_local_experts")
    if e is None and "router/logits" in ds:
        e = ds["router/logits"].shape[-1]
    if e is None:
        e = int(ds[EXPERTS].data.max().compute()) + 1
    li = [int(v) for v in ds["moe_layer"].values] if "moe_layer" in ds.coords else list(range(m))
    return {"n_moe_layers": m, "n_tokens": int(t), "top_k": k, "n_experts": int(e), "layer_index": li}


def _docs(ds) -> tuple[list[str], np.ndarray]:
    """(domain names [D] sorted, domain code per document [n_docs]); '' -> 'unknown' (as routing._docs)."""
    names = [str(s) or "unknown" for s in ds["doc_domain"].values]
    domains = sorted(set(names)) or ["unknown"]
    return domains, np.array([domains.index(s) for s in names], dtype=np.int64)


def _per_token(ds, table: np.ndarray):
    """Lazy table[doc] for every token (e.g. the domain code of its document) -> dask int64 [T]."""
    return ds["doc"].data.map_blocks(lambda d_T, tab=table: tab[d_T], dtype=table.dtype)


def _next(a, axis: int, fill=0):
    """a shifted one step left along `axis` (a[t+1] at t; `fill` at the end), with a's chunks."""
    import dask.array as da

    n = a.shape[axis]
    pad_shape = tuple(1 if i == axis else s for i, s in enumerate(a.shape))
    pad = da.full(pad_shape, fill, dtype=a.dtype)
    tail = a[tuple(slice(1, n) if i == axis else slice(None) for i in range(a.ndim))]
    return da.concatenate([tail, pad], axis=axis).rechunk(a.chunks)


def _same_doc_next(ds):
    """bool [T]: token t and t+1 lie in the same document (False for the last token)."""
    doc = ds["doc"].data
    return doc == _next(doc, 0, fill=-1)


def _layer_counts(fn: Callable, width: int, *args, dtype=np.int64):
    """Sum over token chunks of fn(*blocks) -> (m_b, 1, width) per chunk.  args: dask arrays [M, T, K],
    [M, T] or [T], with the same token chunks (one dataset).  -> dask [M, width]."""
    import dask.array as da

    index = {1: "t", 2: "mt", 3: "mtk"}
    pairs = [x for a in args for x in (a, index[a.ndim])]
    out = da.blockwise(fn, "mtw", *pairs, new_axes={"w": width}, concatenate=True, dtype=dtype,
                       adjust_chunks={"t": lambda c: 1})
    return out.sum(axis=1)


def _token_counts(fn: Callable, width: int, *args):
    """Sum over token chunks of fn(*blocks) -> (width,) for 1-D token arrays.  -> dask [width]."""
    import dask.array as da

    out = da.blockwise(lambda *b: fn(*b)[None], "tw", *[x for a in args for x in (a, "t")],
                       new_axes={"w": width}, dtype=np.int64, adjust_chunks={"t": lambda c: 1})
    return out.sum(axis=0)


def _bincount_layers(code_MN, m_b: int, width: int) -> np.ndarray:
    """Per-layer bincount of codes [m_b, N] in [0, width) -> int64 [m_b, width]."""
    off = (np.arange(m_b, dtype=np.int64) * width)[:, None]
    return np.bincount((code_MN + off).ravel(), minlength=m_b * width).reshape(m_b, width)


# ----------------------------------------------------------------------------- metric graphs
# Each *_graph returns (dict of lazy dask arrays, finish(computed dict) -> result), so several
# metrics can be computed in one dask.compute call that reads every chunk once.
def _loads_graph(ds):
    e = router_info(ds)["n_experts"]

    def f(x):  # (m_b, t, K) -> (m_b, 1, E)
        m_b = x.shape[0]
        return _bincount_layers(x.reshape(m_b, -1).astype(np.int64), m_b, e)[:, None]
    return {"counts": _layer_counts(f, e, ds[EXPERTS].data)}, lambda r: r["counts"]


def _load_graph(ds, convention: str = "softmax"):
    info = router_info(ds)
    e, k = info["n_experts"], info["top_k"]
    graphs, _ = _loads_graph(ds)
    has_logits = "router/logits" in ds
    if has_logits:
        if convention not in ("softmax", "sigmoid"):
            raise ValueError(f"convention must be 'softmax' or 'sigmoid', got {convention!r}")
        lg = ds["router/logits"].data

        def f_probs(r, conv):  # (m_b, t, E) -> (m_b, 1, E) float64 sums of the router distribution
            return np.stack([R.router_probs(r[i], conv).sum(0, dtype=np.float64) for i in range(len(r))])[:, None]
        graphs["p_conv"] = _layer_counts(lambda r: f_probs(r, convention), e, lg, dtype=np.float64)
        if convention != "softmax":
            graphs["p_soft"] = _layer_counts(lambda r: f_probs(r, "softmax"), e, lg, dtype=np.float64)

        def slot(x):  # (m_b, t, K) -> (m_b, 1, K·E): assignments of each slot
            m_b = x.shape[0]
            code = x.astype(np.int64) + (np.arange(k) * e)[None, None]
            return _bincount_layers(code.reshape(m_b, -1), m_b, k * e)[:, None]
        graphs["slot"] = _layer_counts(slot, k * e, ds[EXPERTS].data)

    def finish(r):
        if not has_logits:
            return R._load_frame(info, r["counts"], None, None, None, convention)
        n = info["n_tokens"]
        p_conv = r["p_conv"] / n
        p_soft = p_conv if convention == "softmax" else r["p_soft"] / n
        return R._load_frame(info, r["counts"], p_conv, p_soft, r["slot"].reshape(-1, k, e) / n, convention)
    return graphs, finish


def _domain_graph(ds):
    info = router_info(ds)
    e = info["n_experts"]
    domains, dom_of_doc = _docs(ds)
    d = len(domains)
    dom_T = _per_token(ds, dom_of_doc)

    def f(x, dom):  # (m_b, t, K), (t,) -> (m_b, 1, D·E)
        m_b = x.shape[0]
        code = dom[None, :, None] * e + x.astype(np.int64)
        return _bincount_layers(code.reshape(m_b, -1), m_b, d * e)[:, None]
    graphs = {"counts": _layer_counts(f, d * e, ds[EXPERTS].data, dom_T),
              "n_d": _token_counts(lambda dom: np.bincount(dom, minlength=d), d, dom_T)}
    return graphs, lambda r: R._domain_frame(info, domains, r["counts"].reshape(-1, d, e), r["n_d"])


def _vocab_graph(ds, variant: str = "input", min_count: int = 10):
    if variant not in ("input", "next"):
        raise ValueError(f"variant must be 'input' or 'next', got {variant!r}")
    import dask.array as da

    info = router_info(ds)
    e = info["n_experts"]
    tok = ds["tokens"].data
    vocab = np.asarray(da.unique(tok).compute())  # a cheap 1-D pass: the table's rows
    u = len(vocab)
    if u and vocab[0] < 0:
        raise ValueError(f"token ids must be >= 0, found {vocab[0]}")
    dense_of = np.zeros(int(vocab[-1]) + 1 if u else 1, np.int64)
    dense_of[vocab] = np.arange(u)
    ids = tok if variant == "input" else _next(tok, 0)
    dense_T = ids.map_blocks(lambda t, m=dense_of: m[t], dtype=np.int64)
    keep_T = da.ones(tok.shape, dtype=bool, chunks=tok.chunks) if variant == "input" else _same_doc_next(ds)

    def f(x, dense, keep):  # (m_b, t, K), (t,), (t,) -> (m_b, 1, U·E)
        m_b = x.shape[0]
        code = dense[keep][None, :, None] * e + x[:, keep].astype(np.int64)
        return _bincount_layers(code.reshape(m_b, -1), m_b, u * e)[:, None]
    # one layer per task here whatever the dataset's chunks: a task's table is U·E per layer
    graphs = {"counts": _layer_counts(f, u * e, ds[EXPERTS].data.rechunk({0: 1}), dense_T, keep_T),
              "n_u": _token_counts(lambda dn, kp: np.bincount(dn[kp], minlength=u), u, dense_T, keep_T),
              "vocab": vocab}  # the rows' token ids (a plain array: dask.compute passes it through)

    def finish(r):
        return pd.DataFrame([R._vocab_row(info, layer, variant, r["counts"][layer].reshape(u, e), r["n_u"],
                                          vocab, min_count) for layer in range(info["n_moe_layers"])])
    return graphs, finish


def _consecutive_graph(ds):
    info = router_info(ds)
    domains, dom_of_doc = _docs(ds)
    d = len(domains)
    x = ds[EXPERTS].data
    x_next = _next(x, 1)
    same_T = _same_doc_next(ds)
    dom_T = _per_token(ds, dom_of_doc)  # a pair's domain: both tokens are in one document

    def f(a, b, same, dom):  # (m_b, t, K) ×2, (t,), (t,) -> (m_b, 1, 2·D): first-choice, any-overlap hits
        out = np.zeros((len(a), 1, 2 * d), np.int64)
        for i in range(len(a)):
            first, anyo = R._pair_hits(a[i][same], b[i][same])
            out[i, 0, :d] = np.bincount(dom[same], weights=first, minlength=d)
            out[i, 0, d:] = np.bincount(dom[same], weights=anyo, minlength=d)
        return out
    graphs = {"hits": _layer_counts(f, 2 * d, x, x_next, same_T, dom_T),
              "n_pairs": _token_counts(lambda s, dm: np.bincount(dm[s], minlength=d), d, same_T, dom_T)}

    def finish(r):
        hits = r["hits"].reshape(-1, 2, d).transpose(1, 0, 2)  # [2, M, D]
        return R._consecutive_frame(info, domains, r["n_pairs"], hits)
    return graphs, finish


def _pair_codes(a, b, e: int) -> np.ndarray:
    return a.astype(np.int64) * e + b


def _transitions_graph(ds, slot: int = 0):
    info = router_info(ds)
    m, e = info["n_moe_layers"], info["n_experts"]
    x = ds[EXPERTS].data[:, :, slot]  # [M, T]
    if m < 2:
        return {}, lambda r: R._transitions_frame(info, np.zeros((0, e, e), np.int64))
    a = x[:-1]
    b = x[1:].rechunk(a.chunks)

    def f(xa, xb):  # (m_b, t) ×2 -> (m_b, 1, E·E)
        return _bincount_layers(_pair_codes(xa, xb, e), len(xa), e * e)[:, None]
    graphs = {"joint": _layer_counts(f, e * e, a, b)}
    return graphs, lambda r: R._transitions_frame(info, r["joint"].reshape(-1, e, e))


def _coactivation_graph(ds, pairs: str = "all"):
    info = router_info(ds)
    e, k = info["n_experts"], info["top_k"]
    if k < 2:
        raise ValueError(R.TOP1_COACTIVATION_MESSAGE)
    idx = R.slot_pairs(k, pairs)

    def f(x):  # (m_b, t, K) -> (m_b, 1, E·E + E): pair counts, then per-expert counts
        m_b = x.shape[0]
        x = x.astype(np.int64)
        joint = sum(_bincount_layers(_pair_codes(x[:, :, s], x[:, :, t], e), m_b, e * e) for s, t in idx)
        return np.concatenate([joint, _bincount_layers(x.reshape(m_b, -1), m_b, e)], 1)[:, None]
    graphs = {"counts": _layer_counts(f, e * e + e, ds[EXPERTS].data)}

    def finish(r):
        rows = []
        for layer, c in enumerate(r["counts"]):
            joint, n_i = c[: e * e].reshape(e, e).astype(np.float64), c[e * e:].astype(np.float64)
            co = np.divide(joint, n_i[:, None], out=np.zeros(joint.shape), where=n_i[:, None] > 0)
            for i in range(e):
                for j in range(e):
                    rows.append({"moe_layer": layer, "layer": info["layer_index"][layer], "expert_i": i,
                                 "expert_j": j, "count": int(c[i * e + j]), "n_i": int(n_i[i]),
                                 "coactivation": co[i, j]})
        df = pd.DataFrame(rows)
        df.attrs.update(pairs=pairs, top_k=k, n_experts=e)
        return df
    return graphs, finish


def _transition_matrix_graph(ds, moe_layer_a: int, moe_layer_b: int, slot: int = 0):
    e = router_info(ds)["n_experts"]
    x = ds[EXPERTS].data
    a, b = x[moe_layer_a, :, slot], x[moe_layer_b, :, slot].rechunk(x[moe_layer_a, :, slot].chunks)
    graphs = {"joint": _token_counts(lambda p, q: np.bincount(_pair_codes(p, q, e), minlength=e * e), e * e, a, b)}
    return graphs, lambda r: r["joint"].reshape(e, e)


# ------------------------------------------------------------------------- public functions
def _run(graph_and_finish):
    import dask

    graphs, finish = graph_and_finish
    (computed,) = dask.compute(graphs)
    return finish(computed)


def expert_loads(ds, chunk_tokens: int | None = None) -> np.ndarray:
    """As `routing.expert_loads` -> int64 [M, E].  chunk_tokens is ignored: the dataset's chunks rule."""
    return _run(_loads_graph(ds))


def load_table(ds, convention: str = "softmax", chunk_tokens: int | None = None) -> pd.DataFrame:
    return _run(_load_graph(ds, convention))


def domain_specialization_table(ds, chunk_tokens: int | None = None) -> pd.DataFrame:
    return _run(_domain_graph(ds))


def vocabulary_specialization_table(ds, variant: str = "input", min_count: int = 10,
                                    chunk_tokens: int | None = None) -> pd.DataFrame:
    return _run(_vocab_graph(ds, variant, min_count))


def consecutive_rates(ds, chunk_tokens: int | None = None) -> pd.DataFrame:
    return _run(_consecutive_graph(ds))


def transition_matrix(ds, moe_layer_a: int, moe_layer_b: int, slot: int = 0,
                      chunk_tokens: int | None = None) -> np.ndarray:
    return _run(_transition_matrix_graph(ds, moe_layer_a, moe_layer_b, slot))


def layer_transitions(ds, slot: int = 0, chunk_tokens: int | None = None) -> pd.DataFrame:
    return _run(_transitions_graph(ds, slot))


def coactivation_table(ds, pairs: str = "all") -> pd.DataFrame:
    """OLMoE Eq. 6 per MoE layer over the whole dataset (`routing.coactivation` for every layer).

    Columns: moe_layer, layer, expert_i, expert_j, count (N_{i,j}), n_i (N_i), coactivation (N_ij/N_i).
    Raises ValueError for top-1 routing (routing.TOP1_COACTIVATION_MESSAGE)."""
    return _run(_coactivation_graph(ds, pairs))


@dataclass(frozen=True)
class Metric:
    graph: Callable      # (ds, **options) -> (graphs, finish)
    needs: tuple         # arrays the metric reads
    doc: str


METRICS: dict[str, Metric] = {
    "load": Metric(_load_graph, (EXPERTS,), "expert load and balance (load_table)"),
    "domain": Metric(_domain_graph, (EXPERTS,), "domain specialization (OLMoE Eq. 7)"),
    "vocab": Metric(_vocab_graph, (EXPERTS, "tokens"), "vocabulary specialization, input tokens (OLMoE Eq. 8)"),
    "vocab_next": Metric(lambda ds: _vocab_graph(ds, "next"), (EXPERTS, "tokens"),
                         "vocabulary specialization, next tokens"),
    "consecutive": Metric(_consecutive_graph, (EXPERTS,), "consecutive-token same-expert rates (Mixtral)"),
    "transitions": Metric(_transitions_graph, (EXPERTS,), "layer-to-layer transitions, MI and NMI"),
    "coactivation": Metric(_coactivation_graph, (EXPERTS,), "within-layer co-activation (top-k > 1)"),
}


def count_tables(ds) -> dict[str, Any]:
    """The raw count tables behind the Experts tab's run index (workbench/store/index.py), in one
    pass through dask, for runs too large for one pass in memory:

        load          int64 [M, E]          assignments, all top-k slots
        domain_count  int64 [M, E, D]       assignments per document domain (`domains` order)
        vocab_count   int64 [M, U, E]       N_{x,e}^{(k)} per distinct token id (`vocab` order)
        vocab_total   int64 [U]             N_x, occurrences of each id
        cofire        int64 [M-1, E, E]     first choice at MoE layer m -> m+1
        vocab, domains                      the row labels
    """
    import dask

    info = router_info(ds)
    e = info["n_experts"]
    domains, _ = _docs(ds)
    built = {"load": _loads_graph(ds), "domain": _domain_graph(ds), "vocab": _vocab_graph(ds),
             "transitions": _transitions_graph(ds)}
    (r,) = dask.compute({n: g for n, (g, _) in built.items()})
    vocab = r["vocab"]["vocab"]
    return {"load": r["load"]["counts"],
            "domain_count": r["domain"]["counts"].reshape(-1, len(domains), e).transpose(0, 2, 1),
            "vocab_count": r["vocab"]["counts"].reshape(info["n_moe_layers"], -1, e),
            "vocab_total": r["vocab"]["n_u"], "vocab": vocab, "domains": domains,
            "cofire": r["transitions"].get("joint", np.zeros((0, e * e), np.int64)).reshape(-1, e, e)}


def metric_graphs(ds, names) -> dict[str, tuple]:
    """{name: (graphs, finish)} for the named routing metrics (see METRICS)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown routing metrics {unknown}; known: {sorted(METRICS)}")
    return {n: METRICS[n].graph(ds) for n in names}


def compute_metrics(ds, names) -> dict[str, Any]:
    """Several metrics in one dask.compute (every chunk read once) -> {name: result}."""
    import dask

    built = metric_graphs(ds, names)
    (computed,) = dask.compute({n: g for n, (g, _) in built.items()})
    return {n: finish(computed[n]) for n, (_, finish) in built.items()}

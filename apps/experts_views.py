"""Pure callbacks of the Experts tab: a dashboard per (MoE layer, expert) and token search (issue 18 §3).

The dashboard reads the run's precomputed index (`workbench.store.index`, `workbench index RUN`):
load, top-activating tokens, preferred vocabulary, domain/modality counts and next-layer co-firing are
small arrays there, so a 1M-token run opens an expert in milliseconds.  Runs up to AUTO_INDEX_TOKENS
are indexed on first use (the index is written into the run, as the CLI does); larger ones ask for
`workbench index`.  Search reads whole 1-D arrays once per run (tokens, positions: 4 bytes a token)
and one MoE layer of router/experts when filtering by expert, then filters in numpy.
"""

from __future__ import annotations

import html
import re
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from apps import views as v
from probes import teaching as pt
from workbench.store.index import IndexStale, build_index, open_index
from workbench.store.index_dask import build_index_dask, choose_engine

AUTO_INDEX_TOKENS = 1 << 18
MAX_RESULTS = 200
MAX_CONTEXT = 16
LOAD_BINS = 200


def get_index(run, build: bool = False):
    """The run's index; built (into the run) when missing or stale and the run is small, or `build`."""
    if hasattr(run, "paths"):               # a RunSet (runs joined with '+'): each run has its own index
        raise v.UserError("The Experts tab reads one run's index: open a single run (not several joined with '+').")
    try:
        idx = open_index(run)
    except IndexStale:
        idx = None
    if idx is None:
        if not build and run.n_tokens > AUTO_INDEX_TOKENS:
            raise v.UserError(f"Run {run.path.name} ({run.n_tokens} tokens) has no up-to-date index: click "
                              f"'Build index' or run `workbench index {run.path.name}` in the runs directory.")
        if not run.has("router/experts"):
            raise v.UserError(f"Run {run.path.name} has no router recordings (probe 'router').")
        if choose_engine(run.path) == "dask":   # too large for one pass in this process's memory
            build_index_dask(run.path)
        else:
            build_index(run.path)
        idx = open_index(run)
    return v.memo(run, "index", (idx.attrs.get("created"),), lambda: idx)


def _moe(run, layer) -> int:
    moe = v.run_info(run)["moe_layers"]
    try:
        return moe.index(int(layer))
    except (TypeError, ValueError):
        raise v.UserError(f"Layer {layer!r} is not an MoE layer; MoE layers are {moe}.") from None


def _expert(run, expert) -> int:
    n = v.run_info(run)["n_experts"]
    s = str(expert).lstrip("E")
    if not s.isdigit() or int(s) >= n:
        raise v.UserError(f"Unknown expert {expert!r}; this run has experts E0–E{n - 1}.")
    return int(s)


def _tokens(run) -> np.ndarray:
    return v.memo(run, "all_tokens", (), lambda: run.read("tokens"))


def _positions(run) -> np.ndarray:
    return v.memo(run, "all_positions", (), lambda: run.read("positions"))


def _layer_experts(run, m: int) -> np.ndarray:
    return v.memo(run, "layer_experts", (m,), lambda: np.asarray(run.array("router/experts")[m, :run.n_tokens]))


def _doc_of(run, t) -> np.ndarray:
    return np.searchsorted(run.doc_offsets, np.asarray(t), side="right") - 1


def expert_choices(run) -> list[str]:
    return [f"E{i}" for i in range(v.run_info(run)["n_experts"])]


def context_html(run, positions, gates, n_context: int = 5, tokenizer=None) -> str:
    """Escaped HTML rows: ±n_context tokens around each position (inside its document), the token
    highlighted, with its document and gate; each row carries data-token for linked selection."""
    n_context = max(0, min(int(n_context), MAX_CONTEXT))
    tok, off = _tokens(run), run.doc_offsets
    rows = []
    ids = run.read("doc_id") if run.n_docs else []
    for p, g in zip(np.asarray(positions).tolist(), np.asarray(gates).tolist()):
        d = int(_doc_of(run, p))
        lo, hi = max(int(off[d]), p - n_context), min(int(off[d + 1]), p + n_context + 1)
        text = v.token_text(tokenizer, tok[lo:hi])
        parts = [(f"<mark class='wb-hit'>{html.escape(s)}</mark>" if lo + i == p else html.escape(s))
                 for i, s in enumerate(text)]
        rows.append(f"<tr data-token='{p}'><td>#{p}</td><td>{html.escape(str(ids[d]))}</td><td>{g:.3f}</td>"
                    f"<td class='wb-ctx'>{''.join(parts)}</td></tr>")
    return ("<table class='wb-summary wb-contexts'><tr><th>token</th><th>doc</th><th>gate</th><th>context</th></tr>"
            + "".join(rows) + "</table>") if rows else "<p>No tokens were routed to this expert.</p>"


def expert_dashboard(run, layer, expert, n_context: int = 5, n_top: int = 20,
                     tokenizer=None) -> dict[str, Any]:
    """Everything the dashboard shows for (decoder layer `layer`, `expert`): summary markdown, load over
    the run (figure), top-activating contexts (HTML + table), preferred vocabulary (table), domain and
    modality mix (figure) and next-layer co-firing (figure)."""
    info = v.run_info(run)
    if not info["has_router"]:
        raise v.UserError(f"Run {info['name']} has no router recordings (probe 'router').")
    m, e = _moe(run, layer), _expert(run, expert)
    idx = get_index(run)
    k, n_exp, n = info["top_k"], info["n_experts"], run.n_tokens
    load = np.asarray(idx["load"][m])
    share = load[e] / max(load.sum(), 1)
    pos, gates = idx.top(m, e)
    pos, gates = pos[:max(1, int(n_top))], gates[:max(1, int(n_top))]
    ctx = context_html(run, pos, gates, n_context, tokenizer)
    top_df = pd.DataFrame({"token": pos, "doc": _doc_of(run, pos) if len(pos) else [],
                           "gate": np.round(gates.astype(np.float64), 4)})

    ids, cnt, tot = idx.vocab(m, e)
    vocab = pd.DataFrame({"token": v.token_text(tokenizer, ids), "id": ids, "count": cnt, "N_x": tot,
                          "share of x": np.round(cnt / np.maximum(tot, 1), 4)})

    # load over the run: share of tokens per bin routed to e (one MoE layer read, memoised)
    x = _layer_experts(run, m)
    edges = np.linspace(0, n, min(LOAD_BINS, max(n, 1)) + 1).astype(np.int64)
    hit = (x == e).any(-1).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(hit)])
    width = np.maximum(np.diff(edges), 1)
    frac = (csum[edges[1:]] - csum[edges[:-1]]) / width
    load_fig = go.Figure(go.Scatter(x=(edges[:-1] + edges[1:]) / 2, y=frac, mode="lines", name=f"E{e}",
                                    hovertemplate="tokens ≈%{x:.0f}: %{y:.1%}<extra></extra>"))
    load_fig.add_hline(y=k / n_exp, line_dash="dash", line_color="gray",
                       annotation_text=f"uniform k/E = {k / n_exp:.1%}")
    edges_doc = np.asarray(run.doc_offsets[1:-1][:2000], np.float64)      # one trace: add_vline is slow per line
    if len(edges_doc):
        seg_x = np.column_stack([edges_doc, edges_doc, np.full(len(edges_doc), np.nan)]).ravel()
        load_fig.add_trace(go.Scatter(x=seg_x,
                                      y=np.tile([0.0, float(np.nanmax(frac)) if len(frac) else 1.0, np.nan],
                                                len(edges_doc)), mode="lines", name="document edge",
                                      hoverinfo="skip", line=dict(color="#bbb", width=0.5)))
    load_fig.update_layout(title=f"Load of E{e} over the run, layer {layer} ({len(edges) - 1} bins of "
                                 f"≈{n / max(len(edges) - 1, 1):.0f} tokens; grey: document edges)",
                           xaxis_title="token index", yaxis_title="share routed to the expert", yaxis_tickformat=".0%")

    doms = idx.domains
    dc = np.asarray(idx["domain_count"][m, e], np.float64)
    n_dom = np.asarray(idx["domain_count"][m], np.float64).sum(0) / max(k, 1)       # N_D (tokens per domain)
    mc = np.asarray(idx["modality_count"][m, e], np.float64)
    mix = go.Figure(go.Bar(x=doms, y=dc / np.maximum(n_dom, 1), name="domain (OLMoE Eq. 7)",
                           hovertemplate="%{x}: %{y:.1%} of the domain's tokens<extra></extra>"))
    mix.add_trace(go.Bar(x=[f"[{t}]" for t in idx.attrs["modalities"]],
                         y=mc / np.maximum(np.asarray(idx["modality_count"][m], np.float64).sum(0) / max(k, 1), 1),
                         name="modality", hovertemplate="%{x}: %{y:.1%} of those tokens<extra></extra>"))
    mix.add_hline(y=k / n_exp, line_dash="dash", line_color="gray", annotation_text="uniform k/E")
    mix.update_layout(title=f"E{e}: share of each domain's / modality's tokens", yaxis_tickformat=".0%")

    moe = info["moe_layers"]
    co = go.Figure()
    if m + 1 < len(moe):
        row = np.asarray(idx["cofire"][m, e], np.float64)
        co.add_trace(go.Bar(x=[f"E{j}" for j in range(n_exp)], y=row / max(row.sum(), 1), name=f"layer {moe[m + 1]}",
                            hovertemplate="next layer %{x}: %{y:.1%}<extra></extra>"))
        title = f"Where E{e}'s tokens go at the next MoE layer ({moe[m + 1]}), first choice"
    else:
        title = f"Layer {layer} is the last MoE layer: no next layer to co-fire with"
    co.update_layout(title=title, yaxis_tickformat=".0%", xaxis_title="expert at the next MoE layer")
    summary = (f"**E{e} at layer {layer}**: {int(load[e])} assignments ({share:.2%} of the layer's; uniform "
               f"{1 / n_exp:.2%}). Index built {idx.attrs.get('created')} over {idx.attrs.get('n_tokens')} tokens.")
    for fig in (load_fig, mix, co):
        fig.update_layout(meta={"wb_code": code_dashboard(run, layer, e)})
    return {"summary": summary, "load": load_fig, "contexts": ctx, "top": top_df, "vocab": vocab, "mix": mix,
            "cofire": co}


def code_dashboard(run, layer, expert) -> str:
    return ("from workbench.store import open_run\nfrom workbench.store.index import open_index\n"
            f"run = open_run({str(run.path)!r})\nidx = open_index(run)          # `workbench index RUN` builds it\n"
            f"m = list(run.layout.moe_layer_index).index({int(layer)})\n"
            f"positions, gates = idx.top(m, {int(expert)})\nids, count, n_x = idx.vocab(m, {int(expert)})\n"
            f"cofire = idx['cofire'][m, {int(expert)}]   # next MoE layer, first choice\n")


# ------------------------------------------------------------------------------------ search
def _match_ids(idx, tokenizer, query: str, regex: bool) -> np.ndarray:
    ids = idx.token_ids
    strings = v.memo(idx.run, "token_strings", (id(tokenizer), len(ids)),
                     lambda: v.token_text(tokenizer, ids) if tokenizer is not None else [f"#{i}" for i in ids])
    if regex:
        try:
            pat = re.compile(query)
        except re.error as e:
            raise v.UserError(f"Invalid regular expression {query!r}: {e}") from None
        hit = [bool(pat.search(s)) for s in strings]
    else:
        q = query.lower()
        hit = [q in s.lower() for s in strings]
    return ids[np.asarray(hit, bool)] if len(ids) else ids


def _int_or_none(x, what: str):
    if x in (None, "", "any"):
        return None
    try:
        return int(float(x))
    except (TypeError, ValueError):
        raise v.UserError(f"{what} must be a whole number, got {x!r}") from None


def search(run, query: str = "", regex: bool = False, layer=None, expert=None, doc=None, modality: str = "any",
           pos_lo=None, pos_hi=None, chunk=None, tokenizer=None, limit: int = MAX_RESULTS) -> tuple[pd.DataFrame, str]:
    """Tokens matching every given filter: text (substring, case-insensitive) or regex on the token string,
    routed to `expert` (at MoE layer `layer`, or at any MoE layer), in document `doc`, of `modality`
    ('text' / 'image'), at positions [pos_lo, pos_hi] within their document, in attention chunk `chunk`.
    Returns (first `limit` hits by token index, a markdown note with the total)."""
    info = v.run_info(run)
    tok, posn = _tokens(run), _positions(run)
    n = run.n_tokens
    query = (query or "").strip()
    if query:
        idx = get_index(run) if info["has_router"] else None
        if idx is not None:
            cand = idx.positions_of(_match_ids(idx, tokenizer, query, regex))
        else:                                         # no router: no index; match every distinct id once
            uniq = np.unique(tok)
            strings = v.token_text(tokenizer, uniq)
            pat = re.compile(query) if regex else None
            keep = [bool(pat.search(s)) if pat else query.lower() in s.lower() for s in strings]
            cand = np.flatnonzero(np.isin(tok, uniq[np.asarray(keep, bool)]))
    else:
        cand = np.arange(n)
    d = _int_or_none(doc, "document")
    if d is not None:
        if not 0 <= d < run.n_docs:
            raise v.UserError(f"Document {d} out of range (0–{run.n_docs - 1}).")
        sl = run.doc_slice(d)
        cand = cand[(cand >= sl.start) & (cand < sl.stop)]
    lo, hi = _int_or_none(pos_lo, "first position"), _int_or_none(pos_hi, "last position")
    if lo is not None:
        cand = cand[posn[cand] >= lo]
    if hi is not None:
        cand = cand[posn[cand] <= hi]
    c = _int_or_none(chunk, "chunk")
    if c is not None:
        size = info["chunk_size"]
        if not size:
            raise v.UserError("This run's model has no attention chunk size, so there are no chunks to filter by.")
        cand = cand[posn[cand] // size == c]
    if modality not in (None, "", "any"):
        if modality not in ("text", "image"):
            raise v.UserError(f"Modality must be 'any', 'text' or 'image', got {modality!r}")
        img = (run.attrs.get("config") or {}).get("image_token_index")
        is_img = tok[cand] == img if isinstance(img, int) else np.zeros(len(cand), bool)
        cand = cand[is_img if modality == "image" else ~is_img]
    if expert not in (None, "", "any"):
        if not info["has_router"]:
            raise v.UserError(f"Run {info['name']} has no router recordings to filter by expert.")
        e = _expert(run, expert)
        layers = [_moe(run, layer)] if layer not in (None, "", "any") else range(len(info["moe_layers"]))
        keep = np.zeros(len(cand), bool)
        for m in layers:
            keep |= (_layer_experts(run, m)[cand] == e).any(-1)
        cand = cand[keep]
    elif layer not in (None, "", "any"):
        _moe(run, layer)
    total = len(cand)
    shown = cand[:max(1, int(limit))]
    docs = _doc_of(run, shown) if len(shown) else np.zeros(0, np.int64)
    df = pd.DataFrame({"token": shown, "doc": docs, "position": posn[shown],
                       "text": v.token_text(tokenizer, tok[shown])})
    if info["has_router"] and len(shown):
        m = _moe(run, layer) if layer not in (None, "", "any") else 0
        ex = _layer_experts(run, m)[shown, 0]
        gw = np.asarray(run.array("router/weights").oindex[m, shown, 0]) if len(shown) else []
        df[f"expert@{info['moe_layers'][m]}"] = [f"E{int(x)}" for x in ex]
        df["gate"] = np.round(np.asarray(gw, np.float64), 4)
    note = (f"{total} matching tokens" + (f"; showing the first {len(shown)}" if total > len(shown) else "")
            + ". Click a row to select the token everywhere and open its expert.")
    return df, note


def hit_expert(run, df_row: dict, layer) -> tuple[int, int, str]:
    """(token index, decoder layer, expert label) of a clicked search result."""
    t = int(df_row["token"])
    if not 0 <= t < run.n_tokens:
        raise v.UserError(f"Token {t} is outside this run (0–{run.n_tokens - 1}).")
    m = _moe(run, layer) if layer not in (None, "", "any") else 0
    e = int(_layer_experts(run, m)[t, 0])
    return t, v.run_info(run)["moe_layers"][m], f"E{e}"


def display(s: str) -> str:
    return pt.display_token(s)

"""Routing metrics over a dataset of many runs (`workbench.store.open_dataset`), computed by dask.

Every store-level metric of probes/routing.py reduces the router arrays to small count tables
(assignments per expert, per domain, per token id, per expert pair). Here each metric is a *pass* of
`workbench.store.fold`: a dask task per token chunk reads that chunk of `router/experts` (and of
`tokens`, the `doc` coordinate, `router/logits` where needed) and adds its counts into its lane's
accumulator tables; the lanes are merged once at the end. All metrics asked for together share one
read of every chunk, and a worker holds one chunk per thread plus its lanes' tables whatever the
dataset's size (docs/scale.md, "Memory"). The tables go through the same table builders as the
single-process chunk loops (`routing._load_frame`, …), so the numbers are the same: counts exactly,
float sums up to summation order (≤ 1e-12 relative), and bit-identical on any scheduler.

Pairs of consecutive tokens (consecutive_rates, the 'next' vocabulary variant) count only when both
tokens belong to the same document (`doc` coordinate, global over runs), so pairs never cross a
document or run boundary; the fold hands the passes the pairs inside each chunk and those that
straddle two chunks.

    compute_metrics(ds, ["load", "domain", ...])  -> {name: DataFrame}      # one pass for all
    metric_graphs(ds, names) -> {name: (graphs, finish)}                      # for workbench analyze

Shape legend: M MoE layers, T tokens (t in a chunk), K top-k slots, E experts, D domains,
U distinct token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from probes import routing as R
from workbench.store.fold import count_dtype, fold

__all__ = ["router_info", "expert_loads", "load_table", "domain_specialization_table",
           "vocabulary_specialization_table", "consecutive_rates", "transition_matrix",
           "layer_transitions", "coactivation_table", "METRICS", "metric_graphs", "compute_metrics",
           "count_tables", "metric_passes"]

EXPERTS = "router/experts"
DOC = "doc"


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


def _bincount_into(out_W, code, width: int) -> None:
    out_W += np.bincount(np.asarray(code, np.int64).ravel(), minlength=width)


class _Pass:
    """Defaults of a fold pass (workbench/store/fold.py): reads router/experts, no pairs."""
    arrays: tuple = (EXPERTS,)
    pair_arrays: tuple = ()


# ----------------------------------------------------------------------------------- passes
class LoadPass(_Pass):
    """Assignments per expert [M, E]; with router/logits also the summed router distributions."""

    def __init__(self, info: dict, convention: str = "softmax", has_logits: bool = False, loads_only=False):
        if has_logits and convention not in ("softmax", "sigmoid"):
            raise ValueError(f"convention must be 'softmax' or 'sigmoid', got {convention!r}")
        self.info, self.convention, self.has_logits, self.loads_only = info, convention, has_logits, loads_only
        self.arrays = (EXPERTS, "router/logits") if has_logits else (EXPERTS,)

    def init(self):
        m, e, k = self.info["n_moe_layers"], self.info["n_experts"], self.info["top_k"]
        acc = {"counts": np.zeros((m, e), np.int64)}
        if self.has_logits:
            acc.update(p_conv=np.zeros((m, e)), slot=np.zeros((m, k * e), np.int64))
            if self.convention != "softmax":
                acc["p_soft"] = np.zeros((m, e))
        return acc

    def update(self, acc, c):
        x, e, k = c[EXPERTS], self.info["n_experts"], self.info["top_k"]   # (M, t, K)
        for m in range(len(x)):
            _bincount_into(acc["counts"][m], x[m], e)
            if self.has_logits:
                r = c["router/logits"][m]                                        # (t, E)
                acc["p_conv"][m] += R.router_probs(r, self.convention).sum(0, dtype=np.float64)
                if self.convention != "softmax":
                    acc["p_soft"][m] += R.router_probs(r, "softmax").sum(0, dtype=np.float64)
                _bincount_into(acc["slot"][m], x[m].astype(np.int64) + np.arange(k) * e, k * e)

    def finish(self, acc):
        info = self.info
        if self.loads_only:
            return acc["counts"]
        if not self.has_logits:
            return R._load_frame(info, acc["counts"], None, None, None, self.convention)
        n, k, e = info["n_tokens"], info["top_k"], info["n_experts"]
        p_conv = acc["p_conv"] / n
        p_soft = p_conv if self.convention == "softmax" else acc["p_soft"] / n
        return R._load_frame(info, acc["counts"], p_conv, p_soft, acc["slot"].reshape(-1, k, e) / n, self.convention)


class DomainPass(_Pass):
    """Assignments per (domain, expert) [M, D·E] and tokens per domain [D] (OLMoE Eq. 7)."""
    arrays = (EXPERTS, DOC)

    def __init__(self, info: dict, domains: list[str], dom_of_doc: np.ndarray, raw: bool = False):
        self.info, self.domains, self.dom_of_doc, self.raw = info, domains, dom_of_doc, raw

    def init(self):
        m, e, d = self.info["n_moe_layers"], self.info["n_experts"], len(self.domains)
        return {"counts": np.zeros((m, d * e), np.int64), "n_d": np.zeros(d, np.int64)}

    def update(self, acc, c):
        e, d = self.info["n_experts"], len(self.domains)
        dom = self.dom_of_doc[c[DOC]]
        _bincount_into(acc["n_d"], dom, d)
        for m, x in enumerate(c[EXPERTS]):
            _bincount_into(acc["counts"][m], dom[:, None] * e + x, d * e)

    def finish(self, acc):
        counts = acc["counts"].reshape(-1, len(self.domains), self.info["n_experts"])
        return counts if self.raw else R._domain_frame(self.info, self.domains, counts, acc["n_d"])


class VocabPass(_Pass):
    """N_{x,e} per distinct token id x [M, U·E] and N_x [U] (OLMoE Eq. 8): the routed token itself
    ('input'), or the token after it in the same document ('next')."""

    def __init__(self, info: dict, vocab: np.ndarray, variant: str = "input", min_count: int = 10,
                 raw: bool = False):
        if variant not in ("input", "next"):
            raise ValueError(f"variant must be 'input' or 'next', got {variant!r}")
        self.info, self.vocab, self.variant, self.min_count, self.raw = info, vocab, variant, min_count, raw
        u = len(vocab)
        self.dense_of = np.zeros(int(vocab[-1]) + 1 if u else 1, np.int64)  # token id -> row
        self.dense_of[vocab] = np.arange(u)
        if variant == "input":
            self.arrays = (EXPERTS, "tokens")
        else:
            self.arrays, self.pair_arrays = (), (EXPERTS, "tokens", DOC)

    def init(self):
        m, e, u, k = self.info["n_moe_layers"], self.info["n_experts"], len(self.vocab), self.info["top_k"]
        # int32 while no count can reach 2^31 (T·K events): the largest accumulator of the set
        return {"counts": np.zeros((m, u * e), count_dtype(self.info["n_tokens"] * k)),
                "n_u": np.zeros(u, np.int64)}

    def _add(self, acc, x_MTK, ids_T):
        e, u = self.info["n_experts"], len(self.vocab)
        dense = self.dense_of[ids_T]
        _bincount_into(acc["n_u"], dense, u)
        for m, x in enumerate(x_MTK):
            _bincount_into(acc["counts"][m], dense[:, None] * e + x, u * e)

    def update(self, acc, c):
        if self.variant == "input":
            self._add(acc, c[EXPERTS], c["tokens"])

    def pairs(self, acc, a, b):
        keep = a[DOC] == b[DOC]                    # the next token lies in the same document
        self._add(acc, a[EXPERTS][:, keep], b["tokens"][keep])

    def finish(self, acc):
        info, u, e = self.info, len(self.vocab), self.info["n_experts"]
        if self.raw:
            return {"counts": acc["counts"].reshape(-1, u, e).astype(np.int64), "n_u": acc["n_u"]}
        return pd.DataFrame([R._vocab_row(info, m, self.variant, acc["counts"][m].reshape(u, e).astype(np.int64),
                                          acc["n_u"], self.vocab, self.min_count)
                             for m in range(info["n_moe_layers"])])


class ConsecutivePass(_Pass):
    """Same-expert hits of consecutive tokens per domain [M, 2·D] (first choice, any overlap) and
    pairs per domain [D] (Mixtral Table 5)."""
    arrays, pair_arrays = (), (EXPERTS, DOC)

    def __init__(self, info: dict, domains: list[str], dom_of_doc: np.ndarray):
        self.info, self.domains, self.dom_of_doc = info, domains, dom_of_doc

    def init(self):
        d = len(self.domains)
        return {"hits": np.zeros((self.info["n_moe_layers"], 2 * d), np.int64), "n_pairs": np.zeros(d, np.int64)}

    def update(self, acc, c):
        pass

    def pairs(self, acc, a, b):
        d = len(self.domains)
        same = a[DOC] == b[DOC]
        dom = self.dom_of_doc[a[DOC][same]]
        _bincount_into(acc["n_pairs"], dom, d)
        for m in range(len(a[EXPERTS])):
            first, anyo = R._pair_hits(a[EXPERTS][m][same], b[EXPERTS][m][same])
            acc["hits"][m, :d] += np.bincount(dom, weights=first, minlength=d).astype(np.int64)
            acc["hits"][m, d:] += np.bincount(dom, weights=anyo, minlength=d).astype(np.int64)

    def finish(self, acc):
        d = len(self.domains)
        hits = acc["hits"].reshape(-1, 2, d).transpose(1, 0, 2)  # [2, M, D]
        return R._consecutive_frame(self.info, self.domains, acc["n_pairs"], hits)


class TransitionsPass(_Pass):
    """Joint counts of the `slot`-th choice at consecutive MoE layers [M-1, E·E]."""

    def __init__(self, info: dict, slot: int = 0, raw: bool = False):
        self.info, self.slot, self.raw = info, slot, raw

    def init(self):
        m, e = self.info["n_moe_layers"], self.info["n_experts"]
        return {"joint": np.zeros((max(m - 1, 0), e * e), np.int64)}

    def update(self, acc, c):
        e = self.info["n_experts"]
        x = c[EXPERTS][:, :, self.slot]                                          # (M, t)
        for m in range(len(x) - 1):
            _bincount_into(acc["joint"][m], x[m].astype(np.int64) * e + x[m + 1], e * e)

    def finish(self, acc):
        e = self.info["n_experts"]
        joint = acc["joint"].reshape(-1, e, e)
        return joint if self.raw else R._transitions_frame(self.info, joint)


class TransitionMatrixPass(_Pass):
    """Joint counts [E, E] of the `slot`-th choice at two MoE layers."""

    def __init__(self, info: dict, a: int, b: int, slot: int = 0):
        self.info, self.a, self.b, self.slot = info, a, b, slot

    def init(self):
        return {"joint": np.zeros(self.info["n_experts"] ** 2, np.int64)}

    def update(self, acc, c):
        e, x = self.info["n_experts"], c[EXPERTS]
        _bincount_into(acc["joint"], x[self.a, :, self.slot].astype(np.int64) * e + x[self.b, :, self.slot], e * e)

    def finish(self, acc):
        e = self.info["n_experts"]
        return acc["joint"].reshape(e, e)


class CoactivationPass(_Pass):
    """Pair counts of the top-k slots within a layer [M, E·E] and assignments [M, E] (OLMoE Eq. 6)."""

    def __init__(self, info: dict, pairs: str = "all"):
        if info["top_k"] < 2:
            raise ValueError(R.TOP1_COACTIVATION_MESSAGE)
        self.info, self.pair_kind, self.idx = info, pairs, R.slot_pairs(info["top_k"], pairs)

    def init(self):
        m, e = self.info["n_moe_layers"], self.info["n_experts"]
        return {"joint": np.zeros((m, e * e), np.int64), "n_i": np.zeros((m, e), np.int64)}

    def update(self, acc, c):
        e = self.info["n_experts"]
        for m, x in enumerate(c[EXPERTS]):
            x = x.astype(np.int64)
            for s, t in self.idx:
                _bincount_into(acc["joint"][m], x[:, s] * e + x[:, t], e * e)
            _bincount_into(acc["n_i"][m], x, e)

    def finish(self, acc):
        info, e = self.info, self.info["n_experts"]
        rows = []
        for layer in range(info["n_moe_layers"]):
            cnt, n_i = acc["joint"][layer], acc["n_i"][layer].astype(np.float64)
            joint = cnt.reshape(e, e).astype(np.float64)
            co = np.divide(joint, n_i[:, None], out=np.zeros(joint.shape), where=n_i[:, None] > 0)
            for i in range(e):
                for j in range(e):
                    rows.append({"moe_layer": layer, "layer": info["layer_index"][layer], "expert_i": i,
                                 "expert_j": j, "count": int(cnt[i * e + j]), "n_i": int(n_i[i]),
                                 "coactivation": co[i, j]})
        df = pd.DataFrame(rows)
        df.attrs.update(pairs=self.pair_kind, top_k=info["top_k"], n_experts=e)
        return df


def dataset_vocab(ds) -> np.ndarray:
    """Distinct token ids of the dataset, ascending (a cheap dask pass over `tokens`): the rows of the
    vocabulary tables."""
    import dask.array as da

    vocab = np.asarray(da.unique(ds["tokens"].data).compute())
    if len(vocab) and vocab[0] < 0:
        raise ValueError(f"token ids must be >= 0, found {vocab[0]}")
    return vocab


def _domain_pass(ds, raw=False):
    return DomainPass(router_info(ds), *_docs(ds), raw=raw)


def _consecutive_pass(ds):
    return ConsecutivePass(router_info(ds), *_docs(ds))


def _vocab_pass(ds, variant="input", min_count=10, vocab=None):
    return VocabPass(router_info(ds), dataset_vocab(ds) if vocab is None else vocab, variant, min_count)


def _load_pass(ds, convention="softmax"):
    return LoadPass(router_info(ds), convention, "router/logits" in ds)


@dataclass(frozen=True)
class Metric:
    make: Callable       # (ds, **options) -> a fold pass
    needs: tuple         # arrays the metric reads
    doc: str


METRICS: dict[str, Metric] = {
    "load": Metric(_load_pass, (EXPERTS,), "expert load and balance (load_table)"),
    "domain": Metric(_domain_pass, (EXPERTS,), "domain specialization (OLMoE Eq. 7)"),
    "vocab": Metric(_vocab_pass, (EXPERTS, "tokens"), "vocabulary specialization, input tokens (OLMoE Eq. 8)"),
    "vocab_next": Metric(lambda ds, vocab=None: _vocab_pass(ds, "next", vocab=vocab), (EXPERTS, "tokens"),
                         "vocabulary specialization, next tokens"),
    "consecutive": Metric(_consecutive_pass, (EXPERTS,), "consecutive-token same-expert rates (Mixtral)"),
    "transitions": Metric(lambda ds: TransitionsPass(router_info(ds)), (EXPERTS,),
                          "layer-to-layer transitions, MI and NMI"),
    "coactivation": Metric(lambda ds: CoactivationPass(router_info(ds)), (EXPERTS,),
                           "within-layer co-activation (top-k > 1)"),
}


def metric_passes(ds, names) -> dict[str, Any]:
    """{name: fold pass} for the named routing metrics (see METRICS); the vocabulary is read once."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown routing metrics {unknown}; known: {sorted(METRICS)}")
    vocab = dataset_vocab(ds) if {"vocab", "vocab_next"} & set(names) else None
    return {n: METRICS[n].make(ds, vocab=vocab) if n.startswith("vocab") else METRICS[n].make(ds) for n in names}


def metric_graphs(ds, names, lanes: int | None = None) -> dict[str, tuple]:
    """{name: (graphs, finish)}: every named metric in one fold (one read of each chunk); computing
    the graphs of several names together computes the fold once."""
    if not names:
        return {}
    result = fold(ds, metric_passes(ds, names), lanes)
    return {n: ({"result": result[n]}, lambda r: r["result"]) for n in names}


def compute_metrics(ds, names, lanes: int | None = None) -> dict[str, Any]:
    """Several metrics in one dask compute (every chunk read once) -> {name: result}."""
    return _run(ds, metric_passes(ds, names), lanes)


def _run(ds, passes: dict, lanes: int | None = None):
    (out,) = __import__("dask").compute(fold(ds, passes, lanes))
    return out


def _one(ds, p):
    return _run(ds, {"m": p})["m"]


# ------------------------------------------------------------------------- public functions
def expert_loads(ds, chunk_tokens: int | None = None) -> np.ndarray:
    """As `routing.expert_loads` -> int64 [M, E].  chunk_tokens is ignored: the dataset's chunks rule."""
    return _one(ds, LoadPass(router_info(ds), loads_only=True))


def load_table(ds, convention: str = "softmax", chunk_tokens: int | None = None) -> pd.DataFrame:
    return _one(ds, _load_pass(ds, convention))


def domain_specialization_table(ds, chunk_tokens: int | None = None) -> pd.DataFrame:
    return _one(ds, _domain_pass(ds))


def vocabulary_specialization_table(ds, variant: str = "input", min_count: int = 10,
                                    chunk_tokens: int | None = None) -> pd.DataFrame:
    return _one(ds, _vocab_pass(ds, variant, min_count))


def consecutive_rates(ds, chunk_tokens: int | None = None) -> pd.DataFrame:
    return _one(ds, _consecutive_pass(ds))


def transition_matrix(ds, moe_layer_a: int, moe_layer_b: int, slot: int = 0,
                      chunk_tokens: int | None = None) -> np.ndarray:
    return _one(ds, TransitionMatrixPass(router_info(ds), moe_layer_a, moe_layer_b, slot))


def layer_transitions(ds, slot: int = 0, chunk_tokens: int | None = None) -> pd.DataFrame:
    return _one(ds, TransitionsPass(router_info(ds), slot))


def coactivation_table(ds, pairs: str = "all") -> pd.DataFrame:
    """OLMoE Eq. 6 per MoE layer over the whole dataset (`routing.coactivation` for every layer).

    Columns: moe_layer, layer, expert_i, expert_j, count (N_{i,j}), n_i (N_i), coactivation (N_ij/N_i).
    Raises ValueError for top-1 routing (routing.TOP1_COACTIVATION_MESSAGE)."""
    return _one(ds, CoactivationPass(router_info(ds), pairs))


def count_tables(ds, lanes: int | None = None) -> dict[str, Any]:
    """The raw count tables behind the Experts tab's run index (workbench/store/index.py), in one
    fold over the dataset (for runs too large for one pass in memory):

        load          int64 [M, E]          assignments, all top-k slots
        domain_count  int64 [M, E, D]       assignments per document domain (`domains` order)
        vocab_count   int64 [M, U, E]       N_{x,e}^{(k)} per distinct token id (`vocab` order)
        vocab_total   int64 [U]             N_x, occurrences of each id
        cofire        int64 [M-1, E, E]     first choice at MoE layer m -> m+1
        vocab, domains                      the row labels
    """
    info = router_info(ds)
    domains, dom_of_doc = _docs(ds)
    vocab = dataset_vocab(ds)
    r = _run(ds, {"load": LoadPass(info, loads_only=True), "domain": DomainPass(info, domains, dom_of_doc, raw=True),
                  "vocab": VocabPass(info, vocab, raw=True), "cofire": TransitionsPass(info, raw=True)}, lanes)
    return {"load": r["load"], "domain_count": r["domain"].transpose(0, 2, 1),
            "vocab_count": r["vocab"]["counts"], "vocab_total": r["vocab"]["n_u"], "vocab": vocab,
            "domains": domains, "cofire": r["cofire"]}

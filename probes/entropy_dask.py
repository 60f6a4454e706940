"""Attention-entropy metrics over a dataset of many runs (`workbench.store.open_dataset`), by dask.

Twins of the store-level functions in probes/entropy.py, with the same arguments and results:

    layer_head_summary   per (layer, head) sums over tokens: dask reductions along `token`
    position_profile     per-token values grouped into position bins: flox `groupby_reduce`
                         (count, sum, min, max per bin, map-reduce over token chunks)
    profile_by_kind      position_profile over the layers of each attention kind

Sums are float64, as in the chunk loops; only their order differs (≤ 1e-12 relative). Counts, minima
and maxima are exact.  Memory per task: one chunk of one layer ([H, token chunk]) and O(bins).

Shape legend: L layers, H query heads, T tokens, B position bins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from probes import entropy as E

__all__ = ["layer_head_summary", "position_profile", "profile_by_kind", "summary_graph", "profile_graph"]


def summary_graph(ds, min_keys: int = E.COLLAPSE_MIN_KEYS, threshold: float = E.COLLAPSE_THRESHOLD):
    """(lazy sums [L, H], finish) for layer_head_summary."""
    import dask.array as da

    h = ds["attention/entropy"].data.astype(np.float64)  # [L, H, T]
    n_T = ds["attention/n_keys"].data[:, None, :]          # [L, 1, T]
    fin = da.isfinite(h)
    long_ = fin & (n_T >= min_keys)
    logn = da.log(da.maximum(n_T.astype(np.float64), 1.0))
    # normalized_entropy / kl_to_uniform, elementwise as in probes/entropy.py
    norm = da.where(logn > 0, h / da.where(logn > 0, logn, 1.0), 0.0)
    acc = {"n": fin.sum(-1), "h": da.where(fin, h, 0).sum(-1), "nl": long_.sum(-1),
           "norm": da.where(long_, norm, 0).sum(-1), "kl": da.where(long_, logn - h, 0).sum(-1)}
    no_temp = "attention/entropy_no_temp" in ds
    if no_temp:
        h0 = ds["attention/entropy_no_temp"].data.astype(np.float64)
        d = h0 - h
        okd = da.isfinite(d)
        acc.update(h0=da.where(okd, h0, 0).sum(-1), d=da.where(okd, d, 0).sum(-1),
                   dmax=da.where(okd, d, -np.inf).max(-1))
    kinds = E.layer_kinds(ds)

    def finish(r):
        shape = r["n"].shape
        sums = {k: np.asarray(r[k], dtype=np.float64) if k in r else np.zeros(shape)
                for k in ("n", "h", "h0", "d", "nl", "norm", "kl")}
        dmax = r["dmax"] if no_temp else np.full(shape, -np.inf)
        return E._summary_frame(kinds, sums, dmax, no_temp, threshold)
    return acc, finish


def layer_head_summary(ds, min_keys: int = E.COLLAPSE_MIN_KEYS, threshold: float = E.COLLAPSE_THRESHOLD,
                       chunk_tokens: int = 1 << 16) -> pd.DataFrame:
    """As `entropy.layer_head_summary` (collapsed heads, ΔH mean/max); chunk_tokens is ignored."""
    import dask

    graphs, finish = summary_graph(ds, min_keys, threshold)
    (r,) = dask.compute(graphs)
    return finish(r)


def _bin_codes(pos, edges: np.ndarray):
    """Lazy bin index of every position; -1 outside the edges (ignored, as BinAccumulator does)."""
    nb = len(edges) - 1

    def block(p, edges=edges, nb=nb):
        b = np.searchsorted(edges, p, side="right") - 1
        return np.where((b >= 0) & (b < nb), b, -1)
    return pos.map_blocks(block, dtype=np.int64)


def _binned(values, codes, edges: np.ndarray) -> dict:
    """flox count/sum/min/max per bin of the finite values -> lazy dict of [B] arrays."""
    import dask.array as da
    from flox.core import groupby_reduce

    nb = len(edges) - 1
    v = da.where(da.isfinite(values), values, np.nan)  # BinAccumulator ignores non-finite values
    out = {}
    for key, func in (("count", "count"), ("sum", "nansum"), ("min", "nanmin"), ("max", "nanmax")):
        res, _ = groupby_reduce(v, codes, func=func, expected_groups=np.arange(nb), method="map-reduce",
                                fill_value=np.nan if func != "count" else 0)
        out[key] = res
    return out


def _accumulator(edges, r) -> E.BinAccumulator:
    acc = E.BinAccumulator(edges)
    acc.count = np.asarray(r["count"], dtype=np.int64)
    empty = acc.count == 0
    acc.sum = np.where(empty, 0.0, np.asarray(r["sum"], dtype=np.float64))
    acc.min = np.where(empty, np.inf, np.asarray(r["min"], dtype=np.float64))
    acc.max = np.where(empty, -np.inf, np.asarray(r["max"], dtype=np.float64))
    return acc


def profile_graph(ds, layers, heads=None, stat: str = "entropy", n_bins: int = 2048, edges=None):
    """(lazy per-bin reductions, finish) for position_profile."""
    if stat not in E.STATS:
        raise ValueError(f"stat must be one of {E.STATS}, got {stat!r}")
    layers = [layers] if np.isscalar(layers) else list(layers)
    has0 = "attention/entropy_no_temp" in ds
    if stat == "delta" and not has0:
        raise KeyError("stat='delta' needs attention/entropy_no_temp in the run")
    hsel = slice(None) if heads is None else ([heads] if np.isscalar(heads) else list(heads))
    pos = ds["positions"].data
    if edges is None:
        edges = E.linear_bin_edges(int(pos.max().compute()), n_bins)
    edges = np.asarray(edges, dtype=np.int64)
    ent, nk = ds["attention/entropy"].data, ds["attention/n_keys"].data
    ent0 = ds["attention/entropy_no_temp"].data if has0 else None
    tot = tot0 = logn = 0.0
    n_heads = 0
    for layer in layers:
        h_HT = ent[layer][hsel].astype(np.float64)
        n_T = nk[layer]
        h0_HT = ent0[layer][hsel].astype(np.float64) if has0 else None
        tot = tot + _lazy_stat(stat, h_HT, h0_HT, n_T[None]).sum(0)
        if has0 and stat != "delta":
            tot0 = tot0 + _lazy_stat(stat, h0_HT, None, n_T[None]).sum(0)
        logn = logn + np.log(np.maximum(n_T, 1))
        n_heads += h_HT.shape[0]
    codes = _bin_codes(pos, edges)
    graphs = {"v": _binned(tot / n_heads, codes, edges), "logn": _binned(logn / len(layers), codes, edges)}
    if has0 and stat != "delta":
        graphs["v0"] = _binned(tot0 / n_heads, codes, edges)

    def finish(r):
        df = _accumulator(edges, r["v"]).frame()
        if has0 and stat != "delta":
            df = df.join(_accumulator(edges, r["v0"]).frame("no_temp_").iloc[:, 3:])
        df["log_n_mean"] = _accumulator(edges, r["logn"]).frame()["mean"]
        df.attrs.update(stat=stat, layers=layers, heads=None if heads is None else hsel)
        return df
    return graphs, finish


def _lazy_stat(stat: str, h, h0, n):
    """entropy._stat on dask arrays (the same formulas, without forcing NumPy)."""
    import dask.array as da

    if stat == "entropy":
        return h
    logn = da.log(da.maximum(n.astype(np.float64), 1.0))
    if stat == "normalized":
        return da.where(logn > 0, h / da.where(logn > 0, logn, 1.0), 0.0)
    if stat == "kl":
        return logn - h
    return h0 - h


def position_profile(ds, layers: Sequence[int] | int, heads: Sequence[int] | int | None = None,
                     stat: str = "entropy", n_bins: int = 2048, edges=None,
                     chunk_tokens: int = 1 << 16) -> pd.DataFrame:
    """As `entropy.position_profile`; chunk_tokens is ignored (the dataset's chunks rule)."""
    import dask

    graphs, finish = profile_graph(ds, layers, heads, stat, n_bins, edges)
    (r,) = dask.compute(graphs)
    return finish(r)


def profile_by_kind(ds, stat: str = "normalized", **kwargs) -> dict[str, pd.DataFrame]:
    """As `entropy.profile_by_kind`: one position profile per attention kind."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(E.layer_kinds(ds)):
        groups.setdefault(E.attention_kind(k), []).append(i)
    return {k: position_profile(ds, ls, stat=stat, **kwargs) for k, ls in groups.items()}

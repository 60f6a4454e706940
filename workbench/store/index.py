"""Precomputed per-expert indexes inside a run store: `build_index(run)` / `workbench index RUN`, and
`open_index(run)` to read them (docs/store.md, "Run index").

The Experts tab and token search must stay interactive on a 1M-token run, so everything they need
that would otherwise stream the whole run is computed once, chunk by chunk, and written into the run
as the Zarr group `index/`:

    index/load            int64   [moe_layer, expert]          assignments (all top-k slots)
    index/top_token       int64   [moe_layer, expert, n_top]   token indices with the highest gate, best first (-1 fill)
    index/top_gate        float32 [moe_layer, expert, n_top]   their gates (NaN fill)
    index/vocab_id        int32   [moe_layer, expert, n_vocab] token ids most often routed to the expert (-1 fill)
    index/vocab_count     int64   [moe_layer, expert, n_vocab] how often (N_{x,e}^{(k)}, OLMoE Eq. 8)
    index/vocab_total     int64   [moe_layer, expert, n_vocab] N_x: occurrences of that token id in the run
    index/domain_count    int64   [moe_layer, expert, domain]  assignments per document domain (OLMoE Eq. 7)
    index/modality_count  int64   [moe_layer, expert, modality] assignments of text / image tokens
    index/cofire          int64   [moe_pair, expert, expert]   first choice at MoE layer m -> m+1
    index/token_ids       int32   [vocab_seen]                  distinct token ids of the run, ascending
    index/token_start     int64   [vocab_seen+1]                token_ids[i] occurs at postings[start[i]:start[i+1]]
    index/postings        int64   [token]                       token indices grouped by token id, ascending within one

The index attributes (`index_version`, `n_tokens`, `input_hash`, `n_top`, `n_vocab`, `domains`,
`modalities`, `created`) tie it to the committed run: after a later append it is *stale* and
`open_index` says so.  Memory while building: O(M·E·(n_top + U)) for the counts plus O(T) for the
postings (about 20 bytes a token while sorting); the routed arrays are read one token chunk at a time.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from workbench.store.reader import Run, open_run
from workbench.store.schema import StoreError

INDEX_VERSION = 1
GROUP = "index"
MODALITIES = ("text", "image")
CHUNK = 1 << 16

__all__ = ["build_index", "open_index", "RunIndex", "IndexStale", "INDEX_VERSION"]


class IndexStale(StoreError):
    """The run changed (appended) after its index was built."""


def _image_token(run: Run) -> int | None:
    cfg = run.attrs.get("config") or {}
    v = cfg.get("image_token_index")
    return int(v) if isinstance(v, int) else None


def _top_merge(cur_pos, cur_gate, pos, gate, expert, n_experts: int, n_top: int):
    """Merge candidates (pos, gate, expert) [N] into the running top lists [E, n_top] (gate desc, then
    position asc)."""
    e_all = np.concatenate([np.repeat(np.arange(n_experts), n_top), expert])
    p_all = np.concatenate([cur_pos.ravel(), pos])
    g_all = np.concatenate([cur_gate.ravel(), gate])
    ok = p_all >= 0
    e_all, p_all, g_all = e_all[ok], p_all[ok], g_all[ok]
    order = np.lexsort((p_all, -g_all, e_all))
    e_s = e_all[order]
    first = np.searchsorted(e_s, np.arange(n_experts))
    rank = np.arange(len(e_s)) - first[e_s]
    keep = rank < n_top
    out_p = np.full((n_experts, n_top), -1, np.int64)
    out_g = np.full((n_experts, n_top), np.nan, np.float32)
    out_p[e_s[keep], rank[keep]] = p_all[order][keep]
    out_g[e_s[keep], rank[keep]] = g_all[order][keep]
    return out_p, out_g


def build_index(path: str | Path, n_top: int = 64, n_vocab: int = 64, chunk_tokens: int = CHUNK,
                progress: bool = False, on_step: Callable[[str], None] | None = None) -> Path:
    """Compute the index of the run at `path` and write it as `path/index` (replacing an older one).
    Returns the index group's path.  Needs the run's router recordings (probe 'router')."""
    _check_args(n_top, n_vocab)
    run = _open_routed(path)
    say = on_step or (lambda s: None)
    ex, gw, tok = run.array("router/experts"), run.array("router/weights"), run.array("tokens")
    m, _, k = ex.shape
    e = run.layout.n_experts
    n = run.n_tokens
    off = np.asarray(run.doc_offsets, np.int64)
    doms = [str(d) or "unknown" for d in run.read("doc_domain")] if run.n_docs else []
    domains = sorted(set(doms)) or ["unknown"]
    dom_of_doc = np.array([domains.index(d) for d in doms], np.int64)
    n_dom = len(domains)
    img = _image_token(run)

    # pass 1: the vocabulary seen, for dense per-token-id counts
    say("vocabulary")
    chunks = [(t0, min(n, t0 + chunk_tokens)) for t0 in range(0, n, chunk_tokens)]
    ids_all = np.concatenate([np.asarray(tok[t0:t1]) for t0, t1 in chunks]) if n else np.zeros(0, np.int32)
    vocab, dense_all, n_u = np.unique(ids_all, return_inverse=True, return_counts=True)
    u = len(vocab)
    say("postings")
    postings = np.argsort(dense_all, kind="stable").astype(np.int64)        # (T,) positions grouped by id

    load = np.zeros((m, e), np.int64)
    top_p = np.full((m, e, n_top), -1, np.int64)
    top_g = np.full((m, e, n_top), np.nan, np.float32)
    vcount = np.zeros((m, u * e), np.int64)
    dcount = np.zeros((m, e, n_dom), np.int64)
    mcount = np.zeros((m, e, len(MODALITIES)), np.int64)
    cofire = np.zeros((max(m - 1, 0), e, e), np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="tok", desc="index")
    for t0, t1 in chunks:
        say(f"tokens {t0}–{t1}")
        x = np.asarray(ex[:, t0:t1], dtype=np.int64)                         # (M, t, K)
        g = np.asarray(gw[:, t0:t1], dtype=np.float32)
        dense = dense_all[t0:t1]
        dom_T = dom_of_doc[np.searchsorted(off, np.arange(t0, t1), side="right") - 1] if run.n_docs else \
            np.zeros(t1 - t0, np.int64)
        mod_T = (ids_all[t0:t1] == img).astype(np.int64) if img is not None else np.zeros(t1 - t0, np.int64)
        pos = np.repeat(np.arange(t0, t1), k)
        for layer in range(m):
            xl = x[layer]                                                      # (t, K)
            load[layer] += np.bincount(xl.ravel(), minlength=e)
            top_p[layer], top_g[layer] = _top_merge(top_p[layer], top_g[layer], pos, g[layer].ravel(), xl.ravel(),
                                                    e, n_top)
            vcount[layer] += np.bincount((dense[:, None] * e + xl).ravel(), minlength=u * e)
            dcount[layer] += np.bincount((xl * n_dom + dom_T[:, None]).ravel(),
                                         minlength=e * n_dom).reshape(e, n_dom)
            mcount[layer] += np.bincount((xl * 2 + mod_T[:, None]).ravel(), minlength=e * 2).reshape(e, 2)
            if layer + 1 < m:
                cofire[layer] += np.bincount(xl[:, 0] * e + x[layer + 1, :, 0], minlength=e * e).reshape(e, e)
        if bar is not None:
            bar.update(t1 - t0)
    if bar is not None:
        bar.close()

    say("vocabulary tables")
    attrs, arrays = _tables(run, n_top, n_vocab, domains, img, load, top_p, top_g, vcount.reshape(m, u, e), vocab,
                            n_u, dcount, mcount, cofire)
    arrays.update(postings=(postings, ("token",)))
    say("writing")
    return _write(run.path, attrs, arrays)


def _check_args(n_top, n_vocab) -> None:
    if not isinstance(n_top, int) or not 1 <= n_top <= 100_000:
        raise ValueError(f"n_top must be an int in 1..100000, got {n_top!r}")
    if not isinstance(n_vocab, int) or not 1 <= n_vocab <= 100_000:
        raise ValueError(f"n_vocab must be an int in 1..100000, got {n_vocab!r}")


def _open_routed(path) -> Run:
    run = open_run(path)
    if not run.has("router/experts"):
        raise StoreError(f"{run.path}: no router/experts (record with probe 'router') — nothing to index")
    return run


def _tables(run: Run, n_top: int, n_vocab: int, domains, img, load, top_p, top_g, vcount_MUE, vocab, n_u,
            dcount, mcount, cofire) -> tuple[dict, dict]:
    """The index's attributes and arrays (all but the postings) from its count tables; shared by
    `build_index` and the dask builder (workbench/store/index_dask.py)."""
    m, u, e = vcount_MUE.shape
    nv = min(n_vocab, max(u, 1))
    v_id = np.full((m, e, nv), -1, np.int32)
    v_cnt = np.zeros((m, e, nv), np.int64)
    v_tot = np.zeros((m, e, nv), np.int64)
    for layer in range(m):
        c_EU = vcount_MUE[layer].T                                              # (E, U)
        if u == 0:
            continue
        top = np.argsort(-c_EU, axis=1, kind="stable")[:, :nv]                 # ties: lower token id first
        cnt = np.take_along_axis(c_EU, top, 1)
        v_id[layer] = np.where(cnt > 0, vocab[top], -1)
        v_cnt[layer] = cnt
        v_tot[layer] = np.where(cnt > 0, n_u[top], 0)
    token_start = np.concatenate([[0], np.cumsum(n_u)]).astype(np.int64)
    attrs = {"index_version": INDEX_VERSION, "n_tokens": run.n_tokens, "n_docs": run.n_docs,
             "input_hash": run.attrs.get("input_hash"), "n_top": n_top, "n_vocab": nv, "domains": domains,
             "modalities": list(MODALITIES), "image_token_index": img,
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    arrays = {"load": (load, ("moe_layer", "expert")), "top_token": (top_p, ("moe_layer", "expert", "rank")),
              "top_gate": (top_g, ("moe_layer", "expert", "rank")),
              "vocab_id": (v_id, ("moe_layer", "expert", "vocab_rank")),
              "vocab_count": (v_cnt, ("moe_layer", "expert", "vocab_rank")),
              "vocab_total": (v_tot, ("moe_layer", "expert", "vocab_rank")),
              "domain_count": (dcount, ("moe_layer", "expert", "domain")),
              "modality_count": (mcount, ("moe_layer", "expert", "modality")),
              "cofire": (cofire, ("moe_pair", "expert", "expert_next")),
              "token_ids": (np.asarray(vocab).astype(np.int32), ("vocab_seen",)),
              "token_start": (token_start, ("vocab_edge",))}
    return attrs, arrays


POSTINGS_CHUNK = 1 << 20   # tokens per zarr chunk of index/postings


def _write(run_path: Path, attrs: dict, arrays: dict, fill: Callable[[zarr.Group, Path], None] | None = None) -> Path:
    """Write the index into a hidden sibling directory, then move it into place as `run/index`: a
    crash leaves either the old index or the new one, never a half-written one at `run/index`.
    `fill(group, path)` may add arrays to the hidden group first (the dask builder's postings)."""
    tmp = run_path.parent / f".{run_path.name}.index-{secrets.token_hex(4)}"
    try:
        g = zarr.open_group(tmp, mode="w", zarr_format=3)
        for name, (data, dims) in arrays.items():
            chunks = tuple(min(max(s, 1), POSTINGS_CHUNK) if d == "token" else max(s, 1)
                           for s, d in zip(data.shape, dims))
            a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, dimension_names=dims,
                               fill_value=-1 if data.dtype.kind == "i" else np.nan)
            if data.size:
                a[...] = data
        if fill is not None:
            fill(g, tmp)
        g.update_attributes(attrs)
        dest = run_path / GROUP
        old = None
        if dest.exists():
            old = run_path.parent / f".{run_path.name}.index-old-{secrets.token_hex(4)}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class RunIndex:
    """Read access to a run's index; arrays are read lazily (the postings only where searched)."""

    def __init__(self, run: Run, group: zarr.Group):
        self.run, self.group, self.attrs = run, group, dict(group.attrs)
        self.domains: list[str] = list(self.attrs["domains"])
        self._ids = self._start = self._post = None

    def __getitem__(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(f"{self.run.path}/index: array {name!r} is missing; rebuild with "
                             f"`workbench index {self.run.path}`") from None

    def top(self, moe: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices, gates) with the highest gate for MoE-layer position `moe` and `expert`."""
        p = np.asarray(self["top_token"][moe, expert])
        keep = p >= 0
        return p[keep], np.asarray(self["top_gate"][moe, expert])[keep]

    def vocab(self, moe: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, N_{x,e}, N_x) of the expert's most frequent token ids."""
        ids = np.asarray(self["vocab_id"][moe, expert])
        keep = ids >= 0
        return ids[keep], np.asarray(self["vocab_count"][moe, expert])[keep], \
            np.asarray(self["vocab_total"][moe, expert])[keep]

    @property
    def token_ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.asarray(self["token_ids"][:])
        return self._ids

    def positions_of(self, token_ids) -> np.ndarray:
        """Ascending token indices of every occurrence of any of `token_ids` (postings lookup)."""
        want = np.asarray(token_ids, np.int64).ravel()
        i = np.searchsorted(self.token_ids, want)
        i = i[(i < len(self.token_ids)) & (self.token_ids[np.minimum(i, len(self.token_ids) - 1)] == want)]
        if not len(i):
            return np.zeros(0, np.int64)
        if self._start is None:
            self._start = np.asarray(self["token_start"][:])
        start, j = self._start, np.unique(i)
        if len(j) > 8 and self._post is None:      # many ids: one read of all postings (8 bytes a token), kept
            self._post = np.asarray(self["postings"][:])
        post = self._post if self._post is not None else self["postings"]
        parts = [np.asarray(post[start[x]:start[x + 1]]) for x in j]
        return np.sort(np.concatenate(parts))


def open_index(run: Run | str | Path, allow_stale: bool = False) -> RunIndex | None:
    """The run's index, or None when it has none.  Raises IndexStale when the run was appended to
    after the index was built (unless allow_stale), StoreError when the index is unreadable/newer."""
    run = run if isinstance(run, Run) else open_run(run)
    if not (run.path / GROUP / "zarr.json").is_file():
        return None
    try:
        g = zarr.open_group(run.path / GROUP, mode="r", zarr_format=3, use_consolidated=False)
        attrs = dict(g.attrs)
    except Exception as e:
        raise StoreError(f"{run.path}/index: unreadable ({type(e).__name__}: {e}); rebuild with "
                         f"`workbench index {run.path}`") from e
    ver = attrs.get("index_version")
    if not isinstance(ver, int) or ver > INDEX_VERSION:
        raise StoreError(f"{run.path}/index: index_version {ver!r} is not supported (<= {INDEX_VERSION})")
    if not allow_stale and (attrs.get("n_tokens") != run.n_tokens or
                            attrs.get("input_hash") != run.attrs.get("input_hash")):
        raise IndexStale(f"{run.path}/index was built for {attrs.get('n_tokens')} tokens, the run now commits "
                         f"{run.n_tokens} (or different inputs): rebuild with `workbench index {run.path}`")
    return RunIndex(run, g)


def index_summary(idx: RunIndex) -> dict[str, Any]:
    a = idx.attrs
    return {k: a.get(k) for k in ("n_tokens", "n_docs", "n_top", "n_vocab", "domains", "created")}

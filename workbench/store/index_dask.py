"""The run index of the Experts tab (workbench/store/index.py) built through dask, for runs too large
for one pass in memory: `build_index_dask(run)` / `workbench index RUN --engine dask`.

`build_index` holds every token id and its sort (about 20 bytes a token) plus the count tables in one
process. Here the same arrays come from the engine the dataset metrics use:

    counts      load, domain, vocabulary, modality, co-firing, and the top-gate contexts per expert:
                one chunk fold over the run (workbench/store/fold.py); the top lists are merged per
                chunk and between lanes by the same rule (gate descending, then token index ascending)
    postings    token indices grouped by token id: a counting sort. The vocabulary counts give each
                id's slice of the output (`token_start`); one dask task per block of POSTINGS_CHUNK
                outputs scans the run's token ids, keeps those whose id falls in the block, sorts them
                stably by id and writes exactly that zarr chunk, so tasks never share a chunk.

Memory per task: one token chunk of the routed arrays, the lane's tables (M·E·(n_top + U) plus
the domain and modality counts), or one postings block plus the occurrences of the two token ids
that straddle its edges. Every postings task reads the token ids once (4 bytes a token, compressed on
disk), so the postings cost grows as T²/POSTINGS_BLOCK: ≈ 20 scans of the ids at 20M tokens. The
arrays equal `build_index`'s exactly (tests/test_index_dask.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from workbench.store.index import (
    MODALITIES,
    POSTINGS_CHUNK,
    _check_args,
    _image_token,
    _open_routed,
    _tables,
    _top_merge,
    _write,
)

__all__ = ["build_index_dask", "TopPass", "ModalityPass"]

EXPERTS, WEIGHTS = "router/experts", "router/weights"
POSTINGS_BLOCK = POSTINGS_CHUNK   # outputs per postings task = the zarr chunk of index/postings it writes


class TopPass:
    """Token indices with the highest gate per (MoE layer, expert), best first: [M, E, n_top] (-1 fill)
    and their gates (NaN fill). Owns its merge (not a sum), so the fold leaves its tables alone."""
    arrays, pair_arrays = (EXPERTS, WEIGHTS), ()

    def __init__(self, n_moe: int, n_experts: int, n_top: int):
        self.m, self.e, self.n_top = n_moe, n_experts, n_top

    def init(self):
        return {"pos": np.full((self.m, self.e, self.n_top), -1, np.int64),
                "gate": np.full((self.m, self.e, self.n_top), np.nan, np.float32)}

    def update(self, acc, c):
        x, g = c[EXPERTS], c[WEIGHTS]                                              # (M, t, K)
        k = x.shape[2]
        pos = np.repeat(np.arange(c["_t0"], c["_t0"] + x.shape[1]), k)
        for m in range(self.m):
            acc["pos"][m], acc["gate"][m] = _top_merge(acc["pos"][m], acc["gate"][m], pos,
                                                       g[m].ravel().astype(np.float32), x[m].ravel().astype(np.int64),
                                                       self.e, self.n_top)

    def combine(self, acc, other):
        expert = np.repeat(np.arange(self.e), self.n_top)
        for m in range(self.m):
            acc["pos"][m], acc["gate"][m] = _top_merge(acc["pos"][m], acc["gate"][m], other["pos"][m].ravel(),
                                                       other["gate"][m].ravel(), expert, self.e, self.n_top)

    def finish(self, acc):
        return acc


class ModalityPass:
    """Assignments of text and image tokens per (MoE layer, expert): [M, E, 2]."""
    arrays, pair_arrays = (EXPERTS, "tokens"), ()

    def __init__(self, n_moe: int, n_experts: int, image_token: int | None):
        self.m, self.e, self.img = n_moe, n_experts, image_token

    def init(self):
        return {"count": np.zeros((self.m, self.e * len(MODALITIES)), np.int64)}

    def update(self, acc, c):
        tok = c["tokens"]
        mod = (tok == self.img).astype(np.int64) if self.img is not None else np.zeros(len(tok), np.int64)
        for m, x in enumerate(c[EXPERTS]):
            acc["count"][m] += np.bincount((x.astype(np.int64) * 2 + mod[:, None]).ravel(), minlength=self.e * 2)

    def finish(self, acc):
        return acc["count"].reshape(self.m, self.e, len(MODALITIES))


def _postings_block(run_path: str, out_path: str, vocab: np.ndarray, token_start: np.ndarray, p0: int, p1: int,
                    scan_tokens: int) -> int:
    """Write postings[p0:p1] (one zarr chunk): the token indices of ids vocab[v_lo..v_hi] grouped by id,
    ascending within an id, cut to the block."""
    import zarr

    from workbench.store.reader import open_run

    v_lo = int(np.searchsorted(token_start, p0, side="right") - 1)
    v_hi = int(np.searchsorted(token_start, p1 - 1, side="right") - 1)
    lo_id, hi_id = vocab[v_lo], vocab[v_hi]
    run = open_run(run_path)
    tok, n = run.array("tokens"), run.n_tokens
    pos, ids = [], []
    for t0 in range(0, n, scan_tokens):
        t = np.asarray(tok[t0:min(n, t0 + scan_tokens)])
        hit = np.flatnonzero((t >= lo_id) & (t <= hi_id))
        pos.append(hit + t0)
        ids.append(t[hit])
    pos_a, ids_a = np.concatenate(pos).astype(np.int64), np.concatenate(ids)
    grouped = pos_a[np.argsort(ids_a, kind="stable")]          # by id, positions ascending within one
    base = int(token_start[v_lo])
    out = zarr.open_array(out_path, mode="r+")
    out[p0:p1] = grouped[p0 - base:p1 - base]
    return p1 - p0


def build_index_dask(path: str | Path, n_top: int = 64, n_vocab: int = 64, *, lanes: int | None = None,
                     chunk_tokens: int | None = None, progress: bool = False) -> Path:
    """As `workbench.store.index.build_index`, computed through dask in bounded memory: on the
    threaded scheduler, or on the active `dask.distributed` client (whose workers must see the run at
    the same path). Returns the index group's path."""
    import dask

    from probes import routing_dask as RD
    from workbench.store import open_dataset
    from workbench.store.fold import fold

    _check_args(n_top, n_vocab)
    run = _open_routed(path)
    ds = open_dataset(run.path, chunk_tokens, include_incomplete=True)
    info = RD.router_info(ds)
    m, e = info["n_moe_layers"], info["n_experts"]
    domains, dom_of_doc = RD._docs(ds)
    vocab = RD.dataset_vocab(ds)
    img = _image_token(run)
    passes = {"load": RD.LoadPass(info, loads_only=True), "top": TopPass(m, e, n_top),
              "vocab": RD.VocabPass(info, vocab, raw=True),
              "domain": RD.DomainPass(info, domains, dom_of_doc, raw=True),
              "modality": ModalityPass(m, e, img), "cofire": RD.TransitionsPass(info, raw=True)}

    bar = contextlib.nullcontext()
    if progress:
        from workbench.analyze import _TqdmCallback
        bar = _TqdmCallback("index (counts)")
    with bar:
        (r,) = dask.compute(fold(ds, passes, lanes))
    n_u = r["vocab"]["n_u"]
    attrs, arrays = _tables(run, n_top, n_vocab, domains, img, r["load"], r["top"]["pos"], r["top"]["gate"],
                            r["vocab"]["counts"], vocab, n_u, r["domain"].transpose(0, 2, 1), r["modality"],
                            r["cofire"])
    token_start = arrays["token_start"][0]
    n = run.n_tokens
    scan = int(chunk_tokens or 1 << 20)

    def fill(group, tmp: Path) -> None:
        group.create_array("postings", shape=(n,), dtype=np.int64, chunks=(min(max(n, 1), POSTINGS_BLOCK),),
                           dimension_names=("token",), fill_value=-1)
        if not n:
            return
        from dask import delayed

        tasks = [delayed(_postings_block, pure=False)(str(run.path), str(tmp / "postings"), vocab, token_start,
                                                      p0, min(n, p0 + POSTINGS_BLOCK), scan)
                 for p0 in range(0, n, POSTINGS_BLOCK)]
        written = sum(dask.compute(*tasks))
        if written != n:
            raise RuntimeError(f"{run.path}: postings covered {written} of {n} tokens")

    attrs["built_with"] = "dask"
    return _write(run.path, attrs, arrays, fill)



def in_memory_bytes(path: str | Path) -> int:
    """Estimated peak of `build_index` on the run: about 24 bytes a token (ids, their inverse, the
    argsort and its temporary) plus its int64 vocabulary table M·U·E (U ≤ min(T, vocab size))."""
    run = _open_routed(path)
    m, t, _ = run.array("router/experts").shape
    vocab = (run.attrs.get("config") or {}).get("vocab_size") or run.n_tokens
    return 24 * run.n_tokens + 8 * m * min(run.n_tokens, int(vocab)) * run.layout.n_experts


def choose_engine(path: str | Path, fraction: float = 0.5) -> str:
    """'memory' when `build_index` fits in `fraction` of the memory available now, else 'dask'."""
    avail = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemAvailable:")), None) if Path("/proc/meminfo").exists() else None
    if avail is None:
        return "memory"
    return "memory" if in_memory_bytes(path) <= fraction * avail else "dask"

"""Many runs as one lazy dataset: `open_dataset(paths_or_glob) -> xarray.Dataset` backed by dask.

A corpus recorded in several runs (or the per-rank part stores of a `record --dp N` recording) is
analysed as if it were one run: every token array is concatenated along `token`, documents along
`doc`, and nothing is read until a computation asks for it. The probes' store-level metrics accept
this dataset and compute through dask (probes/routing_dask.py, probes/entropy_dask.py).

    ds = open_dataset("runs/corpus-*.zarr")          # or a list, or a directory of runs
    ds["router/experts"]                             # dask [moe_layer, token, k]
    ds.coords["run"], ds.coords["doc"]               # per token: run index, global document index
    ds.coords["position"], ds.coords["doc_id"]       # per token: position in its document, its id

Variables are named by store path, as `Run.to_xarray()` names them. Per-document variables
(`document_id`, i.e. the store's `doc_id`; `doc_domain`; `doc_run`) lie along `doc`, and
`doc_offsets` along `doc_edge` holds the global token offsets. `ds.attrs` is the first run's
attributes with the totals `n_tokens`/`n_docs`, plus `runs` (paths), `run_n_tokens`, `run_n_docs`,
`run_input_hash` and `dask_chunks`.

By default a dask chunk is DEFAULT_TOKEN_CHUNK tokens: whole disk chunks of every array (16 of 16384
tokens for router/attention arrays, 4 of 65536 for tokens), with every MoE layer of a router array
and one layer of an attention array (DEFAULT_LAYER_CHUNKS); the measurement is in docs/store.md.

Only numpy and zarr are imported at module level; xarray and dask are imported by `open_dataset`.
"""

from __future__ import annotations

import glob as globlib
import os
import warnings
from pathlib import Path

import numpy as np

from workbench.store.reader import Run
from workbench.store.schema import DOC, DOC_EDGE, SCHEMA, TOKEN, StoreError

# 2^18 tokens per dask chunk along `token`: 16 disk chunks of 2-D/3-D arrays, 4 of the 1-D ones
# (the measurement that chose it is in docs/store.md).
DEFAULT_TOKEN_CHUNK = 1 << 18
# Router arrays: every MoE layer in one dask chunk (a task reads 48 disk chunks at Scout's shape), so
# a 20M-token dataset is ~80 chunks, not ~3800, and the per-task overhead of a cluster stays small.
# Attention arrays ([layer, head, token]: 40 heads at Scout) keep one layer per chunk.
DEFAULT_LAYER_CHUNKS = {"layer": 1, "moe_layer": -1}
# Attributes that must agree for runs to be analysed together (a different value means another
# model, precision or schema).
IDENTITY_ATTRS = ("schema_version", "model_source", "config_hash", "dtype")
_GLOB_CHARS = set("*?[")


class IncompleteRunWarning(UserWarning):
    """A run still being written (attribute complete != True) was left out of a dataset."""


def _is_run(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def _runs_in(directory: Path) -> list[Path]:
    """Runs directly inside a directory, skipping hidden ones (a writer's `.X.creating-*` temp stores)."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and _is_run(p))


def resolve_runs(paths_or_glob) -> list[Path]:
    """Run paths from a path, a glob, a directory of runs, or a list of any of these.

    A directory that is not itself a run stands for the runs inside it, so the part directory of a
    `--dp` recording (`.OUT.parts/rank000-of-002.zarr`, …) opens as one dataset. A path `OUT` that
    does not exist but whose part directory does (a `--dp` recording not merged yet) means its parts.
    """
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    if not items:
        raise ValueError("open_dataset: no runs given")
    out: list[Path] = []
    for item in items:
        text = str(item)
        if _GLOB_CHARS & set(text):
            hits = sorted(Path(p) for p in globlib.glob(text) if _is_run(Path(p)))
            if not hits:
                raise FileNotFoundError(f"no run stores match {text!r}")
            out += hits
            continue
        p = Path(text)
        parts = p.parent / f".{p.name}.parts"  # workbench.distributed.parts_dir (not imported: torch)
        if _is_run(p):
            out.append(p)
        elif p.is_dir():
            found = _runs_in(p)
            if not found:
                raise FileNotFoundError(f"{p} is neither a run store nor a directory holding run stores")
            out += found
        elif not p.exists() and parts.is_dir() and _runs_in(parts):
            out += _runs_in(parts)
        else:
            raise FileNotFoundError(f"run store not found: {p}")
    seen: dict[Path, Path] = {}
    for p in out:
        key = p.resolve()
        if key in seen:
            raise ValueError(f"run {p} is given twice (also as {seen[key]}): its tokens would count twice")
        seen[key] = p
    return out


def _check_compatible(first: Run, run: Run) -> None:
    """Reject a run of another model, precision, schema or layout, naming the run and the field."""
    for key in IDENTITY_ATTRS:
        a, b = first.attrs.get(key), run.attrs.get(key)
        if a != b:
            raise StoreError(f"{run.path}: attribute {key!r} is {b!r} but {first.path} has {a!r}; runs of "
                             f"different models, precisions or schemas cannot form one dataset")
    la, lb = first.layout.to_dict(), run.layout.to_dict()
    diff = [k for k in la if la[k] != lb[k]]
    if diff:
        detail = "; ".join(f"{k}: {lb[k]!r} vs {la[k]!r}" for k in diff)
        raise StoreError(f"{run.path}: layout differs from {first.path} in {diff} ({detail})")


def _normalize_chunks(chunks) -> dict[str, int]:
    """{dim: length}; an int means the token chunk. Fixed dims default to 1 layer / moe_layer per chunk."""
    out = {TOKEN: DEFAULT_TOKEN_CHUNK, **DEFAULT_LAYER_CHUNKS}
    if chunks is None:
        return out
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        chunks = {TOKEN: int(chunks)}
    if not isinstance(chunks, dict):
        raise TypeError(f"chunks must be None, an int (tokens per chunk) or a dict {{dim: length}}, got {chunks!r}")
    known = {TOKEN, "layer", "moe_layer", "head", "k", "expert"}
    for dim, n in chunks.items():
        if dim not in known:
            raise ValueError(f"chunks: unknown dimension {dim!r}; known: {sorted(known)}")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or (n < 1 and n != -1):
            raise ValueError(f"chunks[{dim!r}] must be a positive int or -1 (whole axis), got {n!r}")
        out[dim] = int(n)
    return out


def _dask_array(run: Run, name: str, chunks: dict[str, int]):
    """One run's committed part of a token array, as dask chunks aligned with the disk chunks."""
    import dask.array as da

    arr = run.array(name)
    dims = SCHEMA[name].dims
    n = run.n_tokens
    want = []
    for dim, size in zip(dims, arr.shape, strict=True):
        c = chunks.get(dim, -1)
        # one token chunking for every array, so blockwise metrics line them up without rechunking
        want.append((n if dim == TOKEN else size) if c == -1 or (dim == TOKEN and c >= n) else c)
    sel = tuple(slice(0, n) if d == TOKEN else slice(None) for d in dims)
    want = tuple(max(w, 1) for w in want)
    return da.from_array(arr, chunks=want, lock=False, inline_array=True,
                         name=f"{name}-{run.path.resolve()}-{n}-{want}")[sel]


def _strings(values) -> np.ndarray:
    """Fixed-width unicode from the store's variable-length strings (NumPy StringDType)."""
    return np.array([str(v) for v in values], dtype=str)


def _doc_index(offsets: np.ndarray, base: int, n_tokens: int, token_chunks):
    """Lazy global document index of every token: base + (document of t within its run)."""
    import dask.array as da

    def block(t_T, off=offsets, base=base):
        return (np.searchsorted(off, t_T, side="right") - 1 + base).astype(np.int64)

    return da.arange(n_tokens, chunks=token_chunks, dtype=np.int64).map_blocks(block, dtype=np.int64)


def open_dataset(paths_or_glob, chunks=None, *, include_incomplete: bool = False, progress: bool = False):
    """One lazy, dask-backed `xarray.Dataset` over many runs, concatenated along `token`.

    paths_or_glob: a run path, a glob ("runs/shard-*.zarr"), a directory of runs (a `--dp` part
        directory), or a list of these; runs keep the given order (globs and directories sorted).
    chunks: dask chunking — None (DEFAULT_TOKEN_CHUNK tokens, DEFAULT_LAYER_CHUNKS), an int (tokens
        per chunk), or {dim: length} (-1 = the whole axis). Every array gets the same token chunks;
        multiples of 65536 cover whole disk chunks of every array (docs/store.md).
    include_incomplete: also take runs whose writer has not finished (`complete` is not True); by
        default they are skipped with an IncompleteRunWarning. Only committed tokens are ever read.

    Raises StoreError naming the run and the field when runs differ in model (model_source,
    config_hash), dtype, schema_version or layout; every run is validated by `open_run` first.
    """
    import dask.array as da
    import xarray as xr

    chunks = _normalize_chunks(chunks)
    paths = resolve_runs(paths_or_glob)
    runs: list[Run] = []
    for p in paths:
        run = Run(p)
        if run.attrs.get("complete") is not True and not include_incomplete:
            warnings.warn(f"{p}: run is incomplete (still being written, or interrupted) and is left out; "
                          f"pass include_incomplete=True to analyse its {run.n_tokens} committed tokens",
                          IncompleteRunWarning, stacklevel=2)
            continue
        runs.append(run)
    if not runs:
        raise StoreError(f"no complete runs among {[str(p) for p in paths]} "
                         "(pass include_incomplete=True to read runs still being written)")
    first = runs[0]
    for run in runs[1:]:
        _check_compatible(first, run)
    runs = [r for r in runs if r.n_tokens > 0] or runs[:1]

    names = [n for n in first.layout.arrays() if TOKEN in SCHEMA[n].dims]
    parts = {n: [] for n in names}
    run_T, doc_T, doc_id, doc_domain, doc_run, offsets = [], [], [], [], [], [np.zeros(1, np.int64)]
    t_base = d_base = 0
    it = runs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(runs, desc="opening runs", unit="run")
    for i, run in enumerate(it):
        for n in names:
            parts[n].append(_dask_array(run, n, chunks))
        tchunks = parts["tokens"][-1].chunks[0]
        run_T.append(da.full(run.n_tokens, i, dtype=np.int32, chunks=tchunks))
        doc_T.append(_doc_index(run.doc_offsets, d_base, run.n_tokens, tchunks))
        doc_id.append(_strings(run.read("doc_id")))
        doc_domain.append(_strings(run.read("doc_domain")))
        doc_run.append(np.full(run.n_docs, i, np.int32))
        offsets.append(run.doc_offsets[1:] + t_base)
        t_base += run.n_tokens
        d_base += run.n_docs

    dims = {n: SCHEMA[n].dims for n in names}
    data_vars = {n: (dims[n], da.concatenate(parts[n], axis=dims[n].index(TOKEN))) for n in names}
    doc_ids = np.concatenate(doc_id) if doc_id else np.array([], str)
    doc_index = da.concatenate(doc_T)
    data_vars.update({
        "doc_id": ((DOC,), doc_ids), "doc_domain": ((DOC,), np.concatenate(doc_domain)),
        "doc_run": ((DOC,), np.concatenate(doc_run)), "doc_offsets": ((DOC_EDGE,), np.concatenate(offsets)),
    })
    width = max(1, max((len(s) for s in doc_ids), default=1))
    fixed_ids = doc_ids.astype(f"<U{width}")

    def ids_of(d_T, ids=fixed_ids):
        return ids[d_T]

    coords = {"run": ((TOKEN,), da.concatenate(run_T)), "doc": ((TOKEN,), doc_index),
              "position": ((TOKEN,), data_vars["positions"][1]),
              "doc_id": ((TOKEN,), doc_index.map_blocks(ids_of, dtype=f"<U{width}"))}
    if first.has("router/layer_index"):
        coords["moe_layer"] = (("moe_layer",), first.read("router/layer_index"))
    attrs = dict(first.attrs)
    for key in ("input_hash", "data_digests"):  # describe one run's contents, not the dataset's
        attrs.pop(key, None)
    attrs.update(n_tokens=int(t_base), n_docs=int(d_base), runs=[str(r.path) for r in runs],
                 run_n_tokens=[r.n_tokens for r in runs], run_n_docs=[r.n_docs for r in runs],
                 run_input_hash=[r.attrs.get("input_hash") for r in runs],
                 complete=all(r.attrs.get("complete") is True for r in runs), dask_chunks=chunks)
    # xarray allows one variable per name: `doc_id` is the per-token coordinate, and the per-document
    # ids (the store's `doc_id` array) are the variable `document_id` along `doc`.
    data_vars["document_id"] = data_vars.pop("doc_id")
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


"""Read a run store lazily: `open_run(path) -> Run`, and `list_runs(dir)` summaries from metadata only.

Only committed data is visible through `Run`: the group attributes `n_docs`/`n_tokens` are the commit
record (see writer.py), and anything an interrupted writer left beyond them is sliced away. xarray is
imported only by `Run.to_xarray`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr

from workbench.safe_files import read_bounded
from workbench.store.safe_store import META_MAX_BYTES, SafeLocalStore, check_files, chunk_bound
from workbench.store.schema import (
    DOC,
    DOC_EDGE,
    GROWING_DIMS,
    SCHEMA,
    SCHEMA_VERSION,
    TOKEN,
    Layout,
    StoreError,
)

SUBGROUPS = ("router", "attention")


def _dtype_name(arr) -> str:
    dt = arr.dtype
    return "str" if dt.kind in "OUT" else np.dtype(dt).name


def _load(path, mode: str = "r"):
    """Open and validate a run; return (group, attrs, layout, arrays, committed doc_offsets).

    Shared with the writer, whose open_append then truncates what lies past the commit.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run store not found: {path}")
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a Zarr v3 run store (no zarr.json)")
    store = SafeLocalStore(path, read_only=mode == "r")   # bounded reads of regular files only
    try:
        group = zarr.open_group(store=store, mode=mode, zarr_format=3, use_consolidated=False)
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"{path}: cannot open as a Zarr v3 group: {type(e).__name__}: {e}") from e
    attrs = dict(group.attrs)
    version = attrs.get("schema_version")
    if version is None:
        raise StoreError(f"{path} is a Zarr group but not a workbench run (no schema_version attribute)")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {version!r} is newer than this workbench supports "
                         f"(<= {SCHEMA_VERSION}); upgrade workbench to read it")
    for key in ("layout", "n_docs", "n_tokens"):
        if key not in attrs:
            raise StoreError(f"{path}: run attribute {key!r} is missing")
    try:
        layout = Layout.from_dict(attrs["layout"])
    except (ValueError, TypeError) as e:
        raise StoreError(f"{path}: invalid 'layout' attribute: {e}") from e
    n_docs, n_tokens = attrs["n_docs"], attrs["n_tokens"]
    for key, value in (("n_docs", n_docs), ("n_tokens", n_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StoreError(f"{path}: run attribute {key!r} must be a non-negative integer, got {value!r}")

    arrays, missing, problems = {}, [], []
    for name in layout.arrays():
        try:
            arr = group[name]
        except KeyError:
            missing.append(name)
            continue
        except Exception as e:   # corrupt array metadata (bad JSON, wrong fields) fails inside zarr
            raise StoreError(f"{path}: array {name!r} has unreadable metadata: {type(e).__name__}: {e}") from e
        spec = SCHEMA[name]
        if not isinstance(arr, zarr.Array):
            problems.append(f"{name} is a group, expected an array")
            continue
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != spec.dims:
            problems.append(f"{name} has dims {dims}, expected {spec.dims}")
            continue
        if _dtype_name(arr) != spec.dtype:
            problems.append(f"{name} has dtype {_dtype_name(arr)}, expected {spec.dtype}")
            continue
        want = layout.shape(name, n_tokens, n_docs)
        for dim, got, exp in zip(spec.dims, arr.shape, want, strict=True):
            if dim in GROWING_DIMS and got < exp:
                problems.append(f"{name} has {got} along {dim!r} but the run commits {exp}")
            elif dim not in GROWING_DIMS and got != exp:
                problems.append(f"{name} has {got} along {dim!r}, layout says {exp}")
        arrays[name] = arr
    if missing:
        raise StoreError(f"{path}: missing required arrays {missing} (layout groups {list(layout.groups)})")
    if problems:
        raise StoreError(f"{path}: arrays do not match the schema: " + "; ".join(problems))

    # Cheap wholeness checks (O(files) lstat calls, no chunk data): no symlink or special file in the
    # run, every chunk under the commit present and within the size its array's metadata allows.
    store.limits.update({name: chunk_bound(arr) for name, arr in arrays.items()})
    problems = check_files(path, arrays, layout, n_tokens, n_docs,
                           every_chunk_written=isinstance(attrs.get("data_digests"), dict))
    if problems:
        raise StoreError(f"{path}: the run is not whole: " + "; ".join(problems[:6])
                         + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
                         + ". Run `workbench verify` on it for a full report")
    if "router/layer_index" in arrays:
        stored = _read(path, arrays["router/layer_index"], "router/layer_index", slice(None))
        if stored.tolist() != list(layout.moe_layer_index):
            raise StoreError(f"{path}: router/layer_index {stored.tolist()} disagrees with the layout's "
                             f"moe_layer_index {list(layout.moe_layer_index)}")

    offsets = _read(path, arrays["doc_offsets"], "doc_offsets", slice(0, n_docs + 1))
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
        raise StoreError(f"{path}: doc_offsets[:n_docs+1] must rise from 0 to n_tokens={n_tokens}, "
                         f"got {offsets[:3].tolist()} ... {offsets[-3:].tolist()}")
    return group, attrs, layout, arrays, offsets


def _read(path, arr, name, sel):
    try:
        return arr[sel]
    except Exception as e:  # a truncated or corrupt chunk fails deep inside a codec
        raise StoreError(f"{path}: failed to read array {name!r} at {sel}: {type(e).__name__}: {e}") from e


class Run:
    """A recorded run, opened read-only. Arrays are read on demand; see docs/store.md."""

    def __init__(self, path):
        self.path = Path(path)
        self._group, self.attrs, self.layout, self._arrays, self.doc_offsets = _load(self.path, "r")
        self.n_docs: int = self.attrs["n_docs"]
        self.n_tokens: int = self.attrs["n_tokens"]

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens}, "
                f"groups={list(self.layout.groups)}, complete={self.attrs.get('complete')})")

    def has(self, name: str) -> bool:
        return name in self._arrays

    def array(self, name: str) -> zarr.Array:
        """The lazy zarr array. After a crash it may extend past the committed `n_tokens`/`n_docs`."""
        if name not in self._arrays:
            known = sorted(self._arrays)
            raise KeyError(f"{self.path}: no array {name!r} in this run; it has {known}")
        return self._arrays[name]

    def doc_slice(self, i: int) -> slice:
        """Token range of document i (negative indices count from the end)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for a run of {self.n_docs} documents")
        i %= self.n_docs
        return slice(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

    def tokens(self, doc: int | None = None) -> np.ndarray:
        return self.read("tokens", doc=doc)

    def read(self, name: str, doc: int | None = None, layer: int | None = None) -> np.ndarray:
        """Read committed data of one array, touching only the chunks needed.

        doc:   restrict the token axis to one document (doc-level arrays: that document's entry).
        layer: the decoder-layer index. For [moe_layer, ...] arrays it is mapped through
               router/layer_index, so `layer=3` means decoder layer 3, not the 4th MoE layer.
        """
        arr = self.array(name)
        if doc is not None:
            tokens, d = self.doc_slice(doc), doc % self.n_docs
        sel = []
        for dim in SCHEMA[name].dims:
            if dim == TOKEN:
                sel.append(slice(0, self.n_tokens) if doc is None else tokens)
            elif dim == DOC:
                sel.append(slice(0, self.n_docs) if doc is None else d)
            elif dim == DOC_EDGE:
                sel.append(slice(0, self.n_docs + 1) if doc is None else slice(d, d + 2))
            elif dim == "layer" and layer is not None:
                if not -self.layout.n_layers <= layer < self.layout.n_layers:
                    raise IndexError(f"{name}: layer {layer} out of range [0, {self.layout.n_layers})")
                sel.append(layer % self.layout.n_layers)
            elif dim == "moe_layer" and layer is not None:
                index = list(self.layout.moe_layer_index)
                if layer not in index:
                    raise IndexError(f"{name}: decoder layer {layer} is not an MoE layer; "
                                     f"MoE layers are {index}")
                sel.append(index.index(layer))
            else:
                sel.append(slice(None))
        if layer is not None and not {"layer", "moe_layer"} & set(SCHEMA[name].dims):
            raise ValueError(f"{name} has dims {SCHEMA[name].dims}; it takes no layer argument")
        return self._check_ids(name, np.asarray(_read(self.path, arr, name, tuple(sel))))

    def _check_ids(self, name: str, data: np.ndarray) -> np.ndarray:
        # Ids index other tables (the vocabulary, the experts): out of range they are corrupt data,
        # never values to show. One vectorised min/max over what was read.
        hi = {"tokens": self.vocab_size, "router/experts": self.layout.n_experts,
              "doc_offsets": self.n_tokens + 1, "positions": None}.get(name, -1)
        if hi == -1 or not data.size:
            return data
        lo_v, hi_v = int(data.min()), int(data.max())
        if lo_v < 0 or (hi is not None and hi_v >= hi):
            raise StoreError(f"{self.path}: array {name!r} holds ids outside [0, {hi if hi is not None else '∞'}) "
                             f"(min {lo_v}, max {hi_v}): the run is corrupt")
        return data

    @property
    def vocab_size(self) -> int | None:
        v = (self.attrs.get("config") or {}).get("vocab_size") if isinstance(self.attrs.get("config"), dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    def verify(self) -> None:
        """Read all committed data and check it (see workbench/store/verify.py); StoreError listing
        every problem found. O(data): the cheap checks already ran when the run was opened. Runs
        written before `data_digests` existed are checked without them (swapped probe chunks pass)."""
        from workbench.store.verify import verify_problems
        problems = verify_problems(self)
        if problems:
            raise StoreError(f"{self.path}: verification failed — " + "; ".join(problems))

    def to_xarray(self, group: str | None = None):
        """Committed data as an xarray Dataset (lazy, via xr.open_zarr).

        group=None merges all groups, naming variables by their store path ("router/experts") and
        making router/layer_index the `moe_layer` coordinate; group="" / "router" / "attention"
        opens one group with plain names.
        """
        import xarray as xr

        groups = [g for g in ("", *SUBGROUPS) if g == "" or g in self._group] if group is None else [group]
        parts = []
        for g in groups:
            try:
                ds = xr.open_zarr(self._group.store, group=g or None, consolidated=False)   # bounded reads
            except ValueError as e:
                raise StoreError(f"{self.path}: group {g or '/'!r} has arrays of different lengths, "
                                 f"probably a writer is still appending, or one was interrupted: wait for "
                                 f"the writer to finish; if none is running, repair with "
                                 f"RunWriter.open_append({str(self.path)!r}).close() ({e})") from e
            ds = ds.isel({d: slice(0, n) for d, n in ((TOKEN, self.n_tokens), (DOC, self.n_docs),
                                                      (DOC_EDGE, self.n_docs + 1)) if d in ds.dims})
            if group is None and g:
                ds = ds.rename({v: f"{g}/{v}" for v in ds.data_vars})
            parts.append(ds)
        ds = xr.merge(parts, combine_attrs="drop_conflicts") if len(parts) > 1 else parts[0]
        if group is None and "router/layer_index" in ds:
            ds = ds.assign_coords(moe_layer=ds["router/layer_index"].values)
        ds.attrs = dict(self.attrs)
        return ds


def open_run(path) -> Run:
    """Open a run store read-only, validating its schema version, arrays and commit record."""
    return Run(path)


def _size_bytes(path: Path) -> int:
    # lstat: a dangling or hostile symlink inside a run must not make listing fail (or follow it)
    return sum(os.lstat(os.path.join(root, f)).st_size for root, _, files in os.walk(path) for f in files)


def list_runs(runs_dir) -> list[dict]:
    """One summary per run directly inside `runs_dir`, read from each root zarr.json (no arrays)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory not found: {runs_dir}")
    out = []
    for p in sorted(runs_dir.iterdir()):
        meta_path = p / "zarr.json"
        if p.name.startswith(".") or not (p.is_dir() and meta_path.is_file()):  # .X.creating-*: unfinished
            continue
        try:
            meta = json.loads(read_bounded(meta_path, META_MAX_BYTES, "zarr.json", error=StoreError))
        except (OSError, ValueError, RecursionError):     # StoreError is a ValueError
            continue
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else None
        if not isinstance(attrs, dict) or meta.get("node_type") != "group" or "schema_version" not in attrs:
            continue
        out.append({
            "path": str(p),
            "n_docs": attrs.get("n_docs"),
            "n_tokens": attrs.get("n_tokens"),
            "probes": attrs.get("probes"),
            "created": attrs.get("created"),
            "complete": attrs.get("complete"),
            "size_bytes": _size_bytes(p),
            "model_source": attrs.get("model_source"),
            "schema_version": attrs.get("schema_version"),
        })
    return out

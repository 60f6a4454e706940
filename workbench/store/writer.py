"""Append documents to a run store, crash-safely: `RunWriter.create(...)` / `RunWriter.open_append(...)`.

Commit protocol (one flush = one or more buffered documents):

    1. grow every token/doc array and write the new region          (data)
    2. grow doc_offsets and write the new document edges            (index)
    3. update the group attributes n_docs, n_tokens, input_hash     (COMMIT: one zarr.json rewrite)

zarr's LocalStore writes every file to a temporary name and renames it (zarr/storage/_local.py,
`_atomic_write`), so each chunk and each zarr.json is either old or new after a SIGKILL, never torn. The
commit record is therefore step 3, a single atomic file replace. doc_offsets alone cannot be the commit
record: growing it (a metadata write) and writing its new chunk are two files, and between them the new
last edge reads as a stale value. On reopen, everything past the committed n_tokens / n_docs
(doc_offsets past n_docs + 1) is garbage from an interrupted flush and is truncated.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from workbench.store.reader import _load
from workbench.store.safe_store import MAX_STR_CHARS
from workbench.store.schema import (
    DOC,
    DOC_EDGE,
    EMPTY_INPUT_HASH,
    PROBE_ARRAYS,
    SCHEMA,
    SCHEMA_VERSION,
    STATIC_ARRAYS,
    TOKEN,
    Layout,
    StoreError,
    chain_input_hash,
    chunks_for,
    config_hash,
    digest_init,
    digest_piece,
)

# Set by the writer; a caller passing them in `attrs` is an error.
WRITER_ATTRS = ("schema_version", "layout", "created", "n_docs", "n_tokens", "input_hash", "complete",
                "data_digests")
# Must agree between a run and a writer reopening it through `create(..., exist_ok=True)`.
IDENTITY_ATTRS = ("config_hash", "model_source", "dtype")
DOC_KEYS = ("tokens", "positions", "doc_id", "domain")


def _compressor(dtype: str):
    # Byte-shuffled zstd: float32 statistics compress ~1.5-3x, small ints far more (docs/store.md).
    # A crc32c checksum after compression makes a corrupted chunk an error, never silently wrong data.
    comp = ZstdCodec(level=3) if dtype == "str" else BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    return (comp, Crc32cCodec())


def _check_json(attrs: dict) -> None:
    for key, value in attrs.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"attrs[{key!r}] is not JSON-serialisable: {e}") from e


FLUSH_TOKENS = 65536  # RunWriter's default commit threshold (see its docstring)


class RunWriter:
    """Appends documents to one run. Use as a context manager; `finish()` marks the run complete.

    Documents are buffered and committed together once `flush_tokens` tokens or `flush_bytes` bytes are
    pending, or `flush_seconds` have passed since the last flush (checked on append). One flush per
    65536 tokens writes each 1-D chunk about once; flushing every 4096-token document is ~7x slower
    (docs/store.md). A crash loses only the uncommitted buffer, which resume re-records.
    """

    def __init__(self, group: zarr.Group, path: Path, layout: Layout, attrs: dict, offsets: np.ndarray,
                 *, flush_tokens: int = FLUSH_TOKENS, flush_bytes: int = 256 << 20, flush_seconds: float = 60.0,
                 arrays: Mapping[str, zarr.Array] | None = None):
        self.path, self.layout, self._group = path, layout, group
        # write_empty_chunks: a chunk whose values all equal the fill value (doc_domain "" everywhere) is
        # written too, so that a missing chunk file always means a deleted one (reader.check_files).
        # `arrays`: the ones open_append has just opened and validated (re-opening each costs a metadata read).
        self._arrays = {name: (arrays[name] if arrays is not None and name in arrays else group[name])
                        .with_config({"write_empty_chunks": True}) for name in layout.arrays()}
        self._n_docs, self._n_tokens = attrs["n_docs"], attrs["n_tokens"]
        self._input_hash = attrs["input_hash"]
        # Per-array chained digests of the committed data (verify.py); None for runs written before them.
        digests = attrs.get("data_digests")
        self._digests = dict(digests) if isinstance(digests, dict) else None
        for key, value in (("flush_tokens", flush_tokens), ("flush_bytes", flush_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(flush_seconds, (int, float)) or not flush_seconds >= 0:
            raise ValueError(f"flush_seconds must be a number ≥ 0, got {flush_seconds!r}")
        self._offsets = [int(o) for o in offsets]
        ids = self._arrays["doc_id"][: self._n_docs] if self._n_docs else []
        self._done = {str(i) for i in ids}
        self._pending: list[dict] = []
        self._pending_tokens = self._pending_bytes = 0
        self._flush_tokens, self._flush_bytes, self._flush_seconds = flush_tokens, flush_bytes, flush_seconds
        self._last_flush = time.monotonic()
        self._failed: BaseException | None = None
        self._finished = False

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, path, *, attrs: dict, layout: dict | Layout, exist_ok: bool = False,
               **flush_opts) -> RunWriter:
        """Create a new run at `path`. If it exists: append to it when `exist_ok`, else refuse."""
        path = Path(path)
        layout = Layout.from_dict(layout)
        attrs = dict(attrs)
        if path.exists():
            if not exist_ok:
                raise FileExistsError(f"run store already exists: {path} (pass exist_ok=True to append "
                                      "to it, or use RunWriter.open_append)")
            expect = {k: attrs[k] for k in IDENTITY_ATTRS if k in attrs}
            if "config" in attrs and "config_hash" not in expect:
                expect["config_hash"] = config_hash(attrs["config"])
            return cls.open_append(path, layout=layout, expect=expect, **flush_opts)

        clash = [k for k in WRITER_ATTRS if k in attrs]
        if clash:
            raise ValueError(f"attrs: keys {clash} are set by the writer; remove them")
        if "config" in attrs:
            h = config_hash(attrs["config"])
            if attrs.setdefault("config_hash", h) != h:
                raise ValueError(f"attrs: config_hash {attrs['config_hash']!r} does not match the "
                                 f"sha256 of attrs['config'] ({h})")
        attrs.setdefault("workbench_version", getattr(sys.modules.get("workbench"), "__version__", "unknown"))
        for key, default in (("model_source", ""), ("config", {}), ("dtype", ""), ("device", ""),
                             ("probes", list(layout.groups)), ("probe_options", {}), ("layer_kinds", [])):
            attrs.setdefault(key, default)
        attrs.update(schema_version=SCHEMA_VERSION, layout=layout.to_dict(),
                     created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     n_docs=0, n_tokens=0, input_hash=EMPTY_INPUT_HASH, complete=False,
                     data_digests={n: EMPTY_INPUT_HASH for n in digested_arrays(layout)})
        _check_json(attrs)

        # Build in a sibling temp directory and rename it into place, so a crash during creation
        # never leaves a half-made run at `path`.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
        try:
            group = zarr.open_group(tmp, mode="w-", zarr_format=3, attributes=attrs)
            for name in layout.arrays():
                spec = SCHEMA[name]
                arr = group.create_array(
                    name, shape=layout.shape(name), chunks=chunks_for(name, layout),
                    dtype=str if spec.dtype == "str" else spec.dtype, fill_value=spec.fill,
                    dimension_names=spec.dims, compressors=_compressor(spec.dtype))
                if name == "router/layer_index":
                    arr[:] = np.asarray(layout.moe_layer_index, dtype=np.int32)
                if name == "doc_offsets":
                    arr.resize((1,))
                    arr[:] = 0
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open_append(path, **flush_opts)

    @classmethod
    def open_append(cls, path, *, layout: dict | Layout | None = None, expect: dict | None = None,
                    **flush_opts) -> RunWriter:
        """Reopen a run to append (resume): validate it, truncate uncommitted data, check layout.

        layout: if given, must equal the run's layout (the error names each differing key).
        expect: attribute values the run must have, e.g. {"config_hash": ...}.
        """
        path = Path(path)
        group, attrs, stored, arrays, offsets = _load(path, mode="r+")
        if layout is not None:
            given = Layout.from_dict(layout).to_dict()
            diff = [f"{k}: run has {v!r}, given {given[k]!r}" for k, v in stored.to_dict().items()
                    if given[k] != v]
            if diff:
                raise ValueError(f"layout mismatch for {path}: " + "; ".join(diff))
        bad = [f"{k}: run has {attrs.get(k)!r}, expected {v!r}" for k, v in (expect or {}).items()
               if attrs.get(k) != v]
        if bad:
            raise ValueError(f"attribute mismatch for {path}: " + "; ".join(bad))

        n_tokens, n_docs = attrs["n_tokens"], attrs["n_docs"]
        for name, arr in arrays.items():
            want = stored.shape(name, n_tokens, n_docs)
            if arr.shape != want:
                arr.resize(want)  # drop what an interrupted flush wrote past the commit
        for tmp in path.rglob("*.partial"):  # a killed zarr _atomic_write leaves its temp file
            tmp.unlink(missing_ok=True)
        return cls(group, path, stored, attrs, offsets, arrays=arrays, **flush_opts)

    # ---------------------------------------------------------------- state
    @property
    def n_docs(self) -> int:
        """Documents appended, committed or still buffered."""
        return self._n_docs + len(self._pending)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens + self._pending_tokens

    @property
    def pending_tokens(self) -> int:
        """Tokens appended but not yet committed."""
        return self._pending_tokens

    @property
    def flush_tokens(self) -> int:
        return self._flush_tokens

    @property
    def n_committed(self) -> int:
        """Documents durably on disk."""
        return self._n_docs

    @property
    def done_ids(self) -> set[str]:
        """doc_ids appended so far (committed or buffered); a recorder skips these on resume."""
        return set(self._done)

    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    # ---------------------------------------------------------------- appending
    def append(self, doc: Mapping) -> int:
        """Validate one document, buffer it, flush when the buffer is full. Returns its index."""
        self._check_usable()
        item = self._validate(doc)
        self._pending.append(item)
        self._done.add(item["doc_id"])
        self._pending_tokens += len(item["tokens"])
        self._pending_bytes += sum(a.nbytes for a in item.values() if isinstance(a, np.ndarray))
        if (self._pending_tokens >= self._flush_tokens or self._pending_bytes >= self._flush_bytes
                or time.monotonic() - self._last_flush >= self._flush_seconds):
            self.flush()
        return self.n_docs - 1

    def _validate(self, doc: Mapping) -> dict:
        if not isinstance(doc, Mapping):
            raise TypeError(f"append: doc must be a dict of arrays, got {type(doc).__name__}")
        probes = [n for n in PROBE_ARRAYS if n in self._arrays]
        unknown = sorted(set(doc) - set(DOC_KEYS) - set(probes))
        if unknown:
            raise ValueError(f"append: unknown keys {unknown}; this run takes {list(DOC_KEYS) + probes}")
        missing = [n for n in ["tokens", *probes] if n not in doc]
        if missing:
            raise ValueError(f"append: missing arrays {missing} (run layout groups {list(self.layout.groups)})")

        tokens = _as_array("tokens", doc["tokens"], "int32")
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(f"append: array 'tokens': expected shape (T,) with T >= 1, got {tokens.shape}")
        T = len(tokens)
        item = {"tokens": tokens}
        item["positions"] = (np.arange(T, dtype=np.int32) if doc.get("positions") is None
                             else _as_array("positions", doc["positions"], "int32"))
        for name in probes:
            item[name] = _as_array(name, doc[name], SCHEMA[name].dtype)
        for name, arr in item.items():
            want = self.layout.shape(name, n_tokens=T)
            if arr.shape != want:
                raise ValueError(f"append: array {name!r}: expected shape {want} "
                                 f"(dims {SCHEMA[name].dims}, T={T}), got {arr.shape}")
        _check_range("tokens", tokens, 0, 2**31 - 1)
        if "router/experts" in item:
            _check_range("router/experts", item["router/experts"], 0, self.layout.n_experts - 1)

        doc_id = doc.get("doc_id")
        doc_id = str(self.n_docs) if doc_id is None else doc_id
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool):
            raise TypeError(f"append: doc_id must be a str or int, got {type(doc_id).__name__}")
        doc_id = str(doc_id)
        domain = doc.get("domain") or ""
        for key, value in (("doc_id", doc_id), ("domain", domain)):
            if isinstance(value, str) and len(value) > MAX_STR_CHARS:
                raise ValueError(f"append: {key} is {len(value)} characters long; at most {MAX_STR_CHARS}")
        if doc_id == "":
            raise ValueError("append: doc_id must not be empty")
        if doc_id in self._done:
            raise ValueError(f"append: doc_id {doc_id!r} is already in {self.path}")
        if not isinstance(domain, str):
            raise TypeError(f"append: domain must be a str, got {type(domain).__name__}")
        item["doc_id"], item["domain"] = doc_id, domain
        return item

    # ---------------------------------------------------------------- committing
    def flush(self) -> None:
        """Write buffered documents and commit them (crash-safe; see the module docstring)."""
        self._check_usable()
        if not self._pending:
            return
        batch = self._pending
        n_docs = self._n_docs + len(batch)
        n_tokens = self._n_tokens + self._pending_tokens
        offsets = list(self._offsets)
        input_hash = self._input_hash
        digests = None if self._digests is None else dict(self._digests)
        for item in batch:
            offsets.append(offsets[-1] + len(item["tokens"]))
            input_hash = chain_input_hash(input_hash, item["tokens"])
            if digests is not None:
                _chain_digests(digests, item)
        try:
            self._write_data(batch)
            self._grow("doc_offsets", np.asarray(offsets[self._n_docs + 1:], dtype=np.int64),
                       DOC_EDGE, self._n_docs + 1)
            self._commit(n_docs, n_tokens, input_hash, digests)
        except BaseException as e:
            self._failed = e
            raise
        self._n_docs, self._n_tokens, self._input_hash, self._offsets = n_docs, n_tokens, input_hash, offsets
        self._digests = digests
        self._pending, self._pending_tokens, self._pending_bytes = [], 0, 0
        self._last_flush = time.monotonic()

    def _write_data(self, batch: list[dict]) -> None:
        for name in self._arrays:
            if name in STATIC_ARRAYS or name == "doc_offsets":
                continue
            if name in ("doc_id", "doc_domain"):
                key = "doc_id" if name == "doc_id" else "domain"
                self._grow(name, np.array([item[key] for item in batch], dtype=object), DOC, self._n_docs)
            else:
                axis = SCHEMA[name].dims.index(TOKEN)
                data = np.concatenate([item[name] for item in batch], axis=axis)
                self._grow(name, data, TOKEN, self._n_tokens)

    def _grow(self, name: str, data: np.ndarray, dim: str, start: int) -> None:
        arr = self._arrays[name]
        axis = SCHEMA[name].dims.index(dim)
        shape = list(arr.shape)
        shape[axis] = start + data.shape[axis]
        arr.resize(tuple(shape))
        sel = tuple(slice(start, shape[axis]) if i == axis else slice(None) for i in range(len(shape)))
        arr[sel] = data

    def _commit(self, n_docs: int, n_tokens: int, input_hash: str, digests: dict | None = None) -> None:
        # The single atomic write that makes the flushed documents part of the run.
        # (Group.update_attributes writes zarr.json once; attrs.update would write it once per key.)
        update = {"n_docs": n_docs, "n_tokens": n_tokens, "input_hash": input_hash, "complete": False}
        if digests is not None:
            update["data_digests"] = digests
        self._group.update_attributes(update)

    def finish(self) -> None:
        """Flush and mark the run complete (all intended inputs recorded)."""
        self.flush()
        self._group.update_attributes({"complete": True})
        self._finished = True

    def close(self) -> None:
        """Flush buffered documents; the run stays incomplete unless `finish()` was called."""
        if self._failed is None and not self._finished:
            self.flush()

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StoreError(f"{self.path}: an earlier flush failed ({self._failed!r}); reopen with "
                             "RunWriter.open_append to drop the partial write and resume")
        if self._finished:
            raise StoreError(f"{self.path}: writer is finished; reopen with RunWriter.open_append")

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RunWriter({str(self.path)!r}, committed={self._n_docs} docs/{self._n_tokens} tokens, "
                f"pending={len(self._pending)} docs)")


def digested_arrays(layout: Layout) -> list[str]:
    """Arrays with a chained per-document digest in `data_digests`: all appended ones but doc_offsets
    (whose edges the input_hash chain already fixes)."""
    return [n for n in layout.arrays() if n not in STATIC_ARRAYS and n != "doc_offsets"]


def _chain_digests(digests: dict, item: dict) -> None:
    # One link per document and array (verify.py recomputes it reading the run in token windows).
    for name in digests:
        if name in ("doc_id", "doc_domain"):
            data = np.array([item["doc_id" if name == "doc_id" else "domain"]], dtype=object)
        else:
            data = np.moveaxis(item[name], SCHEMA[name].dims.index(TOKEN), 0)
        h = digest_init(digests[name])
        digest_piece(h, data)
        digests[name] = h.hexdigest()


def _as_array(name: str, value, dtype: str) -> np.ndarray:
    """Copy to `dtype`, allowing only same-kind casts (int64 -> int32, float64 -> float32)."""
    try:
        arr = np.asarray(value)
    except (TypeError, RuntimeError, ValueError) as e:
        raise TypeError(f"append: array {name!r}: cannot convert {type(value).__name__} to numpy ({e}); "
                        "pass numpy arrays (torch: t.float().cpu().numpy())") from e
    want = np.dtype(dtype)
    kind_ok = arr.dtype.kind in "iu" if want.kind == "i" else arr.dtype.kind in "f"
    if not kind_ok:
        raise ValueError(f"append: array {name!r}: expected {'an integer' if want.kind == 'i' else 'a float'} "
                         f"array (stored as {want.name}), got dtype {arr.dtype}")
    if want.kind == "i" and arr.dtype != want and arr.size:
        info = np.iinfo(want)
        _check_range(name, arr, int(info.min), int(info.max))
    # Always copy: the document sits in the buffer until a flush, and a recorder may reuse its arrays
    # (or pass numpy views of torch tensors it overwrites) for the next document.
    return arr.astype(want, copy=True)


def _check_range(name: str, arr: np.ndarray, lo: int, hi: int) -> None:
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"append: array {name!r}: values must lie in [{lo}, {hi}], "
                         f"got min {arr.min()}, max {arr.max()}")

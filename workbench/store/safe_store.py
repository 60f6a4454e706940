"""The file-level safety of opening a run: a zarr store that reads only bounded regular files inside the
run, and the cheap "is every committed chunk there" check that `open_run` always runs.

    SafeLocalStore(root, read_only=...)   zarr LocalStore whose reads refuse symlinks, FIFOs, devices,
                                          directories at a file's key, and files over a size bound
    check_files(path, arrays, ...)        one scandir walk of the run: symlinks and special files
                                          anywhere, and every chunk under the commit present, a
                                          regular file, within its size bound (O(files) lstat calls)

zarr's own LocalStore reads `path.read_bytes()`: a chunk that is a symlink to /dev/zero is read until
memory runs out, a FIFO blocks for ever, and a chunk path that is a directory reads as fill values.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import stat

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from workbench.safe_files import kind_of, read_bounded
from workbench.store.schema import StoreError

META_MAX_BYTES = 16 << 20          # a zarr.json: attributes hold the model config, a few KB
DEFAULT_MAX_BYTES = 256 << 20      # any other key before its array's bound is known
MAX_STR_CHARS = 4096               # doc_id / domain length the writer accepts (4 bytes per char in UTF-8)


def chunk_bound(arr) -> int:
    """Largest a chunk file of `arr` can be: raw chunk bytes plus the worst-case codec overhead
    (blosc: 16 bytes + per-block headers; zstd: ~n/256 + a frame header; crc32c: 4 bytes)."""
    n = math.prod(arr.chunks)
    raw = n * (4 + 4 * MAX_STR_CHARS) if arr.dtype.kind in "OUT" else n * np.dtype(arr.dtype).itemsize
    return raw + raw // 64 + 4096


class SafeLocalStore(LocalStore):
    """LocalStore whose reads go through `read_bounded`. `limits[array name]` bounds that array's chunk
    files (set by the reader once the array metadata is known); zarr.json files are bounded by
    META_MAX_BYTES. A missing file reads as absent (None), as in LocalStore."""

    def __init__(self, root, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.limits: dict[str, int] = {}

    def with_read_only(self, read_only: bool = False):
        out = type(self)(self.root, read_only=read_only)
        out.limits = self.limits
        return out

    def _bound(self, key: str) -> int:
        if key == "zarr.json" or key.endswith("/zarr.json"):
            return META_MAX_BYTES
        name = key.split("/c/")[0] if "/c/" in key else key.rsplit("/", 1)[0]
        return self.limits.get(name, DEFAULT_MAX_BYTES)

    def _read(self, key: str, byte_range):
        path = self.root / key
        try:
            data = read_bounded(path, self._bound(key), f"store file {key!r}", error=StoreError)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if byte_range is not None:      # this store never shards, but honour the protocol
            from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
            if isinstance(byte_range, RangeByteRequest):
                data = data[byte_range.start:byte_range.end]
            elif isinstance(byte_range, OffsetByteRequest):
                data = data[byte_range.offset:]
            elif isinstance(byte_range, SuffixByteRequest):
                data = data[max(0, len(data) - byte_range.suffix):]
        return data

    async def get(self, key, prototype=None, byte_range=None):
        if prototype is None:
            prototype = default_buffer_prototype()
        if not self._is_open:
            await self._open()
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def _walk(root: str):
    """(files {relpath: size}, problems): every entry below root by lstat, never following a link."""
    files, problems, stack = {}, [], [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    problems.append(f"{r} is a symlink (to {os.readlink(e.path)!r}); a run holds only its own files")
                elif stat.S_ISDIR(st.st_mode):
                    stack.append(r)
                elif stat.S_ISREG(st.st_mode):
                    files[r] = st.st_size
                else:
                    problems.append(f"{r} is {kind_of(st.st_mode)}")
    return files, problems


def check_files(path, arrays: dict, layout, n_tokens: int, n_docs: int, *, every_chunk_written: bool) -> list[str]:
    """Problems with the files of an opened run (empty when whole): symlinks or special files anywhere
    in it; for every array, each chunk overlapping the committed region missing, not a regular file,
    or larger than the array's chunk bound. `every_chunk_written` (runs from a writer that stores
    all-fill chunks too, marked by a `data_digests` attribute): an absent doc_domain chunk is an
    error as well; older writers skipped chunks whose domains were all "" (zarr's default)."""
    files, problems = _walk(str(path))
    for name, arr in arrays.items():
        shape = layout.shape(name, n_tokens, n_docs)
        if not all(shape):
            continue
        grids = [range(math.ceil(s / c)) for s, c in zip(shape, arr.chunks)]
        bound = chunk_bound(arr)
        enc = arr.metadata.chunk_key_encoding
        missing, big = [], []
        for coords in itertools.product(*grids):
            key = f"{name}/{enc.encode_chunk_key(coords)}"
            size = files.get(key)
            if size is None:
                if os.path.isdir(os.path.join(path, key)):
                    problems.append(f"array {name!r}: chunk {key} is a directory, expected a file")
                elif every_chunk_written or name != "doc_domain":
                    missing.append(key)
            elif size > bound:
                big.append(f"{key} ({size} bytes > {bound})")
        if missing:
            problems.append(f"array {name!r}: {len(missing)} chunk(s) of the committed data are missing "
                            f"(deleted?): {missing[:4]}{' …' if len(missing) > 4 else ''}")
        if big:
            problems.append(f"array {name!r}: chunk files larger than a chunk can be: {big[:4]}")
    return problems

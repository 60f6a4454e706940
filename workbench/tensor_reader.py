"""Read safetensors tensors one at a time with pread(2) into storage of their own: no mapping is held.

    with ShardReader(path) as shard:
        w = shard.read("model.layers.0.feed_forward.experts.gate_up_proj", dtype=torch.bfloat16)

Why not `safe_open(...).get_tensor`: it hands out a view of a memory mapping of the whole shard, and
every page copied through that mapping stays resident (file-backed RSS) until the shard closes, so
loading a model that way peaked at all its weights plus the largest shard (≤ 5 GB in the release;
15.48 GiB against 13.58 GiB running at Scout's widths, docs/benchmarks.md "real-shape").

Here a tensor whose stored dtype is the one asked for, on the CPU, is read straight into the tensor
returned (one copy, page cache → its pages). Any other tensor (a dtype change, another device) is read
through one reusable slab of at most READ_SLAB_BYTES and converted into place slab by slab. The file's
pages stay in the page cache (reclaimable, not the process's RSS), so a load peaks at the weights plus
one slab. A file truncated or rewritten while it is read raises `error` naming the file and tensor,
never SIGBUS (a mapping's way of failing).

The header is parsed here and checked against the file (offsets inside the data, sizes equal to
shape × item size); `error` names the file and key for each problem. Stored dtypes torch has no
name for fall back to safetensors' own reader for that one tensor (mapped only for its copy).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from pathlib import Path

import torch

from workbench.safe_files import kind_of

# the slab a converted tensor is read through (16 MiB): bounds a load's transient memory, and large
# enough that the per-slab Python overhead is nothing next to the copy (≈ 160 slabs for a 2.5 GB tensor)
READ_SLAB_BYTES = 1 << 24
_MAX_HEADER_BYTES = 100 * 2**20             # safetensors' own limit
_PREAD_BYTES = 1 << 30                      # one pread ≤ 1 GiB (Linux returns at most ~2 GiB per call)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ShardReader:
    """One safetensors file opened for pread: header parsed and checked, no data read until `read`."""

    def __init__(self, path, *, error: type[Exception] = ValueError, slab: torch.Tensor | None = None):
        """`slab`: a uint8 CPU tensor of READ_SLAB_BYTES to convert through (`.slab` of the reader of the
        previous shard: one buffer for a whole load, so the allocator is not asked for a new one per shard);
        one is allocated at the first conversion otherwise."""
        self.path, self.error = Path(path), error
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{self.path}: shard is {kind_of(st.st_mode)}, expected a regular file")
            os.set_blocking(self.fd, True)
            self.size = st.st_size
            self.entries = self._header()
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)      # larger readahead when cold
        except BaseException:
            os.close(self.fd)
            raise
        self.slab = slab

    # ------------------------------------------------------------------ header
    def _pread(self, n: int, offset: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = os.pread(self.fd, n - len(out), offset + len(out))
            if not b:
                break
            out += b
        return bytes(out)

    def _header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        """key → (dtype name, shape, absolute start, absolute end) for every tensor."""
        p, err = self.path, self.error
        if self.size < 8:
            raise err(f"{p}: corrupt or unreadable safetensors file ({self.size} bytes, shorter than its "
                      "8-byte header length)")
        (n,) = struct.unpack("<Q", self._pread(8, 0))
        if n > _MAX_HEADER_BYTES or 8 + n > self.size:
            raise err(f"{p}: corrupt or unreadable safetensors file (header length {n} bytes, file {self.size})")
        try:
            header = json.loads(self._pread(n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise err(f"{p}: corrupt or unreadable safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise err(f"{p}: corrupt or unreadable safetensors file (header is not a JSON object)")
        base, entries = 8 + n, {}
        for key, e in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (a, b) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
                a, b = int(a), int(b)
            except (KeyError, TypeError, ValueError) as exc:
                raise err(f"{p}: corrupt header entry for {key!r} ({type(exc).__name__}: {exc})") from None
            if not 0 <= a <= b or base + b > self.size or any(s < 0 for s in shape):
                raise err(f"{p}: header entry {key!r} (shape {list(shape)}, data_offsets [{a}, {b}]) lies "
                          f"outside the file's {self.size - base} data bytes")
            if dtype in DTYPES:
                want = math.prod(shape) * DTYPES[dtype].itemsize
                if b - a != want:
                    raise err(f"{p}: header entry {key!r} holds {b - a} bytes but {dtype} {list(shape)} "
                              f"needs {want}")
            entries[key] = (dtype, shape, base + a, base + b)
        return entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_name(self, key: str) -> str:
        return self._entry(key)[0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def _entry(self, key: str):
        try:
            return self.entries[key]
        except KeyError:
            raise self.error(f"{self.path}: no tensor {key!r} in this shard") from None

    # ------------------------------------------------------------------ data
    def read(self, key: str, *, device=None, dtype: torch.dtype | None = None,
             check_finite: bool = False) -> torch.Tensor:
        """The tensor `key` as a new tensor on `device` (CPU) in `dtype` (its stored dtype). With
        `check_finite`, a floating tensor holding NaN/inf raises `error` with the count."""
        name, shape, start, end = self._entry(key)
        if name not in DTYPES:
            return self._read_mapped(key, device, dtype)
        stored = DTYPES[name]
        dtype = dtype or stored
        device = torch.device(device or "cpu")
        out = torch.empty(shape, dtype=dtype, device=device)
        if out.numel() == 0:
            return out
        bad = 0
        check = check_finite and stored in FLOATS
        if dtype == stored and device.type == "cpu":
            self._pread_into(out.reshape(-1).view(torch.uint8), start, key)
            if check:
                bad = _count_nonfinite(out)
        else:
            flat, per = out.reshape(-1), READ_SLAB_BYTES // stored.itemsize
            if self.slab is None:
                self.slab = torch.empty(READ_SLAB_BYTES, dtype=torch.uint8)
            for i in range(0, flat.numel(), per):
                n = min(per, flat.numel() - i)
                raw = self.slab[:n * stored.itemsize]
                self._pread_into(raw, start + i * stored.itemsize, key)
                src = raw.view(stored)
                if check:
                    bad += _count_nonfinite(src)
                flat[i:i + n].copy_(src)
        if bad:
            raise self.error(f"{self.path}: tensor {key!r} holds {bad} NaN/inf values of {out.numel()}: the "
                             "checkpoint is corrupt or diverged in training")
        return out

    def _pread_into(self, dst: torch.Tensor, offset: int, key: str) -> None:
        """Fill the uint8 tensor `dst` with the file's bytes from `offset`."""
        mv, done, n = memoryview(dst.numpy()), 0, dst.numel()
        while done < n:
            try:
                k = os.preadv(self.fd, [mv[done:done + _PREAD_BYTES]], offset + done)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise self.error(f"{self.path}: cannot read {key!r} ({e})") from None
            if k == 0:
                raise self.error(f"{self.path}: file ends inside {key!r} ({offset + done} of the {offset + n} "
                                 "bytes its header needs): truncated or rewritten while being read")
            done += k

    def _read_mapped(self, key: str, device, dtype) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                view = f.get_tensor(key)
                out = view.to(device=device or "cpu", dtype=dtype, copy=True)
                del view
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise self.error(f"{self.path}: cannot read {key!r} (stored as {self.entries[key][0]}: {e})") from None
        return out

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _count_nonfinite(t: torch.Tensor, block: int = 1 << 22) -> int:
    """NaN/inf values in `t`, in blocks of 4 M values. A finite sum of a block proves every value in it
    finite (NaN and inf propagate); summed in the tensor's own dtype (CPU accumulates bf16/fp16 in fp32)
    it allocates nothing and is 10–80× faster than `isfinite` at one thread. Only a block whose sum is not
    finite (a bad value, or finite values too large to add up in that dtype) is counted exactly."""
    flat = t.reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), block):
        part = flat[i:i + block]
        if not math.isfinite(float(torch.sum(part))):
            bad += int((~torch.isfinite(part)).sum())
    return bad

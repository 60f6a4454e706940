"""KV cache: global (NoPE) layers keep every key; chunked layers keep only the current chunk.

A query at absolute position p on a chunked layer sees keys [⌊p/C⌋·C, p] (spec §2.6), so after
each step a chunked layer drops keys before the chunk start of the *next* position. This is
exact across chunk boundaries — unlike Meta's reference decode, which ignores chunking (§2.6).

Keys and values live in preallocated buffers written in place: a decode step copies one key and one
value per layer (no `torch.cat` of the whole history per step). `KVCache(n, capacity=P)` reserves P
positions at the first write (`generate` passes prompt + max_new_tokens); without it a buffer grows to
exactly what a multi-token write needs (a prefill segment: the memory `torch.cat` held, which the
planner counts) and by a quarter (at least 256 slots) for one token at a time. A chunked layer's
buffer restarts at slot 0 when a new chunk begins (the old chunk is simply forgotten, nothing is
copied) and is cut to one chunk when a prefill left it longer than two, so it never holds more than
the planner's one chunk plus one segment. `k` / `v` are views of the filled part: a later step may
overwrite the slots they show (keep a `.clone()` to hold on to them).

Legend: B batch, Hkv kv heads, S cached keys, Dh head dim.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, capacity: int | None = None) -> None:
        self._k: torch.Tensor | None = None     # (B, Hkv, cap, Dh) buffers; slots [0, n) hold keys
        self._v: torch.Tensor | None = None
        self.k_rows: torch.Tensor | None = None  # the same buffers as (B·Hkv, cap, Dh) views (decode statistics)
        self.v_rows: torch.Tensor | None = None
        self.n = 0                              # filled slots
        self.start = 0                          # absolute position of slot 0
        self.capacity = capacity                # positions to reserve at the first write (a hint)

    @property
    def k(self) -> torch.Tensor | None:         # (B, Hkv, S, Dh), a view of the buffer
        return None if self._k is None else self._k.narrow(2, 0, self.n)

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v.narrow(2, 0, self.n)

    @property
    def end(self) -> int:
        return self.start + self.n

    @torch.inference_mode(False)
    def _alloc(self, like: torch.Tensor, slots: int, keep: int) -> None:
        """New buffers of `slots` positions holding the first `keep` filled slots of the old ones. Never
        inference tensors (nor views made in inference mode), even when a decode step in inference mode
        grows them: a later step or prefill outside it writes into them in place."""
        B, H, _, D = like.shape
        k = like.new_empty(B, H, slots, D)
        v = like.new_empty(B, H, slots, D)
        if keep:
            k[:, :, :keep].copy_(self._k[:, :, :keep])
            v[:, :, :keep].copy_(self._v[:, :, :keep])
        self._set(k, v)

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, cap, D = k.shape
        self._k, self._v = k, v
        self.k_rows, self.v_rows = k.view(B * H, cap, D), v.view(B * H, cap, D)

    def update(self, k_new, v_new, start: int):
        """Append keys for positions [start, start+T); returns (k, v, absolute position of key 0)."""
        T = k_new.shape[2]
        if self._k is None:
            self.start, self.n = start, 0
            self._alloc(k_new, max(T, self.capacity or 0), 0)
        else:
            if start != self.end:
                raise ValueError(f"KV cache holds positions up to {self.end}, got new tokens at {start}")
            shape, have = k_new.shape, self._k.shape
            if (shape[0], shape[1], shape[3]) != (have[0], have[1], have[3]) or k_new.dtype != self._k.dtype:
                raise ValueError(f"KV cache holds keys of shape (batch, kv heads, ·, head dim) = "
                                 f"({have[0]}, {have[1]}, ·, {have[3]}) {self._k.dtype}, got {tuple(shape)} "
                                 f"{k_new.dtype}: one cache serves one batch of one model")
            if self.n + T > have[2]:
                # a prefill segment: exactly what it needs (as `torch.cat` held; the planner counts this);
                # one token at a time without a capacity hint: room for a quarter more, at least 256
                grow = T if T > 1 else max(256, have[2] // 4)
                self._alloc(k_new, self.n + grow, self.n)
        self._k.narrow(2, self.n, T).copy_(k_new)              # `narrow`, not `[:, :, a:b]`: ~1 µs less a view
        self._v.narrow(2, self.n, T).copy_(v_new)
        self.n = n = self.n + T
        return self._k.narrow(2, 0, n), self._v.narrow(2, 0, n), self.start

    def append(self, k_new, v_new, start: int) -> None:
        """`update` without building the returned views (the decode step reads `k_rows` / `v_rows`)."""
        T = k_new.shape[2]
        if self._k is None or start != self.end or self.n + T > self._k.shape[2] or k_new.shape[0] != self._k.shape[0]:
            self.update(k_new, v_new, start)           # first write, growth, or an error to report
            return
        self._k.narrow(2, self.n, T).copy_(k_new)
        self._v.narrow(2, self.n, T).copy_(v_new)
        self.n += T

    def trim(self, next_pos: int, chunk: int | None) -> None:
        if chunk is None or self._k is None:
            return
        keep_from = (next_pos // chunk) * chunk
        drop = keep_from - self.start
        if drop <= 0:
            return
        keep = max(self.n - drop, 0)
        if self._k.shape[2] > 2 * chunk:          # after a long prefill: one chunk is all it will need
            old_k, old_v = self._k, self._v
            self._alloc(old_k, chunk, 0)
            self._k[:, :, :keep].copy_(old_k[:, :, drop:drop + keep])
            self._v[:, :, :keep].copy_(old_v[:, :, drop:drop + keep])
        elif keep:                                  # a partial chunk to the front (overlap-safe)
            src = slice(drop, drop + keep)
            tail_k, tail_v = self._k[:, :, src], self._v[:, :, src]
            if keep > drop:
                tail_k, tail_v = tail_k.clone(), tail_v.clone()
            self._k[:, :, :keep].copy_(tail_k)
            self._v[:, :, :keep].copy_(tail_v)
        self.n, self.start = keep, keep_from

    def nbytes(self) -> int:
        """Bytes of the keys and values held (the filled slots)."""
        return 0 if self._k is None else 2 * self.k.numel() * self._k.element_size()

    def allocated_bytes(self) -> int:
        """Bytes of the buffers, reserved slots included."""
        return 0 if self._k is None else 2 * self._k.numel() * self._k.element_size()


class KVCache:
    def __init__(self, n_layers: int, capacity: int | list[int | None] | None = None) -> None:
        """`capacity`: positions to reserve per layer at its first write — one number for every layer, or
        one per layer (`for_generation` reserves a chunked layer one chunk only)."""
        caps = capacity if isinstance(capacity, list) else [capacity] * n_layers
        if len(caps) != n_layers:
            raise ValueError(f"capacity lists {len(caps)} layers, the cache has {n_layers}")
        for c in caps:
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c <= 0):
                raise ValueError(f"capacity must be a positive number of positions, got {c!r}")
        self.layers = [LayerCache(c) for c in caps]

    @classmethod
    def for_generation(cls, config, positions: int) -> KVCache:
        """A cache for `positions` tokens of a model with text `config`: global layers reserve them all,
        chunked layers at most one chunk (they never hold more while decoding)."""
        C = config.attention_chunk_size
        return cls(config.num_hidden_layers,
                   [min(positions, C) if chunked else positions for chunked in config.is_chunked])

    @property
    def seq_len(self) -> int:
        """Number of positions processed so far (the next position to write)."""
        return max(layer.end for layer in self.layers)

    def nbytes(self) -> int:
        return sum(lc.nbytes() for lc in self.layers)

    def allocated_bytes(self) -> int:
        return sum(lc.allocated_bytes() for lc in self.layers)

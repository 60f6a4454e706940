"""KV cache: global (NoPE) layers keep every key; chunked layers keep only the current chunk.

A query at absolute position p on a chunked layer sees keys [⌊p/C⌋·C, p] (spec §2.6), so after
each step a chunked layer drops keys before the chunk start of the *next* position. This is
exact across chunk boundaries — unlike Meta's reference decode, which ignores chunking (§2.6).

Legend: B batch, Hkv kv heads, S cached keys, Dh head dim.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self) -> None:
        self.k: torch.Tensor | None = None      # (B, Hkv, S, Dh)
        self.v: torch.Tensor | None = None
        self.start = 0                          # absolute position of self.k[:, :, 0]

    @property
    def end(self) -> int:
        return self.start + (0 if self.k is None else self.k.shape[2])

    def update(self, k_new, v_new, start: int):
        """Append keys for positions [start, start+T); returns (k, v, absolute position of key 0)."""
        if self.k is None:
            self.k, self.v, self.start = k_new, v_new, start
        else:
            if start != self.end:
                raise ValueError(f"KV cache holds positions up to {self.end}, got new tokens at {start}")
            self.k = torch.cat([self.k, k_new], dim=2)
            self.v = torch.cat([self.v, v_new], dim=2)
        return self.k, self.v, self.start

    def trim(self, next_pos: int, chunk: int | None) -> None:
        if chunk is None or self.k is None:
            return
        keep_from = (next_pos // chunk) * chunk
        drop = keep_from - self.start
        if drop > 0:
            self.k, self.v = self.k[:, :, drop:], self.v[:, :, drop:]
            self.start = keep_from


class KVCache:
    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def seq_len(self) -> int:
        """Number of positions processed so far (the next position to write)."""
        return max(layer.end for layer in self.layers)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lc in self.layers for t in (lc.k, lc.v) if t is not None)

"""Attention of ONE query per row (a decode step) with its statistics, in the fewest ops.

The statistics are those of `attention_stats.attend_with_stats` (entropy as run, entropy with the NoPE
temperature off, keys per query, first-token mass); for one query they come out of one softmax of the
scores: p gives the output p·V, the entropy Σ entr(p) = −Σ p·ln p and the first-token mass p₀. Compared
with `attention_stats._attend_decode` (the general few-query path) it has no per-call bookkeeping — no
query-group list, no position or mask tensors, no host read of β, no 4-D `matmul` — and computes only the
statistics asked for: at decode sizes each op is a few µs, which is all the cost (~45 → ~20 µs per layer
on one CPU thread, against ~10 µs for the plain SDPA call).

Legend: B batch, H query heads, Hkv kv heads, G = H/Hkv, S keys in range, Dh head dim.
"""

from __future__ import annotations

import torch

from workbench.model.attention_kernel import AttnStats, _sdpa


def _key_range(k_BHSD, v_BHSD, q0: int, k0: int, chunk: int | None):
    """The keys the query at q0 sees, [ka, q0] (a chunked layer: from its chunk start), and ka."""
    ka = k0 if chunk is None else max((q0 // chunk) * chunk, k0)
    if ka != k0 or k_BHSD.shape[2] != q0 + 1 - k0:
        return k_BHSD.narrow(2, ka - k0, q0 + 1 - ka), v_BHSD.narrow(2, ka - k0, q0 + 1 - ka), ka
    return k_BHSD, v_BHSD, ka


def attend_one_plain(q_BH1D, k_BHSD, v_BHSD, q0: int, k0: int, chunk: int | None, scale: float) -> torch.Tensor:
    """`attention_kernel.attend` for one query: the same SDPA call (causal when the query is its key
    range's first key, else unmasked), without building the query-group list."""
    k, v, ka = _key_range(k_BHSD, v_BHSD, q0, k0, chunk)
    return _sdpa(q_BH1D, k, v, scale, is_causal=True) if q0 == ka else _sdpa(q_BH1D, k, v, scale)


def attend_one(q_BH1D: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, q0: int, k0: int,
               chunk: int | None, scale: float, beta_T: torch.Tensor | None,
               want: tuple[bool, bool, bool] = (True, True, True)) -> tuple[torch.Tensor, AttnStats]:
    """Output (B, H, 1, Dh) in q's dtype and AttnStats for the query at absolute position q0; the keys
    cover [k0, q0] (the cache's), of which a chunked layer sees [⌊q0/C⌋·C, q0]. `beta_T` (1,): the
    query's temperature when it is active (then the no-temperature entropy uses q/β), else None.
    `want` = (entropies, n_keys, sink mass): a statistic not wanted is not computed (None in AttnStats);
    the decode step asks only for those whose taps have hooks."""
    B, H, _, Dh = q_BH1D.shape
    Hkv = k_BHSD.shape[1]
    k, v, ka = _key_range(k_BHSD, v_BHSD, q0, k0, chunk)
    n = q0 + 1 - ka
    o, st = attend_one_rows(q_BH1D.reshape(B * Hkv, H // Hkv, Dh), k.reshape(B * Hkv, n, Dh),
                            v.reshape(B * Hkv, n, Dh), B, ka == 0, scale, beta_T, want)
    return o.reshape(B, H, 1, Dh), st


def attend_one_rows(q_RGD: torch.Tensor, k_RSD: torch.Tensor, v_RSD: torch.Tensor, B: int, first_visible: bool,
                    scale: float, beta_T: torch.Tensor | None, want: tuple[bool, bool, bool] = (True, True, True),
                    n_keys_memo: dict | None = None) -> tuple[torch.Tensor, AttnStats]:
    """The core of `attend_one` on 3-D operands: R = B·Hkv rows of G = H/Hkv query heads each (the G heads
    of a kv head as rows), q (R, G, Dh), the visible keys and values (R, S, Dh). Returns the output
    (R, G, Dh) in q's dtype and AttnStats shaped (B, H, 1) as the taps expect. 3-D batched matmuls:
    `torch.matmul` on 4-D operands folds and expands them first, ~10 µs per call here against ~4 µs for
    the product; a cache buffer's slices fold as views. `first_visible`: the document's first token is
    among the keys (the sink mass is p₀, else 0). `n_keys_memo` {S: tensor}: one n_keys tensor per key
    count within a decode step, shared by the layers that see as many keys."""
    R, G, _ = q_RGD.shape
    n = k_RSD.shape[1]
    q, k, v = q_RGD, k_RSD, v_RSD
    f32 = q.dtype == torch.float32
    if not f32:
        q, k, v = q.float(), k.float(), v.float()
    s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)                         # (R, G, S)
    p = torch.softmax(s, dim=-1)
    o = torch.bmm(p, v)
    if not f32:
        o = o.to(q_RGD.dtype)
    entropies, counts, first = want
    shape = (B, R * G // B, 1)
    nk = None
    if counts:
        nk = None if n_keys_memo is None else n_keys_memo.get(n)
        if nk is None:
            nk = torch.full((1,), n, dtype=torch.int32, device=q.device)
            if n_keys_memo is not None:
                n_keys_memo[n] = nk
    sink = None
    if first:
        sink = p.select(2, 0).reshape(shape) if first_visible else q.new_zeros(shape)
    h = h0 = None
    if entropies and n == 1:            # one visible key: a point mass, entropy exactly 0
        h = h0 = q.new_zeros(shape)
    elif entropies:
        # −Σ p·ln p by `entr` (elementwise −p·ln p ≥ 0, 0 at p = 0): no clamp, no log-softmax + exp pair
        h = h0 = torch.special.entr(p).sum(-1).reshape(shape)
        if beta_T is not None:          # the counterfactual: scores of q/β
            p0 = torch.softmax(s.mul_(1.0 / beta_T.float()), dim=-1)
            h0 = torch.special.entr(p0).sum(-1).reshape(shape)
    return o, AttnStats(h, h0, nk, sink)

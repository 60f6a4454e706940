"""Attention over chunked-causal or global-causal masks, computed per chunk, never T×T.

Two paths share one mask convention (spec llama4.md §2.6): key j is visible to query i iff
j ≤ i and, on chunked layers, ⌊j/C⌋ == ⌊i/C⌋. Positions are absolute and contiguous: queries
cover [q0, q0+Tq), keys cover [k0, q0+Tq) (the cache holds [k0, q0)).

* `attend`: the fast path, SDPA per chunk (is_causal when the chunk is aligned, no mask at all
  for one-token decode); whole aligned chunks are folded into the batch axis of one SDPA call, and
  GQA is left to SDPA (`enable_gqa`) instead of repeating K/V.
* the same attention fused with per-row statistics (entropy as run and with temperature off,
  keys per query, first-token mass) lives in `attention_stats.py` and shares `query_groups`,
  `n_keys` and `AttnStats` from here.

Legend: B batch, H query heads, G = H/Hkv, Tq queries, S keys, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnStats:
    entropy_BHT: torch.Tensor
    entropy_no_temp_BHT: torch.Tensor
    n_keys_T: torch.Tensor
    sink_mass_BHT: torch.Tensor


def query_groups(q0: int, Tq: int, k0: int, chunk: int | None) -> list[tuple[int, int, int]]:
    """Split queries into groups that share one key range: (q_start, q_end, key_start), absolute."""
    if chunk is None:
        return [(q0, q0 + Tq, k0)]
    out, p = [], q0
    while p < q0 + Tq:
        c_start = (p // chunk) * chunk
        end = min(q0 + Tq, c_start + chunk)
        out.append((p, end, max(c_start, k0)))
        p = end
    return out


def n_keys(q0: int, Tq: int, k0: int, chunk: int | None, device=None) -> torch.Tensor:
    pos = torch.arange(q0, q0 + Tq, device=device)
    start = torch.full_like(pos, k0) if chunk is None else torch.clamp((pos // chunk) * chunk, min=k0)
    return (pos - start + 1).to(torch.int32)


def _expand_kv(x_BHkvSD: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x_BHkvSD
    B, Hkv, S, D = x_BHkvSD.shape
    return x_BHkvSD[:, :, None].expand(B, Hkv, groups, S, D).reshape(B, Hkv * groups, S, D)


# SDPA's `enable_gqa` (torch ≥ 2.5) lets the CPU flash kernel read each kv head for its G query heads
# in place; on older torch we fall back to materialising the repeated K/V (`_expand_kv`).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q, k, v, scale: float, **kw) -> torch.Tensor:
    G = q.shape[1] // k.shape[1]
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, _expand_kv(k, G), _expand_kv(v, G), scale=scale, **kw)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_takes_gqa() -> bool:
    """Whether the CPU flash op reads kv head h // G for query head h itself (torch ≥ 2.5 does; probed
    once on a 1-token call, so an older build falls back to repeating K/V instead of failing)."""
    if _FLASH_CPU is None:
        return False
    try:
        q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
        return tuple(_FLASH_CPU(q, kv, kv, 0.0, False, scale=1.0)[0].shape) == (1, 2, 1, 8)
    except RuntimeError:
        return False


FLASH_GQA = _flash_takes_gqa()


def _flash(q, k, v, scale, is_causal=False):
    out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse.float()


def _flash_prefix(q, k, v, scale, prefix: int | None, causal: bool):
    """Flash attention + LSE where the first `prefix` keys are visible to every query and the rest
    are causal-aligned with the queries (prefill on top of a cache). Computed as two fused calls
    merged by their log-sum-exps — exact, and no (queries × keys) mask is ever built."""
    if not prefix:
        return _flash(q, k, v, scale, causal)
    o1, l1 = _flash(q, k[:, :, :prefix], v[:, :, :prefix], scale, False)
    o2, l2 = _flash(q, k[:, :, prefix:], v[:, :, prefix:], scale, True)
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * torch.exp(l1 - lse)[..., None] + o2.float() * torch.exp(l2 - lse)[..., None]
    return out.to(q.dtype), lse


def _fold_chunks(x_BHTD: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n·C, Dh) → (B·n, H, C, Dh): consecutive chunks become batch rows (a view when x is a
    transposed (B, T, H, Dh) tensor, as the projections produce)."""
    B, H, T, Dh = x_BHTD.shape
    return x_BHTD.transpose(1, 2).reshape(B * n, T // n, H, Dh).transpose(1, 2)


def _flash_ok(q, k) -> bool:
    """The flash CPU op takes fp32/bf16 with equal head dims."""
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] == k.shape[-1]


def attend(q_BHTD, k_BHSD, v_BHSD, q0: int, k0: int, chunk: int | None, scale: float) -> torch.Tensor:
    """Fast path: SDPA per query group; runs of whole aligned chunks go in one call with the chunks
    folded into the batch axis (one kernel launch instead of T/C). Returns (B, H, Tq, Dh)."""
    B, H, Tq, Dh = q_BHTD.shape
    groups = query_groups(q0, Tq, k0, chunk)
    outs, i = [], 0
    while i < len(groups):
        qa, qb, ka = groups[i]
        j = i
        while (j < len(groups) and groups[j][0] == groups[j][2] and groups[j][1] - groups[j][0] == chunk):
            j += 1                          # groups[i:j] are whole chunks with no cached prefix
        if j - i > 1:
            qa, qb = groups[i][0], groups[j - 1][1]
            n, sl = j - i, slice(qa - q0, qb - q0)
            ksl = slice(qa - k0, qb - k0)
            o = _sdpa(_fold_chunks(q_BHTD[:, :, sl], n), _fold_chunks(k_BHSD[:, :, ksl], n),
                      _fold_chunks(v_BHSD[:, :, ksl], n), scale, is_causal=True)      # (B·n, H, C, Dh)
            outs.append(o.transpose(1, 2).reshape(B, qb - qa, H, Dh).transpose(1, 2))
            i = j
            continue
        q = q_BHTD[:, :, qa - q0:qb - q0]
        k = k_BHSD[:, :, ka - k0:qb - k0]
        v = v_BHSD[:, :, ka - k0:qb - k0]
        if qa == ka:                        # aligned: plain causal over the group
            o = _sdpa(q, k, v, scale, is_causal=True)
        elif qb - qa == 1:                  # one-token decode sees every key in range
            o = _sdpa(q, k, v, scale)
        elif q.device.type == "cpu" and _FLASH_CPU is not None and _flash_ok(q, k):
            # prefill on top of a cache: cached keys unmasked + new keys causal, merged by LSE
            G = 1 if FLASH_GQA else q.shape[1] // k.shape[1]
            o, _ = _flash_prefix(q, _expand_kv(k, G), _expand_kv(v, G), scale, qa - ka, False)
        else:                               # other devices: a (Tq_g, S_g) mask
            qpos = torch.arange(qa, qb, device=q.device)[:, None]
            kpos = torch.arange(ka, qb, device=q.device)[None, :]
            o = _sdpa(q, k, v, scale, attn_mask=kpos <= qpos)
        outs.append(o)
        i += 1
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

"""Attention over chunked-causal or global-causal masks, computed per chunk, never T×T.

Two paths share one mask convention (spec llama4.md §2.6): key j is visible to query i iff
j ≤ i and, on chunked layers, ⌊j/C⌋ == ⌊i/C⌋. Positions are absolute and contiguous: queries
cover [q0, q0+Tq), keys cover [k0, q0+Tq) (the cache holds [k0, q0)).

* `attend`: the fast path, SDPA per chunk (is_causal when the chunk is aligned, no mask at all
  for one-token decode); whole aligned chunks are folded into the batch axis of one SDPA call, and
  GQA is left to SDPA (`enable_gqa`) instead of repeating K/V.
* `attend_with_stats`: the same attention computed blockwise with online log-sum-exp
  accumulators (science.md §3.1) that also yield, per query row, the entropy of the attention
  distribution as run and — on temperature-tuned NoPE layers — the entropy the row would have
  with tuning off (scores divided by the row's β), in the same pass. Memory O(block²), exact
  to fp32 round-off.

Legend: B batch, H query heads, G = H/Hkv, Tq queries, S keys, Dh head dim, bq/bk block sizes.
"""

from __future__ import annotations

import math
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


def _fold_chunks(x_BHTD: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n·C, Dh) → (B·n, H, C, Dh): consecutive chunks become batch rows (a view when x is a
    transposed (B, T, H, Dh) tensor, as the projections produce)."""
    B, H, T, Dh = x_BHTD.shape
    return x_BHTD.transpose(1, 2).reshape(B * n, T // n, H, Dh).transpose(1, 2)


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
        else:                               # prefill on top of a cache: (Tq_g, S_g) mask
            qpos = torch.arange(qa, qb, device=q.device)[:, None]
            kpos = torch.arange(ka, qb, device=q.device)[None, :]
            o = _sdpa(q, k, v, scale, attn_mask=kpos <= qpos)
        outs.append(o)
        i += 1
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend_with_stats(q_BHTD, k_BHSD, v_BHSD, q0: int, k0: int, chunk: int | None, scale: float,
                      beta_T: torch.Tensor | None, block: int = 512) -> tuple[torch.Tensor, AttnStats]:
    """Blockwise attention + streaming entropy. `beta_T` is the temperature already folded into q
    (None when the layer has none); the counterfactual entropy uses scores / beta."""
    B, H, Tq, Dh = q_BHTD.shape
    G = H // k_BHSD.shape[1]
    dev = q_BHTD.device
    out = torch.empty(B, H, Tq, Dh, dtype=torch.float32, device=dev)
    ent = torch.empty(B, H, Tq, dtype=torch.float32, device=dev)
    ent0 = torch.empty_like(ent)
    sink = torch.zeros_like(ent)
    for qa, qb, ka in query_groups(q0, Tq, k0, chunk):
        for ba in range(qa, qb, block):
            bb = min(qb, ba + block)
            q = q_BHTD[:, :, ba - q0:bb - q0].float()                                # (B, H, bq, Dh)
            qpos = torch.arange(ba, bb, device=dev)[:, None]
            inv_beta = None if beta_T is None else (1.0 / beta_T[ba - q0:bb - q0].float())[:, None]
            acc = _Online(B, H, bb - ba, Dh, dev, with_counterfactual=inv_beta is not None)
            for ka_b in range(ka, bb, block):
                kb_b = min(bb, ka_b + block)
                k = _expand_kv(k_BHSD[:, :, ka_b - k0:kb_b - k0], G).float()       # (B, H, bk, Dh)
                v = _expand_kv(v_BHSD[:, :, ka_b - k0:kb_b - k0], G).float()
                s = torch.matmul(q, k.transpose(-1, -2)) * scale                    # (B, H, bq, bk)
                kpos = torch.arange(ka_b, kb_b, device=dev)[None, :]
                visible = kpos <= qpos                                              # (bq, bk)
                if not bool(visible.all()):
                    s = s.masked_fill(~visible, float("-inf"))
                acc.update(s, v, inv_beta)
                if ka_b == 0:                   # the document's first token is visible in this range
                    first = s[..., 0]
                    sink[:, :, ba - q0:bb - q0] = first                            # LSE subtracted below
            o, h, h0, lse = acc.finish()
            sl = slice(ba - q0, bb - q0)
            out[:, :, sl], ent[:, :, sl], ent0[:, :, sl] = o, h, h0
            if ka == 0:
                sink[:, :, sl] = torch.exp(sink[:, :, sl] - lse)
    stats = AttnStats(ent, ent0, n_keys(q0, Tq, k0, chunk, dev), sink)
    return out.to(q_BHTD.dtype), stats


class _Online:
    """Per-row online softmax statistics: max m, l = Σ e^{s-m}, shifted moment t = Σ e^{s-m}(s-m),
    and the weighted value sum; optionally a second (m, l, t) set for scores / β."""

    def __init__(self, B, H, n, Dh, dev, with_counterfactual: bool):
        full = lambda v: torch.full((B, H, n), v, dtype=torch.float32, device=dev)  # noqa: E731
        self.m, self.l, self.t = full(-math.inf), full(0.0), full(0.0)
        self.o = torch.zeros(B, H, n, Dh, dtype=torch.float32, device=dev)
        self.cf = (full(-math.inf), full(0.0), full(0.0)) if with_counterfactual else None

    @staticmethod
    def _step(m, l, t, s):
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp(m - m_safe)                               # 0 where m = -inf
        shifted = s - m_safe[..., None]
        e = torch.exp(shifted)                                      # 0 where masked
        moment = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
        mm = torch.where(torch.isfinite(m), m - m_safe, torch.zeros_like(m))
        t = alpha * (t + mm * l) + moment
        l = alpha * l + e.sum(-1)
        return m_new, l, t, e, alpha

    def update(self, s, v, inv_beta):
        self.m, self.l, self.t, e, alpha = self._step(self.m, self.l, self.t, s)
        self.o = self.o * alpha[..., None] + torch.matmul(e, v)
        if self.cf is not None:
            m0, l0, t0, _, _ = self._step(*self.cf, s * inv_beta)
            self.cf = (m0, l0, t0)

    def finish(self):
        o = self.o / self.l[..., None]
        h = torch.log(self.l) - self.t / self.l
        lse = self.m + torch.log(self.l)
        h0 = h if self.cf is None else torch.log(self.cf[1]) - self.cf[2] / self.cf[1]
        return o, h.clamp_min(0.0), h0.clamp_min(0.0), lse

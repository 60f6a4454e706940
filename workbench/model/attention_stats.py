"""Attention fused with per-row statistics — never a T×T matrix.

For each query row i (scores s_ij already scaled, temperature folded into q, mask applied):
    entropy     H_i  = LSE_i − Σ_j a_ij s_ij                      (nats)
    no-temp     H0_i = the same for scores s_ij / β_i              (NoPE layers with tuning; = H elsewhere)
    n_keys      number of visible keys
    sink mass   a_i0 when the document's first token is visible, else 0

Exact implementations:

* fused (CPU): the flash-attention CPU kernel returns each row's log-sum-exp; running it once more
  with the (mean-centred) keys as values gives ō_i = Σ_j a_ij k_j, and H_i = LSE_i − scale·q_i·ō_i
  (the "V := K" identity, science.md §3.1). A third call with q/β gives the counterfactual on
  tiles where temperature is active. Two or three fused kernels, memory O(T).
* padded (CPU, fp32): the same identity in one call for the output and ō: the op needs equal head
  sizes for q, k and v, so q' = [q, 0], k' = [k, 0], v' = [v, k] (head size 2·Dh; q'·k' = q·k exactly).
  The softmax is computed once instead of twice; the QK product pays for the zeros. 10–18 % less
  kernel time than two calls (benchmarks/attention_paths.py); the output is the plain call's (the
  zeros add exact zeros; bitwise equal on the CPUs measured). Used for groups of ≥ PAD_MIN_KEYS keys.
  Memory: k' and v' span the group's key range at 2·Dh (4·S·Hkv·Dh fp32 values, against 2 for the
  fused path's fp32 and centred keys); q' and out' are 2·Dh per query.
* tiled (any device; reference): tiles whose key range is short (every chunk of a chunked layer
  with C ≤ `dense_keys`, the first blocks of a global layer) are computed densely; longer ranges
  use online log-sum-exp accumulators with a shifted first moment (science.md §3.1), so memory is
  O(tile) at any context length. Full aligned chunks are batched into one tensor op.

Both agree with entropies of eager softmax weights to fp32 round-off (tests/test_attention_stats.py).

Legend: B batch, H query heads, Hkv kv heads, G = H/Hkv, n chunks, C chunk, tq/tk tile sizes, Dh.
"""

from __future__ import annotations

import math

import torch

from workbench.model.attention_kernel import (
    _FLASH_CPU,
    FLASH_GQA,
    AttnStats,
    _flash_prefix,
    _fold_chunks,
    n_keys,
    query_groups,
)

METHODS = ("auto", "padded", "fused", "tiled")
TILE_ELEMS = 1 << 22          # fp32 score elements per tile (16 MiB); bounds memory at any T
# fp32 query groups with at least this many keys take the padded call: it saves work per score (one
# softmax instead of two) but copies q, k, v per token, so it wins from 512 keys (chunk 512: 2.07× attend
# vs 2.11×; global 4,096: 2.80× vs 3.02×) and loses below (chunk 256: 2.35× vs 2.19×); attention_paths.py
PAD_MIN_KEYS = 512
DECODE_QUERIES = 16           # at most this many queries in one key range: the dense decode path
# Masked scores get a finite, hugely negative value instead of -inf: exp() still gives exactly 0,
# and 0·(s−m) stays 0 (no NaN), which saves a `where` pass per tile. Every row's first tile holds
# at least one visible key (its key-range start), so no row's max is ever this value.
MASKED = -1e30


def _expand(x_BHkvSD: torch.Tensor, G: int) -> torch.Tensor:
    if G == 1:
        return x_BHkvSD
    B, Hkv, S, D = x_BHkvSD.shape
    return x_BHkvSD[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv * G, S, D)


def _row_stats(s: torch.Tensor):
    """Dense statistics of (masked) score rows s (…, tk): max m, l = Σe^{s−m}, t = Σe^{s−m}(s−m), e."""
    m = s.amax(-1, keepdim=True)
    shifted = s - m
    e = torch.exp(shifted)
    return m.squeeze(-1), e.sum(-1), (e * shifted).sum(-1), e


def _dense(q, k, v, scale, visible, inv_beta):
    """One tile with its whole key range: returns out (…, tq, Dh), H, H0, LSE, first-key score."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                     # (…, tq, tk)
    if visible is not None:
        s = s.masked_fill(~visible, MASKED)
    m, l, t, e = _row_stats(s)
    out = torch.matmul(e, v) / l[..., None]
    h = torch.log(l) - t / l
    if _no_temperature(inv_beta):
        h0 = h
    else:
        _, l0, t0, _ = _row_stats(s * inv_beta)
        h0 = torch.log(l0) - t0 / l0
    return out, h, h0, m + torch.log(l), s[..., 0]




def attend_with_stats(q_BHTD, k_BHSD, v_BHSD, q0: int, k0: int, chunk: int | None, scale: float,
                      beta_T: torch.Tensor | None, dense_keys: int = 2048,
                      method: str = "auto") -> tuple[torch.Tensor, AttnStats]:
    """Attention output (B, H, Tq, Dh) in q's dtype, plus AttnStats. Positions as in `attend`.
    method: "padded" (fp32, CPU flash kernel: one call with heads padded to 2·Dh returns the output and
    Σ a·k), "fused" (CPU flash kernel, a second call with V := centred K), "tiled", or "auto": decode
    steps — up to DECODE_QUERIES queries in one key range — dense per kv head; else, on CPU, padded for
    fp32 query groups whose key range is at least PAD_MIN_KEYS and fused for the rest and for bf16 (a bf16
    Σ a·k would be rounded to bf16); tiled elsewhere."""
    if method not in METHODS:
        raise ValueError(f"attend_with_stats: method must be one of {METHODS}, got {method!r}")
    Tq = q_BHTD.shape[2]
    if (method == "auto" and Tq <= DECODE_QUERIES and len(query_groups(q0, Tq, k0, chunk)) == 1
            and Tq * k_BHSD.shape[2] * q_BHTD.shape[1] <= TILE_ELEMS):
        return _attend_decode(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T)
    flash = q_BHTD.device.type == "cpu" and _FLASH_CPU is not None
    if method == "padded" and not (flash and q_BHTD.dtype == torch.float32):
        raise ValueError("attend_with_stats: method='padded' needs float32 tensors on the CPU (the flash op), "
                         f"got {q_BHTD.dtype} on {q_BHTD.device.type}")
    if method in ("fused", "padded") or (method == "auto" and flash and q_BHTD.dtype in (torch.float32,
                                                                                      torch.bfloat16)):
        pad_from = {"padded": 0, "fused": None}.get(method, PAD_MIN_KEYS if q_BHTD.dtype == torch.float32 else None)
        return _attend_fused(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T, pad_from)
    return _attend_tiled(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T, dense_keys)


def _attend_decode(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T):
    """A few queries sharing one key range (decode steps): dense scores per kv head, the G query heads
    of a group stacked as rows — no K/V expansion, no extra kernels. Measured on one CPU thread for 40
    heads × 512 keys: ≈ 0.5 ms vs 24 ms fused (whose expand/centre copies dominate at Tq = 1)."""
    B, H, Tq, Dh = q_BHTD.shape
    Hkv = k_BHSD.shape[1]
    G = H // Hkv
    (qa, qb, ka), = query_groups(q0, Tq, k0, chunk)
    f32 = q_BHTD.dtype == torch.float32            # no `.float()` calls then: each is an op per layer per step
    q = q_BHTD.reshape(B, Hkv, G * Tq, Dh)                                  # row g·Tq + t
    k, v = k_BHSD[:, :, ka - k0:qb - k0], v_BHSD[:, :, ka - k0:qb - k0]
    if not f32:
        q, k, v = q.float(), k.float(), v.float()
    # one query sees every key of its range: no mask, no position tensors (the common decode step);
    # each op saved here is ~10 µs per layer per token, which is what recorded decoding costs over plain
    visible = None
    if Tq > 1:
        qpos = torch.arange(qa, qb, device=q.device).repeat(G)[:, None]    # (G·Tq, 1)
        visible = torch.arange(ka, qb, device=q.device)[None, :] <= qpos
    ib = None
    if beta_T is not None and not bool((beta_T == 1).all()):                # before floor_scale β ≡ 1
        ib = (1.0 / beta_T.float()).repeat(G)[:, None]
    # fewest ops per step (each is ~10 µs at decode sizes): log-softmax once gives the weights, the entropy
    # −Σ p·log p (log p is s − m − log l, computed stably) and the first-token mass p_0, without LSE
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)                   # (B, Hkv, G·Tq, S)
    if visible is not None:
        s = s.masked_fill(~visible, MASKED)
    logp = torch.log_softmax(s, dim=-1)
    p = torch.exp(logp)
    o = torch.matmul(p, v)
    h = -torch.linalg.vecdot(p, logp)
    h0 = h
    if ib is not None:
        logp0 = torch.log_softmax(s.mul_(ib), dim=-1)
        h0 = -torch.linalg.vecdot(torch.exp(logp0), logp0)
    sink = p[..., 0] if ka == 0 else torch.zeros_like(h)
    shape = (B, H, Tq)
    nk = (torch.full((1,), qb - ka, dtype=torch.int32, device=q.device) if Tq == 1
          else n_keys(q0, Tq, k0, chunk, q.device))
    o = o.reshape(B, H, Tq, Dh) if f32 else o.reshape(B, H, Tq, Dh).to(q_BHTD.dtype)
    if Tq == 1 and qb - ka > 1:         # no single-key row: `_finish` would only clamp
        h = h.clamp_min(0.0).reshape(shape)
        h0 = h if ib is None else h0.clamp_min(0.0).reshape(shape)
        return o, AttnStats(h, h0, nk, sink.reshape(shape))
    return o, _finish(h.reshape(shape), h0.reshape(shape), nk, sink.reshape(shape))


def _unfold(x, B: int, n: int):
    """(B·n, H, C, …) → (B, H, n·C, …): folded chunks back on the token axis (a view when the chunks'
    memory is laid out (B·n, C, H, …), as the flash op writes its output)."""
    y = x.transpose(1, 2)                                               # (B·n, C, H, …)
    return y.reshape(B, n * y.shape[1], *y.shape[2:]).transpose(1, 2)


def _attend_fused(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T, pad_from: int | None = None):
    """The flash-kernel paths. pad_from: query groups whose key range (the chunk, or every visible key) has
    at least this many keys take the padded call (`_padded`); None: none do (the fused two calls)."""
    B, H, Tq, Dh = q_BHTD.shape
    if not FLASH_GQA:                   # older torch: the flash op wants one kv head per query head
        k_BHSD, v_BHSD = _expand(k_BHSD, H // k_BHSD.shape[1]), _expand(v_BHSD, H // k_BHSD.shape[1])
    G = H // k_BHSD.shape[1]            # else the op reads kv head h // G in place: no K/V copies
    groups = query_groups(q0, Tq, k0, chunk)
    outs, ents, ent0s, sinks = [], [], [], []
    i = 0
    while i < len(groups):
        qa, qb, ka = groups[i]
        j = i + 1
        if chunk is not None and qa == ka and qb - qa == chunk:
            while j < len(groups) and groups[j][0] == groups[j][2] and groups[j][1] - groups[j][0] == chunk:
                j += 1                    # groups[i:j]: whole aligned chunks → fold into the batch axis
        qb = groups[j - 1][1]
        n = j - i
        q = q_BHTD[:, :, qa - q0:qb - q0]
        k = k_BHSD[:, :, ka - k0:qb - k0] if n == 1 else k_BHSD[:, :, qa - k0:qb - k0]
        v = v_BHSD[:, :, ka - k0:qb - k0] if n == 1 else v_BHSD[:, :, qa - k0:qb - k0]
        if n > 1:                         # views for the projections' (B, T, H, Dh) layout, as `attend` folds
            q, k, v = _fold_chunks(q, n), _fold_chunks(k, n), _fold_chunks(v, n)
        causal = qa == ka or n > 1
        prefix = qa - ka if not causal and qb - qa > 1 else None      # prefill on top of a cache
        # statistics accumulate in fp32 whatever the model dtype: the kernel returns Σ a·k in its input
        # dtype, and bf16 rounding of that sum alone cost up to 5e-3 nats (tests/test_bf16.py)
        qf, kc = q.float(), None
        if pad_from is not None and k.shape[2] >= pad_from:
            out, h, lse = _padded(q, k, v, scale, prefix, causal)
        else:
            out, lse = _flash_prefix(q, k, v, scale, prefix, causal)
            kc = _centred(k)
            ko, lse_c = _flash_prefix(qf, kc, kc, scale, prefix, causal)
            h = lse_c - scale * torch.linalg.vecdot(qf, ko)
        h0 = h
        if beta_T is not None:
            beta = beta_T[qa - q0:qb - q0].float()
            if not bool((beta == 1).all()):
                ib = (1.0 / beta).reshape(n, 1, -1, 1).repeat(B, 1, 1, 1) if n > 1 else (1.0 / beta)[:, None]
                qs = (qf * ib).to(q.dtype).float()       # the query the no-temperature model would use
                kc = _centred(k) if kc is None else kc
                ko0, lse0 = _flash_prefix(qs, kc, kc, scale, prefix, causal)
                h0 = lse0 - scale * torch.linalg.vecdot(qs, ko0)
        if n > 1:
            out, h, h0, lse = _unfold(out, B, n), _unfold(h, B, n), _unfold(h0, B, n), _unfold(lse, B, n)
        # first-token mass, only for the queries that see the document's first key (all of a group that
        # starts at key 0; the first chunk of a folded run): one (T, Dh)·(Dh,) product per head
        if ka == 0:
            m = chunk if n > 1 else qb - qa
            k_first = k_BHSD[:, :, :1].float().repeat_interleave(G, dim=1)            # (B, H, 1, Dh); k0 == 0
            first = torch.matmul(q_BHTD[:, :, qa - q0:qa - q0 + m].float(), k_first.transpose(-1, -2))[..., 0]
            sink = torch.exp(scale * first - lse[:, :, :m])
            if m < qb - qa:
                sink = torch.cat([sink, sink.new_zeros(B, H, qb - qa - m)], dim=2)
        else:
            sink = torch.zeros_like(lse)
        outs.append(out)
        ents.append(h)
        ent0s.append(h0)
        sinks.append(sink)
        i = j
    cat = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs, dim=2)  # noqa: E731
    return cat(outs), _finish(cat(ents), cat(ent0s), n_keys(q0, Tq, k0, chunk, q_BHTD.device), cat(sinks))


def _centred(k: torch.Tensor) -> torch.Tensor:
    """fp32 keys minus their mean over the key axis: the scores of a row shift by a constant (its softmax
    is unchanged) and the LSE and Σ a·k of a V := K pass carry the round-off of smaller numbers."""
    kf = k.float().contiguous()         # a mean over strided rows was measured ~20x slower
    return kf - kf.mean(dim=2, keepdim=True)


def _padded_like(x_BHSD: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, S, 2·Dh) buffer laid out (B, S, H, 2·Dh) in memory, as the projections lay out q, k,
    v and the flash op its output: copies into it stream, and elementwise ops on mixed layouts (which
    were several times slower) never happen."""
    B, H, S, D = x_BHSD.shape
    return x_BHSD.new_empty(B, S, H, 2 * D).transpose(1, 2)


def _padded(q, k, v, scale, prefix, causal):
    """fp32 only: one flash call for the output and Σ a·k. Heads padded to 2·Dh: q' = [q, 0], k' = [k, 0],
    v' = [v, k], so q'·k' = q·k exactly (the zeros add exact zeros: the output is the plain call's),
    the softmax is computed once, and out' = [out, Σ a·k]; H = LSE − scale·q·Σ a·k.

    The keys are not centred here: the kernel's LSE is of the uncentred scores whatever v' holds, so its
    round-off (eps·max|s|) bounds H's either way. Returns out (a view of out'), H and LSE."""
    Dh = q.shape[-1]
    qp, kp, vp = _padded_like(q), _padded_like(k), _padded_like(v)
    qp[..., Dh:] = 0
    qp[..., :Dh] = q
    kp[..., Dh:] = 0
    kp[..., :Dh] = k
    vp[..., :Dh] = v
    vp[..., Dh:] = k
    outp, lse = _flash_prefix(qp, kp, vp, scale, prefix, causal)
    h = lse - scale * torch.linalg.vecdot(q, outp[..., Dh:])
    return outp[..., :Dh], h, lse


def _finish(h, h0, n_keys_T, sink) -> AttnStats:
    """Entropy is ≥ 0, and exactly 0 for a row with one visible key (its distribution is a point
    mass); the V := K identity only gets there to round-off, so say it exactly."""
    single = (n_keys_T == 1)
    h = h.clamp_min(0.0).masked_fill(single, 0.0)
    h0 = h0.clamp_min(0.0).masked_fill(single, 0.0)
    return AttnStats(h, h0, n_keys_T, sink)


def _attend_tiled(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T, dense_keys):
    B, H, Tq, Dh = q_BHTD.shape
    G = H // k_BHSD.shape[1]
    dev = q_BHTD.device
    out = torch.empty(B, H, Tq, Dh, dtype=torch.float32, device=dev)
    ent, ent0, sink = (torch.zeros(B, H, Tq, dtype=torch.float32, device=dev) for _ in range(3))
    inv_beta_T = None if beta_T is None else 1.0 / beta_T.float()
    groups = query_groups(q0, Tq, k0, chunk)

    # 1) full aligned chunks, C ≤ dense_keys: batch them, a few chunks per tensor op
    if chunk is not None and chunk <= dense_keys:
        full = [g for g in groups if g[0] == g[2] and g[1] - g[0] == chunk]
        per_op = max(1, TILE_ELEMS // (B * H * chunk * chunk))
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril()
        for i in range(0, len(full), per_op):
            part = full[i:i + per_op]
            a, b = part[0][0], part[-1][1]                  # consecutive chunks [a, b)
            n = len(part)
            q = q_BHTD[:, :, a - q0:b - q0].float().reshape(B, H, n, chunk, Dh)
            k = _expand(k_BHSD[:, :, a - k0:b - k0], G).float().reshape(B, H, n, chunk, Dh)
            v = _expand(v_BHSD[:, :, a - k0:b - k0], G).float().reshape(B, H, n, chunk, Dh)
            ib = None if inv_beta_T is None else inv_beta_T[a - q0:b - q0].reshape(n, chunk, 1)
            o, h, h0, lse, first = _dense(q, k, v, scale, causal, ib)
            sl = slice(a - q0, b - q0)
            out[:, :, sl] = o.reshape(B, H, -1, Dh)
            ent[:, :, sl], ent0[:, :, sl] = h.reshape(B, H, -1), h0.reshape(B, H, -1)
            if a == 0:                                       # only chunk 0 sees the first token
                sink[:, :, :chunk] = torch.exp(first[:, :, 0] - lse[:, :, 0])
        done = set(full)
        groups = [g for g in groups if g not in done]

    # 2) everything else: query tiles; dense when the key range is short, online otherwise
    for qa, qb, ka in groups:
        tq = max(1, min(qb - qa, TILE_ELEMS // (B * H * min(dense_keys, qb - ka))))
        for ba in range(qa, qb, tq):
            bb = min(qb, ba + tq)
            q = q_BHTD[:, :, ba - q0:bb - q0].float()
            ib = None if inv_beta_T is None else inv_beta_T[ba - q0:bb - q0, None]
            qpos = torch.arange(ba, bb, device=dev)[:, None]
            sl = slice(ba - q0, bb - q0)
            if bb - ka <= dense_keys:
                k = _expand(k_BHSD[:, :, ka - k0:bb - k0], G).float()
                v = _expand(v_BHSD[:, :, ka - k0:bb - k0], G).float()
                visible = torch.arange(ka, bb, device=dev)[None, :] <= qpos
                o, h, h0, lse, first = _dense(q, k, v, scale, visible, ib)
            else:
                o, h, h0, lse, first = _online(q, k_BHSD, v_BHSD, ka, bb, k0, G, scale, qpos, ib, dense_keys)
            out[:, :, sl], ent[:, :, sl], ent0[:, :, sl] = o, h, h0
            if ka == 0:
                sink[:, :, sl] = torch.exp(first - lse)
    return out.to(q_BHTD.dtype), _finish(ent, ent0, n_keys(q0, Tq, k0, chunk, dev), sink)


def _no_temperature(inv_beta) -> bool:
    """True when the tile has no temperature (β ≡ 1 before floor_scale): the counterfactual is H."""
    return inv_beta is None or bool((inv_beta == 1).all())


def _online(q, k_BHSD, v_BHSD, ka, kb, k0, G, scale, qpos, inv_beta, tk):
    """Online (m, l, t) accumulation over key tiles of size tk for keys [ka, kb)."""
    B, H, tq, Dh = q.shape
    shape = (B, H, tq)
    m, l, t = (torch.full(shape, -math.inf, device=q.device), torch.zeros(shape, device=q.device),
               torch.zeros(shape, device=q.device))
    cf = None if _no_temperature(inv_beta) else (m.clone(), l.clone(), t.clone())
    o = torch.zeros(B, H, tq, Dh, device=q.device)
    first = None
    for a in range(ka, kb, tk):
        b = min(kb, a + tk)
        k = _expand(k_BHSD[:, :, a - k0:b - k0], G).float()
        v = _expand(v_BHSD[:, :, a - k0:b - k0], G).float()
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        visible = torch.arange(a, b, device=q.device)[None, :] <= qpos
        if not bool(visible.all()):
            s = s.masked_fill(~visible, MASKED)
        if first is None:
            first = s[..., 0]
        m, l, t, alpha, e = _merge(m, l, t, s)
        o = o * alpha[..., None] + torch.matmul(e, v)
        if cf is not None:
            m0, l0, t0, _, _ = _merge(*cf, s * inv_beta)
            cf = (m0, l0, t0)
    h = torch.log(l) - t / l
    h0 = h if cf is None else torch.log(cf[1]) - cf[2] / cf[1]
    return o / l[..., None], h, h0, m + torch.log(l), first


def _merge(m, l, t, s):
    """Fold a tile of scores into running (m, l, t); t is re-centred to the new max."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    alpha = torch.exp(m - m_safe)
    shifted = s - m_safe[..., None]
    e = torch.exp(shifted)
    moment = (e * shifted).sum(-1)
    delta = torch.where(torch.isfinite(m), m - m_safe, torch.zeros_like(m))
    return m_new, alpha * l + e.sum(-1), alpha * (t + delta * l) + moment, alpha, e

"""Llama 4 text attention (spec llama4.md §2.2–2.5).

    x ─ q_proj ─ RoPE* ─ QKnorm* ─ ×temp(pos)† ─┐
    x ─ k_proj ─ RoPE* ─ QKnorm* ──── cache ────┼─ attend (chunked* | global†) ─ o_proj
    x ─ v_proj ──────────────────────── cache ──┘
    * RoPE layers (chunked when attention_chunk_size is set)   † NoPE layers (temperature tuning)

Scale 1/√Dh on every layer; GQA with H/Hkv query heads per kv head. Statistics (entropy as run,
entropy with tuning off, keys per query, first-token mass) are computed inside the attention
pass when `stats=True`, and published through taps.

Legend: B batch, T new tokens, D hidden, H heads, Hkv kv heads, Dh head dim, S cached+new keys.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import Llama4TextConfig
from workbench.instrument.tap import Tap
from workbench.model.attention_kernel import attend
from workbench.model.attention_one import attend_one, attend_one_plain
from workbench.model.attention_stats import TILE_ELEMS, attend_with_stats
from workbench.model.kv_cache import LayerCache
from workbench.model.rope import apply_rope


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) over the last axis, in float32, cast back (HF Llama4TextL2Norm)."""
    return torch.rms_norm(x, (x.shape[-1],), None, eps)   # the same ops in one call (upcast, cast back)


def attend_stats(q_BHTD, k_BHSD, v_BHSD, q0: int, k0: int, chunk: int | None, scale: float, beta_T,
                 want: tuple[bool, bool, bool] = (True, True, True)):
    """Attention + statistics: one query (a decode step) by `attend_one` (computing the statistics in
    `want` only), else `attend_with_stats` (all of them)."""
    if q_BHTD.shape[2] == 1 and q_BHTD.shape[1] * k_BHSD.shape[2] <= TILE_ELEMS:
        return attend_one(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T, want)
    return attend_with_stats(q_BHTD, k_BHSD, v_BHSD, q0, k0, chunk, scale, beta_T)


class Llama4TextAttention(nn.Module):
    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scaling = self.head_dim ** -0.5
        self.use_rope = c.use_rope[layer_idx]
        self.chunk = c.attention_chunk_size if c.is_chunked[layer_idx] else None
        self.use_qk_norm = c.use_qk_norm and self.use_rope
        self.eps = c.rms_norm_eps
        self.temperature_tuning = c.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = c.floor_scale, c.attn_scale
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=bias)
        for name in ("q", "k", "v", "z", "entropy", "entropy_no_temp", "n_keys", "sink_mass"):
            setattr(self, f"hook_{name}", Tap(f"self_attn.hook_{name}"))

    def temperature(self, positions_T: torch.Tensor) -> torch.Tensor:
        """β(pos) = 1 + attn_scale·ln(⌊(pos+1)/floor_scale⌋ + 1), as HF computes it (float32)."""
        return torch.log1p(torch.floor((positions_T.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0

    def forward(self, x_BTD: torch.Tensor, start: int, rot_BTP: torch.Tensor | None,
                cache: LayerCache | None = None, stats: bool = False) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim)             # (B, T, H, Dh)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv, self.head_dim)                # (B, T, Hkv, Dh)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, rot_BTP), apply_rope(k, rot_BTP)
        if self.use_qk_norm:                          # weightless RMS norm per head, after RoPE
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        beta_T = None
        # β(pos) = 1 exactly while pos + 1 < floor_scale: then q·β = q bit for bit, so skip the ops (decode
        # steps of a short context pay per op) and the statistics skip the counterfactual (it equals H)
        if self.temperature_tuning and start + T >= self.floor_scale:
            beta_T = self.temperature(torch.arange(start, start + T, device=x_BTD.device))
            q = (q * beta_T.view(1, T, 1, 1)).to(q.dtype)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)

        q_BHTD, k_BHSD, v_BHSD = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k0 = start
        if cache is not None:
            k_BHSD, v_BHSD, k0 = cache.update(k_BHSD, v_BHSD, start)
        if stats:
            z, st = attend_stats(q_BHTD, k_BHSD, v_BHSD, start, k0, self.chunk, self.scaling, beta_T)
            self.hook_entropy(st.entropy_BHT)
            self.hook_entropy_no_temp(st.entropy_no_temp_BHT)
            self.hook_n_keys(st.n_keys_T)
            self.hook_sink_mass(st.sink_mass_BHT)
        elif T == 1:
            z = attend_one_plain(q_BHTD, k_BHSD, v_BHSD, start, k0, self.chunk, self.scaling)
        else:
            z = attend(q_BHTD, k_BHSD, v_BHSD, start, k0, self.chunk, self.scaling)
        if cache is not None:
            cache.trim(start + T, self.chunk)
        z = self.hook_z(z.transpose(1, 2))                                         # (B, T, H, Dh)
        return self.o_proj(z.reshape(B, T, -1))

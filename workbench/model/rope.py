"""Rotary position embedding, Llama 4 flavour (spec llama4.md §2.3).

Complex, *interleaved* pairs (2i, 2i+1) — Meta/GPT-J style, not rotate_half — so HF checkpoints
load without any q/k row permutation. Frequencies use llama3 scaling when configured.
Computed in float32 exactly as HF `Llama4TextRotaryEmbedding` does, for bitwise-close parity.

Legend: B batch, T tokens, H heads, Dh head dim, P = Dh/2 rotation pairs.
"""

from __future__ import annotations

import math

import torch

from workbench.config import Llama4TextConfig


def inv_freq(config: Llama4TextConfig) -> torch.Tensor:
    """(P,) inverse frequencies θ_i = theta^(-2i/Dh), with llama3 scaling applied when configured."""
    dim = config.head_dim
    freqs_P = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type")) != "llama3":
        return freqs_P
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen_P = 2 * math.pi / freqs_P
    # long wavelengths (low frequencies) are divided by `factor`; short ones kept; a smooth blend between
    scaled_P = torch.where(wavelen_P > low_wavelen, freqs_P / factor, freqs_P)
    smooth_P = (old_len / wavelen_P - low) / (high - low) if high != low else torch.zeros_like(wavelen_P)
    blended_P = (1 - smooth_P) * scaled_P / factor + smooth_P * scaled_P
    medium = ~(wavelen_P < high_wavelen) & ~(wavelen_P > low_wavelen)
    return torch.where(medium, blended_P, scaled_P)


def rotations(inv_freq_P: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations e^{i·θ·pos}: (B, T, P) complex64."""
    angles_BTP = positions_BT[..., None].float() * inv_freq_P.to(positions_BT.device, torch.float)
    return torch.polar(torch.ones_like(angles_BTP), angles_BTP)


def apply_rope(x_BTHD: torch.Tensor, rot_BTP: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last axis of a (B, T, H, Dh) tensor; math in float32."""
    xf = x_BTHD if x_BTHD.dtype == torch.float32 else x_BTHD.float()      # no cast op when it is a no-op
    x_c = torch.view_as_complex(xf.reshape(*x_BTHD.shape[:-1], -1, 2))               # (B, T, H, P)
    out = torch.view_as_real(x_c * rot_BTP[:, :, None, :]).flatten(3)
    return out if out.dtype == x_BTHD.dtype else out.type_as(x_BTHD)

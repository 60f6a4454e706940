"""The Llama 4 vision tower: tiles → patch tokens → ViT encoder → pixel shuffle → adapter (spec llama4.md §4.1–4.3).

    pixel_values (N, C, S, S)
      └ unfold 14×14 + linear (no bias) ── hook_patch_embed ── append CLS (last) ── + positional_embedding_vlm
      └ layernorm_pre ── L × [x += attn(LN(x)) with 2-D RoPE, bidirectional; x += MLP(LN(x))] ── layernorm_post
      └ drop CLS ── hook_encoder_out ── pixel shuffle (k×k patches → 1 token) ── fc1 GELU fc2 GELU ── hook_features

Module and parameter names equal Hugging Face's (`vision_model.patch_embedding.linear.weight`,
`vision_model.model.layers.{j}.self_attn.q_proj.bias`, …). The 2-D RoPE table is recomputed in
`forward` (it is not in checkpoints and is tiny), so a model built on the meta device needs no fix-up.

Legend: N tiles, C channels, S tile side (px), P patches per tile (+1 with CLS), Dv vision hidden,
H heads, Dh head dim, R rotation pairs (Dh/2), G patch-grid side, k shuffle factor (1/ratio),
Q tokens per tile (= P/k²), Do adapter output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from workbench.config_vision import Llama4VisionConfig
from workbench.instrument.tap import Tap


def vision_rotations(config: Llama4VisionConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (P+1, R), float32 (spec §4.2; HF `Llama4VisionRotaryEmbedding`).

    Patch p sits at column x = p mod G, row y = p div G. Pairs 0…R/2−1 rotate by (x+1)·f_j, pairs
    R/2…R−1 by (y+1)·f_j, with f_j = θ^(−2j/R): positions are 1-based. The CLS row (last) is angle 0."""
    G, R = config.patches_per_side, config.head_dim // 2
    f_j = 1.0 / (config.rope_theta ** (torch.arange(0, R, 2, device=device)[: R // 2].float() / R))   # (R/2,)
    p = torch.arange(G * G, device=device)
    x, y = (p % G + 1).float(), (p // G + 1).float()
    ang = torch.cat([x[:, None] * f_j, y[:, None] * f_j], dim=-1)          # (P, R)
    ang = torch.cat([ang, ang.new_zeros(1, R)])                             # (P+1, R): CLS row unrotated
    return ang.cos(), ang.sin()


def apply_vision_rope(x_NPHD: torch.Tensor, cos_PR: torch.Tensor, sin_PR: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2r], x[2r+1]) by the angle of pair r, in float32 (as HF does)."""
    xf = x_NPHD.float().unflatten(-1, (-1, 2))                    # (N, P, H, R, 2)
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos_PR[:, None, :], sin_PR[:, None, :]             # (P, 1, R)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x_NPHD)


def pixel_shuffle(x_NPD: torch.Tensor, k: int) -> torch.Tensor:
    """(N, G·G, D) → (N, (G/k)², k²·D): token (i, j) of the (G/k)×(G/k) grid holds patches rows
    k·i…k·i+k−1 × cols k·j…k·j+k−1, channels ordered (dy, dx, d) — HF `pixel_shuffle` with ratio 1/k."""
    G = int(round(x_NPD.shape[1] ** 0.5))
    return rearrange(x_NPD, "n (i dy j dx) d -> n (i j) (dy dx d)", i=G // k, dy=k, dx=k)


class Llama4UnfoldConvolution(nn.Module):
    """Non-overlapping patches, flattened (channel, ky, kx) like `nn.Unfold`, then a bias-free linear."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(config.num_channels * config.patch_size ** 2, config.hidden_size, bias=False)

    def forward(self, pixels_NCSS: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels_NCSS, kernel_size=self.patch_size, stride=self.patch_size)   # (N, C·p·p, P)
        return self.linear(patches.transpose(1, 2))                                            # (N, P, Dv)


class Llama4VisionAttention(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        D, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(D, D, bias=True)
        self.k_proj = nn.Linear(D, D, bias=True)
        self.v_proj = nn.Linear(D, D, bias=True)
        self.o_proj = nn.Linear(D, D, bias=True)

    def forward(self, x_NPD: torch.Tensor, cos_PR: torch.Tensor, sin_PR: torch.Tensor) -> torch.Tensor:
        heads = lambda t: rearrange(t, "n p (h d) -> n p h d", h=self.n_heads)
        q = rearrange(apply_vision_rope(heads(self.q_proj(x_NPD)), cos_PR, sin_PR), "n p h d -> n h p d")
        k = rearrange(apply_vision_rope(heads(self.k_proj(x_NPD)), cos_PR, sin_PR), "n p h d -> n h p d")
        v = rearrange(self.v_proj(x_NPD), "n p (h d) -> n h p d", h=self.n_heads)
        z = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=False)                                  # (N, H, P, Dh)
        return self.o_proj(rearrange(z, "n h p d -> n p (h d)"))


class Llama4VisionMLP(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))          # exact-erf GELU (HF nn.GELU(), META F.gelu)


class Llama4VisionEncoderLayer(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.self_attn = Llama4VisionAttention(config)
        self.mlp = Llama4VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.hook_resid_post = Tap("hook_resid_post")

    def forward(self, x_NPD, cos_PR, sin_PR):
        x_NPD = x_NPD + self.self_attn(self.input_layernorm(x_NPD), cos_PR, sin_PR)
        return self.hook_resid_post(x_NPD + self.mlp(self.post_attention_layernorm(x_NPD)))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class Llama4VisionMLP2(nn.Module):
    """The adapter MLP: fc1 → GELU → (dropout) → fc2 → GELU, both bias-free (META `c_fc`, `c_proj`)."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.dropout = config.projector_dropout
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(x)), p=self.dropout, training=self.training)
        return F.gelu(self.fc2(h))


class Llama4VisionPixelShuffleMLP(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.shuffle_factor = config.shuffle_factor
        self.mlp = Llama4VisionMLP2(config)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x_NPD, self.shuffle_factor))        # (N, Q, Do)


class Llama4VisionModel(nn.Module):
    """`vision_model(pixel_values (N, C, S, S))` → image features (N, Q, Do), one row of Q tokens per tile."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.config = config
        D, P = config.hidden_size, config.patches_per_side ** 2
        self.patch_embedding = Llama4UnfoldConvolution(config)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(P + 1, D))      # last row: CLS
        self.layernorm_pre = nn.LayerNorm(D, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(D, eps=config.norm_eps)
        self.model = Llama4VisionEncoder(config)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(config)
        self.hook_patch_embed = Tap("hook_patch_embed")
        self.hook_encoder_out = Tap("hook_encoder_out")
        self.hook_features = Tap("hook_features")

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        want = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must have shape (tiles, {want[0]}, {want[1]}, {want[2]}) for this "
                             f"vision config (image_size={c.image_size}), got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point (normalised), got dtype {pixel_values.dtype}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixel_values)
        w = self.patch_embedding.linear.weight
        x = self.hook_patch_embed(self.patch_embedding(pixel_values.to(device=w.device, dtype=w.dtype)))  # (N, P, Dv)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm                  # (N, P+1, Dv), CLS last
        x = self.layernorm_pre(x)
        cos_PR, sin_PR = vision_rotations(self.config, device=x.device)
        for layer in self.model.layers:
            x = layer(x, cos_PR, sin_PR)
        x = self.hook_encoder_out(self.layernorm_post(x)[:, :-1])                      # (N, P, Dv), CLS dropped
        return self.hook_features(self.vision_adapter(x))                              # (N, Q, Do)

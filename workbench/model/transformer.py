"""The Llama 4 text decoder: embeddings → pre-norm blocks → final norm → lm_head (spec §2.1).

    resid_pre ─┬─ RMSNorm ─ attention ─ (+) ─ resid_mid ─┬─ RMSNorm ─ MoE | MLP ─ (+) ─ resid_post
               └──────────────────────────┘                └──────────────────────────┘

Module and parameter names equal Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, …),
so HF checkpoints load with an exact key-set check and no renames. Forward is differentiable:
no inference_mode, no detach; the caller chooses dtype and grad mode.

Legend: B batch, T tokens, D hidden, V vocab, P rotation pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.config import Llama4TextConfig
from workbench.instrument.tap import Tap
from workbench.model.attention import Llama4TextAttention
from workbench.model.kv_cache import KVCache
from workbench.model.moe import Llama4TextMLP, Llama4TextMoe
from workbench.model.rope import inv_freq, rotations


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) in float32, cast back, times the weight (HF Llama4TextRMSNorm, the same
    kernels in the same order; the casts are skipped where they are no-ops, in-place where bitwise equal).
    In float32 `torch.rms_norm` (`F.rms_norm` without its Python wrapper) runs exactly these ops in one
    call (bitwise equal, tests/test_decode_step.py); in bf16/fp16 it would multiply the weight before the
    cast back, so those keep the explicit ops."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x if x.dtype == torch.float32 else x.float()
    y = xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (y if y.dtype == x.dtype else y.type_as(x)) * weight


class Llama4TextRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe[layer_idx]
        self.self_attn = Llama4TextAttention(config, layer_idx)
        self.feed_forward = (Llama4TextMoe(config) if self.is_moe
                             else Llama4TextMLP(config.hidden_size, config.intermediate_size_mlp))
        self.input_layernorm = Llama4TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Llama4TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", Tap(f"hook_{name}"))

    def forward(self, x_BTD, start, rot_BTP, cache=None, stats=False):
        x_BTD = self.hook_resid_pre(x_BTD)
        a = self.hook_attn_out(self.self_attn(self.input_layernorm(x_BTD), start, rot_BTP, cache, stats))
        h = self.hook_resid_mid(x_BTD + a)
        f = self.hook_mlp_out(self.feed_forward(self.post_attention_layernorm(h)))
        return self.hook_resid_post(h + f)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None                 # (B, T, V), or (B, 1, V) with last_only
    hidden_states: tuple[torch.Tensor, ...] | None = None   # embeddings + every layer's output (HF convention)
    cache: KVCache | None = None


class Llama4TextModel(nn.Module):
    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Llama4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama4TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", inv_freq(config), persistent=False)
        self.hook_embed, self.hook_final_norm = Tap("hook_embed"), Tap("hook_final_norm")

    def forward(self, input_ids=None, *, inputs_embeds=None, start: int = 0, cache: KVCache | None = None,
                output_hidden_states: bool = False, attn_stats: bool = False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.hook_embed(x)                                                    # (B, T, D)
        B, T, _ = x.shape
        positions_BT = torch.arange(start, start + T, device=x.device).expand(B, T)
        rot_BTP = (rotations(self.inv_freq, positions_BT)
                   if any(layer.self_attn.use_rope for layer in self.layers) else None)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, start, rot_BTP, None if cache is None else cache.layers[i], attn_stats)
            if hidden is not None:
                hidden.append(x)
        x = self.hook_final_norm(self.norm(x))
        if hidden is not None:
            hidden[-1] = x          # HF convention: the last hidden state is after the final norm
        return x, hidden


class Llama4ForCausalLM(nn.Module):
    """`model(input_ids)` → `ModelOutput(logits=(B, T, V))`. Tokens outside [0, vocab) and prompts
    beyond `max_position_embeddings` raise a ValueError naming the value."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.config = config
        self.model = Llama4TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.tokenizer = None           # set by load_model; not part of the module state

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def check_inputs(self, input_ids: torch.Tensor, start: int = 0) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for vocab_size={V} (valid ids are 0..{V - 1})")
        end = start + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence reaches position {end}, beyond max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    def forward(self, input_ids=None, *, inputs_embeds=None, start: int | None = None,
                cache: KVCache | None = None, output_hidden_states: bool = False,
                attn_stats: bool = False, last_only: bool = False) -> ModelOutput:
        if start is None:
            start = 0 if cache is None else cache.seq_len
        if input_ids is not None:
            self.check_inputs(input_ids, start)
            input_ids = input_ids.long()
        elif inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        x, hidden = self.model(input_ids, inputs_embeds=inputs_embeds, start=start, cache=cache,
                               output_hidden_states=output_hidden_states, attn_stats=attn_stats)
        logits = self.lm_head(x[:, -1:] if last_only else x)
        return ModelOutput(logits, tuple(hidden) if hidden is not None else None, cache)

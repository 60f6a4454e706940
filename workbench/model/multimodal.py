"""Early fusion: `Llama4ForConditionalGeneration` = vision tower + projector + the text model (spec llama4.md §4.4).

    input_ids ── embed_tokens ─────────────────────────────┐
    pixel_values ── vision_model ── multi_modal_projector ── hook_image_features ── scatter into <|patch|> rows
                                                                                      └── language_model(inputs_embeds)

Image features are scattered in order into the positions where `input_ids == image_token_index`
(`<|patch|>`), row-major over the batch, exactly like HF's `masked_scatter`; every other image token
(`<|image_start|>`, `<|image|>`, separators, `<|image_end|>`) stays an ordinary text embedding. Names
equal HF's (`vision_model.*`, `multi_modal_projector.linear_1.weight`, `language_model.model.*`,
`language_model.lm_head.weight`).

Unlike transformers 5.24, whose `Llama4ForConditionalGeneration.forward` raises AttributeError
('image_outputs') whenever pixel values are given, this forward runs with images.

Legend: B batch, T tokens, N tiles, Q tokens per tile, I = N·Q image tokens, Do adapter width,
D text hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.config_vision import Llama4Config
from workbench.instrument.tap import Tap
from workbench.model.kv_cache import KVCache
from workbench.model.transformer import Llama4ForCausalLM, ModelOutput
from workbench.model.vision import Llama4VisionModel

# Tap vocabulary of the vision path (full names; text sites gain the prefix `language_model.`).
VISION_SITES: dict[str, tuple[str, str]] = {
    "vision_model.hook_patch_embed": ("N P Dv", "patch embeddings (linear of unfolded 14×14 patches), before CLS"),
    "vision_model.model.layers.{j}.hook_resid_post": ("N P+1 Dv", "encoder residual after layer j (CLS last)"),
    "vision_model.hook_encoder_out": ("N P Dv", "encoder output after layernorm_post, CLS dropped"),
    "vision_model.hook_features": ("N Q Do", "pixel-shuffled adapter output (HF vision_model last_hidden_state)"),
    "hook_image_features": ("I D", "projected image features, in the order they fill the <|patch|> positions"),
}


@dataclass
class MultimodalOutput(ModelOutput):
    image_token_mask: torch.Tensor | None = None      # (B, T) bool: positions that received image features
    image_features: torch.Tensor | None = None        # (I, D) projected features, when pixel_values were given


class Llama4MultiModalProjector(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.vision_output_dim, config.text_config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4ForConditionalGeneration(nn.Module):
    """`model(input_ids, pixel_values)` → `MultimodalOutput(logits=(B, T, V), image_token_mask=(B, T), …)`.

    Pass `pixel_values` together with the tokens that hold all their `<|patch|>` positions (the prefill);
    decode steps with a cache pass none, as HF does. Without pixel values `<|patch|>` tokens are plain
    text embeddings (HF behaviour)."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.config = config
        self.vision_model = Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = Llama4MultiModalProjector(config)
        self.language_model = Llama4ForCausalLM(config.text_config)
        self.hook_image_features = Tap("hook_image_features")
        self.tokenizer = None           # set by the loader; not module state
        self.image_processor = None

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def check_inputs(self, input_ids: torch.Tensor, start: int = 0) -> None:
        self.language_model.check_inputs(input_ids, start)

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the `<|patch|>` positions that image features fill, in scatter order (row-major)."""
        return input_ids == self.config.image_token_index

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, S, S) → projected features (N·Q, D), one row per `<|patch|>` token."""
        feats_NQO = self.vision_model(pixel_values)
        return self.hook_image_features(self.multi_modal_projector(feats_NQO.flatten(0, 1)))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                start: int | None = None, cache: KVCache | None = None, output_hidden_states: bool = False,
                attn_stats: bool = False, last_only: bool = False) -> MultimodalOutput:
        if start is None:
            start = 0 if cache is None else cache.seq_len
        self.check_inputs(input_ids, start)
        ids = input_ids.long()
        x_BTD = self.language_model.model.embed_tokens(ids)
        mask_BT = self.image_token_mask(ids)
        feats = None
        if pixel_values is not None:
            feats = self.get_image_features(pixel_values)                          # (I, D)
            n_tokens, n_feats = int(mask_BT.sum()), feats.shape[0]
            if n_tokens != n_feats:
                per_tile = self.config.vision_config.tokens_per_tile
                raise ValueError(
                    f"image features and image tokens do not match: input_ids hold {n_tokens} <|patch|> tokens "
                    f"(id {self.config.image_token_index}) but pixel_values give {n_feats} features "
                    f"({pixel_values.shape[0]} tiles × {per_tile} tokens per tile)")
            x_BTD = x_BTD.masked_scatter(mask_BT[..., None], feats.to(x_BTD.dtype))
        out = self.language_model(inputs_embeds=x_BTD, start=start, cache=cache,
                                  output_hidden_states=output_hidden_states, attn_stats=attn_stats,
                                  last_only=last_only)
        return MultimodalOutput(out.logits, out.hidden_states, out.cache, image_token_mask=mask_BT,
                                image_features=feats)


def multimodal_site_names(config: Llama4Config) -> dict[str, tuple[str, str]]:
    """All full tap names of a `Llama4ForConditionalGeneration` built from `config`, with (shape, meaning)."""
    from workbench.instrument.sites import site_names

    out = {f"language_model.{k}": v for k, v in site_names(config.text_config).items()}
    for name, spec in VISION_SITES.items():
        if "{j}" in name:
            out.update({name.format(j=j): spec for j in range(config.vision_config.num_hidden_layers)})
        else:
            out[name] = spec
    return out

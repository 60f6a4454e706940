"""Vision and composite configuration: plain dataclasses whose fields are Hugging Face `config.json` keys.

`Llama4VisionConfig` mirrors HF's `vision_config`; `Llama4Config` is the composite
(`text_config`, `vision_config`, `boi/eoi/image_token_index`) that `Llama4ForConditionalGeneration`
checkpoints carry (spec llama4.md §1.2–§1.3).

Defaults are the released checkpoints' values (Scout and Maverick share the vision tower), not HF's
class defaults: those cannot run a forward pass (hidden 768 shuffled by 0.5 gives 3072 channels, but
the adapter expects `intermediate_size` 5632; the adapter emits 4096 but the projector expects 7680).
HF writes every vision key into `config.json`, so reading a checkpoint never depends on defaults.

Fields HF's modelling code ignores are validated instead of silently ignored: `hidden_act` must be
"gelu" (HF always uses exact-erf GELU), `multi_modal_projector_bias` must be false (HF builds
`linear_1` without bias), and a `norm_eps` other than 1e-5 warns (HF's LayerNorms keep torch's 1e-5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any

from workbench.config import _IGNORED_KEYS, PRESETS, ConfigError, Llama4TextConfig, check_model_type, from_hf_fields

_VISION_IGNORED = _IGNORED_KEYS | {"vision_feature_layer"}
_COMPOSITE_IGNORED = _IGNORED_KEYS | {"pad_token_id", "vision_feature_layer", "vision_feature_select_strategy"}


@dataclass
class Llama4VisionConfig:
    hidden_size: int = 1408
    hidden_act: str = "gelu"
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632          # encoder MLP width AND the pixel-shuffled width (HF sizes adapter fc1 by it)
    vision_output_dim: int = 4096          # input width of multi_modal_projector.linear_1
    image_size: int = 336                  # tile side in pixels
    patch_size: int = 14
    norm_eps: float = 1e-5
    vision_feature_select_strategy: str = "default"
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    multi_modal_projector_bias: bool = False
    projector_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0            # HF: rope_parameters["rope_theta"]

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size"):       # HF allows [h, w]; the model needs square tiles
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise ConfigError(f"config field {name!r} must be square (one integer), got {v!r}")
                setattr(self, name, v[0])
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "intermediate_size",
                     "vision_output_dim", "image_size", "patch_size", "projector_input_dim", "projector_output_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        for name in ("norm_eps", "rope_theta", "pixel_shuffle_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive number, got {v!r}")
        for name in ("projector_dropout", "attention_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
                raise ConfigError(f"config field {name!r} must be in [0, 1), got {v!r}")
        if self.hidden_act != "gelu":
            raise ConfigError(f"config field 'hidden_act' must be 'gelu' (the Llama 4 vision tower uses exact-erf "
                              f"GELU; HF ignores this field), got {self.hidden_act!r}")
        if self.multi_modal_projector_bias is not False:
            raise ConfigError(f"config field 'multi_modal_projector_bias' must be false (HF builds "
                              f"multi_modal_projector.linear_1 without bias), got {self.multi_modal_projector_bias!r}")
        if self.norm_eps != 1e-5:
            warnings.warn(f"vision norm_eps={self.norm_eps}: transformers ignores this field and uses 1e-5 in its "
                          "LayerNorms; this model uses the configured value", stacklevel=3)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim={self.head_dim} (hidden_size/num_attention_heads) must be a multiple "
                              "of 4: 2-D RoPE rotates half the pairs by column and half by row")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        s = round(1 / self.pixel_shuffle_ratio)
        if abs(1 / self.pixel_shuffle_ratio - s) > 1e-9:
            raise ConfigError(f"pixel_shuffle_ratio={self.pixel_shuffle_ratio} must be 1/k for an integer k")
        if self.patches_per_side % s:
            raise ConfigError(f"pixel_shuffle_ratio={self.pixel_shuffle_ratio} needs the patch grid side "
                              f"(image_size/patch_size = {self.patches_per_side}) to be divisible by {s}")
        if self.intermediate_size != self.hidden_size * s * s:
            raise ConfigError(f"vision intermediate_size={self.intermediate_size} must equal hidden_size·(1/ratio)² = "
                              f"{self.hidden_size}·{s * s} = {self.hidden_size * s * s}: HF sizes the adapter's fc1 "
                              "input by intermediate_size, and pixel shuffle produces that many channels")
        if self.projector_input_dim != self.projector_output_dim:
            raise ConfigError(f"projector_input_dim={self.projector_input_dim} must equal projector_output_dim="
                              f"{self.projector_output_dim} (the adapter's fc2 maps output_dim → output_dim)")
        if self.vision_output_dim != self.projector_output_dim:
            raise ConfigError(f"vision_output_dim={self.vision_output_dim} must equal projector_output_dim="
                              f"{self.projector_output_dim} (the projector reads the adapter's output)")

    # ---------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """k = 1/pixel_shuffle_ratio: k×k patches merge into one token."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_side(self) -> int:
        return self.patches_per_side // self.shuffle_factor

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side ** 2

    # ---------------------------------------------------------------- (de)serialisation
    def to_hf(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
        d["model_type"] = "llama4_vision_model"
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "vision_config", strict: bool = False) -> Llama4VisionConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        rp = d.pop("rope_parameters", None)
        if rp is not None:
            if not isinstance(rp, dict):
                raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {rp!r}")
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                raise ConfigError(f"{source}: vision rope_type {kind!r} is not supported (Llama 4 uses plain 2-D RoPE)")
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp["rope_theta"])
        return from_hf_fields(cls, d, source, strict, _VISION_IGNORED)


@dataclass
class Llama4Config:
    """The composite config of `Llama4ForConditionalGeneration`.

    Attributes it does not define read through to `text_config` (`config.max_position_embeddings`,
    `config.num_hidden_layers`, `config.layer_kinds()`), so code written for the text model —
    generation, recording, the CLI — accepts a multimodal model unchanged."""

    text_config: Llama4TextConfig = dataclasses.field(default_factory=Llama4TextConfig)
    vision_config: Llama4VisionConfig = dataclasses.field(default_factory=Llama4VisionConfig)
    boi_token_index: int = 200080          # <|image_start|>
    eoi_token_index: int = 200081          # <|image_end|>
    image_token_index: int = 200092        # <|patch|>: positions that receive image features
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.text_config, Llama4TextConfig):
            raise ConfigError(f"text_config must be a Llama4TextConfig, got {type(self.text_config).__name__}")
        if not isinstance(self.vision_config, Llama4VisionConfig):
            raise ConfigError(f"vision_config must be a Llama4VisionConfig, got {type(self.vision_config).__name__}")
        for name in ("boi_token_index", "eoi_token_index", "image_token_index"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"config field {name!r} must be a token id (non-negative integer), got {v!r}")
        V = self.text_config.vocab_size
        if self.image_token_index >= V:     # HF accepts this (small test models keep the 200k defaults)
            warnings.warn(f"image_token_index={self.image_token_index} is outside the text vocabulary "
                          f"(vocab_size={V}): no token can receive image features", stacklevel=3)

    def __getattr__(self, name: str):
        # only called when normal lookup fails; guard against recursion while unpickling/copying
        if name.startswith("__") or "text_config" not in self.__dict__:
            raise AttributeError(name)
        try:
            return getattr(self.__dict__["text_config"], name)
        except AttributeError:
            raise AttributeError(f"'Llama4Config' (and its text_config) has no attribute {name!r}") from None

    @property
    def image_token_id(self) -> int:      # HF attribute alias
        return self.image_token_index

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                "text_config": self.text_config.to_hf(), "vision_config": self.vision_config.to_hf(),
                "boi_token_index": self.boi_token_index, "eoi_token_index": self.eoi_token_index,
                "image_token_index": self.image_token_index, "tie_word_embeddings": self.tie_word_embeddings}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_hf(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config", strict: bool = False) -> Llama4Config:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        check_model_type(d, source)
        if not isinstance(d.get("vision_config"), dict) or not isinstance(d.get("text_config"), dict):
            raise ConfigError(f"{source}: not a multimodal Llama 4 config (needs 'text_config' and 'vision_config' "
                              "objects)")
        rest = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        return from_hf_fields(cls, dict(rest,
                                        text_config=Llama4TextConfig.from_hf(d["text_config"],
                                                                             source=f"{source}: text_config",
                                                                             strict=strict),
                                        vision_config=Llama4VisionConfig.from_hf(d["vision_config"],
                                                                                 source=f"{source}: vision_config",
                                                                                 strict=strict)),
                              source, strict, _COMPOSITE_IGNORED | {"text_config", "vision_config"})


def is_multimodal_config(d: dict[str, Any]) -> bool:
    """True for a `config.json` dict that describes a Llama4ForConditionalGeneration (has a vision_config)."""
    return isinstance(d, dict) and isinstance(d.get("vision_config"), dict)


# ------------------------------------------------------------------------------------- presets
# tiny-vision keeps the real structure at CPU size: 56-px tiles of 14-px patches (4×4 patches), pixel
# shuffle 0.5 → a 2×2 token grid per tile, each token covering 28×28 px exactly as in the 336-px
# model; several tiles + a global tile per image. Text = the `tiny` preset (byte tokenizer, where the
# Llama 4 special ids are 256 + offset: <|image_start|> 336, <|image_end|> 337, <|patch|> 348).
_TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
                    image_size=56, patch_size=14, pixel_shuffle_ratio=0.5, rope_theta=10000.0)
_REAL_VISION: dict[str, Any] = {}          # the dataclass defaults are the released Scout/Maverick values

VISION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-vision": dict(text="tiny", vision=_TINY_VISION,
                        boi_token_index=336, eoi_token_index=337, image_token_index=348),
    "scout-vision": dict(text="scout", vision=_REAL_VISION),
    "maverick-vision": dict(text="maverick", vision=_REAL_VISION),
}


def vision_preset(name: str) -> Llama4Config:
    if name not in VISION_PRESETS:
        raise KeyError(f"unknown vision preset {name!r}; known presets: {sorted(VISION_PRESETS)}")
    p = dict(VISION_PRESETS[name])
    text = Llama4TextConfig(**PRESETS[p.pop("text")])
    vision = Llama4VisionConfig(**p.pop("vision"))
    return Llama4Config(text_config=text, vision_config=vision, **p)

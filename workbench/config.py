"""Model configuration: plain dataclasses whose fields are Hugging Face `config.json` keys.

`Llama4TextConfig.from_hf(d)` reads either a `Llama4TextConfig` JSON or a composite `Llama4Config`
JSON (nested `text_config`), the older `rope_theta`/`rope_scaling` spelling and the newer
`rope_parameters`, and `attn_temperature_tuning` given as an int (the v4.51 release shipped `4`).

The per-layer schedule (uses RoPE / chunked / MoE) is computed once in `__post_init__`
(spec llama4.md §1.1): nothing else in the code base recomputes `% interval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config field has a value the model cannot be built with; the message names field and value."""


# Keys HF writes that carry no information for our model (bookkeeping, training-only, or derived).
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "initializer_range",
    "use_cache", "attention_dropout", "cache_implementation", "for_llm_compressor", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "id2label", "label2id",
    "problem_type", "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "finetuning_task",
    "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "quantization_config",
    "attn_implementation", "_attn_implementation_autoset", "layer_types", "rope_type",
}


@dataclass
class Llama4TextConfig:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192          # width of each routed expert and of the shared expert
    intermediate_size_mlp: int = 16384     # width of the dense-MLP layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None       # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    no_rope_layers: list[int] | None = None  # HF semantics: 1 = layer USES RoPE (and is chunked), 0 = NoPE
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1

    # derived, explicit per-layer schedule (not HF keys)
    use_rope: list[bool] = field(init=False, repr=False)
    is_chunked: list[bool] = field(init=False, repr=False)
    is_moe: list[bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        att = self.attn_temperature_tuning
        if not isinstance(att, int):    # bool, or the int 4 the v4.51 release shipped (spec §6.1)
            raise ConfigError(f"config field 'attn_temperature_tuning' must be true/false, got {att!r}")
        self.attn_temperature_tuning = bool(att)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate_fields()
        L = self.num_hidden_layers
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, L, step))
        self.validate_schedule()
        moe = set(self.moe_layers)
        self.use_rope = [bool(r) for r in self.no_rope_layers]
        # HF `layer_types`: "chunked_attention" iff the layer uses RoPE and a chunk size is set.
        self.is_chunked = [r and self.attention_chunk_size is not None for r in self.use_rope]
        self.is_moe = [i in moe for i in range(L)]

    # ---------------------------------------------------------------- validation
    def validate_fields(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {_short(v)}")
            if v > MAX_CONFIG_INT:      # beyond int32 every size here overflows a tensor dimension or index
                raise ConfigError(f"config field {name!r} is {_short(v)}, larger than {MAX_CONFIG_INT} (2**31 - 1)")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "num_experts_per_tok", "num_local_experts",
                     "interleave_moe_layer_step", "no_rope_layer_interval", "floor_scale"):
            positive(name)
        for name in ("tie_word_embeddings", "attention_bias", "use_qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name!r} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            bad = [i for i in ids if i is not None and (not isinstance(i, int) or isinstance(i, bool) or i < 0)]
            if bad or (name == "eos_token_id" and isinstance(v, list) and not v):
                raise ConfigError(f"config field {name!r} must be a token id (non-negative integer"
                                  f"{', or a list of them' if name == 'eos_token_id' else ''}), got {_short(v)}")
            outside = [i for i in ids if i is not None and i >= self.vocab_size]
            if outside:
                raise ConfigError(f"config field {name!r}: token id {_short(outside[0])} is outside the "
                                  f"vocabulary (vocab_size={self.vocab_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        chunk = self.attention_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise ConfigError(f"attention_chunk_size must be a positive integer or null, got {chunk!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (Llama 4 uses 'silu')")
        def finite(name: str, value, lo: float = 0.0, strict: bool = True) -> None:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and abs(value) < 1e300 and math.isfinite(value))          # abs() first: huge ints overflow float
            if not ok or (value <= lo if strict else value < lo):
                raise ConfigError(f"{name} must be a finite number {'>' if strict else '≥'} {lo}, got {_short(value)}")

        finite("rms_norm_eps", self.rms_norm_eps)
        finite("rope_theta", self.rope_theta)
        finite("attn_scale", self.attn_scale, strict=False)
        if self.num_hidden_layers > 10_000:      # a hostile config.json must not stall the schedule build
            raise ConfigError(f"num_hidden_layers={self.num_hidden_layers} is implausibly large (> 10000)")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {rs!r}")
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in ("llama3", "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (expected 'llama3')")
            if kind == "llama3":
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in rs:
                        raise ConfigError(f"rope_scaling (llama3) is missing {k!r}")
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    finite(f"rope_scaling {k}", rs[k])
                if rs["low_freq_factor"] > rs["high_freq_factor"]:
                    raise ConfigError(f"rope_scaling low_freq_factor={rs['low_freq_factor']} > "
                                      f"high_freq_factor={rs['high_freq_factor']}")

    def validate_schedule(self) -> None:
        L = self.num_hidden_layers
        for name in ("no_rope_layers", "moe_layers"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"config field {name!r} must be a list, got {getattr(self, name)!r}")
        self.no_rope_layers, self.moe_layers = list(self.no_rope_layers), list(self.moe_layers)
        if len(self.no_rope_layers) != L:
            raise ConfigError(f"no_rope_layers has {len(self.no_rope_layers)} entries, expected num_hidden_layers={L}")
        bad = [v for v in self.no_rope_layers if v not in (0, 1, True, False)]
        if bad:
            raise ConfigError(f"no_rope_layers entries must be 0 or 1, got {bad[0]!r}")
        for i in self.moe_layers:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < L:
                raise ConfigError(f"moe_layers contains {i!r}, outside 0..{L - 1}")

    # ---------------------------------------------------------------- schedule helpers
    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe)

    @property
    def moe_layer_index(self) -> list[int]:
        return [i for i, m in enumerate(self.is_moe) if m]

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_kinds(self) -> list[str]:
        """Human-readable kind per layer, e.g. 'rope-chunked/moe', 'nope-global/dense'."""
        out = []
        for r, c, m in zip(self.use_rope, self.is_chunked, self.is_moe):
            att = ("rope-chunked" if c else "rope-global") if r else "nope-global"
            out.append(f"{att}/{'moe' if m else 'dense'}")
        return out

    def temperature_scale(self, pos: float) -> float:
        """Query multiplier on NoPE layers at 0-based position `pos` (spec §2.5)."""
        if not self.attn_temperature_tuning:
            return 1.0
        return 1.0 + self.attn_scale * math.log(math.floor((pos + 1) / self.floor_scale) + 1)

    # ---------------------------------------------------------------- (de)serialisation
    def to_hf(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["model_type"] = "llama4_text"
        d["layer_types"] = ["chunked_attention" if c else "full_attention" for c in self.is_chunked]
        d["rope_parameters"] = self.rope_parameters()
        return d

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.Llama4TextConfig(**...)`: the HF keys minus the ones its
        constructor derives or renames (RoPE goes in `rope_parameters`; `layer_types` is derived)."""
        d = self.to_hf()
        for k in ("model_type", "rope_scaling", "rope_theta", "layer_types"):
            d.pop(k)
        return d

    def rope_parameters(self) -> dict[str, Any]:
        p = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            p.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            p["rope_type"] = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            p["rope_theta"] = self.rope_theta
        return p

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_hf(), sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> Llama4TextConfig:
        """A copy with fields changed and the schedule re-derived (pass no_rope_layers=None to re-derive)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d.update(changes)
        return Llama4TextConfig(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config", strict: bool = False) -> Llama4TextConfig:
        """Build from a HF config dict (text or composite). Unknown keys are reported with a warning."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        check_model_type(d, source)
        if "text_config" in d:
            d = d["text_config"]
            if not isinstance(d, dict):
                raise ConfigError(f"{source}: 'text_config' must be an object")
        d = dict(d)
        rp = d.pop("rope_parameters", None)
        if rp:
            if not isinstance(rp, dict):
                raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {rp!r}")
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 500000.0))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                d.setdefault("rope_scaling", rp)
        rs = d.get("rope_scaling")
        if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) in (None, "default") and len(rs) <= 2:
            d["rope_scaling"] = None
        return from_hf_fields(cls, d, source, strict, _IGNORED_KEYS, check_types=True)


def from_hf_fields(cls, d: dict[str, Any], source: str, strict: bool, ignored: set[str], *,
                   check_types: bool = False):
    """`cls(**known keys of d)` for a `from_hf`: unknown keys (not in `ignored`) warn at from_hf's caller,
    or raise when `strict`; ints become floats for float fields; `check_types` also refuses non-integers
    for int fields and non-numbers for float fields. Every error names `source`."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in d if k not in names and k not in ignored)
    if unknown:
        msg = f"{source}: ignoring unknown config keys {unknown}"
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=3)
    kwargs = {k: v for k, v in d.items() if k in names}
    for f in dataclasses.fields(cls):
        v = kwargs.get(f.name)
        if v is None:
            continue
        if f.type.startswith("float") and isinstance(v, int) and not isinstance(v, bool):
            try:
                kwargs[f.name] = float(v)
            except OverflowError:
                raise ConfigError(f"{source}: field {f.name!r} is {_short(v)}, too large for a number") from None
        elif check_types and f.type in ("int", "int | None") and not (isinstance(v, int) and not isinstance(v, bool)):
            raise ConfigError(f"{source}: field {f.name!r} must be an integer, got {v!r}")
        elif check_types and f.type == "float" and not isinstance(v, (int, float)):
            raise ConfigError(f"{source}: field {f.name!r} must be a number, got {v!r}")
    try:
        return cls(**kwargs)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


MAX_CONFIG_INT = 2 ** 31 - 1
LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")


def _short(v) -> str:
    """repr of a config value, a huge int shortened to its first digits and length."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 30:
        s = str(abs(v))
        return f"{'-' if v < 0 else ''}{s[:8]}… ({len(s)} digits)"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "…"


def check_model_type(d: dict, source: str) -> None:
    """`model_type` (when present, here and in `text_config`) must name Llama 4: a gpt2 or llama config
    would otherwise be read field by field and build a wrong model without complaint."""
    for where, sub in (("", d), ("text_config.", d.get("text_config"))):
        if isinstance(sub, dict) and "model_type" in sub and sub["model_type"] not in LLAMA4_MODEL_TYPES:
            raise ConfigError(f"{source}: {where}model_type {_short(sub['model_type'])} is not a Llama 4 config "
                              f"(expected one of {list(LLAMA4_MODEL_TYPES)})")


# ------------------------------------------------------------------------------------- presets
_TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=131072, num_local_experts=4, num_experts_per_tok=1,
    moe_layers=[0, 1, 3],          # layer 2 is dense: both FFN kinds present
    no_rope_layer_interval=2,      # layers 1, 3 are NoPE (global) — both attention kinds present
    attention_chunk_size=32, floor_scale=16, attn_scale=0.1, use_qk_norm=True,
    rope_theta=10000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    bos_token_id=256, eos_token_id=[257, 263, 264], pad_token_id=274,  # byte tokenizer: 256 + Llama 4 offsets
)

_SCOUT = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=10485760, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1, no_rope_layer_interval=4, attention_chunk_size=8192,
    attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, use_qk_norm=True,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
)

_MAVERICK = dict(_SCOUT, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                 rope_scaling=None, max_position_embeddings=1048576)

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "scout": _SCOUT, "maverick": _MAVERICK}


def preset(name: str) -> Llama4TextConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return Llama4TextConfig(**PRESETS[name])

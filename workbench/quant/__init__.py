"""Quantized weights for running the real checkpoints on one GPU (docs/quantization.md).

    from workbench.quant import quantize_model, quantize_checkpoint, load_quantized, load_fp8
    quantize_model(model, targets=("experts",), group_size=128)       # in place, int4 routed experts
    quantize_checkpoint("Llama-4-Scout-17B-16E-Instruct", "scout-int4")  # streaming, bf16 never in RAM
    model = load_quantized("scout-int4", device="cuda")
    model = load_fp8("Llama-4-Maverick-17B-128E-Instruct-FP8", device="cuda")   # FP8 as released
    weight_bytes(preset("scout"), "int4")                              # for the memory planner

`weight_bytes` counts every stored byte of the weights, scale and zero-point overhead included, from
a config alone (meta device, nothing allocated).
"""

from __future__ import annotations

import math

import torch

from workbench.quant.experts import Float32Router
from workbench.quant.fp8 import (
    Fp8Experts,
    Fp8Linear,
    dequantize_fp8,
    fp8_matmul_supported,
    load_fp8,
    quantize_fp8,
    save_fp8_checkpoint,
)
from workbench.quant.int4 import (
    TARGETS,
    Int4Experts,
    Int4Linear,
    Int4Spec,
    dequantize_int4,
    quantize_int4,
    quantize_model,
)
from workbench.quant.int4_checkpoint import load_quantized, quantize_checkpoint, save_quantized

_PLAIN_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
SCHEMES = ("int4", "fp8", *_PLAIN_BYTES)


def _category(name: str, is_moe: bool) -> str:
    if ".feed_forward.experts." in name:
        return "experts"
    if ".feed_forward.shared_expert." in name:
        return "shared_expert"
    if ".feed_forward.router." in name:
        return "router"
    if ".self_attn." in name:
        return "attention"
    if ".feed_forward." in name and not is_moe:
        return "mlp"
    return "other"                      # embeddings, lm_head, norms


def weight_bytes_breakdown(config, scheme: str = "int4", *, targets=("experts",), group_size: int = 128,
                           symmetric: bool = True, scale_bytes: int = 2, base: str = "bf16") -> dict[str, int]:
    """Bytes per category (experts, shared_expert, attention, mlp, router, other) and 'total'.

    scheme "int4": targeted weights at ½ byte + one `scale_bytes` scale (+ one uint8 zero when
    asymmetric) per group of `group_size` input channels; the router in float32 when the experts are
    quantized (as `quantize_model` does). scheme "fp8": targeted weights at 1 byte + one float32 scale
    per output channel (the released per-channel layout). Everything else at `base` (bf16 by default).
    Plain schemes ("bf16", "fp32", …) count every weight at that width. Tied embeddings count once."""
    from workbench.model.transformer import Llama4ForCausalLM

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
    if base not in _PLAIN_BYTES:
        raise ValueError(f"unknown base dtype {base!r}; choose from {sorted(_PLAIN_BYTES)}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown targets {bad}; choose from {TARGETS}")
    plain = _PLAIN_BYTES.get(scheme, _PLAIN_BYTES[base])
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    out = dict.fromkeys(("experts", "shared_expert", "attention", "mlp", "router", "other"), 0)
    seen = set()
    for name, p in model.named_parameters():          # named_parameters yields a tied weight once
        if id(p) in seen:
            continue
        seen.add(id(p))
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        cat = _category(name, layer is not None and config.is_moe[layer])
        n = p.numel()
        quantized = scheme in ("int4", "fp8") and cat in targets
        if not quantized:
            router32 = scheme == "int4" and cat == "router" and "experts" in targets
            out[cat] += n * (4 if router32 else plain)
            continue
        stacked = cat == "experts"                    # [E, in, out]; linears are [out, in]
        in_features = p.shape[-2] if stacked else p.shape[-1]
        out_channels = n // in_features
        if scheme == "int4":
            groups = out_channels * math.ceil(in_features / group_size)
            out[cat] += math.ceil(n / 2) + groups * (scale_bytes + (0 if symmetric else 1))
        else:
            out[cat] += n + 4 * out_channels
    out["total"] = sum(out.values())
    return out


def weight_bytes(config, scheme: str = "int4", **kwargs) -> int:
    """Total bytes of the model's weights under `scheme` ("int4", "fp8", "bf16", "fp32", …), scale
    overhead included; keyword arguments as `weight_bytes_breakdown`."""
    return weight_bytes_breakdown(config, scheme, **kwargs)["total"]


__all__ = ["quantize_model", "quantize_checkpoint", "save_quantized", "load_quantized", "load_fp8",
           "save_fp8_checkpoint", "weight_bytes", "weight_bytes_breakdown", "Int4Spec", "Int4Linear",
           "Int4Experts", "Fp8Linear", "Fp8Experts", "Float32Router", "quantize_int4", "dequantize_int4",
           "quantize_fp8", "dequantize_fp8", "fp8_matmul_supported", "SCHEMES", "TARGETS"]

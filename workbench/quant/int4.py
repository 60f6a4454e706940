"""Group-wise int4 weight-only quantization: our packed format, its reference dequantisation, and the
modules that compute with it (`Int4Linear`, `Int4Experts`); `quantize_model` converts a model in place.

Format (docs/quantization.md). Every quantized weight is stored [..., out, in] — nn.Linear's layout;
the routed experts' [E, in, out] parameters are transposed — and quantized in groups of `group_size`
consecutive *input* channels, one scale (and zero point) per (output row, group):

    qweight  uint8        [..., out, in/2]   two 4-bit codes per byte: low nibble = even input index
    scales   scale_dtype  [..., out, in/G]
    zeros    uint8        [..., out, in/G]   asymmetric only; symmetric codes have the implicit zero 8

    w ≈ (code − zero) · scale         symmetric:  scale = max|w| / 7,          code = round(w/scale) + 8
                                      asymmetric: scale = (max − min) / 15,    zero = round(−min/scale)
                                      (min ≤ 0 ≤ max forced, so 0 is representable and |error| ≤ scale/2)

`dequantize_int4` is the reference path: every int4 matmul here is `F.linear(x, dequantize(...))`, so
the quantized matmul equals the dequantised reference exactly (tests assert bitwise equality). Routed
experts are dequantised one active expert at a time (`experts.dispatch`). The router is replaced by
`Float32Router` in quantized MoE layers; attention statistics are computed in float32 by the attention
kernels whatever the weights are.

Legend: O out features, I in features, G group size, E experts, D hidden, F expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from workbench.quant.experts import Float32Router, dispatch, swiglu_expert

QUANT_METHOD = "workbench-int4"
FORMAT_VERSION = 1
TARGETS = ("experts", "shared_expert", "attention", "mlp")   # routed experts, MoE shared expert, q/k/v/o, dense MLP
_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Int4Spec:
    """What to quantize and how; `to_config()` is the `quantization_config` written to config.json."""
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "bfloat16"
    targets: tuple[str, ...] = ("experts",)
    router_fp32: bool = True

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even integer ≥ 2, got {self.group_size!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ValueError(f"unknown quantization targets {bad or targets!r}; choose from {TARGETS}")
        object.__setattr__(self, "targets", targets)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def to_config(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": 4,
                "group_size": self.group_size, "symmetric": self.symmetric, "scale_dtype": self.scale_dtype,
                "targets": list(self.targets), "router_dtype": "float32" if self.router_fp32 else None,
                "layout": "[..., out, in]; groups and nibble pairs along in; low nibble = even index"}

    @classmethod
    def from_config(cls, qc: dict, source: str = "config") -> Int4Spec:
        if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise ValueError(f"{source}: quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}"
                             + (" (an FP8 checkpoint: use workbench.quant.load_fp8)" if "fp8" in str(method) else ""))
        if qc.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{source}: int4 format_version {qc['format_version']} is newer than this code "
                             f"({FORMAT_VERSION}); update workbench")
        return cls(group_size=qc["group_size"], symmetric=qc["symmetric"], scale_dtype=qc["scale_dtype"],
                   targets=tuple(qc["targets"]), router_fp32=qc.get("router_dtype") == "float32")


class Int4Packed(NamedTuple):
    qweight: torch.Tensor               # uint8 [..., O, I/2]
    scales: torch.Tensor                # [..., O, I/G]
    zeros: torch.Tensor | None          # uint8 [..., O, I/G], None when symmetric


# ------------------------------------------------------------------------------------- the format
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [..., I] → [..., I/2]: byte j = codes[2j] | codes[2j+1] << 4."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [..., I/2] → uint8 codes [..., I]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _check_group(in_features: int, group_size: int, what: str = "weight") -> None:
    if in_features % group_size:
        ok = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(f"{what}: input dim {in_features} is not a multiple of group_size={group_size}"
                         + (f" (try group_size in {ok})" if ok else ""))


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  scale_dtype: torch.dtype = torch.bfloat16) -> Int4Packed:
    """[..., O, I] float weight → packed codes, scales (rounded to `scale_dtype` *before* the codes are
    chosen, so the codes fit the scales that are stored) and zeros. Computed in float32."""
    *lead, O, I = w.shape
    _check_group(I, group_size)
    wg = w.float().reshape(*lead, O, I // group_size, group_size)           # (..., O, I/G, G)
    tiny = torch.finfo(scale_dtype).tiny                                       # all-zero groups: scale > 0
    lo, hi = wg.amin(-1), wg.amax(-1)
    if symmetric:
        scales = (torch.maximum(hi, -lo) / 7).clamp_(min=tiny).to(scale_dtype)
        codes = torch.div(wg, scales.float()[..., None]).round_().clamp_(-8, 7).add_(8)
        zeros = None
    else:
        lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
        scales = ((hi - lo) / 15).clamp_(min=tiny).to(scale_dtype)
        z = (-lo / scales.float()).round_().clamp_(0, 15)
        codes = torch.div(wg, scales.float()[..., None]).round_().add_(z[..., None]).clamp_(0, 15)
        zeros = z.to(torch.uint8)
    return Int4Packed(pack_int4(codes.to(torch.uint8).reshape(*lead, O, I)), scales, zeros)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantisation: (code − zero) · scale, rounded once to `dtype`. [..., O, I].
    When `dtype` is the scales' own 16-bit dtype the arithmetic runs in it directly: code − zero is a
    small integer (exact) and its product with a 16-bit scale is exact before the single rounding, so
    the result is bitwise the float32-then-cast one at a third of the memory traffic (tested)."""
    codes = unpack_int4(qweight)
    *lead, O, I = codes.shape
    groups = scales.shape[-1]
    work = dtype if dtype in (torch.bfloat16, torch.float16) and scales.dtype == dtype else torch.float32
    codes = codes.reshape(*lead, O, groups, I // groups).to(work)
    zero = 8.0 if zeros is None else zeros.to(work)[..., None]
    return ((codes - zero) * scales.to(work)[..., None]).reshape(*lead, O, I).to(dtype)


# ----------------------------------------------------------------------------------------- modules
class Int4Linear(nn.Module):
    """A bias-free linear layer over an int4 weight [*lead, out, in]. With `lead=(E,)` it holds one
    matrix per expert and `forward(x, index=e)` uses expert e's. Weights are buffers (uint8 can't carry
    gradients); the forward stays differentiable with respect to x."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.bfloat16, lead: tuple[int, ...] = (), device=None):
        super().__init__()
        _check_group(in_features, group_size, f"Int4Linear({in_features}→{out_features})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        shape, groups = (*lead, out_features), in_features // group_size
        self.register_buffer("qweight", torch.zeros(*shape, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(*shape, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.zeros(*shape, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: Int4Spec) -> Int4Linear:
        """Quantize a float weight [*lead, out, in] (one leading slice at a time, to bound temporaries)."""
        *lead, O, I = w.shape
        m = cls(I, O, spec.group_size, spec.symmetric, spec.torch_scale_dtype, tuple(lead), device=w.device)
        m.load_weight(w)
        return m

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != (*self.qweight.shape[:-1], self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} does not fit {self}")
        slices = [()] if w.dim() == 2 else [(e,) for e in range(w.shape[0])]   # one expert at a time
        for idx in slices:
            q = quantize_int4(w[idx], self.group_size, self.zeros is None, self.scales.dtype)
            self.qweight[idx].copy_(q.qweight)
            self.scales[idx].copy_(q.scales)
            if q.zeros is not None:
                self.zeros[idx].copy_(q.zeros)

    def weight(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        """The dequantised weight [out, in] (of expert `index` when stacked)."""
        sel = (lambda t: t) if index is None else (lambda t: t[index])
        return dequantize_int4(sel(self.qweight), sel(self.scales),
                               None if self.zeros is None else sel(self.zeros), dtype)

    def forward(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        return F.linear(x, self.weight(x.dtype, index))

    def extra_repr(self) -> str:
        lead = tuple(self.qweight.shape[:-2])
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.zeros is None}" + (f", lead={lead}" if lead else ""))


class Int4Experts(nn.Module):
    """Drop-in for `Llama4TextExperts` (same forward signature) over int4 weights:
    `gate_up_proj` [E, 2F, D] (gate rows, then up rows) and `down_proj` [E, D, F], both [out, in]."""

    def __init__(self, num_experts: int, hidden: int, inner: int, group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.num_experts = num_experts
        kw = dict(group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype, lead=(num_experts,),
                  device=device)
        self.gate_up_proj = Int4Linear(hidden, 2 * inner, **kw)
        self.down_proj = Int4Linear(inner, hidden, **kw)

    @classmethod
    def from_float(cls, experts: nn.Module, spec: Int4Spec) -> Int4Experts:
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()     # (E, D, 2F), (E, F, D)
        E, D, F2 = gu.shape
        m = cls(E, D, F2 // 2, spec.group_size, spec.symmetric, spec.torch_scale_dtype, device=gu.device)
        m.gate_up_proj.load_weight(gu.transpose(1, 2))                           # → [E, out, in]
        m.down_proj.load_weight(dn.transpose(1, 2))
        return m

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, gate_NK: torch.Tensor) -> torch.Tensor:
        return dispatch(x_ND, ids_NK, gate_NK, self.num_experts, swiglu_expert(self.gate_up_proj, self.down_proj))


# ------------------------------------------------------------------------------- model conversion
def _linear_sites(model, targets) -> list[str]:
    """Module paths of the nn.Linear layers that `targets` selects (never router, embeddings, lm_head)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        if "attention" in targets:
            out += [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if layer.is_moe and "shared_expert" in targets:
            out += [f"{p}.feed_forward.shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        if not layer.is_moe and "mlp" in targets:
            out += [f"{p}.feed_forward.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    return out


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _fp32_router(router: nn.Linear) -> Float32Router:
    new = Float32Router(router.in_features, router.out_features, bias=False, device=router.weight.device,
                        dtype=torch.float32)
    with torch.no_grad():
        if router.weight.device.type != "meta":
            new.weight.copy_(router.weight.float())
    return new


def install_int4(model, spec: Int4Spec, *, quantize: bool = True):
    """Swap the targeted modules for int4 ones. `quantize=True` quantizes the current weights;
    `quantize=False` only builds empty modules of the right shapes (for loading, on the meta device)."""
    dev = None if quantize else "meta"
    for layer in model.model.layers:
        if not (layer.is_moe and "experts" in spec.targets):
            continue
        ff = layer.feed_forward
        if quantize:
            ff.experts = Int4Experts.from_float(ff.experts, spec)
        else:
            E, D, F2 = ff.experts.gate_up_proj.shape
            ff.experts = Int4Experts(E, D, F2 // 2, spec.group_size, spec.symmetric, spec.torch_scale_dtype, dev)
        if spec.router_fp32:            # only where the experts accept float32 gates (see Float32Router)
            ff.router = _fp32_router(ff.router)
    for path in _linear_sites(model, spec.targets):
        lin = model.get_submodule(path)
        if quantize:
            _set(model, path, Int4Linear.from_weight(lin.weight.detach(), spec))
        else:
            _set(model, path, Int4Linear(lin.in_features, lin.out_features, spec.group_size, spec.symmetric,
                                         spec.torch_scale_dtype, device=dev))
    model.quantization = spec.to_config()
    return model


def quantize_model(model, targets=("experts",), group_size: int = 128, *, symmetric: bool = True,
                   scale_dtype: str = "bfloat16", router_fp32: bool = True):
    """Quantize `model` in place (and return it): `targets` ⊆ {experts, shared_expert, attention, mlp}.
    The routed experts are converted one expert at a time, so the extra memory is one expert's float32
    copy. Embeddings, lm_head, norms and the router are never quantized."""
    spec = Int4Spec(group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype,
                    targets=targets, router_fp32=router_fp32)
    if getattr(model, "quantization", None):
        raise ValueError(f"model is already quantized ({model.quantization['quant_method']})")
    return install_int4(model, spec)


def spec_of(model) -> Int4Spec | None:
    qc = getattr(model, "quantization", None)
    return Int4Spec.from_config(qc) if qc and qc.get("quant_method") == QUANT_METHOD else None


__all__ = ["Int4Spec", "Int4Packed", "Int4Linear", "Int4Experts", "pack_int4", "unpack_int4", "quantize_int4",
           "dequantize_int4", "install_int4", "quantize_model", "spec_of", "TARGETS", "QUANT_METHOD"]

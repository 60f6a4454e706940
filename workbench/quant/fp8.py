"""FP8 weights as released (spec llama4.md §5.1): load per-expert, unfused float8_e4m3fn weights with
their scales into our fused layout; compute in FP8 where the GPU supports it, dequantise elsewhere.

Released layout (converted with `OFFLINE_QUANT_COMPATIBLE=1`; vLLM `load_moe_expert_weights` reads the same):

    language_model.model.layers.{i}.feed_forward.experts.{e}.{gate_proj,up_proj,down_proj}.weight
        float8_e4m3fn, [out, in]   (gate/up: [F, D], down: [D, F])
    ….weight_scale   float32, [out, 1] per output channel, or [1] / [] per tensor:   w ≈ weight · scale
    (any other linear `X.weight` stored as FP8 carries `X.weight_scale` the same way; `input_scale`
    — static activation scales — is ignored: we quantize activations dynamically or not at all)

`load_fp8(dir, keep_fp8=...)`:
  * keep_fp8=False — dequantise on load (w·scale, computed in float32) into a plain model of `dtype`:
    works on every device, costs bf16 memory.
  * keep_fp8=True — keep FP8 storage in `Fp8Experts` / `Fp8Linear`: each forward either runs
    `torch._scaled_mm` (row-wise scales, activations quantized per token) when `fp8_matmul_supported`
    says the device can, or dequantises one active expert at a time (CPU, older GPUs, and whenever
    activations need gradients).
  * keep_fp8="auto" (default) — True exactly when `fp8_matmul_supported(device)`.

UNTESTED: the `torch._scaled_mm` path has never run — this project's test machines have no FP8-capable
GPU. It is gated by `fp8_matmul_supported` (CUDA, compute capability ≥ 9.0, `torch._scaled_mm`
present, env `WORKBENCH_FP8_MATMUL` not "0") and should be checked against the dequantised path on an
H100/H200 before it is trusted (tests/test_quant.py has a `gpu`-marked test for exactly that).

Legend: O out, I in, E experts, D hidden, F expert width, M rows.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

from workbench.checkpoint import (
    CheckpointError,
    _atomic,
    _check,
    _open,
    _shard_map,
    checkpoint_dir,
    read_config,
    read_headers,
    recover_checkpoint,
    resolve_device,
    resolve_dtype,
    text_names,
)
from workbench.model.rope import inv_freq
from workbench.model.transformer import Llama4ForCausalLM
from workbench.quant.experts import Float32Router, dispatch, swiglu_expert
from workbench.tokenizer import load_tokenizer

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)            # 448
_EXPERT_KEY = re.compile(r"^(?P<base>.+\.feed_forward\.experts)\.(?P<e>\d+)\."
                         r"(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|weight_scale|input_scale)$")
_STORED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": FP8}


# ------------------------------------------------------------------------------ numerics
def quantize_fp8(w_OI: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [..., O, I] → (float8_e4m3fn weight, float32 scale [..., O, 1] or [1]), absmax scaling."""
    w = w_OI.float()
    amax = w.abs().amax(-1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale.contiguous()


def _channel_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """[1] / [] (per tensor), [O] or [O, 1] (per channel) → float32 [O, 1]."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out_features, 1).clone()
    if s.numel() == out_features and (s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1)):
        return s.reshape(out_features, 1)
    raise CheckpointError(f"weight_scale of shape {tuple(scale.shape)} is neither per-tensor nor per-channel "
                          f"for {out_features} output channels (block-wise FP8 scales are not supported)")


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w · scale in float32, cast to `dtype`; `scale` per channel ([..., O, 1]) or per tensor."""
    return (w.float() * scale.float()).to(dtype)


@functools.cache
def _capable(device_type: str, index: int | None) -> bool:
    if device_type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    # row-wise scaled FP8 GEMM needs Hopper (sm90) or newer
    return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device()) >= (9, 0)


def fp8_matmul_supported(device) -> bool:
    """Whether `Fp8Linear` will use `torch._scaled_mm` on `device` (see the module docstring: UNTESTED)."""
    if os.environ.get("WORKBENCH_FP8_MATMUL", "1") == "0":
        return False
    dev = torch.device(device)
    return _capable(dev.type, dev.index)


def scaled_mm_linear(x: torch.Tensor, w_OI: torch.Tensor, scale_O1: torch.Tensor) -> torch.Tensor:
    """x · (w·scale)ᵀ with `torch._scaled_mm`: x quantized per row (token) to e4m3, row-wise scales on
    both sides, bf16 output cast to x's dtype. UNTESTED (no FP8 GPU here)."""
    x2 = x.reshape(-1, x.shape[-1]).float()                                    # (M, I)
    M = x2.shape[0]
    pad = (-M) % 16                                                            # keep every GEMM dim 16-aligned
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    sx = (x2.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)         # (M', 1)
    xq = (x2 / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(xq, w_OI.t(), scale_a=sx, scale_b=scale_O1.float().reshape(1, -1),
                           out_dtype=torch.bfloat16)
    return out[:M].reshape(*x.shape[:-1], -1).to(x.dtype)


# ------------------------------------------------------------------------------------ modules
class Fp8Linear(torch.nn.Module):
    """Bias-free linear over an FP8 weight [*lead, out, in] with float32 per-channel scales [*lead, out, 1].
    `scaled_mm`: None = auto (`fp8_matmul_supported` and no gradient needed), False = always dequantise."""

    def __init__(self, in_features: int, out_features: int, lead: tuple[int, ...] = (), device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(*lead, out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(*lead, out_features, 1, dtype=torch.float32, device=device))
        self.scaled_mm: bool | None = None

    def forward(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        w = self.weight if index is None else self.weight[index]
        s = self.weight_scale if index is None else self.weight_scale[index]
        fast = self.scaled_mm is not False and fp8_matmul_supported(x.device) and not (
            torch.is_grad_enabled() and x.requires_grad)
        if fast:
            return scaled_mm_linear(x, w, s)
        return F.linear(x, dequantize_fp8(w, s, x.dtype))

    def extra_repr(self) -> str:
        lead = tuple(self.weight.shape[:-2])
        return f"in={self.in_features}, out={self.out_features}" + (f", lead={lead}" if lead else "")


class Fp8Experts(torch.nn.Module):
    """Drop-in for `Llama4TextExperts` over FP8 weights: `gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]."""

    def __init__(self, num_experts: int, hidden: int, inner: int, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = Fp8Linear(hidden, 2 * inner, (num_experts,), device)
        self.down_proj = Fp8Linear(inner, hidden, (num_experts,), device)

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, gate_NK: torch.Tensor) -> torch.Tensor:
        return dispatch(x_ND, ids_NK, gate_NK, self.num_experts, swiglu_expert(self.gate_up_proj, self.down_proj))


# ------------------------------------------------------------------------- synthetic release writer
def save_fp8_checkpoint(model, path, *, targets=("experts",), per_channel: bool = True) -> Path:
    """Write `model` the way the FP8 releases are laid out (composite config, `language_model.` prefix,
    routed experts unfused per expert in [out, in], FP8 + `weight_scale`). `targets` may add
    "shared_expert" and "attention" (as `X.weight` + `X.weight_scale`). For tests and quality runs."""
    linears = set()
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        if "attention" in targets:
            linears |= {f"{p}.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if layer.is_moe and "shared_expert" in targets:
            linears |= {f"{p}.feed_forward.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if "experts" in targets and name.endswith(".experts.gate_up_proj"):
            base, F2 = name[: -len(".gate_up_proj")], t.shape[-1]
            for e in range(t.shape[0]):
                for proj, w in (("gate_proj", t[e, :, : F2 // 2]), ("up_proj", t[e, :, F2 // 2:])):
                    q, s = quantize_fp8(w.t(), per_channel)
                    tensors[f"language_model.{base}.{e}.{proj}.weight"] = q
                    tensors[f"language_model.{base}.{e}.{proj}.weight_scale"] = s
        elif "experts" in targets and name.endswith(".experts.down_proj"):
            base = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                q, s = quantize_fp8(t[e].t(), per_channel)
                tensors[f"language_model.{base}.{e}.down_proj.weight"] = q
                tensors[f"language_model.{base}.{e}.down_proj.weight_scale"] = s
        elif name in linears:
            q, s = quantize_fp8(t, per_channel)
            tensors[f"language_model.{name}"] = q
            tensors[f"language_model.{name}_scale"] = s
        else:
            tensors[f"language_model.{name}"] = t.contiguous()
    with checkpoint_dir(path) as out:       # crash-safe as save_model (a re-save is swapped in whole)
        _atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        text = model.config.to_hf()
        cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
               "quantization_config": {"quant_method": "fp8", "weight_dtype": "float8_e4m3fn",
                                       "weight_scale": "per-channel" if per_channel else "per-tensor",
                                       "targets": list(targets),
                                       "note": "synthetic, written by workbench.quant.fp8.save_fp8_checkpoint"}}
        _atomic(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        if getattr(model, "tokenizer", None) is not None:
            _atomic(out / "tokenizer.json", lambda p: model.tokenizer.tok.save(str(p)))
    return Path(path)


# ------------------------------------------------------------------------------------------ loader
def load_fp8(directory, dtype=torch.bfloat16, device=None, keep_fp8="auto") -> Llama4ForCausalLM:
    """Load an FP8 checkpoint (released layout, see module docstring) into our model. `dtype`: compute
    dtype of activations and of every unquantized weight. Exact key-set and shape check on the fused
    view (missing experts are listed by index)."""
    directory = Path(directory)
    dtype, dev = resolve_dtype(dtype) or torch.bfloat16, resolve_device(device)
    keep = fp8_matmul_supported(dev) if keep_fp8 == "auto" else bool(keep_fp8)
    recover_checkpoint(directory)
    config, _ = read_config(directory)
    shard_of = _shard_map(directory)
    names = text_names(shard_of, directory, "not loaded (text path only)")
    shapes, dtypes = read_headers(shard_of, names)
    headers = {n: (shapes[n], dtypes[n]) for n in shapes}

    experts: dict[str, dict[int, dict[str, str]]] = {}     # base → e → "gate_proj.weight" → name
    scales, plain, ignored = {}, {}, []
    for n in names:
        m = _EXPERT_KEY.match(n)
        if m and m["kind"] == "input_scale":
            ignored.append(n)
        elif m:
            experts.setdefault(m["base"], {}).setdefault(int(m["e"]), {})[f"{m['proj']}.{m['kind']}"] = n
        elif n.endswith(".input_scale"):
            ignored.append(n)
        elif n.endswith(".weight_scale"):
            scales[n[: -len("_scale")]] = n
        else:
            plain[n] = n
    if ignored:
        warnings.warn(f"{directory}: ignoring {len(ignored)} static activation scales (input_scale)", stacklevel=2)
    logical = {n: headers[n][0] for n in plain}
    problems = [f"{s}: weight_scale without its weight" for w, s in scales.items() if w not in plain]
    problems += [f"{n}: FP8 weight without weight_scale" for n in plain if headers[n][1] == "F8_E4M3"
                 and n not in scales]
    for base, per in experts.items():
        E = max(per) + 1
        need = [f"{p}.{k}" for p in ("gate_proj", "up_proj", "down_proj") for k in ("weight", "weight_scale")]
        absent = [f"{base}.{e}.{k}" for e in range(E) for k in need if k not in per.get(e, {})]
        if absent:
            problems.append(f"missing per-expert tensors ({len(absent)}): {absent[:8]}")
            continue
        Fg, D = headers[per[0]["gate_proj.weight"]][0]
        shapes = {(headers[per[e][f"{p}.weight"]][0]) for e in range(E) for p in ("gate_proj", "up_proj")}
        downs = {headers[per[e]["down_proj.weight"]][0] for e in range(E)}
        if shapes != {(Fg, D)} or downs != {(D, Fg)}:
            problems.append(f"{base}: per-expert shapes disagree (gate/up {sorted(shapes)}, down {sorted(downs)})")
            continue
        logical[f"{base}.gate_up_proj"], logical[f"{base}.down_proj"] = (E, D, 2 * Fg), (E, Fg, D)
    if problems:
        raise CheckpointError(f"{directory}: " + "\n  ".join(problems))
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    _check(model, logical, str(directory))

    def read(n):
        with _open(shard_of[names[n]]) as f:
            try:
                return f.get_tensor(names[n])
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard_of[names[n]]}: corrupt data for {names[n]!r} ({e})") from None

    for base, per in experts.items():            # fuse expert by expert, straight into the device tensors
        E, D, F2 = logical[f"{base}.gate_up_proj"]
        Fh = F2 // 2
        moe = model.get_submodule(base.rpartition(".")[0])
        if keep:
            fx = Fp8Experts(E, D, Fh, device=dev)
            for e in range(E):
                for proj, rows in (("gate_proj", slice(0, Fh)), ("up_proj", slice(Fh, F2))):
                    fx.gate_up_proj.weight[e, rows] = read(per[e][f"{proj}.weight"]).to(dev)
                    fx.gate_up_proj.weight_scale[e, rows] = _channel_scale(read(per[e][f"{proj}.weight_scale"]), Fh)
                fx.down_proj.weight[e] = read(per[e]["down_proj.weight"]).to(dev)
                fx.down_proj.weight_scale[e] = _channel_scale(read(per[e]["down_proj.weight_scale"]), D)
            moe.experts = fx
            moe.router = Float32Router(D, E, bias=False, device="meta")        # filled from `plain` below
        else:
            gu = torch.empty(E, D, F2, dtype=dtype, device=dev)
            dn = torch.empty(E, Fh, D, dtype=dtype, device=dev)
            for e in range(E):
                for proj, cols in (("gate_proj", slice(0, Fh)), ("up_proj", slice(Fh, F2))):
                    w = read(per[e][f"{proj}.weight"])
                    gu[e, :, cols] = dequantize_fp8(w, _channel_scale(read(per[e][f"{proj}.weight_scale"]), Fh)).t()
                w = read(per[e]["down_proj.weight"])
                dn[e] = dequantize_fp8(w, _channel_scale(read(per[e]["down_proj.weight_scale"]), D)).t()
            moe.experts.gate_up_proj = torch.nn.Parameter(gu)
            moe.experts.down_proj = torch.nn.Parameter(dn)
    for n in plain:
        module_name, _, attr = n.rpartition(".")
        module = model.get_submodule(module_name)
        t = read(n)
        if n in scales:
            s = _channel_scale(read(scales[n]), t.shape[0])
            if keep:
                lin = Fp8Linear(t.shape[1], t.shape[0], device=dev)
                lin.weight.copy_(t.to(dev))
                lin.weight_scale.copy_(s.to(dev))
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, lin)
                continue
            t = dequantize_fp8(t, s)
        to = torch.float32 if isinstance(module, Float32Router) else dtype
        module._parameters[attr] = torch.nn.Parameter(t.to(device=dev, dtype=to, copy=True))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.inv_freq = inv_freq(config).to(dev)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{directory}: internal: tensors left unloaded {left[:5]}")
    model.tokenizer = load_tokenizer(directory, config.bos_token_id, config.eos_token_id)
    model.source = str(directory)
    model.quantization = {"quant_method": "fp8", "kept_fp8": keep}
    return model.eval()

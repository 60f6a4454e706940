"""Int4 checkpoints: quantize a bf16/fp32 Hugging Face checkpoint by streaming it (`quantize_checkpoint`),
save an in-memory quantized model (`save_quantized`), and load either back (`load_quantized`).

Streaming: the output is planned from the source headers alone (every output tensor's shape is known
before any weight is read), split into shards of at most `max_shard_size`, and each shard is produced
and written before the next begins. A routed-expert tensor is read one expert slice at a time and
quantized in row blocks, so the host holds one output shard, one expert's source slice and a few
float32 row blocks — never the bf16 model (peak RSS measured in tests/test_quant.py and
docs/quantization.md).

Layout (docs/quantization.md): `Llama4ForCausalLM` key names; a quantized weight `W` becomes
`W.qweight` / `W.scales` [/ `W.zeros`], where W is the expert parameter path
(`model.layers.{i}.feed_forward.experts.gate_up_proj`) or the linear's module path
(`model.layers.{i}.self_attn.q_proj`); config.json carries `quantization_config` (Int4Spec.to_config).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from workbench.checkpoint import (
    INDEX,
    CheckpointError,
    _atomic,
    _check,
    _open,
    _parse_size,
    _shard_map,
    checkpoint_dir,
    finish_loaded,
    read_config,
    read_headers,
    recover_checkpoint,
    resolve_device,
    resolve_dtype,
    shard_files,
    split_shards,
    stream_tensors,
    text_names,
    write_index,
    write_model_files,
)
from workbench.model.transformer import Llama4ForCausalLM
from workbench.quant.experts import Float32Router
from workbench.quant.int4 import Int4Linear, Int4Spec, install_int4, quantize_int4, spec_of

_STORED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8}
_ROW_BLOCK = 2048          # rows quantized at once: bounds float32 temporaries to ~4 · 2048 · in bytes


def _role(qmodel, name: str) -> tuple[str, str | None]:
    """How the source tensor `name` is written: ('experts', base) / ('linear', base) / ('router', None) /
    ('plain', None), from the module that holds it in the (meta) quantized model."""
    try:
        if isinstance(qmodel.get_submodule(name), Int4Linear):       # experts.gate_up_proj / down_proj
            return "experts", name
    except AttributeError:
        pass
    parent, _, attr = name.rpartition(".")
    holder = qmodel.get_submodule(parent) if parent else qmodel
    if attr == "weight" and isinstance(holder, Int4Linear):
        return "linear", parent
    if attr == "weight" and isinstance(holder, Float32Router):
        return "router", None
    return "plain", None


def _quantize_into(w_OI: torch.Tensor, spec: Int4Spec, out: dict[str, torch.Tensor], base: str, index=()) -> None:
    for r in range(0, w_OI.shape[0], _ROW_BLOCK):
        q = quantize_int4(w_OI[r:r + _ROW_BLOCK], spec.group_size, spec.symmetric, spec.torch_scale_dtype)
        out[f"{base}.qweight"][(*index, slice(r, r + _ROW_BLOCK))] = q.qweight
        out[f"{base}.scales"][(*index, slice(r, r + _ROW_BLOCK))] = q.scales
        if q.zeros is not None:
            out[f"{base}.zeros"][(*index, slice(r, r + _ROW_BLOCK))] = q.zeros


def quantize_checkpoint(src, dst, *, targets=("experts",), group_size: int = 128, symmetric: bool = True,
                        scale_dtype: str = "bfloat16", router_fp32: bool = True, dtype=None,
                        max_shard_size="2GB", progress: bool = False) -> Path:
    """Quantize the HF checkpoint in `src` into `dst` (our int4 layout), streaming. `dtype` casts the
    tensors that stay unquantized (None keeps the checkpoint's). Vision tensors are not carried over
    (the output is a text-only `Llama4ForCausalLM`); tokenizer and generation files are copied."""
    src, dst = Path(src), Path(dst)
    spec = Int4Spec(group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype, targets=targets,
                    router_fp32=router_fp32)
    keep_dtype = resolve_dtype(dtype)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"destination {dst} is the source directory; write the quantized model elsewhere")
    config, _ = read_config(src)
    shard_of = _shard_map(src)
    names = text_names(shard_of, src, "not written (text-only output)")
    shapes, dtypes = read_headers(shard_of, names)
    bad = sorted(set(dtypes.values()) - {"F32", "BF16", "F16"})
    if bad:
        raise CheckpointError(f"{src}: tensors of dtype {bad} cannot be int4-quantized from here "
                              "(FP8 checkpoints load with workbench.quant.load_fp8)")
    with torch.device("meta"):
        _check(Llama4ForCausalLM(config), shapes, str(src))
        qmodel = install_int4(Llama4ForCausalLM(config), spec, quantize=False)
    expected = {k: v for k, v in qmodel.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        names.pop("lm_head.weight", None)

    # plan: every source tensor → its output tensors (shape, dtype), grouped into shards
    jobs = []
    for name in sorted(names, key=lambda n: (str(shard_of[names[n]]), n)):
        role, base = _role(qmodel, name)
        if base is not None:
            outs = {k: (tuple(expected[k].shape), expected[k].dtype) for k in expected if k.startswith(base + ".")}
        else:
            out_dtype = (torch.float32 if role == "router" else keep_dtype) or _STORED[dtypes[name]]
            outs = {name: (shapes[name], out_dtype)}
        nbytes = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in outs.values())
        jobs.append((name, role, base, outs, nbytes))
    planned = {k for *_, outs, _ in jobs for k in outs}
    if planned != set(expected):
        missing, extra = sorted(set(expected) - planned)[:5], sorted(planned - set(expected))[:5]
        raise CheckpointError(f"internal: planned keys differ from the quantized model's (missing {missing}, "
                              f"extra {extra})")
    shards = split_shards(jobs, lambda job: job[-1], _parse_size(max_shard_size))

    cfg = config.to_hf()
    cfg["architectures"] = ["Llama4ForCausalLM"]
    plain = {d for _, role, _, outs, _ in jobs if role == "plain" for _, d in outs.values()}
    cfg["dtype"] = str(plain.pop() if len(plain) == 1 else torch.float32).replace("torch.", "")
    cfg["quantization_config"] = spec.to_config()
    files = shard_files(len(shards))
    weight_map, total = {}, 0
    with checkpoint_dir(dst) as out:        # a re-quantization into an existing dst keeps the old one until done
        for i, (fname, shard) in enumerate(zip(files, shards)):
            tensors: dict[str, torch.Tensor] = {}
            for name, role, base, outs, _ in shard:
                tensors.update(_produce(src, shard_of[names[name]], names[name], role, base, outs, spec))
            _atomic(out / fname, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
            weight_map.update({k: fname for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            if progress:
                print(f"wrote {fname} ({i + 1}/{len(files)})", flush=True)
        for f in src.iterdir():            # tokenizer, generation config, chat template, …
            if f.is_file() and f.name not in ("config.json", INDEX) and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, out / f.name)
        _atomic(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        write_index(out, {"metadata": {"total_size": total}, "weight_map": weight_map} if len(files) > 1 else None)
    return dst


def _produce(src: Path, path: Path, key: str, role: str, base: str | None, outs: dict, spec: Int4Spec):
    """Read one source tensor (expert by expert for stacked experts) and return its output tensors."""
    out = {k: torch.empty(s, dtype=d) for k, (s, d) in outs.items()}
    try:
        if role == "experts":
            with _open(path) as f:
                n_experts = f.get_slice(key).get_shape()[0]
            for e in range(n_experts):      # reopen per expert: only this slice's pages are mapped
                with _open(path) as f:
                    w_IO = f.get_slice(key)[e:e + 1][0]
                _quantize_into(w_IO.t(), spec, out, base, (e,))
                del w_IO
            return out
        with _open(path) as f:
            t = f.get_tensor(key)
        if role == "linear":
            _quantize_into(t, spec, out, base)
        else:
            (name,) = outs
            out[name].copy_(t)
        del t
        return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt data for {key!r} ({e})") from None


def save_quantized(model, path, max_shard_size="5GB") -> Path:
    """Write an in-memory quantized model (after `quantize_model`) in the same layout."""
    spec = spec_of(model)
    if spec is None:
        raise ValueError("model is not int4-quantized; call workbench.quant.quantize_model first")
    extra = {"quantization_config": spec.to_config(),
             "dtype": str(model.model.embed_tokens.weight.dtype).replace("torch.", "")}
    with checkpoint_dir(path) as out:       # crash-safe as save_model; config.json written once, complete
        write_model_files(model, out, max_shard_size, config_update=extra)
    return Path(path)


def load_quantized(directory, dtype=None, device=None) -> Llama4ForCausalLM:
    """Load a checkpoint written by `quantize_checkpoint`/`save_quantized`. `dtype` is the compute dtype
    of the unquantized weights (None keeps the stored one); int4 codes, scales and the float32 router
    keep theirs. Exact key-set and shape check as `load_model`."""
    directory = Path(directory)
    dtype, dev = resolve_dtype(dtype), resolve_device(device)
    recover_checkpoint(directory)
    config, raw = read_config(directory)
    if "quantization_config" not in raw:
        raise CheckpointError(f"{directory}: config.json has no quantization_config (not a quantized checkpoint; "
                              "use workbench.load_model)")
    spec = Int4Spec.from_config(raw["quantization_config"], source=str(directory / "config.json"))
    shard_of = _shard_map(directory)
    names = {k: k for k in shard_of}
    with torch.device("meta"):
        model = install_int4(Llama4ForCausalLM(config), spec, quantize=False)
    shapes, dtypes = read_headers(shard_of, names)
    _check(model, shapes, str(directory))
    bad = sorted(set(dtypes.values()) - set(_STORED))
    if bad:
        raise CheckpointError(f"{directory}: unexpected tensor dtypes {bad}")
    params = dict(model.named_parameters())

    def target(name: str, stored: torch.dtype | None) -> torch.dtype | None:
        """`dtype` for floating parameters; the router (fp32), int4 codes, scales and zeros as stored."""
        module = model.get_submodule(name.rpartition(".")[0])
        if name not in params or isinstance(module, Float32Router) or stored is None or not stored.is_floating_point:
            return None
        return dtype

    for name, t in stream_tensors(shard_of, names, device=dev, dtype=target):   # each in storage of its own
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in params:
            module._parameters[attr] = torch.nn.Parameter(
                t, requires_grad=module._parameters[attr].requires_grad and t.is_floating_point())
        else:                       # int4 codes, scales, zeros: stored dtype kept
            module._buffers[attr] = t
        del t
    return finish_loaded(model, config, directory, dev)


def checkpoint_bytes(directory) -> int:
    """Bytes of safetensors data in a checkpoint directory (for reporting)."""
    return sum(os.path.getsize(p) for p in Path(directory).glob("*.safetensors"))

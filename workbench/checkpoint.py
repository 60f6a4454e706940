"""Hugging Face checkpoints ↔ our model: meta-device build, streamed shard-by-shard loading,
exact key-set and shape checks, sharded atomic saving.

Accepted layouts (spec llama4.md §5.1): `Llama4ForCausalLM` (`model.*`, `lm_head.weight`) and
`Llama4ForConditionalGeneration` (`language_model.model.*`, `language_model.lm_head.weight`,
plus `vision_model.*` / `multi_modal_projector.*`, which this text model does not load yet —
a warning says so). `config.json` + `model.safetensors`, or shards + `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from workbench.config import PRESETS, ConfigError, Llama4TextConfig, preset
from workbench.model.rope import inv_freq
from workbench.model.transformer import Llama4ForCausalLM
from workbench.tokenizer import load_tokenizer, preset_tokenizer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
_MAX_RANDOM_PARAMS = 2_000_000_000     # load_model(preset) refuses to materialise random weights beyond this


class CheckpointError(ValueError):
    """A checkpoint does not match the model it describes; the message lists every problem."""


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None (keep the checkpoint's dtype), a torch dtype or a name; only dtypes the model computes in
    (float32, bfloat16, float16, float64 — float8/int types are storage formats, not compute dtypes)."""
    if dtype is None:
        return None
    out = _DTYPES.get(str(dtype).removeprefix("torch."), dtype) if not isinstance(dtype, torch.dtype) else dtype
    if out not in set(_DTYPES.values()):
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} (or the torch dtypes)")
    return out


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported (use 'cpu', 'cuda' or 'mps')")
    return dev


def read_config(directory: Path) -> tuple[Llama4TextConfig, dict]:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return Llama4TextConfig.from_hf(raw, source=str(path)), raw


def _shard_map(directory: Path) -> dict[str, Path]:
    """tensor name → shard file, from the index (or the single file's header)."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = {f: directory / f for f in set(weight_map.values())}
        absent = sorted(f for f, p in files.items() if not p.exists())
        if absent:
            raise CheckpointError(f"{index} points to missing shard files: {absent}")
        return {k: files[f] for k, f in weight_map.items()}
    single = directory / SINGLE
    if not single.exists():
        raise FileNotFoundError(f"{directory}: neither {SINGLE} nor {INDEX} found")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def _prefix(keys) -> str:
    if any(k.startswith("language_model.") for k in keys):
        return "language_model."
    return ""


def _check(model: torch.nn.Module, shapes: dict[str, tuple], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: checkpoint {shapes[k]} vs model {expected[k]}"
             for k in sorted(set(expected) & set(shapes)) if tuple(shapes[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {wrong}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match its config.json —\n  " + "\n  ".join(problems))


def build_model(config: Llama4TextConfig, *, device="cpu", dtype=torch.float32, seed: int | None = 0):
    """A randomly initialised model (normal(0, 0.02) weights, ones for norms)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    model = Llama4ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype)


def load_model(source: str | os.PathLike, dtype=None, device=None, *, seed: int = 0) -> Llama4ForCausalLM:
    """A preset name (random weights, byte tokenizer) or a HF checkpoint directory."""
    from workbench.checkpoint_vision import is_multimodal_source, load_multimodal  # local: import cycle

    if is_multimodal_source(source):
        return load_multimodal(source, dtype, device, seed=seed)
    dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if isinstance(source, str) and source in PRESETS:
        cfg = preset(source)
        with torch.device("meta"):      # count first: a random full-size model would exhaust RAM
            n_params = sum(p.numel() for p in Llama4ForCausalLM(cfg).parameters())
        if n_params > _MAX_RANDOM_PARAMS:
            raise ValueError(f"preset {source!r} is full size ({n_params / 1e9:.2f}B parameters); build it on the "
                             "meta device with Llama4ForCausalLM(preset(name)) or load a checkpoint")
        model = build_model(cfg, device=dev, dtype=dtype or torch.float32, seed=seed)
        model.tokenizer, model.source = preset_tokenizer(cfg), source
        return model.eval()
    directory = Path(source)
    if not directory.exists():
        raise FileNotFoundError(f"{str(source)!r} is neither a preset ({sorted(PRESETS)}) nor an existing directory")
    if not directory.is_dir():
        raise NotADirectoryError(f"{str(source)!r} is a file; pass the checkpoint directory that holds config.json")
    config, raw = read_config(directory)
    shard_of = _shard_map(directory)
    prefix = _prefix(shard_of)
    vision = sorted(k for k in shard_of if k.startswith(_VISION_PREFIXES))
    if vision:
        warnings.warn(f"{directory}: {len(vision)} vision/projector tensors are not loaded — this build runs "
                      "the text path of Llama4ForConditionalGeneration only", stacklevel=2)
    ours = {k[len(prefix):]: k for k in shard_of if k.startswith(prefix) and not k.startswith(_VISION_PREFIXES)}
    ours.update({k: k for k in shard_of if not k.startswith(prefix) and not k.startswith(_VISION_PREFIXES)})
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    shapes, ck_dtypes = {}, set()
    by_file: dict[Path, list[str]] = {}
    for name, key in ours.items():
        by_file.setdefault(shard_of[key], []).append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                try:
                    sl = f.get_slice(ours[name])
                    shapes[name] = tuple(sl.get_shape())
                    ck_dtypes.add(sl.get_dtype())
                    del sl                  # a slice keeps the shard's mmap alive
                except SafetensorError as e:
                    raise CheckpointError(f"{path}: cannot read header of {ours[name]!r} ({e})") from None
    _check(model, shapes, str(directory))
    stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    bad_dtypes = ck_dtypes - set(stored)
    if bad_dtypes:
        raise CheckpointError(f"{directory}: unsupported tensor dtypes {sorted(bad_dtypes)} "
                              "(quantized and integer checkpoints are not supported by load_model)")
    if dtype is None:
        dtype = stored[next(iter(ck_dtypes))] if len(ck_dtypes) == 1 else torch.float32
    params = dict(model.named_parameters())
    for path, names in by_file.items():       # stream: one tensor at a time, shard by shard
        with _open(path) as f:
            for name in names:
                if name not in params:
                    continue
                try:
                    t = f.get_tensor(ours[name])
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: corrupt data for {ours[name]!r} ({e})") from None
                # copy=True: safetensors hands out views of its mmap; a parameter must not share pages with a
                # file that another tool may rewrite in place (a truncated mapping kills the process with SIGBUS)
                _assign(model, name, t.to(device=dev, dtype=dtype, copy=True))
                del t
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.inv_freq = inv_freq(config).to(dev)
    model.tokenizer = load_tokenizer(directory, config.bos_token_id, config.eos_token_id)
    model.source = str(directory)
    return model.eval()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    try:
        for unit, mult in units:        # HF spelling: "5GB" = 5·10⁹ bytes, "5GiB" = 5·2³⁰
            if s.endswith(unit):
                return int(float(s[: -len(unit)]) * mult)
        return int(s)
    except ValueError:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB', '500MiB' or a byte count") from None


def save_model(model: Llama4ForCausalLM, path: str | os.PathLike, max_shard_size="5GB") -> Path:
    """Write HF `Llama4ForCausalLM` format (config.json, safetensors shards + index, tokenizer.json).
    Every file is written to a temporary name and renamed, so a killed save never leaves a file
    that looks valid; the index is written last."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, cur, cur_bytes = [], {}, 0
    for k in sorted(state):
        nb = state[k].numel() * state[k].element_size()
        if cur and cur_bytes + nb > limit:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = state[k]
        cur_bytes += nb
    shards.append(cur)
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX]:
        stale.unlink(missing_ok=True)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic(out / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
    cfg = model.config.to_hf()
    cfg["architectures"] = ["Llama4ForCausalLM"]
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    _atomic(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
    if getattr(model, "tokenizer", None) is not None:
        _atomic(out / "tokenizer.json", lambda p: model.tokenizer.tok.save(str(p)))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _atomic(out / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    return out


def _atomic(final: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; give the file open()'s usual mode
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

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
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from workbench.checkpoint_dir import INDEX, _atomic, _umask, checkpoint_dir, recover_checkpoint  # noqa: F401
from workbench.config import PRESETS, ConfigError, Llama4TextConfig, preset
from workbench.model.rope import inv_freq
from workbench.model.transformer import Llama4ForCausalLM
from workbench.safe_files import confined_name, read_bounded, regular_file
from workbench.tensor_reader import DTYPES, FLOATS, ShardReader
from workbench.tokenizer import load_tokenizer, preset_tokenizer

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


JSON_MAX_BYTES = 64 << 20        # config.json / index / preprocessor_config.json (Maverick's index: ~5 MB)


def read_json_file(path: Path, error=ConfigError, what: str = "file"):
    """Parsed JSON of a regular file of at most JSON_MAX_BYTES (symlinks followed: a Hugging Face cache
    snapshot links its files into ../../blobs); a FIFO, device, oversized, non-UTF-8, malformed or
    too deeply nested file is an `error` naming it."""
    raw = read_bounded(path, JSON_MAX_BYTES, what, follow_symlinks=True, error=error)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    except ValueError as e:            # an integer beyond Python's 4300-digit limit
        raise error(f"{path}: unreadable JSON ({e})") from None


def read_config_json(directory: Path) -> tuple[Path, dict]:
    """(path, parsed JSON) of `directory`/config.json; a missing, malformed or non-UTF-8 file is named."""
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    return path, read_json_file(path, ConfigError, "config.json")


def read_config(directory: Path) -> tuple[Llama4TextConfig, dict]:
    path, raw = read_config_json(directory)
    return Llama4TextConfig.from_hf(raw, source=str(path)), raw


def _shard_map(directory: Path) -> dict[str, Path]:
    """tensor name → shard file, from the index (or the single file's header)."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = read_json_file(index, CheckpointError, "index")["weight_map"]
            names = set(weight_map.values())
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(f"{index}: ", f"{index}: malformed index: ", 1)) from None
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
        # Shard names must stay inside the checkpoint (an index naming /etc/passwd or ../elsewhere is refused)
        files = {f: confined_name(f, directory, f"{INDEX} shard", error=CheckpointError)
                 for f in sorted(names, key=str)}
        absent = sorted(f for f, p in files.items() if not p.exists())
        if absent:
            raise CheckpointError(f"{index} points to missing shard files: {absent}")
        for p in files.values():
            regular_file(p, "shard", error=CheckpointError)      # a FIFO would block, /dev/zero never end
        return {k: files[f] for k, f in weight_map.items()}
    single = directory / SINGLE
    if not single.exists():
        raise FileNotFoundError(f"{directory}: neither {SINGLE} nor {INDEX} found")
    regular_file(single, "weights file", error=CheckpointError)
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


def text_names(shard_of: dict[str, Path], source, dropped: str) -> dict[str, str]:
    """Our name → stored key for every text tensor (the `language_model.` prefix removed); vision and
    projector tensors are left out with a warning "… vision/projector tensors are {dropped}"."""
    prefix = _prefix(shard_of)
    vision = [k for k in shard_of if k.startswith(_VISION_PREFIXES)]
    if vision:
        warnings.warn(f"{source}: {len(vision)} vision/projector tensors are {dropped}", stacklevel=3)
    return {k[len(prefix):] if k.startswith(prefix) else k: k for k in shard_of if k not in vision}


def _by_shard(shard_of: dict[str, Path], names: dict[str, str]) -> dict[Path, list[str]]:
    """Our names (`names`: our name → stored key) grouped by the shard file that holds them, in order."""
    by_file: dict[Path, list[str]] = {}
    for name, key in names.items():
        by_file.setdefault(shard_of[key], []).append(name)
    return by_file


def read_headers(shard_of: dict[str, Path], names: dict[str, str]) -> tuple[dict[str, tuple], dict[str, str]]:
    """(shapes, safetensors dtype names) by our name, from the shard headers alone (no data is read)."""
    shapes, dtypes = {}, {}
    for path, group in _by_shard(shard_of, names).items():
        with _open(path) as f:
            for name in group:
                try:
                    sl = f.get_slice(names[name])
                    shapes[name], dtypes[name] = tuple(sl.get_shape()), sl.get_dtype()
                    del sl                  # a slice keeps the shard's mmap alive
                except SafetensorError as e:
                    raise CheckpointError(f"{path}: cannot read header of {names[name]!r} ({e})") from None
    return shapes, dtypes


def stream_tensors(shard_of: dict[str, Path], names: dict[str, str], keep=None, *, device=None, dtype=None):
    """(our name, tensor) one at a time, shard by shard, for the names `keep` accepts (all by default).

    Each tensor is read into storage of its own (`tensor_reader.ShardReader`: pread, no mapping held,
    so a load's memory is what it keeps plus one 16 MiB slab) on `device` (CPU by default) in `dtype`:
    a torch dtype, None (as stored), or a function (our name, stored dtype) → dtype. Floating tensors
    holding NaN/inf are refused by name: they generate garbage without any error."""
    slab = None                                     # one conversion buffer for the whole load
    for path, group in _by_shard(shard_of, names).items():
        try:
            reader = ShardReader(path, error=CheckpointError, slab=slab)
        except OSError as e:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
        with reader:
            for name in group:
                if keep is not None and not keep(name):
                    continue
                key = names[name]
                want = dtype
                if callable(dtype):
                    want = dtype(name, DTYPES.get(reader.dtype_name(key)))
                yield name, reader.read(key, device=device, dtype=want, check_finite=True)
            slab = reader.slab


_STORED = {name: t for name, t in DTYPES.items() if t in FLOATS}       # F32, BF16, F16, F64


def stored_dtype(ck_dtypes: set[str], source, refusal: str) -> torch.dtype:
    """The dtype `dtype=None` keeps: the checkpoint's one float dtype (float32 when they are mixed);
    any other stored dtype is refused with "(`refusal`)"."""
    bad = ck_dtypes - set(_STORED)
    if bad:
        raise CheckpointError(f"{source}: unsupported tensor dtypes {sorted(bad)} ({refusal})")
    return _STORED[next(iter(ck_dtypes))] if len(ck_dtypes) == 1 else torch.float32


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
    """A bundled model (`tiny-moe`, `tiny-vlm`: trained weights), a preset name (random weights, byte
    tokenizer) or a HF checkpoint directory."""
    from workbench.bundled import is_bundled, resolve_source
    from workbench.checkpoint_vision import is_multimodal_source, load_multimodal  # local: import cycle
    from workbench.config_vision import VISION_PRESETS

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_model: source must be a bundled model name, a preset name or a checkpoint "
                        f"directory (str or path), got {type(source).__name__} {source!r:.60}")
    if is_bundled(source) and not os.path.isdir(source):
        model = load_model(resolve_source(source), dtype, device, seed=seed)
        model.source = source                       # provenance names the bundled model, not a site path
        return model

    if not (isinstance(source, str) and (source in PRESETS or source in VISION_PRESETS)):
        recover_checkpoint(source)          # a save killed mid-swap (two-rename fallback) left it aside
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
    shapes, ck_dtypes = read_headers(shard_of, ours)
    _check(model, shapes, str(directory))
    stored = stored_dtype(set(ck_dtypes.values()), directory,
                          "quantized and integer checkpoints are not supported by load_model")
    if dtype is None:
        dtype = stored
    params = dict(model.named_parameters())
    # one tensor at a time, read into its own storage (never a view of a file another tool may rewrite)
    for name, t in stream_tensors(shard_of, ours, keep=params.__contains__, device=dev, dtype=dtype):
        _assign(model, name, t)
        del t
    return finish_loaded(model, config, directory, dev)


def finish_loaded(model: Llama4ForCausalLM, config: Llama4TextConfig, directory: Path, dev) -> Llama4ForCausalLM:
    """The last steps of loading a text model whose weights are in place: tie lm_head to the embedding
    when configured, RoPE frequencies on `dev`, the checkpoint's tokenizer, `source`; eval mode."""
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
    Crash-safe (see `checkpoint_dir`): a re-save over an existing checkpoint is written beside it and
    swapped in, so `path` holds the complete old or the complete new checkpoint at every instant; a
    fresh save writes each file under a temporary name, renamed when complete, the index last."""
    with checkpoint_dir(path) as out:
        write_model_files(model, out, max_shard_size)
    return Path(path)


def write_model_files(model: Llama4ForCausalLM, out: Path, max_shard_size="5GB", config_update=None) -> None:
    """The files of `save_model` into the directory `out` (`config_update`: extra config.json keys)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    index = write_shards(state, out, max_shard_size)
    cfg = model.config.to_hf()
    cfg["architectures"] = ["Llama4ForCausalLM"]
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    cfg.update(config_update or {})
    _atomic(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
    if getattr(model, "tokenizer", None) is not None:
        _atomic(out / "tokenizer.json", lambda p: model.tokenizer.tok.save(str(p)))
    write_index(out, index)


def split_shards(items, nbytes, limit: int) -> list[list]:
    """`items` in order, in consecutive groups of at most `limit` bytes (`nbytes(item)`); an item larger
    than `limit` gets a group of its own. Always at least one group."""
    shards, cur, cur_bytes = [], [], 0
    for item in items:
        nb = nbytes(item)
        if cur and cur_bytes + nb > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += nb
    shards.append(cur)
    return shards


def shard_files(n: int) -> list[str]:
    """HF shard file names: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`."""
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def remove_shards(out: Path) -> None:
    """Delete the weights (and index) of an earlier save in `out`, so none of its shards survive."""
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX]:
        stale.unlink(missing_ok=True)


def write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_size) -> dict | None:
    """Replace the weights in `out` by `state` (keys sorted, shards of at most `max_shard_size`, each
    written atomically). Returns the index for `write_index`, to be written last (None: a single file)."""
    limit = _parse_size(max_shard_size)
    groups = split_shards(sorted(state), lambda k: state[k].numel() * state[k].element_size(), limit)
    remove_shards(out)
    files = shard_files(len(groups))
    for fname, keys in zip(files, groups):
        shard = {k: state[k] for k in keys}
        _atomic(out / fname, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
    if len(groups) == 1:
        return None
    return {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: fname for fname, keys in zip(files, groups) for k in keys}}


def write_index(out: Path, index: dict | None) -> None:
    """Write `model.safetensors.index.json` atomically (nothing for a single-file checkpoint)."""
    if index is not None:
        _atomic(out / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2)))

"""Multimodal checkpoints: HF `Llama4ForConditionalGeneration` safetensors ↔ our model.

Same contract as `workbench/checkpoint.py` (whose helpers this reuses): build on the meta device,
exact key-set and per-tensor shape check (missing, unexpected and mis-shaped keys listed together),
stream tensors shard by shard, save crash-safely (`checkpoint.checkpoint_dir`) with the index last.
Our parameter names are HF's (`vision_model.*`, `multi_modal_projector.linear_1.weight`,
`language_model.model.*`, `language_model.lm_head.weight`), so there are no renames.
`preprocessor_config.json` is read into `model.image_processor` when present, and written on save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from workbench.checkpoint import (
    _assign,
    _atomic,
    _check,
    _shard_map,
    checkpoint_dir,
    read_config_json,
    read_headers,
    read_json_file,
    recover_checkpoint,
    resolve_device,
    resolve_dtype,
    stored_dtype,
    stream_tensors,
    write_index,
    write_shards,
)
from workbench.config import ConfigError
from workbench.config_vision import VISION_PRESETS, Llama4Config, is_multimodal_config, vision_preset
from workbench.image import ImageProcessor
from workbench.model.multimodal import Llama4ForConditionalGeneration
from workbench.model.rope import inv_freq
from workbench.tokenizer import load_tokenizer, preset_tokenizer

PREPROCESSOR = "preprocessor_config.json"
_LM_HEAD = "language_model.lm_head.weight"
_MAX_RANDOM_PARAMS = 2_000_000_000


def read_multimodal_config(directory: Path) -> Llama4Config:
    path, raw = read_config_json(Path(directory))
    return Llama4Config.from_hf(raw, source=str(path))


def is_multimodal_source(source) -> bool:
    """True for a vision preset name or a directory whose config.json has a `vision_config` — what
    `load_model` routes here. Unreadable configs answer False so the text loader reports them."""
    if isinstance(source, str) and source in VISION_PRESETS:
        return True
    try:
        path = Path(source) / "config.json"
        return path.is_file() and is_multimodal_config(read_json_file(path))
    except (OSError, TypeError, ValueError, RecursionError):
        return False


def build_multimodal(config: Llama4Config, *, device="cpu", dtype=torch.float32,
                     seed: int | None = 0) -> Llama4ForConditionalGeneration:
    """Random weights: normal(0, 0.02), norms weight 1 / bias 0."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    model = Llama4ForConditionalGeneration(config)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) or n.endswith("norm")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, _, attr = name.rpartition(".")
            if owner in norms:
                p.fill_(1.0 if attr == "weight" else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype)


def _expected(model: Llama4ForConditionalGeneration, tied: bool):
    """What `checkpoint._check` reads (state_dict shapes, config.tie_word_embeddings); a tied lm_head is
    stored only as the embedding, so it is dropped from the expected set here."""
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == _LM_HEAD)}
    return SimpleNamespace(state_dict=lambda: state, config=SimpleNamespace(tie_word_embeddings=False))


def load_multimodal(source: str | os.PathLike, dtype=None, device=None, *,
                    seed: int = 0) -> Llama4ForConditionalGeneration:
    """A vision preset name (random weights, byte tokenizer) or a HF Llama4ForConditionalGeneration directory."""
    dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if not (isinstance(source, str) and source in VISION_PRESETS):
        recover_checkpoint(source)          # a save killed mid-swap (two-rename fallback) left it aside
    if isinstance(source, str) and source in VISION_PRESETS:
        cfg = vision_preset(source)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in Llama4ForConditionalGeneration(cfg).parameters())
        if n_params > _MAX_RANDOM_PARAMS:
            raise ValueError(f"preset {source!r} is full size ({n_params / 1e9:.2f}B parameters); build it on "
                             "the meta device with Llama4ForConditionalGeneration(vision_preset(name)) or load a "
                             "checkpoint")
        model = build_multimodal(cfg, device=dev, dtype=dtype or torch.float32, seed=seed)
        model.tokenizer, model.image_processor = preset_tokenizer(cfg.text_config), ImageProcessor.from_config(cfg)
        model.source = source
        return model.eval()
    directory = Path(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(source)!r} is neither a vision preset ({sorted(VISION_PRESETS)}) nor a "
                                "checkpoint directory")
    config = read_multimodal_config(directory)
    tied = config.text_config.tie_word_embeddings
    shard_of = _shard_map(directory)
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(config)
    names = {k: k for k in shard_of}
    shapes, ck_dtypes = read_headers(shard_of, names)
    if tied:
        shapes.pop(_LM_HEAD, None)
    _check(_expected(model, tied), shapes, str(directory))
    stored = stored_dtype(set(ck_dtypes.values()), directory, "quantized and integer checkpoints are not supported")
    if dtype is None:
        dtype = stored
    # one tensor at a time, each read into storage of its own (no mapping of the shard is held)
    for name, t in stream_tensors(shard_of, names, keep=shapes.__contains__, device=dev, dtype=dtype):
        _assign(model, name, t)
        del t
    lm = model.language_model
    if tied:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.model.inv_freq = inv_freq(config.text_config).to(dev)
    model.tokenizer = load_tokenizer(directory, config.text_config.bos_token_id, config.text_config.eos_token_id)
    lm.tokenizer = model.tokenizer
    pre = directory / PREPROCESSOR
    if pre.exists():
        try:
            model.image_processor = ImageProcessor.from_hf(read_json_file(pre, ConfigError, PREPROCESSOR), config)
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"{pre}: unusable preprocessor config ({e})") from None
        if model.image_processor.tile_size != config.vision_config.image_size:
            raise ConfigError(f"{pre}: tile size {model.image_processor.tile_size} differs from the vision "
                              f"config's image_size={config.vision_config.image_size}")
    else:
        model.image_processor = ImageProcessor.from_config(config)
    model.source = str(directory)
    return model.eval()


def save_multimodal(model: Llama4ForConditionalGeneration, path: str | os.PathLike, max_shard_size="5GB") -> Path:
    """Write HF `Llama4ForConditionalGeneration` format: config.json, safetensors shards (+ index),
    tokenizer.json and preprocessor_config.json. Crash-safe like `save_model` (`checkpoint_dir`): a
    re-save is written beside the old checkpoint and swapped in; a fresh save writes each file to a
    temporary name and renames it, the index last."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.text_config.tie_word_embeddings:
        state.pop(_LM_HEAD, None)
    cfg = model.config.to_hf()
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    processor = getattr(model, "image_processor", None) or ImageProcessor.from_config(model.config)
    with checkpoint_dir(path) as out:
        index = write_shards(state, out, max_shard_size)
        _atomic(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        _atomic(out / PREPROCESSOR, lambda p: Path(p).write_text(json.dumps(processor.to_hf(), indent=2)))
        if getattr(model, "tokenizer", None) is not None:
            _atomic(out / "tokenizer.json", lambda p: model.tokenizer.tok.save(str(p)))
        write_index(out, index)
    return Path(path)

"""Hooks on taps, always removed; `run_with_cache`; write-interventions; model interventions.

    with hooks(model, {"model.layers.*.feed_forward.hook_topk_ids": fn}):   # fn(value, site) -> value | None
        model(ids)
    out, cache = run_with_cache(model, ids, "*.hook_resid_post")
    with intervene(model, temperature_tuning=False, mask_experts={3: [0]}, drop_shared=True):
        model(ids)

A hook returning a tensor replaces the tap's value (write-intervention); returning None leaves
it. Glob patterns match full site names (see `sites.py`); a pattern matching nothing is an error
naming it, so typos never silently record nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from workbench.instrument.tap import Tap
from workbench.model.moe import Llama4TextMoe, MoEIntervention

HookFn = Callable[[torch.Tensor, str], Any]


def taps(model: torch.nn.Module) -> dict[str, Tap]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Tap)}


def match(model: torch.nn.Module, pattern: str, all_taps: dict[str, Tap] | None = None) -> list[str]:
    """Site names matching the glob `pattern`; `all_taps` = `taps(model)` when the caller has it already
    (walking the module tree once per pattern cost ~8 ms per recorded document on a 4-layer model)."""
    all_taps = taps(model) if all_taps is None else all_taps
    names = [n for n in all_taps if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        close = [n for n in all_taps if pattern.split(".")[-1] in n][:3]
        raise KeyError(f"tap pattern {pattern!r} matches no site" + (f"; similar sites: {close}" if close else ""))
    return names


@contextmanager
def hooks(model: torch.nn.Module, fns: dict[str, HookFn]) -> Iterator[None]:
    """Attach `fn(value, site_name)` to every tap matching each glob; removed on exit, even on error."""
    all_taps = taps(model)
    handles = []
    try:
        for pattern, fn in fns.items():
            for name in match(model, pattern, all_taps):
                def hook(_mod, _inp, out, fn=fn, name=name):
                    res = fn(out, name)
                    return out if res is None else res
                handles.append(all_taps[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_cache(model, input_ids, names: str | list[str] = "*", **forward_kwargs):
    """Forward pass that also returns {site name: value} for every matching tap."""
    patterns = [names] if isinstance(names, str) else list(names)
    cache: dict[str, torch.Tensor] = {}

    def keep(value, site):
        cache[site] = value

    with hooks(model, {p: keep for p in patterns}):
        out = model(input_ids, **forward_kwargs)
    return out, cache


def ablate(kind: str = "zero", mean_over: tuple[int, ...] = (0,)) -> HookFn:
    """A write-hook: 'zero' ablation or 'mean' ablation over `mean_over` axes."""
    if kind not in ("zero", "mean"):
        raise ValueError(f"ablation kind must be 'zero' or 'mean', got {kind!r}")

    def fn(value, _site):
        if kind == "zero":
            return torch.zeros_like(value)
        return value.float().mean(dim=mean_over, keepdim=True).expand_as(value).to(value.dtype)
    return fn


def replace(new: torch.Tensor) -> HookFn:
    """A write-hook replacing the value with `new` (shapes must match)."""
    def fn(value, site):
        if tuple(new.shape) != tuple(value.shape):
            raise ValueError(f"replacement for {site} has shape {tuple(new.shape)}, expected {tuple(value.shape)}")
        return new.to(value.dtype)
    return fn


@contextmanager
def intervene(model, *, temperature_tuning: bool | None = None, floor_scale: float | None = None,
              attn_scale: float | None = None, chunk_size: int | None | str = "keep",
              nope_interval: int | None = None, top_k: int | None = None,
              mask_experts: dict[int, list[int]] | None = None, force_experts: dict[int, list[int]] | None = None,
              drop_shared: bool | list[int] = False, drop_routed: bool | list[int] = False) -> Iterator[None]:
    """Temporarily change how the model runs; everything is restored on exit.

    temperature_tuning/floor_scale/attn_scale: NoPE query temperature (spec §2.5).
    chunk_size: attention chunk for RoPE layers (None = global causal everywhere).
    nope_interval: every n-th layer becomes NoPE/global (HF `no_rope_layer_interval` semantics).
    top_k, mask_experts {layer: [ids]}, force_experts {layer: [ids]}, drop_shared, drop_routed:
    routing edits on MoE layers (layer indices are decoder-layer indices)."""
    layers = model.model.layers
    saved = []

    def setattr_saved(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def layer_set(spec) -> set[int]:
        if spec is True:
            return {i for i, layer in enumerate(layers) if layer.is_moe}
        return set(spec or [])

    moe_idx = {i for i, layer in enumerate(layers) if layer.is_moe}
    for d in (mask_experts or {}, force_experts or {}):
        bad = sorted(set(d) - moe_idx)
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers (MoE layers: {sorted(moe_idx)})")
    if chunk_size not in ("keep", None) and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if nope_interval is not None and (not isinstance(nope_interval, int) or nope_interval <= 0):
        raise ValueError(f"nope_interval must be a positive int, got {nope_interval!r}")
    try:
        cfg = model.config
        for i, layer in enumerate(layers):
            att = layer.self_attn
            use_rope = att.use_rope if nope_interval is None else (i + 1) % nope_interval != 0
            if nope_interval is not None:
                setattr_saved(att, "use_rope", use_rope)
                setattr_saved(att, "use_qk_norm", cfg.use_qk_norm and use_rope)
            tt = cfg.attn_temperature_tuning if temperature_tuning is None else temperature_tuning
            setattr_saved(att, "temperature_tuning", bool(tt) and not use_rope)
            if floor_scale is not None:
                setattr_saved(att, "floor_scale", floor_scale)
            if attn_scale is not None:
                setattr_saved(att, "attn_scale", attn_scale)
            base_chunk = cfg.attention_chunk_size if chunk_size == "keep" else chunk_size
            setattr_saved(att, "chunk", base_chunk if use_rope else None)
            if layer.is_moe:
                ff: Llama4TextMoe = layer.feed_forward
                iv = MoEIntervention(
                    mask=tuple((mask_experts or {}).get(i, ())), force=tuple((force_experts or {}).get(i, ())),
                    top_k=top_k, drop_shared=i in layer_set(drop_shared), drop_routed=i in layer_set(drop_routed))
                setattr_saved(ff, "intervention", iv)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)

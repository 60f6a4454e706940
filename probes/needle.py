"""Needle in a haystack: does the model retrieve a key–value fact planted at depth d of a context
of length L — with NoPE temperature tuning on and off? (science.md §2.4, §6)

    grid = needle_grid(model, lengths=[256, 1024], depths=[0.1, 0.5, 0.9])
    save_grid(grid, "runs/needle.zarr");  needle_figure(grid)

A haystack is filler text with one fact "The secret code for <key> is <value>." inserted at
relative depth d (by token count), followed by the question "The secret code for <key> is".
Retrieval is measured two ways: the summed log-probability of the value tokens (teacher-forced),
and greedy exact match of the value. The prefix runs in segments on the chunk-aware KV cache, so
memory stays bounded at any L (the same code runs a real checkpoint at its full context).
Drives the model, so it imports torch (unlike the store-only probes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A quiet river runs past the old mill, and the wind moves through the tall trees. ")


@dataclass
class Haystack:
    prefix: list[int]          # filler + fact + filler + question
    value: list[int]           # tokens the model should produce next
    fact_start: int            # token index where the fact begins
    length: int                # requested context length L
    depth: float


@dataclass
class NeedleGrid:
    lengths: list[int]
    depths: list[float]
    tuning: list[bool]
    logprob: np.ndarray        # (tuning, length, depth): Σ log p(value | prefix), nats
    exact: np.ndarray          # (tuning, length, depth): greedy continuation == value
    attrs: dict = field(default_factory=dict)


def make_haystack(tokenizer, length: int, depth: float, seed: int = 0, filler: str = FILLER) -> Haystack:
    """Token-level haystack of exactly `length` prefix tokens (± the fact's own tokenisation)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
    value = "".join(rng.choice("0123456789") for _ in range(5))
    fact = tokenizer.encode(f" The secret code for {key} is {value}. ", add_bos=False)
    question = tokenizer.encode(f" The secret code for {key} is", add_bos=False)
    value_ids = tokenizer.encode(f" {value}", add_bos=False)
    fill_unit = tokenizer.encode(filler, add_bos=False)
    n_fill = length - len(fact) - len(question) - 1
    if n_fill < 0:
        need = len(fact) + len(question) + 1
        raise ValueError(f"length {length} is too short for the fact and question ({need} tokens)")
    fill = (fill_unit * (n_fill // len(fill_unit) + 1))[:n_fill]
    at = int(round(depth * n_fill))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prefix = bos + fill[:at] + fact + fill[at:] + question
    return Haystack(prefix, value_ids, len(bos) + at, length, depth)


def score(model, hay: Haystack, segment: int = 4096) -> tuple[float, bool]:
    """(Σ log p(value), greedy exact match), running the prefix in segments on the KV cache."""
    import torch

    from workbench.model.kv_cache import KVCache

    dev = model.device
    ids = torch.tensor([hay.prefix + hay.value], device=dev)
    model.check_inputs(ids)
    n = len(hay.prefix)
    with torch.no_grad():
        cache = KVCache(model.config.num_hidden_layers)
        for a in range(0, n - 1, segment):
            model(ids[:, a:min(a + segment, n - 1)], cache=cache, last_only=True)
        # last prefix token + value tokens, teacher-forced: logits for every value position
        logits = model(ids[:, n - 1:], cache=cache).logits[0, :len(hay.value)].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(hay.value, device=dev)
    lp = float(logp.gather(-1, target[:, None]).sum())
    exact = bool((logits.argmax(-1) == target).all())     # greedy == teacher-forced argmax until a miss
    return lp, exact


def needle_grid(model, lengths: Sequence[int], depths: Sequence[float], tuning: Sequence[bool] = (True, False),
                seeds: Sequence[int] = (0,), segment: int = 4096, progress: bool = False) -> NeedleGrid:
    """Mean over `seeds` of the value log-prob and exact-match rate on an L × d grid, per tuning."""
    from workbench.instrument.hooks import intervene

    if model.tokenizer is None:
        raise ValueError("the needle probe builds text haystacks and needs a model with a tokenizer")
    lp = np.zeros((len(tuning), len(lengths), len(depths)))
    ex = np.zeros_like(lp)
    cells = [(t, i, j) for t in range(len(tuning)) for i in range(len(lengths)) for j in range(len(depths))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cells) * len(seeds), desc="needle")
    for t, i, j in cells:
        with intervene(model, temperature_tuning=tuning[t]):
            for s in seeds:
                v, e = score(model, make_haystack(model.tokenizer, lengths[i], depths[j], seed=s), segment)
                lp[t, i, j] += v / len(seeds)
                ex[t, i, j] += e / len(seeds)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    return NeedleGrid(list(lengths), list(depths), list(tuning), lp, ex,
                      {"seeds": list(seeds), "model_source": str(getattr(model, "source", "")),
                       "floor_scale": model.config.floor_scale, "attn_scale": model.config.attn_scale,
                       "attention_chunk_size": model.config.attention_chunk_size})


def save_grid(grid: NeedleGrid, path) -> None:
    """Write the grid as a Zarr v3 group with dimension names (xarray-readable)."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes={"probe": "needle", **grid.attrs})
    for name, data, dims in (("lengths", np.asarray(grid.lengths, np.int64), ("length",)),
                             ("depths", np.asarray(grid.depths, np.float64), ("depth",)),
                             ("tuning", np.asarray(grid.tuning, np.bool_), ("tuning",)),
                             ("logprob", grid.logprob.astype(np.float32), ("tuning", "length", "depth")),
                             ("exact", grid.exact.astype(np.float32), ("tuning", "length", "depth"))):
        g.create_array(name, data=data, dimension_names=dims)


def load_grid(path) -> NeedleGrid:
    import zarr

    g = zarr.open_group(str(path), mode="r", zarr_format=3)
    if g.attrs.get("probe") != "needle":
        raise ValueError(f"{path}: not a needle-probe store (attrs probe={g.attrs.get('probe')!r})")
    return NeedleGrid(g["lengths"][:].tolist(), g["depths"][:].tolist(), g["tuning"][:].tolist(),
                      g["logprob"][:], g["exact"][:], dict(g.attrs))


def needle_figure(grid: NeedleGrid, metric: str = "logprob") -> go.Figure:
    """Heatmaps (length × depth), one panel per tuning setting."""
    from plotly.subplots import make_subplots

    data = {"logprob": grid.logprob, "exact": grid.exact}[metric]
    fig = make_subplots(rows=1, cols=len(grid.tuning), shared_yaxes=True,
                        subplot_titles=[f"temperature tuning {'on' if t else 'off'}" for t in grid.tuning])
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    for c, _t in enumerate(grid.tuning):
        fig.add_trace(go.Heatmap(z=data[c], x=[f"{d:.0%}" for d in grid.depths], y=[str(n) for n in grid.lengths],
                                 zmin=lo, zmax=hi, colorscale="Viridis", showscale=c == 0,
                                 colorbar={"title": "Σ log p (nats)" if metric == "logprob" else "exact match"},
                                 hovertemplate="L=%{y}<br>depth=%{x}<br>%{z:.3f}<extra></extra>"), row=1, col=c + 1)
    fig.update_xaxes(title_text="needle depth")
    fig.update_yaxes(title_text="context length (tokens)", col=1)
    fig.update_layout(title=f"Needle in a haystack — {metric}", height=380)
    return fig

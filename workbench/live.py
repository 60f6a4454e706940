"""Generation that records as it goes: routing and attention statistics of the prompt *and* of
every generated token, written to a run as one document.

    rec = generate_recorded(model, ids, 32, probes=("router", "entropy"), on_token=print)
    rec.arrays == run_document(model, rec.tokens, probes)         # same arrays, same shapes
    append_generation(model, rec, "runs/gen.zarr", doc_id="g0")   # one document in a run
    reply, rec = chat_recorded(model, messages, out="runs/chat.zarr", doc_id="turn-0", on_text=print)
    chat_recorded(vlm, [{"role": "user", "content": "Question: …\n<|image|>\nAnswer:"}], images=[img],
                  prompt_format="plain")                          # a raw prompt: no chat template
    generate_recorded(vlm, prepared.input_ids, 8, pixel_values=prepared.pixel_values)   # images: prefill only

Design: the decode loop of `workbench.generation.generate` (batch 1) with the hooks of
`recording.ProbeCollector` installed for the whole generation and `attn_stats=True` on every
forward, so the prefill and each decode step append their tap values to the same lists that
`run_document` fills from one pass over the finished sequence.  Every generated token gets exactly
one forward: it yields the next token's logits and records the token's own routing and attention
(the last token's forward, whose logits go unused, is the one step more than `generate` does).
The KV cache is the chunk-aware one, so the recording stays exact across chunk boundaries and past
`floor_scale` (tests compare with `run_document` on the full sequence).

The store has no per-document metadata arrays, so where the prompt ends and how a document was
generated go into the run attribute `generations` ({doc_id: {n_prompt, stop_id, temperature, …}}).
A chat turn with images adds its patch map there (`image_layouts` as `attribution_store.layouts_attr`,
`image_token_positions`: the `<|patch|>` indices within the document), so an image token of a run can be
mapped back to its pixels without storing the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import numpy as np
import torch

from workbench.generation import _as_batch, _sample, check_sampling, decoder
from workbench.instrument.hooks import taps
from workbench.model.decode import DecodeStep
from workbench.model.kv_cache import KVCache
from workbench.recording import ProbeCollector, check_probes, layout_for, prefill, run_attrs

DEFAULT_PROBES = ("router", "entropy")


@dataclass
class RecordedGeneration:
    tokens: list[int]                       # prompt + generated ids (a stop token included when hit)
    n_prompt: int
    arrays: dict[str, np.ndarray] = field(repr=False)   # probe arrays over all `tokens`, as run_document's
    probes: tuple[str, ...] = DEFAULT_PROBES
    stop_id: int | None = None              # the stop token that ended generation, None at max_new_tokens
    settings: dict = field(default_factory=dict)   # temperature, top_p, seed, max_new_tokens, segment, …

    @property
    def new_ids(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    def generated(self, name: str) -> np.ndarray:
        """Array `name` restricted to the generated tokens (sliced on its `token` axis)."""
        from workbench.store.schema import SCHEMA, TOKEN

        a = self.arrays[name]
        axis = SCHEMA[name].dims.index(TOKEN)
        return np.take(a, np.arange(self.n_prompt, a.shape[axis]), axis=axis)


def _token_axis(site: str) -> int | None:
    """The token axis of a tap's value (`instrument.sites`: T, or N = B·T rows), None for an unknown site."""
    from workbench.instrument.sites import LAYER_SITES, MODEL_SITES, MOE_SITES

    for table in (LAYER_SITES, MOE_SITES, MODEL_SITES):
        for suffix, (dims, _) in table.items():
            if site == suffix or site.endswith("." + suffix):
                d = dims.split()
                return d.index("T") if "T" in d else d.index("N") if "N" in d else None
    return None


def _stop_ids(model, stop_ids) -> list[int]:
    """As `generate`: the given ids, else the tokenizer's stop tokens, else config.json's eos_token_id."""
    if stop_ids is not None:
        return [int(s) for s in stop_ids]
    if getattr(model, "tokenizer", None) is not None:
        return list(model.tokenizer.stop_ids)
    eos = model.config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


@torch.no_grad()
def generate_recorded(model, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 32, *,
                      probes: Sequence[str] = DEFAULT_PROBES, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int | None = None, stop_ids: Sequence[int] | None = None,
                      on_token: Callable[[int], None] | None = None, segment: int = 4096,
                      pixel_values: torch.Tensor | None = None) -> RecordedGeneration:
    """Generate up to `max_new_tokens` after `prompt` (one sequence) and record `probes` for every
    token, prompt and generated.  Sampling, stops and the token sequence are those of
    `generate(model, prompt, ...)`; `on_token(token_id)` streams each new token.  The prompt is
    prefilled in segments of `segment` tokens, as `run_document` does.

    `pixel_values` (a multimodal model; `workbench.image.prepare(...).pixel_values`): the images of
    the prompt's `<|patch|>` tokens, passed with the prefill only — decode steps run as text, as in
    HF.  The arrays then equal `run_document(model, tokens, probes, pixel_values=pixel_values)`."""
    if isinstance(probes, str) or not probes:
        raise ValueError(f"probes must be a non-empty sequence of probe names, got {probes!r}")
    probes = check_probes(probes)
    if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)   # finite, in range
    if not isinstance(segment, int) or segment <= 0:
        raise ValueError(f"segment must be a positive number of tokens, got {segment!r}")
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], (Integral, str)):
        raise ValueError("generate_recorded takes one prompt (a list of token ids or a string), not a batch")
    ids = _as_batch(model, prompt)                                           # (1, T)
    if ids.shape[0] != 1:
        raise ValueError(f"generate_recorded takes one prompt, got a batch of {ids.shape[0]}")
    model.check_inputs(ids)
    T = ids.shape[1]
    if T + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    stops = set(_stop_ids(model, stop_ids))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache.for_generation(model.config, T + max_new_tokens)              # written in place
    col = ProbeCollector(model, probes)
    new: list[int] = []
    step = DecodeStep.for_model(model) if max_new_tokens else None
    fns = col.fns                               # {site: fn(value, site)}, the collector's hook functions
    with ExitStack() as collecting:
        collecting.enter_context(col.hooks())
        out = prefill(model, ids, cache, segment, pixel_values, attn_stats=col.attn_stats, last_only=True)
        logits = out.logits[:, -1]
        axes = {site: _token_axis(site) for site in fns}
        batched = step is not None and None not in axes.values()
        if batched:
            # per-step batching of the collector's tap values: the decode steps append each value to a list
            # (no hook machinery, no op) and the collector gets one tensor per tap at the end, as if from one
            # forward over the generated tokens. Users' hooks on the same taps still fire at every step,
            # first, as hooks registered before the collector's would
            modules = taps(model)
            held: dict[str, list] = {site: [] for site in fns}
            sinks = {modules[site]: (lambda v, _site, keep=held[site].append: keep(v), site) for site in fns}
            collecting.close()

            def forward(nxt, cache, pos, stats):
                return step(nxt, cache, pos, stats, sinks)
        else:
            forward = decoder(model) if max_new_tokens else None
        for i in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, gen)
            tok = int(nxt[0])
            new.append(tok)
            if on_token is not None:
                on_token(tok)
            # the token's own forward: records its probes and gives the next logits
            logits = forward(nxt, cache, T + i, col.attn_stats)
            if tok in stops:
                break
    if batched:
        for site, values in held.items():
            if values:
                fns[site](torch.cat(values, dim=axes[site]), site)
    hit = new[-1] if new and new[-1] in stops else None
    settings = dict(temperature=float(temperature), top_p=float(top_p), seed=seed,
                    max_new_tokens=int(max_new_tokens), segment=segment)
    if pixel_values is not None:
        settings["image_tiles"] = int(pixel_values.shape[0])      # the run holds tokens, not pixels
    return RecordedGeneration(ids[0].tolist() + new, T, col.arrays(), probes, hit, settings)


def append_generation(model, rec: RecordedGeneration, out: str | Path, *, doc_id: str | int | None = None,
                      domain: str = "generated", model_source: str | None = None, finish: bool = True) -> int:
    """Write `rec` as one document into the run at `out` (created when missing, else appended to; the
    run must come from the same model config and probes).  Returns the document's index.  The run's
    attributes are those `record()` writes, so the run equals a `record()` of the same tokens."""
    from workbench.store import RunWriter

    out = Path(out)
    attrs = run_attrs(model, rec.probes, rec.settings.get("segment", 4096), model_source)
    _check_run(model, out)
    writer = RunWriter.create(out, attrs=attrs, layout=layout_for(model, rec.probes), exist_ok=True)
    try:
        index = writer.append({"tokens": np.asarray(rec.tokens, dtype=np.int32), "doc_id": doc_id,
                               "domain": domain or "", **rec.arrays})
        writer.flush()
        if finish:
            writer.finish()
    finally:
        writer.close()
    doc_key = str(index if doc_id is None else doc_id)
    _note_generation(out, doc_key, dict(n_prompt=rec.n_prompt, stop_id=rec.stop_id, **rec.settings))
    return index


def _check_run(model, out: Path) -> None:
    """A run at `out`, if there is one, must come from this model's config (the writer would refuse too,
    but only after the generation ran, and naming hashes rather than the problem)."""
    from workbench.store import config_hash, open_run

    if out.exists():
        have, mine = open_run(out).attrs.get("config_hash"), config_hash(model.config.to_hf())
        if have != mine:
            raise ValueError(f"run {out} was recorded with a different model config (config_hash {have!r}, "
                             f"this model {mine!r}); write to a new run")


def _note_generation(out: Path, doc_id: str, info: dict) -> None:
    """Add `info` under attrs['generations'][doc_id].  After the writer has closed: a writer keeps the
    attributes it opened with and rewrites them on every commit, so a note made while one is open
    would be lost at its next commit."""
    import zarr

    group = zarr.open_group(out, mode="r+", zarr_format=3, use_consolidated=False)
    notes = dict(group.attrs.get("generations") or {})
    notes[doc_id] = info
    group.update_attributes({"generations": notes})


def chat_recorded(model, messages: Sequence[dict], max_new_tokens: int = 256, *, out: str | Path | None = None,
                  doc_id: str | int | None = None, domain: str = "chat", probes: Sequence[str] = DEFAULT_PROBES,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  stop_ids: Sequence[int] | None = None, on_text: Callable[[str], None] | None = None,
                  model_source: str | None = None, tools: list[dict] | None = None, images: Sequence | None = None,
                  prompt_format: str = "chat", **render_kwargs):
    """One chat turn (as `workbench.chat.chat_generate`: render, generate, stop at end-of-turn tokens,
    stream text pieces to `on_text`; images as `workbench.chat.prepare_chat`, their pixel values with
    the prefill) recorded with `probes`; written as one document (prompt + reply) to the run at `out`
    when given.  `prompt_format="plain"` prompts with the last message alone, no chat template (a model
    trained on raw prompts, e.g. tiny-vlm); the recording is the same, and the run's `generations` note
    says which format the turn used.  Returns (ChatReply, RecordedGeneration)."""
    from workbench.chat import TextStream, prepare_chat

    c = prepare_chat(model, messages, images=images, stop_ids=stop_ids, tools=tools, prompt_format=prompt_format,
                     **render_kwargs)
    if out is not None:
        _check_run(model, Path(out))
    stream = TextStream(model.tokenizer, c.stops, on_text)
    rec = generate_recorded(model, c.ids, max_new_tokens, probes=probes, temperature=temperature, top_p=top_p,
                            seed=seed, stop_ids=c.stops, on_token=stream, pixel_values=c.pixel_values)
    rec.settings["prompt_format"] = prompt_format
    if c.prepared is not None and c.prepared.layouts:     # the run holds tokens, not pixels: keep the patch map
        from workbench.attribution_store import layouts_attr
        rec.settings["image_layouts"] = layouts_attr(c.prepared.layouts)
        rec.settings["image_token_positions"] = [int(p) for p in c.prepared.patch_map.position]
    reply = stream.close(c.ids)
    if out is not None:
        append_generation(model, rec, out, doc_id=doc_id, domain=domain, model_source=model_source)
    return reply, rec

"""Token generation with the chunk-aware KV cache: greedy or sampled (temperature, top-p, seed),
stop tokens, a streaming callback. Returns prompt + new ids, like HF `generate`.

Decoding is exact across chunk boundaries and past `floor_scale` (tests compare token-for-token
with HF `generate(do_sample=False)`).

Prompts of unequal length are generated *by length group*: rows with the same prompt length are
prefilled and decoded together as one batch, one group after another. There is no left padding:
the attention kernels have no padding mask and the KV cache one position counter per batch, and
Llama 4's chunked attention and NoPE temperature depend on each token's absolute position
(spec llama4.md §2.5–2.6), so a padded row would need per-row positions through RoPE, temperature,
chunking and the cache. Grouping is exact by construction — each row gets the tokens it would get
alone — and batched within a group; the cost is one decode loop per distinct prompt length.

Seeded sampling is per row: with `seed=s`, row b draws from its own generator seeded `s + b`, so a
row's tokens do not depend on the other rows, the grouping, or the batch size, and row b equals
`generate(prompt_b, seed=s + b)`. A single prompt (row 0) draws from `s`, as a plain generator
would. `seed=[s0, s1, …]` gives each row its seed explicitly (`[s] * B` samples every row as it
would be alone with seed s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import numpy as np
import torch

from workbench.model.decode import DecodeStep
from workbench.model.kv_cache import KVCache


def _check_ids(row, b: int) -> list[int]:
    """One prompt row as a list of ints; bools, floats and other objects are refused by position."""
    if isinstance(row, (str, bytes, dict)) or not isinstance(row, Sequence) and not isinstance(row, np.ndarray):
        raise ValueError(f"prompt row {b}: expected a string or a sequence of token ids, got {type(row).__name__}")
    if isinstance(row, np.ndarray):
        if row.ndim != 1 or row.dtype.kind not in "iu":
            raise ValueError(f"prompt row {b}: a token-id array must be 1-D of integers, got dtype {row.dtype} "
                             f"shape {row.shape}")
        return row.tolist()
    for p, t in enumerate(row):
        if isinstance(t, bool) or not isinstance(t, Integral):
            raise ValueError(f"prompt row {b}: token ids must be integers; position {p} holds "
                             f"{type(t).__name__} {t!r:.40}")
        if not 0 <= t < 2 ** 63:
            raise ValueError(f"prompt row {b}: token id {t} is out of range (position {p})")
    return [int(t) for t in row]


def _as_rows(model, prompt) -> list[torch.Tensor]:
    """str | list[str] | list[int] | list[list[int]] | (T,) or (B, T) tensor or numpy array → B rows of
    (T_b,) ids. Anything else (a dict, a set, bools, floats) is refused naming the row and position."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, np.ndarray):
        if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
            raise ValueError(f"prompt: a token-id array must be 1-D or 2-D of integers, got dtype {prompt.dtype} "
                             f"shape {prompt.shape}")
        prompt = torch.from_numpy(prompt.astype(np.int64))
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"prompt: a token-id tensor must hold integers, got dtype {prompt.dtype}")
        ids = prompt if prompt.dim() == 2 else prompt[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"empty or ill-shaped prompt {tuple(ids.shape)}: give at least one token per row")
        return list(ids.to(model.device))
    if isinstance(prompt, (bytes, dict, set, frozenset)) or not isinstance(prompt, Sequence):
        raise ValueError(f"prompt must be a string, token ids, a list of those, or a tensor / numpy array of "
                         f"ids; got {type(prompt).__name__}")
    rows = list(prompt)
    if rows and all(isinstance(r, str) for r in rows):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        rows = [model.tokenizer.encode(r) for r in rows]
    elif rows and (isinstance(rows[0], (Integral, float)) or isinstance(rows[0], bool)):
        rows = [rows]
    elif any(isinstance(r, str) for r in rows):
        raise ValueError("a batch mixes strings and token lists: pass all strings or all token ids")
    rows = [_check_ids(r, b) for b, r in enumerate(rows)] or [[]]
    empty = [b for b, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"empty prompt in row {empty[0]} of {len(rows)}: give at least one token per row")
    return [torch.tensor(r, dtype=torch.long, device=model.device) for r in rows]


def _as_batch(model, prompt) -> torch.Tensor:
    """As `_as_rows`, for callers that need one (B, T) block (rows of equal length)."""
    rows = _as_rows(model, prompt)
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(f"prompts in one batch must have equal length (got lengths {lengths}); "
                         "generate them separately")
    return torch.stack(rows)


def _sample(logits_BV: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    if temperature <= 0:
        return logits_BV.argmax(-1)
    if temperature < 1e-4:
        # logits / 1e-45 overflows float32 (inf - inf = NaN in the softmax): shift by the max first and
        # divide in float64, so a tiny temperature tends to greedy instead of failing.
        z = logits_BV.double()
        probs = torch.softmax((z - z.amax(-1, keepdim=True)) / temperature, dim=-1).float()
    else:
        probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[..., 0] = True           # always keep the top token (top_p=1e-300 rounds to 0 in float32)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits_BV.device)


def _sample_rows(logits_BV, temperature, top_p, gens: list[torch.Generator] | None):
    """One draw per row, row b from `gens[b]` (per-row seeds), or the whole batch from the global RNG."""
    if temperature <= 0 or gens is None:
        return _sample(logits_BV, temperature, top_p, None)
    return torch.cat([_sample(logits_BV[b:b + 1], temperature, top_p, g) for b, g in enumerate(gens)])


def _generators(seed, B: int) -> list[torch.Generator] | None:
    if seed is None:
        return None
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        seeds = [int(seed) + b for b in range(B)]
    else:
        seeds = list(seed) if isinstance(seed, Sequence) and not isinstance(seed, str) else [None]
        if len(seeds) != B or not all(isinstance(s, Integral) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seed must be an int or one int per prompt ({B}), got {seed!r:.80}")
    bad = [s for s in seeds if not -2 ** 63 <= s < 2 ** 64]
    if bad:
        raise ValueError(f"seed {bad[0]} is out of range: torch generators take seeds in [-2**63, 2**64)")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def decoder(model) -> Callable[[torch.Tensor, KVCache, int], torch.Tensor]:
    """`f(ids_B, cache, pos) -> logits (B, V)`: one decode step, the lean `DecodeStep` where the model
    allows it (bitwise the module forward's result), else the module forward itself."""
    step = DecodeStep.for_model(model)
    if step is not None:
        return step

    def forward(ids_B, cache, pos, stats=False):
        return model(ids_B[:, None], start=pos, cache=cache, attn_stats=stats, last_only=True).logits[:, -1]
    return forward


def _decode(model, ids_GT, max_new_tokens, temperature, top_p, gens, stops, on_token, rows, prefill_chunk):
    """Prefill + decode one group of equal-length rows; `rows[g]` is row g's index in the caller's
    batch (for `on_token`). Returns (G, T + steps) ids and (G,) new-token counts."""
    G, T = ids_GT.shape
    cache = KVCache.for_generation(model.config, T + max_new_tokens)              # written in place
    step = prefill_chunk or T
    for a in range(0, T, step):                   # optional chunked prefill keeps activations bounded
        out = model(ids_GT[:, a:a + step], cache=cache, last_only=True)
    logits = out.logits[:, -1]
    forward = decoder(model) if max_new_tokens > 1 else None
    if G == 1:        # one row: the token and the stop check as Python ints, no tensor ops per step
        stop_set, new = set(stops.tolist()), []
        for i in range(max_new_tokens):
            nxt = _sample_rows(logits, temperature, top_p, gens)
            tok = int(nxt[0])
            new.append(tok)
            if on_token is not None:
                on_token(rows[0], tok)
            if tok in stop_set or i == max_new_tokens - 1:
                break
            logits = forward(nxt, cache, T + i)
        ids = torch.cat([ids_GT, torch.tensor([new], dtype=ids_GT.dtype, device=ids_GT.device)], dim=1)
        return ids, torch.full((1,), len(new), dtype=torch.long, device=ids_GT.device)
    done = torch.zeros(G, dtype=torch.bool, device=ids_GT.device)
    n_new = torch.zeros_like(done, dtype=torch.long)
    pieces = [ids_GT]
    for i in range(max_new_tokens):
        nxt = _sample_rows(logits, temperature, top_p, gens)
        nxt = torch.where(done, pieces[-1][:, -1] if len(pieces) > 1 else nxt, nxt)
        pieces.append(nxt[:, None])
        n_new += ~done
        if on_token is not None:
            for g in range(nxt.shape[0]):
                if not done[g]:
                    on_token(rows[g], int(nxt[g]))
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = forward(nxt, cache, T + i)
    return torch.cat(pieces, dim=1), n_new


def check_sampling(*, max_new_tokens=0, temperature=0.0, top_p=1.0) -> None:
    """The types and ranges of generation settings, each error naming its argument."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
        raise ValueError(f"max_new_tokens must be an integer, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")


def _refuse_image_placeholders(model, rows) -> None:
    """A prompt with `<|image|>` / `<|patch|>` tokens and no pixel values would answer about an image
    that is not there; images go through `workbench.chat` / `prepare_chat`, which supply them."""
    if getattr(model, "_pixel_values", None) is not None:       # chat._PrefillImages: images given
        return
    tok = getattr(model, "tokenizer", None)
    ids = {tok.token_to_id(t) for t in ("<|image|>", "<|patch|>")} - {None} if tok is not None else set()
    index = getattr(getattr(model, "config", None), "image_token_index", None)
    if isinstance(index, int):
        ids.add(index)
    if ids and any(bool(torch.isin(r, torch.tensor(sorted(ids), device=r.device)).any()) for r in rows):
        raise ValueError("the prompt contains an image placeholder (<|image|> or <|patch|>) but no image was "
                         "given; pass images through workbench.chat(..., images=[...]) / prepare_chat, or "
                         "remove the placeholder")


@torch.no_grad()
def generate(model, prompt: str | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 32,
             *, temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
             stop_ids: Sequence[int] | None = None, on_token: Callable[[int, int], None] | None = None,
             prefill_chunk: int | None = None, pad_token_id: int | None = None,
             return_lengths: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generate up to `max_new_tokens` for each prompt. `temperature=0` is greedy; `seed` (an int, or
    one per row) makes sampling reproducible per row (see the module docstring).
    `on_token(batch_index, token_id)` is called for every new token (streaming), in order per row; rows
    of one prompt length interleave step by step, and length groups run one after another (in order
    of first appearance). A row stops at its first stop token, after which `on_token` no longer fires
    for it; `stop_ids=None` uses the tokenizer's stop tokens (or config `eos_token_id`), `[]` none.

    Returns ids on the model's device, row b = prompt_b + its new tokens (up to and including its
    stop token), the same tokens `generate` gives for prompt_b alone:
    * prompts of equal length: one (B, T + n) block, n the steps the batch ran; a row that stopped
      early repeats its stop token as filler (unchanged from before unequal batches were supported);
    * prompts of unequal length: (B, max_b len_b), each row right-padded with `pad_token_id`
      (default config `pad_token_id`).
    With `return_lengths=True` returns `(ids, lengths)`, lengths (B,) = prompt_b + new tokens of row b:
    `ids[b, :lengths[b]]` is row b's sequence whatever the filler."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if prefill_chunk is not None and (not isinstance(prefill_chunk, Integral) or prefill_chunk <= 0):
        raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
    rows = _as_rows(model, prompt)
    _refuse_image_placeholders(model, rows)
    B, device = len(rows), rows[0].device
    groups: dict[int, list[int]] = {}                   # prompt length → row indices, in first-seen order
    for b, r in enumerate(rows):
        groups.setdefault(len(r), []).append(b)
    blocks = {T: torch.stack([rows[b] for b in idx]) for T, idx in groups.items()}
    for block in blocks.values():                       # validate every row before any generation
        model.check_inputs(block)
    T_max = max(groups)
    if T_max + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T_max}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if len(groups) > 1:
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError(f"prompts of unequal length (lengths {sorted(groups)}) come back right-padded, "
                             "and this config has no pad_token_id: pass pad_token_id=")
    gens = _generators(seed, B)
    if stop_ids is None:            # the tokenizer's stop tokens, else config.json's eos_token_id (as HF does)
        eos = model.config.eos_token_id
        stop_ids = (model.tokenizer.stop_ids if model.tokenizer is not None
                    else [] if eos is None else eos if isinstance(eos, list) else [eos])
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)

    results = {}
    for T, idx in groups.items():
        results[T] = _decode(model, blocks[T], max_new_tokens, temperature, top_p,
                             None if gens is None else [gens[b] for b in idx], stops, on_token, idx,
                             prefill_chunk)
    if len(groups) == 1:
        ids, n_new = results[T_max]
        return (ids, T_max + n_new) if return_lengths else ids
    lengths = torch.empty(B, dtype=torch.long, device=device)
    for T, idx in groups.items():
        lengths[idx] = T + results[T][1]
    ids = torch.full((B, int(lengths.max())), pad_token_id, dtype=torch.long, device=device)
    for T, idx in groups.items():
        for g, b in enumerate(idx):
            ids[b, :lengths[b]] = results[T][0][g, :lengths[b]]
    return (ids, lengths) if return_lengths else ids

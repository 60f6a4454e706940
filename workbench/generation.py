"""Token generation with the chunk-aware KV cache: greedy or sampled (temperature, top-p, seed),
stop tokens, a streaming callback. Returns prompt + new ids, like HF `generate`.

Decoding is exact across chunk boundaries and past `floor_scale` (tests compare token-for-token
with HF `generate(do_sample=False)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral

import torch

from workbench.model.kv_cache import KVCache


def _as_batch(model, prompt) -> torch.Tensor:
    """str | list[str] | list[int] | list[list[int]] | (T,) or (B, T) tensor → (B, T) ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
    else:
        rows = list(prompt)
        if rows and all(isinstance(r, str) for r in rows):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids")
            rows = [model.tokenizer.encode(r) for r in rows]
        elif rows and isinstance(rows[0], Integral):
            rows = [rows]
        rows = [list(r) for r in rows]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"prompts in one batch must have equal length (got lengths {lengths}); "
                             "generate them separately")
        ids = torch.tensor(rows if rows and rows[0] else [[]], dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"empty or ill-shaped prompt {tuple(ids.shape)}: give at least one token per row")
    return ids.to(model.device)


def _sample(logits_BV: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p          # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits_BV.device)


@torch.no_grad()
def generate(model, prompt: str | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 32,
             *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Sequence[int] | None = None, on_token: Callable[[int, int], None] | None = None,
             prefill_chunk: int | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens`. `temperature=0` is greedy. `on_token(batch_index, token_id)`
    is called for every new token (streaming), in order. A row stops at its first stop token (then
    repeats it as filler, and `on_token` no longer fires for it); the batch stops when all rows have.
    `stop_ids=None` uses the tokenizer's stop tokens (or config `eos_token_id`), `[]` none.
    Returns (B, T_prompt + new) ids on the model's device."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
    ids = _as_batch(model, prompt)
    model.check_inputs(ids)
    if ids.shape[1] + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if stop_ids is None:            # the tokenizer's stop tokens, else config.json's eos_token_id (as HF does)
        eos = model.config.eos_token_id
        stop_ids = (model.tokenizer.stop_ids if model.tokenizer is not None
                    else [] if eos is None else eos if isinstance(eos, list) else [eos])
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config.num_hidden_layers)
    step = prefill_chunk or ids.shape[1]
    for a in range(0, ids.shape[1], step):     # optional chunked prefill keeps activations bounded
        out = model(ids[:, a:a + step], cache=cache, last_only=True)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    pieces = [ids]
    for _ in range(max_new_tokens):
        nxt = _sample(out.logits[:, -1], temperature, top_p, gen)
        nxt = torch.where(done, pieces[-1][:, -1] if len(pieces) > 1 else nxt, nxt)
        pieces.append(nxt[:, None])
        if on_token is not None:
            for b in range(nxt.shape[0]):
                if not done[b]:
                    on_token(b, int(nxt[b]))
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        out = model(nxt[:, None], cache=cache, last_only=True)
    return torch.cat(pieces, dim=1)

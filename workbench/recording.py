"""Record probes from forward passes into a Zarr run store (docs/store.md).

    record(model, ["text", [1, 2, 3], {"text": ..., "domain": "arxiv", "id": "a1"}], "run.zarr",
           probes=("router", "entropy"))

Every document runs on its own (batch 1), so no document's results depend on another's; long
documents run in segments of `segment` tokens on top of the chunk-aware KV cache, so activation
memory is bounded and the cache grows only on NoPE layers (linear in T). Probe values come from
the taps (the same sites users hook), attention statistics from the fused streaming kernel.

Resumable: documents already committed (by doc id) are skipped; an interrupted run reopens and
continues, never duplicating or corrupting what was written. `complete` is set at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from workbench.instrument.hooks import hooks
from workbench.model.kv_cache import KVCache
from workbench.store import RunWriter

PROBES = ("router", "router_logits", "entropy", "norms", "sink")


def _normalise_inputs(model, inputs) -> list[dict]:
    docs = []
    for i, item in enumerate(inputs):
        if isinstance(item, dict):
            if "tokens" in item:
                tokens = item["tokens"]
            elif "text" in item:
                if not isinstance(item["text"], str):
                    raise ValueError(f"input {i}: 'text' must be a string, got {type(item['text']).__name__}")
                tokens = _encode(model, item["text"], f"input {i}")
            else:
                raise ValueError(f"input {i}: a dict needs a 'text' or 'tokens' field, got keys {sorted(item)}")
            doc_id, domain = item.get("id", i), item.get("domain", "")
        elif isinstance(item, str):
            tokens, doc_id, domain = _encode(model, item, f"input {i}"), i, ""
        else:
            tokens, doc_id, domain = item, i, ""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        if not isinstance(tokens, (list, tuple)) or any(not isinstance(t, int) or isinstance(t, bool) for t in tokens):
            raise ValueError(f"input {i}: 'tokens' must be a list of integer token ids")
        tokens = list(tokens)
        if not tokens:
            raise ValueError(f"input {i} (id {doc_id!r}) is empty")
        docs.append({"tokens": tokens, "doc_id": str(doc_id), "domain": str(domain or "")})
    return docs


def _encode(model, text: str, where: str) -> list[int]:
    if model.tokenizer is None:
        raise ValueError(f"{where}: the model has no tokenizer; pass token ids")
    return model.tokenizer.encode(text)


def read_inputs(path: str | Path) -> list:
    """A .txt file (one document per non-empty line, or the whole file with `--whole`) or .jsonl
    with `text` or `tokens`, optional `id` and `domain` per line."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not ({"text", "tokens"} & set(obj)):
                raise ValueError(f"{path}:{n}: each line must be an object with 'text' or 'tokens'")
            out.append(obj)
    else:
        out = [line for line in raw.splitlines() if line.strip()]
    if not out:
        raise ValueError(f"{path}: no documents found (empty input)")
    return out


def check_probes(probes: Sequence[str]) -> tuple[str, ...]:
    """`probes` as a tuple, or ValueError naming the unknown ones."""
    if isinstance(probes, str):
        raise ValueError(f"probes must be a sequence of probe names, e.g. ({probes!r},), not a string")
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; available: {list(PROBES)}")
    return tuple(probes)


def layout_for(model, probes: Sequence[str]) -> dict:
    check_probes(probes)
    cfg = model.config
    return dict(n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                moe_layer_index=cfg.moe_layer_index, top_k=cfg.num_experts_per_tok,
                n_experts=cfg.num_local_experts, **{p: p in probes for p in PROBES})


def run_attrs(model, probes: Sequence[str], segment: int = 4096, model_source: str | None = None) -> dict:
    """The provenance attributes of a run recorded from `model` (config, dtype, device, probes, …)."""
    return dict(model_source=model_source or str(getattr(model, "source", "")), config=model.config.to_hf(),
                dtype=str(model.dtype).replace("torch.", ""), device=str(model.device), probes=list(probes),
                probe_options={"segment": segment, "entropy_units": "nats"},
                layer_kinds=model.config.layer_kinds())


class ProbeCollector:
    """Collects the probe taps of one sequence (batch 1) over any number of forward passes on one KV
    cache — a prefill in segments, then decode steps — and assembles the store's arrays (token axis =
    all tokens seen, in order). `run_document` and `workbench.live` share it, so a recorded generation
    is built by exactly the code that records a document.

        col = ProbeCollector(model, probes)
        with col.hooks():
            model(ids, cache=cache, attn_stats=col.attn_stats, last_only=True)   # as often as needed
        arrays = col.arrays()
    """

    def __init__(self, model, probes: Sequence[str]):
        cfg = model.config
        self.attn_stats = bool({"entropy", "sink"} & set(probes))
        self._model, self._parts = model, {}
        fns = {}
        root = "language_model.model" if hasattr(model, "language_model") else "model"   # multimodal: text inside
        for j, i in enumerate(cfg.moe_layer_index):
            base = f"{root}.layers.{i}.feed_forward."
            if "router" in probes:
                fns[base + "hook_topk_ids"] = self._keep(("router/experts", j))
                fns[base + "hook_topk_gates"] = self._keep(("router/weights", j))
            if "router_logits" in probes:
                fns[base + "hook_router_logits"] = self._keep(("router/logits", j))
            if "norms" in probes:
                fns[base + "hook_shared_out"] = self._keep(("router/shared_norm", j))
                fns[base + "hook_routed_out"] = self._keep(("router/routed_norm", j))
        for i in range(cfg.num_hidden_layers):
            base = f"{root}.layers.{i}.self_attn."
            if "entropy" in probes:
                fns[base + "hook_entropy"] = self._keep(("attention/entropy", i))
                fns[base + "hook_entropy_no_temp"] = self._keep(("attention/entropy_no_temp", i))
                fns[base + "hook_n_keys"] = self._keep(("attention/n_keys", i))
            if "sink" in probes:
                fns[base + "hook_sink_mass"] = self._keep(("attention/sink_mass", i))
        self._fns = fns

    def _keep(self, key):
        reduce = key[0].endswith("_norm")       # keep only the per-token L2 norm, not the (N, D) output

        def fn(value, _site):
            self._parts.setdefault(key, []).append(value.detach().float().norm(dim=-1) if reduce else value.detach())
        return fn

    def hooks(self):
        """Context manager: the collecting hooks are installed inside it (and always removed after)."""
        return hooks(self._model, self._fns) if self._fns else nullcontext()

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything collected so far, shaped as the store expects (token axis = T)."""
        out = {}
        groups: dict[str, dict[int, torch.Tensor]] = {}
        for (name, idx), pieces in self._parts.items():
            if name in ("attention/n_keys",):
                t = torch.cat(pieces, dim=0)                               # (T,)
            elif name.startswith("attention/"):
                t = torch.cat([p[0] for p in pieces], dim=-1)              # (H, T)
            elif name.endswith("_norm"):
                t = torch.cat(pieces, dim=0)                               # (T,) norms, reduced in the hook
            else:
                t = torch.cat(pieces, dim=0)                               # (T, K) or (T, E)
            groups.setdefault(name, {})[idx] = t
        for name, per in groups.items():
            stacked = torch.stack([per[k] for k in sorted(per)])
            integer = name.endswith("experts") or name == "attention/n_keys"
            out[name] = (stacked if integer else stacked.float()).cpu().numpy()
        return out


def prefill_spans(model, ids: torch.Tensor, segment: int, pixel_values=None) -> list[tuple[int, int]]:
    """The [a, b) token spans of a segmented prefill.  With `pixel_values` (a multimodal model) the
    first span reaches past the last `<|patch|>` token: the forward scatters all image features into
    the tokens it is given, so they must all be in one call (later spans run as text)."""
    T = ids.shape[1]
    first = segment
    if pixel_values is not None:
        if not hasattr(model, "vision_model"):
            raise ValueError("pixel_values were given but this model has no vision tower (a text-only model)")
        patch = (ids[0] == model.config.image_token_index).nonzero()
        first = max(segment, int(patch[-1]) + 1) if len(patch) else segment
    return ([(0, min(first, T))] if T else []) + [(a, min(a + segment, T)) for a in range(first, T, segment)]


def prefill(model, ids: torch.Tensor, cache: KVCache, segment: int, pixel_values=None, **kw):
    """Run the prompt `ids` (1, T) through `model` in segments on `cache`; the pixel values go with the
    first segment only (`prefill_spans`).  Returns the last forward's output."""
    out = None
    for a, b in prefill_spans(model, ids, segment, pixel_values):
        extra = (pixel_values,) if pixel_values is not None and a == 0 else ()
        out = model(ids[:, a:b], *extra, cache=cache, **kw)
    return out


@torch.no_grad()
def run_document(model, tokens: Sequence[int], probes: Sequence[str], segment: int = 4096,
                 pixel_values: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Run one document and return its probe arrays, shaped as the store expects (token axis = T).
    `pixel_values` (multimodal model): the image features fill the document's `<|patch|>` tokens."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=model.device)
    model.check_inputs(ids)
    cache = KVCache(model.config.num_hidden_layers)
    col = ProbeCollector(model, probes)
    with col.hooks():
        prefill(model, ids, cache, segment, pixel_values, attn_stats=col.attn_stats, last_only=True)
    return col.arrays()


def record(model, inputs: Iterable, out: str | Path, probes: Sequence[str] = ("router", "entropy"), *,
           segment: int = 4096, progress: bool = True, model_source: str | None = None,
           finish: bool = True, flush_tokens: int | None = None) -> Path:
    """Record `probes` for every input document into the run at `out` (created, or appended to /
    resumed when it exists with the same model config). Returns the store path."""
    probes = tuple(probes)
    if not isinstance(segment, int) or segment <= 0:
        raise ValueError(f"segment must be a positive number of tokens, got {segment!r}")
    layout = layout_for(model, probes)
    docs = _normalise_inputs(model, inputs)
    seen = set()
    for d in docs:
        if d["doc_id"] in seen:
            raise ValueError(f"duplicate document id {d['doc_id']!r} in inputs")
        seen.add(d["doc_id"])
    attrs = run_attrs(model, probes, segment, model_source)
    writer = RunWriter.create(out, attrs=attrs, layout=layout, exist_ok=True,
                              **({"flush_tokens": flush_tokens} if flush_tokens else {}))
    todo = [d for d in docs if d["doc_id"] not in writer.done_ids]
    try:
        bar = _progress(todo, progress, sum(len(d["tokens"]) for d in todo))
        for d in todo:
            arrays = run_document(model, d["tokens"], probes, segment)
            writer.append({"tokens": np.asarray(d["tokens"], dtype=np.int32), "doc_id": d["doc_id"],
                           "domain": d["domain"], **arrays})
            if bar is not None:
                bar.update(len(d["tokens"]))
        writer.flush()
        if finish:
            writer.finish()
    finally:
        writer.close()
        if progress and todo:
            bar.close()
    return Path(out)


def _progress(todo, enabled: bool, total: int):
    if not enabled or not todo:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="tok", desc="record")

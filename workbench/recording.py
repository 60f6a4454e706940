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
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from workbench.instrument.hooks import hooks
from workbench.model.kv_cache import KVCache
from workbench.resume import plan_resume
from workbench.store import RunWriter
from workbench.store.background import BackgroundWriter

PROBES = ("router", "router_logits", "entropy", "norms", "sink")


DOC_FIELDS = ("text", "tokens", "id", "domain")
MAX_ID = 10 ** 18            # integer ids beyond this are refused (str() of a huge int is slow or fails)


def _as_documents(inputs) -> list:
    """`inputs` as a list of documents: one string, one dict or one flat sequence / 1-D array of token
    ids is a single document (as `generate` reads a prompt), not one document per character or id."""
    if isinstance(inputs, (str, bytes, dict)):
        return [inputs]
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        if inputs.ndim == 1:
            return [inputs]
        if inputs.ndim == 2:
            return list(inputs)
        raise ValueError(f"inputs: a token-id array must be 1-D (one document) or 2-D (one per row), "
                         f"got shape {tuple(inputs.shape)}")
    try:
        items = list(inputs)
    except TypeError:
        raise TypeError(f"inputs must be a string, a dict, token ids or a sequence of those, "
                        f"got {type(inputs).__name__}") from None
    if items and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
        return [items]
    return items


def check_token_ids(tokens, where: str, vocab_size: int | None = None) -> list[int]:
    """A list of ints from a list/tuple/1-D integer array/tensor; ValueError naming `where` otherwise."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"{where}: 'tokens' must be a 1-D integer array, got dtype {tokens.dtype} "
                             f"shape {tokens.shape}")
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)):
        raise ValueError(f"{where}: 'tokens' must be a list of integer token ids, got {type(tokens).__name__}")
    # Fast path (a 2,048-token document cost ~1.5 ms in the loop below): all plain ints, checked in numpy;
    # anything else, or any value out of range, takes the loop, which names the first bad position.
    if tokens and set(map(type, tokens)) == {int}:
        hi = min(vocab_size, 2 ** 31) if vocab_size is not None else 2 ** 31
        try:
            arr = np.fromiter(tokens, dtype=np.int64, count=len(tokens))
        except OverflowError:
            arr = None
        if arr is not None and int(arr.min()) >= 0 and int(arr.max()) < hi:
            return list(tokens)
    for p, t in enumerate(tokens):
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise ValueError(f"{where}: 'tokens' must be a list of integer token ids; position {p} holds "
                             f"{type(t).__name__} {t!r}")
        if t < 0 or (vocab_size is not None and t >= vocab_size) or t >= 2 ** 31:
            shown = t if abs(t) < 10 ** 30 else f"{str(t)[:12]}… ({len(str(t))} digits)"
            limit = f"vocab_size={vocab_size}" if vocab_size is not None else "int32"
            raise ValueError(f"{where}: token id {shown} is out of range for {limit} (position {p})")
    return [int(t) for t in tokens]


def check_document(item: dict, where: str) -> None:
    """The fields of one dict document (Python input or JSONL line): exactly one of text / tokens,
    a string text that is valid Unicode, an id that is a string or integer, a string domain."""
    if "text" in item and "tokens" in item:
        raise ValueError(f"{where}: has both 'text' and 'tokens'; give one")
    if "text" not in item and "tokens" not in item:
        raise ValueError(f"{where}: a document needs a 'text' or 'tokens' field, got keys {sorted(item)}")
    if "text" in item:
        text = item["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: 'text' holds an unpaired surrogate {text[e.start]!r} at character "
                             f"{e.start} (not valid Unicode)") from None
    if "id" in item:
        i = item["id"]
        if isinstance(i, bool) or not isinstance(i, (str, int, np.integer)):
            raise ValueError(f"{where}: 'id' must be a string or an integer, got {type(i).__name__} {i!r:.40}")
        if isinstance(i, str) and not i:
            raise ValueError(f"{where}: 'id' must not be empty")
        if not isinstance(i, str) and abs(int(i)) > MAX_ID:
            raise ValueError(f"{where}: integer 'id' is too large (more than {len(str(MAX_ID))} digits)")
    domain = item.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise ValueError(f"{where}: 'domain' must be a string, got {type(domain).__name__}")


def _normalise_inputs(model, inputs) -> list[dict]:
    docs = []
    vocab = getattr(model.config, "vocab_size", None)
    for i, item in enumerate(_as_documents(inputs)):
        where = f"input {i}"
        if isinstance(item, dict):
            check_document(item, where)
            if "tokens" in item:
                tokens = item["tokens"]
            else:
                tokens = _encode(model, item["text"], where)
            doc_id, domain = item.get("id", i), item.get("domain", "")
        elif isinstance(item, str):
            check_document({"text": item}, where)
            tokens, doc_id, domain = _encode(model, item, where), i, ""
        else:
            tokens, doc_id, domain = item, i, ""
        tokens = check_token_ids(tokens, f"{where} (id {doc_id!r})", vocab)
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
    with `text` or `tokens`, optional `id` and `domain` per line. Each JSONL line is checked here,
    so errors name the file and line."""
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
            except RecursionError:
                raise ValueError(f"{path}:{n}: JSON nested too deeply") from None
            except ValueError as e:            # e.g. an integer over Python's 4300-digit limit
                raise ValueError(f"{path}:{n}: unreadable JSON ({e})") from None
            if not isinstance(obj, dict) or not ({"text", "tokens"} & set(obj)):
                raise ValueError(f"{path}:{n}: each line must be an object with 'text' or 'tokens'")
            check_document(obj, f"{path}:{n}")
            if "tokens" in obj:
                check_token_ids(obj["tokens"], f"{path}:{n}")
            out.append(obj)
    else:
        out = [line for line in raw.splitlines() if line.strip()]
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                check_document({"text": line}, f"{path}:{n}")
    if not out:
        raise ValueError(f"{path}: no documents found (empty input)")
    return out


def check_probes(probes: Sequence[str]) -> tuple[str, ...]:
    """`probes` as a tuple, or ValueError naming the unknown ones."""
    if isinstance(probes, str):
        raise ValueError(f"probes must be a sequence of probe names, e.g. ({probes!r},), not a string")
    try:
        probes = tuple(probes)
    except TypeError:
        raise ValueError(f"probes must be a sequence of probe names, got {type(probes).__name__}") from None
    bad = [p for p in probes if not isinstance(p, str)]
    if bad:
        raise ValueError(f"probes must be probe names (strings), got {bad[0]!r}")
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; available: {list(PROBES)}")
    if not probes:
        raise ValueError(f"probes is empty; give at least one of {list(PROBES)}")
    return probes


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

    @property
    def fns(self) -> dict:
        """{site: fn(value, site)}: what the collecting hooks call, for callers that hand tap values over
        without hooks (`live.generate_recorded`'s decode steps)."""
        return self._fns

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
           finish: bool = True, flush_tokens: int | None = None, stats: dict | None = None,
           background: bool = False) -> Path:
    """Record `probes` for every input document into the run at `out` (created, or appended to /
    resumed when it exists with the same model config). Returns the store path.

    Resuming compares content (workbench/resume.py): a document whose id the run holds is skipped when
    its tokens and domain equal the recording, and refused (ValueError, nothing recorded) when they
    differ. `stats`, if given, receives recorded / skipped / conflicting counts and `summary`, and, once
    the call returns, `seconds` (its wall time) and `store_seconds` / `store_cpu_seconds`: the wall time
    spent inside store calls (resume planning, create/open, append, flush, finish, close) and the
    process CPU time during them (zarr's encoding threads included). With `background=True` the store
    calls are the hand-offs and the waits for the worker: the write time that compute did not hide.
    `background=True`: store writes run on a worker thread while later documents are computed, one
    commit per 16,384 tokens, and a new run's store is created there while the first document is
    computed (workbench/store/background.py; same crash safety; an error creating it is raised by
    the next store call). Off by default: on a
    shared 2-core CPU the waits in store calls fall (3.6 % of record time at 32K tokens on `tiny`, against
    7.8 % inline) but record is no faster overall: the worker's zarr work competes with compute for the
    GIL and the cores (docs/benchmarks.md, throughput notes). It pays on slow disks and where a core
    is free."""
    probes = check_probes(probes)
    if not isinstance(segment, int) or isinstance(segment, bool) or segment <= 0:
        raise ValueError(f"segment must be a positive number of tokens, got {segment!r}")
    if flush_tokens is not None and (not isinstance(flush_tokens, int) or isinstance(flush_tokens, bool)
                                     or flush_tokens <= 0):
        raise ValueError(f"flush_tokens must be a positive number of tokens, got {flush_tokens!r}")
    t_start = time.perf_counter()
    in_store = _StoreClock()
    layout = layout_for(model, probes)
    docs = _normalise_inputs(model, inputs)
    seen = set()
    for d in docs:
        if d["doc_id"] in seen:
            raise ValueError(f"duplicate document id {d['doc_id']!r} in inputs")
        seen.add(d["doc_id"])
    attrs = run_attrs(model, probes, segment, model_source)
    flush_opts = {"flush_tokens": flush_tokens} if flush_tokens else {}
    with in_store:
        plan = plan_resume(out, docs)
        plan.raise_on_conflict()             # before the writer opens: a refused resume changes nothing
        if background and not Path(out).exists():
            # a new run: the worker creates the store while the first document is computed
            writer = BackgroundWriter.creating(
                out, lambda: RunWriter.create(out, attrs=attrs, layout=layout, **flush_opts), **flush_opts)
        else:
            writer = RunWriter.create(out, attrs=attrs, layout=layout, exist_ok=True, **flush_opts)
            if background:
                writer = BackgroundWriter(writer)
    todo = [d for d in plan.todo if d["doc_id"] not in writer.done_ids]
    if stats is not None:
        stats.update(recorded=len(todo), skipped=len(docs) - len(todo), conflicting=0,
                     summary=f"{len(todo)} recorded, {len(docs) - len(todo)} skipped (already present), "
                             "0 conflicting")
    try:
        bar = _progress(todo, progress, sum(len(d["tokens"]) for d in todo))
        for d in todo:
            arrays = run_document(model, d["tokens"], probes, segment)
            with in_store:
                writer.append({"tokens": np.asarray(d["tokens"], dtype=np.int32), "doc_id": d["doc_id"],
                               "domain": d["domain"], **arrays})
            if bar is not None:
                bar.update(len(d["tokens"]))
        with in_store:
            writer.flush()
            if finish:
                writer.finish()
    finally:
        with in_store:
            writer.close()
        if progress and todo:
            bar.close()
    if stats is not None:
        stats.update(seconds=time.perf_counter() - t_start, store_seconds=in_store.wall,
                     store_cpu_seconds=in_store.cpu)
    return Path(out)


class _StoreClock:
    """Accumulates wall and process CPU time over the `with` blocks it guards (record's store calls)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t
        self.cpu += time.process_time() - self._c


def _progress(todo, enabled: bool, total: int):
    if not enabled or not todo:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="tok", desc="record")

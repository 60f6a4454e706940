"""Layer-streamed prefill probing: record a checkpoint far larger than device memory, one layer at a time.

    streamed_record("Llama-4-Scout-17B-16E/", docs, "run.zarr", probes=("router", "entropy"),
                    dtype="bf16", device="cuda")

    for each batch of documents (≤ batch_tokens tokens):
        x[d] = embed(tokens[d])                      rows gathered from the memory-mapped embedding
        for layer i in 0..L-1:
            load layer i from the safetensors shards  one tensor mapped at a time, copied, unmapped
            for each document d, segment by segment:  its own KV cache, batch 1 — as `record` runs it
                x[d] = layer_i(x[d])                  probes captured by forward hooks on the layer's taps
            free layer i
        append the batch's documents to the run      (the store `record` writes; resumable by doc id)

Peak memory is one layer's weights (two with `prefetch`) + the batch's hidden states + one document's
KV cache for one layer + one segment's activations (`workbench plan` gives the numbers). The final norm
and lm_head are never loaded: no probe needs logits.

Results equal `record`'s bit for bit on the same device and dtype: each layer sees the same inputs,
segment by segment, with the same cache and rotations (tests/test_streamed.py compares the stores).

`devices=[...]` with `resident=True` is layer placement: contiguous layers (balanced by bytes) live on
each device and stay loaded across batches; hidden states move to the device of the next layer.

Legend: B batch (1), T tokens, S segment tokens, D hidden.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from workbench.checkpoint import (
    _VISION_PREFIXES,
    CheckpointError,
    _assign,
    _check,
    _open,
    _prefix,
    _shard_map,
    read_config,
    resolve_device,
    resolve_dtype,
    stored_dtype,
)
from workbench.instrument.hooks import hooks
from workbench.model.kv_cache import LayerCache
from workbench.model.rope import inv_freq, rotations
from workbench.model.transformer import Llama4ForCausalLM, Llama4TextDecoderLayer
from workbench.recording import _normalise_inputs, layout_for
from workbench.resume import plan_resume
from workbench.store import RunWriter
from workbench.tokenizer import load_tokenizer


class StreamedCheckpoint:
    """A HF checkpoint directory opened for per-tensor access: headers checked, nothing loaded.

    `skeleton` is the model on the meta device (config, input checks, tokenizer); `load_layer(i)`
    materialises one decoder layer; `embed(ids)` gathers embedding rows without loading the matrix."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            error = NotADirectoryError if self.directory.exists() else FileNotFoundError
            raise error(f"{str(directory)!r} is not a checkpoint directory "
                        "(layer streaming reads safetensors shards; presets have none)")
        self.config, _ = read_config(self.directory)
        shard_of = _shard_map(self.directory)
        prefix = _prefix(shard_of)
        vision = [k for k in shard_of if k.startswith(_VISION_PREFIXES)]
        if vision:
            warnings.warn(f"{self.directory}: {len(vision)} vision/projector tensors are not loaded — layer "
                          "streaming runs the text path only", stacklevel=2)
        self.where = {(k[len(prefix):] if k.startswith(prefix) else k): (shard_of[k], k)
                      for k in shard_of if not k.startswith(_VISION_PREFIXES)}
        with torch.device("meta"):
            self.skeleton = Llama4ForCausalLM(self.config)
        shapes, dtypes = self._headers()
        _check(self.skeleton, shapes, str(self.directory))
        # the dtype load_model would choose with dtype=None
        self.dtype = stored_dtype(dtypes, self.directory, "quantized checkpoints are not supported by layer streaming")
        self.skeleton.tokenizer = load_tokenizer(self.directory, self.config.bos_token_id, self.config.eos_token_id)
        self.skeleton.source = str(self.directory)

    def _headers(self):
        by_file: dict[Path, list[str]] = {}
        for name, (path, _) in self.where.items():
            by_file.setdefault(path, []).append(name)
        shapes, dtypes = {}, set()
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    try:
                        sl = f.get_slice(self.where[name][1])
                        shapes[name], dtype = tuple(sl.get_shape()), sl.get_dtype()
                        del sl                     # a slice keeps the shard's mmap alive
                    except SafetensorError as e:
                        raise CheckpointError(f"{path}: cannot read header of {name!r} ({e})") from None
                    dtypes.add(dtype)
        return shapes, dtypes

    def tensor(self, name: str, device, dtype) -> torch.Tensor:
        """One tensor, copied out of its shard. The shard is mapped only for this copy: safetensors keeps
        every page touched through a mapping resident until the mapping closes, so holding a shard
        open across a layer would add the layer's size again as file-backed RSS."""
        path, key = self.where[name]
        with _open(path) as f:
            try:
                view = f.get_tensor(key)                      # lazy: a view of the mapping
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: corrupt data for {key!r} ({e})") from None
            out = view.to(device=device, dtype=dtype, copy=True)
            del view
        return out

    def layer_bytes(self, i: int) -> int:
        return sum(p.numel() for p in self.skeleton.model.layers[i].parameters())

    def load_layer(self, i: int, device, dtype) -> Llama4TextDecoderLayer:
        with torch.device("meta"):
            layer = Llama4TextDecoderLayer(self.config, i)
        for name in list(layer.state_dict()):
            _assign(layer, name, self.tensor(f"model.layers.{i}.{name}", device, dtype))
        return layer.eval()

    def embed(self, ids_BT: torch.Tensor, device, dtype) -> torch.Tensor:
        """Embedding rows for `ids_BT`; only the pages of those rows are read. Gathering then casting
        equals casting then gathering (an elementwise cast), so this matches `embed_tokens(ids)`."""
        path, key = self.where["model.embed_tokens.weight"]
        with _open(path) as f:
            w_VD = f.get_tensor(key)
            x_BTD = F.embedding(ids_BT, w_VD).to(device=device, dtype=dtype)
            del w_VD
        return x_BTD


def place_layers(layer_bytes: Sequence[int], n_devices: int) -> list[int]:
    """Device index of each layer: contiguous runs, split where the cumulative bytes cross k/n."""
    total = float(sum(layer_bytes)) or 1.0
    out, before = [], 0
    for b in layer_bytes:
        out.append(min(int((before + b / 2) / total * n_devices), n_devices - 1))
        before += b
    return out


class _Layers:
    """Hands out decoder layers in order: loads them, prefetches the next one on a thread, keeps them
    when resident. The prefetch thread only stages a layer in host memory (the disk/page-cache read,
    the slow part); the copy to an accelerator happens on the main thread, on the compute stream, so
    no stream synchronisation is needed."""

    def __init__(self, ck: StreamedCheckpoint, dtype, devices, placement, *, prefetch: bool, resident: bool):
        self.ck, self.dtype, self.devices, self.placement = ck, dtype, devices, placement
        self.resident = resident
        self.kept: dict[int, Llama4TextDecoderLayer] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="layer-prefetch") if prefetch else None
        self.pending = {}

    def device(self, i: int) -> torch.device:
        return self.devices[self.placement[i]]

    def get(self, i: int) -> Llama4TextDecoderLayer:
        if i in self.kept:
            return self.kept[i]
        fut = self.pending.pop(i, None)
        if fut is not None:
            layer = fut.result().to(self.device(i))
        else:
            layer = self.ck.load_layer(i, self.device(i), self.dtype)
        nxt = i + 1
        if self.pool is not None and nxt < len(self.placement) and nxt not in self.kept:
            self.pending[nxt] = self.pool.submit(self.ck.load_layer, nxt, "cpu", self.dtype)
        if self.resident:
            self.kept[i] = layer
        return layer

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.pending.clear()


def _capture(cfg, i: int, probes: Sequence[str]):
    """Hook functions on one layer's taps (names relative to the layer) and the dict they fill.
    The same sites and keys as `recording.run_document`."""
    parts: dict[str, list] = {}

    def keep(key):
        def fn(value, _site):
            parts.setdefault(key, []).append(value.detach())
        return fn

    fns = {}
    if cfg.is_moe[i]:
        if "router" in probes:
            fns["feed_forward.hook_topk_ids"] = keep("router/experts")
            fns["feed_forward.hook_topk_gates"] = keep("router/weights")
        if "router_logits" in probes:
            fns["feed_forward.hook_router_logits"] = keep("router/logits")
        if "norms" in probes:
            fns["feed_forward.hook_shared_out"] = keep("router/shared_norm")
            fns["feed_forward.hook_routed_out"] = keep("router/routed_norm")
    if "entropy" in probes:
        fns["self_attn.hook_entropy"] = keep("attention/entropy")
        fns["self_attn.hook_entropy_no_temp"] = keep("attention/entropy_no_temp")
        fns["self_attn.hook_n_keys"] = keep("attention/n_keys")
    if "sink" in probes:
        fns["self_attn.hook_sink_mass"] = keep("attention/sink_mass")
    return fns, parts


def _to_numpy(name: str, pieces: list[torch.Tensor]) -> np.ndarray:
    """One document's values for one layer, combined exactly as `run_document` combines them."""
    if name == "attention/n_keys":
        t = torch.cat(pieces, dim=0)                                   # (T,)
    elif name.startswith("attention/"):
        t = torch.cat([p[0] for p in pieces], dim=-1)                  # (H, T)
    elif name.endswith("_norm"):
        t = torch.cat(pieces, dim=0).float().norm(dim=-1)              # (T,)
    else:
        t = torch.cat(pieces, dim=0)                                   # (T, K) or (T, E)
    keep_int = name.endswith("experts") or name == "attention/n_keys"
    return (t if keep_int else t.float()).cpu().numpy()


@torch.no_grad()
def stream_documents(ck: StreamedCheckpoint, documents: Sequence[Sequence[int]], probes: Sequence[str], *,
                     dtype=None, devices=("cpu",), segment: int = 4096, hidden_device=None,
                     prefetch: bool = False, layers: _Layers | None = None, bar=None) -> list[dict[str, np.ndarray]]:
    """Run `documents` (token lists) through the checkpoint layer by layer; return each document's probe
    arrays shaped as the store expects (what `run_document` returns)."""
    cfg = ck.config
    dtype = resolve_dtype(dtype) or ck.dtype
    devices = [resolve_device(d) for d in devices]
    hidden_device = devices[0] if hidden_device is None else resolve_device(hidden_device)
    own = layers is None
    if own:
        placement = place_layers([ck.layer_bytes(i) for i in range(cfg.num_hidden_layers)], len(devices))
        layers = _Layers(ck, dtype, devices, placement, prefetch=prefetch, resident=False)
    want_stats = bool({"entropy", "sink"} & set(probes))
    freqs_P = inv_freq(cfg)
    # hidden states: per document, a list of segments — each layer sees exactly the tensors `record` would
    xs: list[list[torch.Tensor]] = []
    for tokens in documents:
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        ck.skeleton.check_inputs(ids)
        xs.append([ck.embed(ids[:, a:a + segment], hidden_device, dtype) for a in range(0, ids.shape[1], segment)])
    per_doc: list[dict[str, list[np.ndarray]]] = [{} for _ in documents]
    try:
        for i in range(cfg.num_hidden_layers):
            layer = layers.get(i)
            dev = layers.device(i)
            fns, parts = _capture(cfg, i, probes)
            rope = layer.self_attn.use_rope
            with hooks(layer, fns) if fns else _null():
                for d, segments in enumerate(xs):
                    parts.clear()
                    cache, start, out = LayerCache(), 0, []
                    for x_BSD in segments:
                        S = x_BSD.shape[1]
                        rot_BSP = (rotations(freqs_P.to(dev), torch.arange(start, start + S, device=dev).expand(1, S))
                                   if rope else None)
                        y = layer(x_BSD.to(dev), start, rot_BSP, cache, want_stats)
                        out.append(y.to(hidden_device))
                        start += S
                    xs[d] = out
                    del cache
                    for name, pieces in parts.items():
                        per_doc[d].setdefault(name, []).append(_to_numpy(name, pieces))
            parts.clear()
            del layer
            if bar is not None:
                bar.update(1)
    finally:
        if own:
            layers.close()
    return [{name: np.stack(per_layer) for name, per_layer in arrays.items()} for arrays in per_doc]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _batches(docs: list[dict], batch_tokens: int) -> list[list[dict]]:
    out, cur, n = [], [], 0
    for d in docs:
        if cur and n + len(d["tokens"]) > batch_tokens:
            out.append(cur)
            cur, n = [], 0
        cur.append(d)
        n += len(d["tokens"])
    if cur:
        out.append(cur)
    return out


def streamed_record(source, inputs: Iterable, out, probes: Sequence[str] = ("router", "entropy"), *,
                    dtype=None, device=None, devices: Sequence | None = None, resident: bool = False,
                    segment: int = 4096, batch_tokens: int = 262144, prefetch: bool = False,
                    hidden_device=None, progress: bool = True, model_source: str | None = None,
                    finish: bool = True) -> Path:
    """`record` for a checkpoint directory, executed layer by layer (module docstring). Writes the same
    store, resumable by doc id; each batch is committed when its last layer is done."""
    ck = source if isinstance(source, StreamedCheckpoint) else StreamedCheckpoint(source)
    probes = tuple(probes)
    layout = layout_for(ck.skeleton, probes)
    docs = _normalise_inputs(ck.skeleton, inputs)
    seen: set[str] = set()
    for d in docs:
        if d["doc_id"] in seen:
            raise ValueError(f"duplicate document id {d['doc_id']!r} in inputs")
        seen.add(d["doc_id"])
    if batch_tokens <= 0 or segment <= 0:
        raise ValueError(f"batch_tokens and segment must be positive, got {batch_tokens}, {segment}")
    dtype = resolve_dtype(dtype) or ck.dtype
    devs = [resolve_device(d) for d in (devices or [device])]
    placement = place_layers([ck.layer_bytes(i) for i in range(ck.config.num_hidden_layers)], len(devs))
    attrs = dict(model_source=model_source or str(ck.directory), config=ck.config.to_hf(),
                 dtype=str(dtype).replace("torch.", ""), device=str(devs[0]), probes=list(probes),
                 probe_options={"segment": segment, "entropy_units": "nats"},
                 layer_kinds=ck.config.layer_kinds(),
                 execution={"mode": "layer-placed" if resident and len(devs) > 1 else "layer-streamed",
                            "devices": [str(d) for d in devs], "batch_tokens": batch_tokens})
    plan_resume(out, docs).raise_on_conflict()      # a changed document under a recorded id: refuse
    writer = RunWriter.create(out, attrs=attrs, layout=layout, exist_ok=True)
    todo = [d for d in docs if d["doc_id"] not in writer.done_ids]
    batches = _batches(todo, batch_tokens)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches) * ck.config.num_hidden_layers, unit="layer", desc="streamed")
    layers = _Layers(ck, dtype, devs, placement, prefetch=prefetch, resident=resident)
    try:
        for batch in batches:
            arrays = stream_documents(ck, [d["tokens"] for d in batch], probes, dtype=dtype, devices=devs,
                                      segment=segment, hidden_device=hidden_device, layers=layers, bar=bar)
            for d, arr in zip(batch, arrays):
                writer.append({"tokens": np.asarray(d["tokens"], dtype=np.int32), "doc_id": d["doc_id"],
                               "domain": d["domain"], **arr})
            writer.flush()
        if finish:
            writer.finish()
    finally:
        layers.close()
        writer.close()
        if bar is not None:
            bar.close()
    return Path(out)

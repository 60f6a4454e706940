"""The run-store vocabulary: every array's name, dtype, dimension names, fill value and source site.

A run is one Zarr v3 group (`RUN.zarr`). Array names are paths inside it; `dimension_names` are the
labels xarray shows. Dimension legend:

    token      one recorded token; the run's documents are concatenated along it
    doc        one document                    doc_edge  document boundaries (n_docs + 1)
    layer      decoder layer (all layers)      head      query head
    moe_layer  position in `router/layer_index` (the MoE layers only)
    k          top-k slot                       expert    routed expert

`site` names the tap (workbench/instrument/sites.py) an array is recorded from, so the store mirrors the
tap vocabulary (STYLE rule 13). Probe groups switch families of arrays on; "core" arrays always exist.
Everything here is plain data: no zarr I/O, no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1

# Dimensions whose length grows as documents are appended.
TOKEN, DOC, DOC_EDGE = "token", "doc", "doc_edge"
GROWING_DIMS = (TOKEN, DOC, DOC_EDGE)
PROBE_GROUPS = ("router", "router_logits", "entropy", "norms", "sink")


class StoreError(ValueError):
    """A store on disk is missing, not a run, from a newer schema, inconsistent or corrupt."""


@dataclass(frozen=True)
class ArraySpec:
    name: str                 # path inside the run group, e.g. "router/experts"
    dtype: str                # numpy dtype name; "str" = variable-length UTF-8
    dims: tuple[str, ...]     # zarr v3 dimension_names
    fill: int | float | str   # fill value of never-written elements
    groups: tuple[str, ...]   # present when any of these probe groups is on ("core" = always)
    site: str                 # tap suffix it is recorded from ("" = bookkeeping)
    meaning: str


def _spec(name, dtype, dims, fill, groups, site, meaning) -> ArraySpec:
    return ArraySpec(name, dtype, tuple(dims.split()), fill, tuple(groups.split()), site, meaning)


NAN = float("nan")
SCHEMA: dict[str, ArraySpec] = {s.name: s for s in [
    _spec("tokens", "int32", "token", -1, "core", "", "token id"),
    _spec("positions", "int32", "token", -1, "core", "", "position of the token within its document"),
    _spec("doc_offsets", "int64", "doc_edge", -1, "core", "",
          "document i is tokens[doc_offsets[i]:doc_offsets[i+1]]; starts with 0"),
    _spec("doc_id", "str", "doc", "", "core", "", "user id (JSONL `id`) or the document's index"),
    _spec("doc_domain", "str", "doc", "", "core", "", "domain label; empty string when unknown"),
    _spec("router/layer_index", "int32", "moe_layer", -1, "router router_logits norms", "",
          "decoder-layer index of each MoE layer"),
    _spec("router/experts", "int16", "moe_layer token k", -1, "router",
          "feed_forward.hook_topk_ids", "chosen experts, in top-k order"),
    _spec("router/weights", "float32", "moe_layer token k", NAN, "router",
          "feed_forward.hook_topk_gates", "gate of each chosen expert (sigmoid of its logit)"),
    _spec("router/logits", "float32", "moe_layer token expert", NAN, "router_logits",
          "feed_forward.hook_router_logits", "raw router logits"),
    _spec("router/shared_norm", "float32", "moe_layer token", NAN, "norms",
          "feed_forward.hook_shared_out", "L2 norm of the shared-expert output"),
    _spec("router/routed_norm", "float32", "moe_layer token", NAN, "norms",
          "feed_forward.hook_routed_out", "L2 norm of the summed routed-expert output"),
    _spec("attention/entropy", "float32", "layer head token", NAN, "entropy",
          "self_attn.hook_entropy", "attention entropy in nats, as run"),
    _spec("attention/entropy_no_temp", "float32", "layer head token", NAN, "entropy",
          "self_attn.hook_entropy_no_temp", "entropy with temperature tuning off"),
    _spec("attention/n_keys", "int32", "layer token", -1, "entropy",
          "self_attn.hook_n_keys", "number of keys each query attends to"),
    _spec("attention/sink_mass", "float32", "layer head token", NAN, "sink",
          "self_attn.hook_sink_mass", "attention probability on the document's first token"),
]}

# Written once at creation; everything else with a growing dim is appended per document.
STATIC_ARRAYS = tuple(n for n, s in SCHEMA.items() if not set(s.dims) & set(GROWING_DIMS))
# Supplied by the caller in `RunWriter.append(doc)` (besides "tokens" and the optional "positions").
PROBE_ARRAYS = tuple(n for n, s in SCHEMA.items() if "core" not in s.groups and TOKEN in s.dims)


@dataclass(frozen=True)
class Layout:
    """Sizes of the fixed dimensions and which probe groups a run records."""

    n_layers: int
    n_heads: int
    moe_layer_index: tuple[int, ...]
    top_k: int
    n_experts: int
    router: bool = False
    router_logits: bool = False
    entropy: bool = False
    norms: bool = False
    sink: bool = False

    def __post_init__(self):
        object.__setattr__(self, "moe_layer_index", tuple(int(i) for i in self.moe_layer_index))
        for key in ("n_layers", "n_heads", "top_k", "n_experts"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layout: {key} must be a positive int, got {value!r}")
        idx = self.moe_layer_index
        if list(idx) != sorted(set(idx)) or any(not 0 <= i < self.n_layers for i in idx):
            raise ValueError(f"layout: moe_layer_index must be sorted, unique and in [0, n_layers="
                             f"{self.n_layers}), got {list(idx)}")
        if self.top_k > self.n_experts:
            raise ValueError(f"layout: top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_experts > 32767:
            raise ValueError(f"layout: n_experts={self.n_experts} does not fit router/experts (int16)")
        router_groups = [g for g in ("router", "router_logits", "norms") if getattr(self, g)]
        if router_groups and not idx:
            raise ValueError(f"layout: probe groups {router_groups} need MoE layers, "
                             "but moe_layer_index is empty")

    @classmethod
    def from_dict(cls, d: dict | Layout) -> Layout:
        if isinstance(d, Layout):
            return d
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"layout: unknown keys {unknown}; known: {sorted(fields)}")
        missing = sorted(f for f in ("n_layers", "n_heads", "moe_layer_index", "top_k", "n_experts")
                         if f not in d)
        if missing:
            raise ValueError(f"layout: missing keys {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["moe_layer_index"] = list(self.moe_layer_index)
        return d

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(g for g in PROBE_GROUPS if getattr(self, g))

    @property
    def sizes(self) -> dict[str, int]:
        """Length of every fixed dimension."""
        return {"layer": self.n_layers, "head": self.n_heads, "moe_layer": len(self.moe_layer_index),
                "k": self.top_k, "expert": self.n_experts}

    def arrays(self) -> list[str]:
        """Names of the arrays a run with this layout holds, in schema order."""
        on = {"core", *self.groups}
        return [n for n, s in SCHEMA.items() if on & set(s.groups)]

    def shape(self, name: str, n_tokens: int = 0, n_docs: int = 0) -> tuple[int, ...]:
        sizes = {**self.sizes, TOKEN: n_tokens, DOC: n_docs, DOC_EDGE: n_docs + 1}
        return tuple(sizes[d] for d in SCHEMA[name].dims)


# Token-axis chunk lengths are powers of two that divide 65536, so chunk edges of all arrays align.
# 1-D arrays: 65536 tokens (256 KiB int32). Wider rows: the largest power of two <= 16384 keeping a
# chunk's raw size <= 4 MiB (Scout: 40 heads x 16384 x 4 B = 2.6 MiB). See docs/store.md.
TOKEN_CHUNK_1D = 65536
TOKEN_CHUNK_MAX = 16384
TOKEN_CHUNK_MIN = 1024
CHUNK_TARGET_BYTES = 4 << 20
DOC_CHUNK = 4096


def chunks_for(name: str, layout: Layout) -> tuple[int, ...]:
    """Chunk shape: one layer per chunk, the whole of every other fixed dim, a slab of tokens."""
    spec = SCHEMA[name]
    if DOC in spec.dims or DOC_EDGE in spec.dims:
        return (DOC_CHUNK,)
    if TOKEN not in spec.dims:
        return layout.shape(name)
    if spec.dims == (TOKEN,):
        return (TOKEN_CHUNK_1D,)
    sizes = layout.sizes
    lead = {"layer", "moe_layer"}
    row = [sizes[d] for d in spec.dims if d != TOKEN and d not in lead]
    row_bytes = 4 * max(1, _prod(row))
    t = TOKEN_CHUNK_MAX
    while t > TOKEN_CHUNK_MIN and t * row_bytes > CHUNK_TARGET_BYTES:
        t //= 2
    return tuple(1 if d in lead else t if d == TOKEN else sizes[d] for d in spec.dims)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def config_hash(config: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


EMPTY_INPUT_HASH = hashlib.sha256(b"").hexdigest()


def chain_input_hash(previous: str, tokens) -> str:
    """Running input hash: h_i = sha256(bytes(h_{i-1}) + tokens_i as little-endian int32).

    A chain (not one streaming sha256) so a resumed run can continue it from the stored hex digest.
    """
    data = np.ascontiguousarray(np.asarray(tokens), dtype="<i4").tobytes()
    return hashlib.sha256(bytes.fromhex(previous) + data).hexdigest()


def digest_init(previous: str):
    """A sha256 for the next link of a per-document chain: h_i = sha256(bytes(h_{i-1}) + piece bytes)."""
    return hashlib.sha256(bytes.fromhex(previous))


def digest_piece(hasher, data) -> None:
    """Feed one document's (part of an) array to `hasher`, token axis first (so a document read in
    token windows hashes the same as one written whole); strings as length-prefixed UTF-8."""
    data = np.asarray(data)
    if data.dtype.kind in "OUT":
        for v in data.reshape(-1):
            b = str(v).encode("utf-8", "surrogatepass")
            hasher.update(len(b).to_bytes(4, "little") + b)
    else:
        hasher.update(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes())

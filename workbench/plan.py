"""Memory planner: what a Llama 4 checkpoint needs, and which execution mode fits a device.

    plan = make_plan("scout", dtype="bf16", device="h100-80gb", tokens=8192)
    print(format_plan(plan))             # or `workbench plan scout --device h100-80gb`

Everything comes from the config (a preset or a checkpoint's config.json); nothing is loaded.
Parameter counts are exact (equal to `params.count_params`, which builds the model on the meta device). Byte
figures for activations are estimates of the live tensors at each layer's peak, written out below
so they can be checked; `benchmarks/gpu_check.py` prints the plan next to measured peaks.

Four execution modes, as the recorder runs them:

* in-memory — `record`: all weights on one device; per document the KV cache (global NoPE layers
  grow with T; chunked layers hold at most one chunk plus a segment, spec §2.7), the probe values
  held until the document ends, and one segment's activations.
* layer-streamed — `streamed.streamed_record`: one decoder layer's weights at a time (two with
  prefetch), the hidden states of a batch of documents (in and out), one document's KV cache for
  that layer, one segment's activations. Reads every weight once per batch.
* N devices — layer placement (`streamed_record(devices=[...], resident=True)`): contiguous
  layers per device, packed greedily in order; N is the number of devices that packing uses.
* expert-parallel over W devices — `expert_parallel.record_ep` (`record --ep W`): every rank holds
  every non-expert weight and E/W of each MoE layer's routed experts, and runs the whole forward on
  replicated activations, so it also holds the in-memory mode's KV cache, probe values and activations
  (plus the all-reduce's copy of the routed output). W is the smallest divisor of E whose per-rank
  bytes fit; its "device needs" is per rank. NCCL's own buffers are not modelled.

Legend: L layers, D hidden, H query heads, Hkv kv heads, Dh head dim, E experts, K top-k,
F expert/shared width, Fd dense-MLP width, C chunk, S segment tokens, N document tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.config import PRESETS, Llama4TextConfig, preset
from workbench.model.attention_stats import PAD_MIN_KEYS
from workbench.params import DTYPE_BYTES, human, human_bytes
from workbench.tensor_reader import READ_SLAB_BYTES

GiB, MiB = 2**30, 2**20

# Total memory as `nvidia-smi` reports it (MiB): the marketing "80GB" is 79.6 GiB on an H100.
DEVICES: dict[str, int] = {
    "h100-80gb": 81559 * MiB,
    "h200-141gb": 143771 * MiB,
    "a100-80gb": 81920 * MiB,
    "a100-40gb": 40960 * MiB,
    "l40s-48gb": 46068 * MiB,
    "rtx4090-24gb": 24564 * MiB,
}
# What a GPU process can really use: the CUDA context and cuBLAS workspaces (~1 GiB) and allocator
# fragmentation (~5 %) come off the top. A CPU host keeps 10 % for the OS and the Python process.
GPU_RESERVE_BYTES, GPU_USABLE_FRACTION, CPU_USABLE_FRACTION = 1 * GiB, 0.95, 0.90
# On a CPU the plan is a peak RSS — what `/usr/bin/time -v`, `ps` or VmHWM report for the process that
# records — so it includes the process itself: Python + torch + workbench imported, before any weight.
# Measured 0.72–0.78 GiB per fresh child by benchmarks/real_shape.py (torch 2.14, Linux x86-64; about
# half of it is torch's shared libraries). On a GPU the plan is device memory and has no such term.
CPU_PROCESS_BASELINE_BYTES = int(0.75 * GiB)
# `load_model` reads each tensor with pread into its own storage (tensor_reader.ShardReader; no mapping
# held): a tensor stored in the dtype asked for goes straight into its parameter, any other through one
# reusable slab (converted slab by slab; a GPU load's host buffer). So loading peaks at the weights plus
# that slab. (Before, one mapping per shard kept every copied page resident: weights + the largest shard,
# 15.48 GiB measured at Scout's widths, docs/benchmarks.md "real-shape".)

STORE_BYTES = {"router": "ids int16 + gates fp32 per k", "router_logits": "fp32 per expert",
               "entropy": "entropy, entropy_no_temp fp32 per head + n_keys int32",
               "norms": "2 fp32", "sink": "fp32 per head"}


@dataclass
class DeviceSpec:
    name: str
    total_bytes: int
    usable_bytes: int
    kind: str                    # "gpu" | "cpu"


def parse_device(spec: str) -> DeviceSpec:
    """A name from DEVICES, or `cpu:GB` / `gpu:GB` (GiB; e.g. `cpu:24`, `gpu:79.6`)."""
    s = spec.strip().lower()
    if s in DEVICES:
        total, kind = DEVICES[s], "gpu"
    else:
        m = re.fullmatch(r"(cpu|gpu):(\d+(?:\.\d+)?)(gib|gb)?", s)
        if not m:
            raise ValueError(f"unknown device {spec!r}; use one of {sorted(DEVICES)} or cpu:GB / gpu:GB (GiB)")
        kind, total = m.group(1), int(float(m.group(2)) * GiB)
        if total <= 0:
            raise ValueError(f"device {spec!r} has no memory")
    usable = (int(total * GPU_USABLE_FRACTION) - GPU_RESERVE_BYTES if kind == "gpu"
              else int(total * CPU_USABLE_FRACTION))
    return DeviceSpec(s, total, max(usable, 0), kind)


def config_of(source) -> Llama4TextConfig:
    """A config, a preset name, or a checkpoint directory (only config.json is read)."""
    if isinstance(source, Llama4TextConfig):
        return source
    if isinstance(source, str) and source in PRESETS:
        return preset(source)
    from workbench.bundled import resolve_source
    path = Path(resolve_source(source))
    if not path.exists():
        raise FileNotFoundError(f"{str(source)!r} is neither a preset ({sorted(PRESETS)}) nor a directory")
    from workbench.checkpoint import read_config
    return read_config(path if path.is_dir() else path.parent)[0]


# ------------------------------------------------------------------------------------ components
def layer_params(cfg: Llama4TextConfig) -> list[int]:
    """Parameters of each decoder layer, in order."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * H * Dh * 2 + D * Hkv * Dh * 2 + (H * Dh + 2 * Hkv * Dh + D if cfg.attention_bias else 0)
    norms = 2 * D
    E, F, Fd = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    moe = D * E + E * D * 2 * F + E * F * D + 3 * D * F        # router, gate_up, down, shared expert
    dense = 3 * D * Fd
    return [attn + norms + (moe if m else dense) for m in cfg.is_moe]


def param_counts(cfg: Llama4TextConfig) -> dict[str, int]:
    """`params.count_params` from the shapes alone (no module built: fast enough for sweeps);
    tests/test_plan.py holds the two equal."""
    D, E, F, K = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.num_experts_per_tok
    embed = cfg.vocab_size * D
    head = 0 if cfg.tie_word_embeddings else embed
    routed = cfg.num_moe_layers * E * 3 * D * F
    total = sum(layer_params(cfg)) + embed + head + D
    return {"total": total, "active": total - routed + routed * K // E, "routed_experts": routed,
            "embedding": embed, "lm_head": head}


def largest_tensor(cfg: Llama4TextConfig) -> int:
    """Elements of the largest single checkpoint tensor (fused expert gate_up, or the embedding)."""
    D, E, F = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    moe = E * D * 2 * F if cfg.num_moe_layers else 0
    return max(moe, cfg.vocab_size * D, D * cfg.intermediate_size_mlp,
               D * cfg.num_attention_heads * cfg.head_dim)


def layer_tensor_bytes(cfg: Llama4TextConfig, i: int, b: float) -> list[float]:
    """Bytes of decoder layer i's tensors in `state_dict` order — the order `streamed.py` loads them in
    (tests/test_plan.py holds it equal to the module's)."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bias = cfg.attention_bias
    attn = [D * H * Dh, H * Dh] if bias else [D * H * Dh]
    for _ in ("k", "v"):
        attn += [D * Hkv * Dh, Hkv * Dh] if bias else [D * Hkv * Dh]
    attn += [H * Dh * D, D] if bias else [H * Dh * D]
    E, F, Fd = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    ffn = ([D * E, E * D * 2 * F, E * F * D, D * F, D * F, F * D] if cfg.is_moe[i] else [D * Fd, D * Fd, Fd * D])
    return [n * b for n in attn + ffn + [D, D]]


def layer_load_peak(tensor_bytes: list[float]) -> float:
    """Peak while one layer is loaded tensor by tensor out of memory-mapped shards (`streamed.py`): the
    shard is mapped only for one copy, so while tensor t is copied its source pages (file-backed, read
    through the mapping) and its copy are resident next to the tensors already loaded:
    max over t of (Σ bytes before t + 2 × bytes of t)."""
    peak, before = 0.0, 0.0
    for n in tensor_bytes:
        peak = max(peak, before + 2 * n)
        before += n
    return peak


def kv_bytes_per_token_layer(cfg: Llama4TextConfig, b: float) -> float:
    return 2 * cfg.num_key_value_heads * cfg.head_dim * b


def kv_cache_bytes(cfg: Llama4TextConfig, tokens: int, b: float, segment: int) -> list[float]:
    """Per layer, for one document of `tokens` tokens processed in `segment`-token pieces. A chunked
    layer holds the keys of the current chunk, at most C−1 old ones plus a new segment (kv_cache.py)."""
    per = kv_bytes_per_token_layer(cfg, b)
    C = cfg.attention_chunk_size
    return [per * (min(tokens, C - 1 + min(segment, tokens)) if chunked else tokens)
            for chunked in cfg.is_chunked]


def stats_bytes_per_token(cfg: Llama4TextConfig, probes, b: float) -> dict[str, float]:
    """Probe values per token: `held` while a document runs (the recorder keeps tap values on the
    compute device until the document ends) and `stored` in the run (docs/store.md dtypes)."""
    L, H, M = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_moe_layers
    K, E, D = cfg.num_experts_per_tok, cfg.num_local_experts, cfg.hidden_size
    held = stored = 0.0
    if "router" in probes:
        held += M * K * (8 + b)                  # int64 ids, gates in the model dtype
        stored += M * K * (2 + 4)
    if "router_logits" in probes:
        held += M * E * b
        stored += M * E * 4
    if "entropy" in probes:
        held += L * (2 * H * 4 + 4)              # fp32 statistics, int32 n_keys
        stored += L * (2 * H * 4 + 4)
    if "sink" in probes:
        held += L * H * 4
        stored += L * H * 4
    if "norms" in probes:
        held += M * 2 * D * b                    # the full shared/routed outputs until the doc ends
        stored += M * 2 * 4
    return {"held": held, "stored": stored}


def activation_bytes(cfg: Llama4TextConfig, segment: int, b: float, keys: int = 0, cpu_stats: bool = False) -> float:
    """Live tensors at the peak of one decoder layer on a `segment`-token piece (estimate, no grad).

    attention: x, normed x, q/k/v, o_proj out (b each) + fp32 RoPE/QK-norm copies of q (3·H·Dh·4)
               + the statistics kernel's tiles (≤ 4 live fp32 tiles of TILE_ELEMS = 16 MiB, or S×S×H
               when smaller; attention_stats.py) + with statistics, the fused CPU path's fp32 keys and
               their centred copy over the layer's whole key range (2·keys·Hkv·Dh·4; `keys` = 0 without)
               and its fp32 per-query buffers (`cpu_stats`: on top of a cache each flash pass returns two
               outputs merged by their LSEs; q, q/β, Σ a·k and the merge's terms: 8·H·Dh·4 instead of 3);
               an fp32 model's ranges of ≥ PAD_MIN_KEYS keys take the padded call instead: k' and v' at
               2·Dh (4·keys·Hkv·Dh·4) and q' and its output at 2·Dh (4 more fp32 rows of H·Dh)
    MoE:       x, h, normed h, shared out (4·D) + router logits (E) + per slot k: gated input, the
               sorted output and its gather (3·D), gate_up (2F), silu·up (F) + sort indices (3·8 B)
    dense:     x, h, normed h (3·D) + gate, up, silu·up (3·Fd) + out (D)
    """
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, K, F, Fd = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.intermediate_size_mlp
    tiles = min(4 * 16 * MiB, 4 * H * segment * segment * 4)
    padded = cpu_stats and b == 4 and keys >= PAD_MIN_KEYS          # attention_stats' auto choice
    fp32_rows = (8 if cpu_stats else 3) + (4 if padded else 0)
    attn = (segment * ((3 * D + 2 * H * Dh + 2 * Hkv * Dh) * b + fp32_rows * H * Dh * 4) + tiles
            + (4 if padded else 2) * keys * Hkv * Dh * 4)
    moe = segment * ((4 * D + E + K * (3 * D + 3 * F)) * b + K * 24) if cfg.num_moe_layers else 0
    dense = segment * (4 * D + 3 * Fd) * b if cfg.num_moe_layers < cfg.num_hidden_layers else 0
    return float(max(attn, moe, dense))


# ------------------------------------------------------------------------------------ the plan
@dataclass
class Mode:
    name: str
    device_bytes: float              # what the compute device needs
    host_bytes: float                # what the host needs besides (CPU RAM)
    fits: bool
    detail: dict = field(default_factory=dict)


@dataclass
class Plan:
    source: str
    dtype: str
    device: DeviceSpec
    tokens: int
    segment: int
    batch_tokens: int
    probes: tuple[str, ...]
    params: dict[str, int]
    weight_bytes: dict[str, float]                  # per dtype name
    largest_layer_bytes: float
    embedding_bytes: float
    kv_bytes_per_token: float                       # grows: global (NoPE/unchunked) layers only
    kv_chunked_cap_bytes: float                     # fixed: all chunked layers together
    kv_bytes: float                                 # for one `tokens`-long document
    stats_bytes_per_token: dict[str, float]
    activation_bytes: float
    modes: list[Mode]

    @property
    def recommended(self) -> str:
        for m in self.modes:
            if m.fits:
                return m.name
        return "none"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recommended"] = self.recommended
        return d


def _pack(items: list[float], budget: float) -> int | None:
    """Greedy contiguous packing (layer placement keeps layers in order): devices used, or None
    when one item alone exceeds the budget."""
    if budget <= 0 or any(x > budget for x in items):
        return None
    n, used = 1, 0.0
    for x in items:
        if used + x > budget:
            n, used = n + 1, 0.0
        used += x
    return n


def _quant_weight_bytes(cfg: Llama4TextConfig, scheme: str) -> float:
    from workbench.quant import weight_bytes

    return float(weight_bytes(cfg, scheme))


def _quant_expert_bytes(cfg: Llama4TextConfig, scheme: str) -> float:
    """Routed-expert bytes under int4/fp8 (scales included), as `quantize_model`/`load_fp8` hold them."""
    from workbench.quant import weight_bytes_breakdown

    return float(weight_bytes_breakdown(cfg, scheme)["experts"])


def expert_parallel_mode(cfg: Llama4TextConfig, weights: float, expert_weights: float, resident: float,
                         collective: float, usable: float, quantized: bool) -> Mode:
    """The smallest W dividing E (`expert_parallel.expert_range` refuses the rest) for which one rank's
    bytes fit: non-expert weights (every rank) + `expert_weights`/W + `resident` (KV cache, probe
    values, activations: replicated) + `collective` (the all-reduce's buffer; none when W = 1, which
    is the in-memory mode)."""
    E = cfg.num_local_experts
    other = weights - expert_weights
    divisors = [w for w in range(1, E + 1) if E % w == 0]
    per_rank = {w: other + expert_weights / w + resident + (collective if w > 1 else 0) for w in divisors}
    W = next((w for w in divisors if per_rank[w] <= usable), None)
    room = usable - other - resident - collective  # what is left for experts on one rank (W > 1)
    if expert_weights == 0 or W == 1:              # no MoE layers, or no split needed
        by_bytes = W
    else:                                          # the smallest W by bytes alone, divisor of E or not
        by_bytes = math.ceil(expert_weights / room) if room > 0 else None
    at = W or E                                    # not fitting: show the floor, one expert slice per rank
    return Mode("expert-parallel", per_rank[at], 0.0, W is not None,
                {"n_devices": W, "min_by_bytes": by_bytes, "num_experts": E, "divisors": divisors,
                 "experts_per_rank": E // at, "non_expert_weights": other,
                 "expert_weights_per_rank": expert_weights / at, "replicated": resident,
                 "collective": collective if at > 1 else 0,
                 "per_rank_bytes": per_rank[at],
                 "runnable": not quantized})        # expert_parallel.py loads plain-dtype shards only


def make_plan(source, *, dtype: str = "bf16", device: str = "h100-80gb", tokens: int = 8192,
              segment: int = 4096, batch_tokens: int | None = None, probes=("router", "entropy"),
              prefetch: bool = False) -> Plan:
    """Memory for recording `probes` on documents of `tokens` tokens. `batch_tokens` (default
    `tokens`) is the number of tokens whose hidden states a layer-streamed pass keeps."""
    cfg = config_of(source)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
    if tokens <= 0 or segment <= 0:
        raise ValueError(f"tokens and segment must be positive, got tokens={tokens}, segment={segment}")
    dev = parse_device(device)
    b = DTYPE_BYTES[dtype]
    act_b = 2 if b < 2 else b                        # fp8/int4 weights still compute in bf16
    segment = min(segment, tokens)
    batch_tokens = max(batch_tokens or tokens, tokens)
    probes = tuple(probes)
    counts = param_counts(cfg)
    per_layer = [p * b for p in layer_params(cfg)]
    embed = counts["embedding"] * b
    head = counts["lm_head"] * b + cfg.hidden_size * b
    kv_layers = kv_cache_bytes(cfg, tokens, act_b, segment)
    kv = sum(kv_layers)
    per_tok_kv = kv_bytes_per_token_layer(cfg, act_b)
    glob = sum(1 for c in cfg.is_chunked if not c)
    stats = stats_bytes_per_token(cfg, probes, act_b)
    # keys the CPU statistics pass copies to fp32 at once (the fused path runs on CPU only; GPUs tile): the
    # whole document on a global layer, a chunk + segment otherwise
    stat_keys = (0 if dev.kind != "cpu" or not {"entropy", "sink"} & set(probes) else
                 max(tokens if not ch else min(tokens, (cfg.attention_chunk_size or tokens) + segment)
                     for ch in cfg.is_chunked))
    act = activation_bytes(cfg, segment, act_b, stat_keys, cpu_stats=stat_keys > 0)
    # int4/fp8 quantize the routed experts only (workbench.quant's layout: scales included, the rest
    # bf16, the router fp32) — what `quantize_model`/`load_fp8` actually hold
    weights = _quant_weight_bytes(cfg, dtype) if dtype in ("int4", "fp8") else counts["total"] * b
    expert_w = _quant_expert_bytes(cfg, dtype) if dtype in ("int4", "fp8") else counts["routed_experts"] * b
    if dtype in ("int4", "fp8"):      # embeddings/head stay bf16; layers share the rest pro rata
        embed, head = counts["embedding"] * 2, counts["lm_head"] * 2 + cfg.hidden_size * 2
        scale = (weights - embed - head) / sum(per_layer)
        per_layer = [w * scale for w in per_layer]

    # 1. in memory on one device (on a CPU, a peak RSS: the process itself included). Loading reads each
    #    tensor into its own storage, through at most one READ_SLAB_BYTES slab (module note above): on a CPU
    #    the same memory, on a GPU host memory.
    base = CPU_PROCESS_BASELINE_BYTES if dev.kind == "cpu" else 0
    run1 = weights + kv + stats["held"] * tokens + act
    need1 = (max(run1, weights + READ_SLAB_BYTES) if dev.kind == "cpu" else run1) + base
    m1 = Mode("in-memory", need1, stats["stored"] * tokens + (READ_SLAB_BYTES if dev.kind != "cpu" else 0),
              need1 <= dev.usable_bytes,
              {"weights": weights, "kv_cache": kv, "probe_values": stats["held"] * tokens, "activations": act,
               "process_baseline": base, "running_peak": run1, "loading_peak": weights + READ_SLAB_BYTES,
               "read_slab": READ_SLAB_BYTES})

    # 2. layer-streamed on one device (hidden states of the batch in and out, one layer's KV)
    hidden = 2 * batch_tokens * cfg.hidden_size * act_b
    layer_w = max(max(per_layer) * (2 if prefetch else 1), embed)
    rest = hidden + max(kv_layers) + stats["held"] * tokens / cfg.num_hidden_layers + act
    compute2 = layer_w + rest                                   # a layer runs the batch
    wscale = per_layer[0] / (layer_params(cfg)[0] * b)          # 1, or the int4/fp8 pro-rata factor
    load = max(layer_load_peak([n * wscale for n in layer_tensor_bytes(cfg, i, b)])
               for i in range(cfg.num_hidden_layers))
    if dev.kind == "cpu":
        # one memory: the peak is the larger of running a layer and loading one (its copy + the mapped
        # pages of the tensor being copied, next to the batch's input hidden states; with prefetch the next
        # layer loads while this one runs), plus the process itself — a peak RSS (module docstring)
        loading = (max(per_layer) + rest if prefetch else hidden / 2) + load
        need2 = max(compute2, loading) + base
        host2 = stats["stored"] * batch_tokens
    else:
        # host: the batch's probe arrays, plus the largest tensor's pages while it is copied out of its
        # memory-mapped shard (file-backed, reclaimable; streamed.py maps one tensor at a time)
        need2, loading = compute2, 0.0
        host2 = stats["stored"] * batch_tokens + largest_tensor(cfg) * b
    m2 = Mode("layer-streamed", need2, host2, need2 <= dev.usable_bytes,
              {"layer_weights": layer_w, "hidden_states": hidden, "kv_cache_one_layer": max(kv_layers),
               "activations": act, "largest_tensor": largest_tensor(cfg) * b, "weights_read_per_batch": weights,
               "running_peak": compute2, "loading_peak": loading,
               "process_baseline": base})

    # 3. N devices, contiguous layers per device; each device also holds one segment's activations
    #    and the probe values of the layers it runs (held until the document ends)
    items = [embed] + [w + k for w, k in zip(per_layer, kv_layers)] + [head]
    budget = dev.usable_bytes - act - stats["held"] * tokens
    n = _pack(items, budget)
    lower = math.ceil(sum(items) / budget) if budget > 0 else None
    m3 = Mode("devices", sum(items), stats["stored"] * tokens, n is not None,
              {"n_devices": n, "lower_bound": lower, "per_device_budget": budget})
    # 4. expert parallel: the in-memory mode's KV, probe values and activations on every rank, plus the
    #    copy `_Reduce` all-reduces (the routed output of one segment, S×D, alongside the MoE layer's peak)
    m4 = expert_parallel_mode(cfg, weights, expert_w, kv + stats["held"] * tokens + act + base,  # base: per rank
                              segment * cfg.hidden_size * act_b, dev.usable_bytes, dtype in ("int4", "fp8"))
    m4.host_bytes = stats["stored"] * tokens
    name = (f"config ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts)"
            if isinstance(source, Llama4TextConfig) else str(source))
    return Plan(source=name, dtype=dtype, device=dev, tokens=tokens, segment=segment,
                batch_tokens=batch_tokens, probes=probes, params=counts,
                weight_bytes={k: (_quant_weight_bytes(cfg, k) if k in ("int4", "fp8") else counts["total"] * v)
                              for k, v in DTYPE_BYTES.items()},
                largest_layer_bytes=max(per_layer), embedding_bytes=embed,
                kv_bytes_per_token=per_tok_kv * glob,
                kv_chunked_cap_bytes=per_tok_kv * (len(kv_layers) - glob) * (cfg.attention_chunk_size or 0),
                kv_bytes=kv, stats_bytes_per_token=stats, activation_bytes=act, modes=[m1, m2, m3, m4])


def format_plan(p: Plan) -> str:
    hb = human_bytes
    c = p.params
    lines = [
        f"source            {p.source}   dtype {p.dtype}   device {p.device.name} "
        f"({hb(p.device.total_bytes)} total, {hb(p.device.usable_bytes)} usable)",
        f"parameters        total {human(c['total'])} ({c['total']:,}), active/token {human(c['active'])}, "
        f"routed experts {human(c['routed_experts'])}",
        "weights           " + ", ".join(f"{k} {hb(v)}" for k, v in p.weight_bytes.items()),
        f"largest layer     {hb(p.largest_layer_bytes)}   embedding {hb(p.embedding_bytes)}",
        f"KV cache          {hb(p.kv_bytes_per_token)}/token on global layers + {hb(p.kv_chunked_cap_bytes)} "
        f"fixed on chunked layers; {hb(p.kv_bytes)} for one {p.tokens:,}-token document",
        f"probe values      {hb(p.stats_bytes_per_token['held'])}/token held while a document runs, "
        f"{hb(p.stats_bytes_per_token['stored'])}/token stored ({','.join(p.probes)})",
        f"activations       {hb(p.activation_bytes)} peak per {p.segment:,}-token segment (estimate)",
        "",
        f"{'mode':<16}{'device needs':>16}{'host needs':>14}  fits",
    ]
    for m in p.modes:
        extra = ""
        if m.name == "devices":
            extra = (f"  → {m.detail['n_devices']} × {p.device.name} (layer placement; ≥ {m.detail['lower_bound']} "
                     "by total bytes)" if m.fits else "  → a single layer exceeds one device")
        elif m.name == "expert-parallel":
            d = m.detail
            W, E = d["n_devices"], d["num_experts"]
            if W == 1:
                extra = "  → 1 device, no split needed (the in-memory mode)"
            elif m.fits:
                extra = (f"  → {W} × {p.device.name} ({d['experts_per_rank']} of {E} experts per rank; "
                         f"{hb(d['non_expert_weights'])} non-expert weights on every rank")
                if d["min_by_bytes"] is not None and d["min_by_bytes"] < W:
                    extra += f"; {d['min_by_bytes']} would fit by bytes, but W must divide {E}"
                extra += ")"
            else:
                extra = (f"  → not even at W = {E}, one expert per rank ({hb(d['non_expert_weights'])} "
                         "non-expert weights on every rank)")
            if not d["runnable"] and W != 1:
                extra += " [planned only: expert_parallel loads plain-dtype shards]"
        elif m.name == "layer-streamed":
            extra = (f"  (reads {hb(m.detail['weights_read_per_batch'])} of weights per batch of "
                     f"{p.batch_tokens:,} tokens)")
        lines.append(f"{m.name:<16}{hb(m.device_bytes):>16}{hb(m.host_bytes):>14}  "
                     f"{'yes' if m.fits else 'no '}{extra}")
    if p.device.kind == "cpu":
        ls = next(m for m in p.modes if m.name == "layer-streamed").detail
        lines.append(f"\non a CPU the needs are peak RSS: the process after imports ({hb(CPU_PROCESS_BASELINE_BYTES)}) "
                     f"included; layer-streamed peaks loading a layer ({hb(ls['loading_peak'])}: its copy + the "
                     f"mapped pages of the tensor being copied) or running one ({hb(ls['running_peak'])})")
    lines.append(f"\nrecommended       {p.recommended}")
    return "\n".join(lines)

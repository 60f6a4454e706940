"""Memory planner: parameter counts against the spec (§1.3), KV growth, and known fits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.cli import main
from workbench.config import preset
from workbench.expert_parallel import expert_range
from workbench.model import Llama4ForCausalLM
from workbench.params import count_params
from workbench.plan import DEVICES, kv_cache_bytes, layer_params, make_plan, param_counts, parse_device
from workbench.quant import weight_bytes_breakdown
from workbench.tensor_reader import READ_SLAB_BYTES

GiB = 2**30


@pytest.mark.parametrize("name", ["tiny", "scout", "maverick"])
def test_layer_params_match_the_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    assert layer_params(cfg) == [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert param_counts(cfg) == count_params(cfg)
    tied = cfg.replace(tie_word_embeddings=True, num_experts_per_tok=min(2, cfg.num_local_experts))
    assert param_counts(tied) == count_params(tied)


def test_parameter_counts_match_spec():
    # spec llama4.md §1.3: Scout 107.77 B text, Maverick 400.7 B, both ≈ 17.2 B active per token
    scout, maverick = make_plan("scout").params, make_plan("maverick").params
    assert round(scout["total"] / 1e9, 2) == 107.77
    assert round(maverick["total"] / 1e9, 1) == 400.7
    for p in (scout, maverick):
        assert round(p["active"] / 1e9, 1) == 17.2
    assert make_plan("scout", dtype="bf16").weight_bytes["bf16"] == 2 * scout["total"]


def test_scout_bf16_on_one_h100():
    p = make_plan("scout", dtype="bf16", device="h100-80gb", tokens=8192)
    modes = {m.name: m for m in p.modes}
    assert not modes["in-memory"].fits                   # 215.5 GB of weights vs 79.6 GiB
    assert modes["layer-streamed"].fits                  # one 4.4 GB layer at a time
    assert p.recommended == "layer-streamed"
    dev = modes["devices"].detail
    assert dev["n_devices"] == dev["lower_bound"] == math.ceil(modes["devices"].device_bytes / dev["per_device_budget"])
    assert dev["n_devices"] == 3
    assert make_plan("scout", device="h200-141gb").modes[2].detail["n_devices"] == 2


def test_known_fits():
    # Meta: Scout fits one H100 with int4 weights; fp8 Scout fits one H200; Maverick bf16 needs a node
    assert make_plan("scout", dtype="int4", device="h100-80gb").recommended == "in-memory"
    assert make_plan("scout", dtype="fp8", device="h200-141gb").recommended == "in-memory"
    assert make_plan("scout", dtype="fp8", device="h100-80gb").recommended == "layer-streamed"
    mav = {m.name: m for m in make_plan("maverick", device="h200-141gb").modes}
    assert not mav["in-memory"].fits and mav["layer-streamed"].fits
    assert mav["devices"].detail["n_devices"] == mav["devices"].detail["lower_bound"] == 6
    # on 80 GB devices a 32.6 GB MoE layer packs two to a device: layer placement needs one more than the
    # byte lower bound (expert parallelism needs 16: every rank holds all non-expert weights; below)
    mav80 = make_plan("maverick", device="h100-80gb").modes[2].detail
    assert mav80["lower_bound"] == 11 and mav80["n_devices"] == 12
    # a 32 GB layer does not fit a 24 GB card at all
    small = {m.name: m for m in make_plan("maverick", device="rtx4090-24gb").modes}
    assert not small["layer-streamed"].fits and not small["devices"].fits
    assert make_plan("tiny", dtype="fp32", device="cpu:1").recommended == "in-memory"


def test_kv_cache_grows_only_on_global_layers():
    cfg = preset("scout")
    per_token_layer = 2 * 8 * 128 * 2                                # k and v, 8 kv heads × 128, bf16
    n_global = cfg.is_chunked.count(False)
    assert n_global == 12                                            # NoPE every 4th layer
    a, b = make_plan("scout", tokens=32768), make_plan("scout", tokens=131072)
    assert a.kv_bytes_per_token == per_token_layer * n_global
    assert b.kv_bytes - a.kv_bytes == (131072 - 32768) * per_token_layer * n_global
    chunked = [x for x, c in zip(kv_cache_bytes(cfg, 131072, 2, 4096), cfg.is_chunked) if c]
    assert max(chunked) == per_token_layer * (8192 - 1 + 4096)       # one chunk + a segment, never T
    short = kv_cache_bytes(cfg, 100, 2, 4096)
    assert all(x == 100 * per_token_layer for x in short)


def test_streamed_and_probe_memory_scale_with_batch_and_probes():
    base = make_plan("scout", tokens=8192)
    big = make_plan("scout", tokens=8192, batch_tokens=65536)
    assert big.modes[1].detail["hidden_states"] == 8 * base.modes[1].detail["hidden_states"]
    logits = make_plan("maverick", probes=("router", "router_logits"))
    # 24 MoE layers × 128 experts × fp32 stored
    assert logits.stats_bytes_per_token["stored"] == 24 * (1 * 6 + 128 * 4)
    assert make_plan("scout", prefetch=True).modes[1].detail["layer_weights"] == 2 * base.largest_layer_bytes


def test_checkpoint_directory_reads_config_only(tmp_path):
    cfg = preset("scout")
    (tmp_path / "config.json").write_text(json.dumps({"text_config": cfg.to_hf(), "model_type": "llama4"}))
    p = make_plan(tmp_path, device="h200-141gb")           # no weights on disk: nothing is loaded
    assert p.params == make_plan("scout", device="h200-141gb").params


def test_devices():
    h100 = parse_device("h100-80gb")
    assert h100.total_bytes == DEVICES["h100-80gb"] and 0 < h100.usable_bytes < h100.total_bytes
    assert parse_device("cpu:24").total_bytes == 24 * GiB
    assert parse_device("gpu:79.6").kind == "gpu"
    with pytest.raises(ValueError, match="unknown device 'h100'"):
        parse_device("h100")
    with pytest.raises(ValueError, match="unknown dtype"):
        make_plan("tiny", dtype="int8")


def test_cli_plan(capsys):
    assert main(["plan", "scout", "--dtype", "bf16", "--device", "h100-80gb", "--tokens", "8192"]) == 0
    out = capsys.readouterr().out
    assert "107.77B" in out and "recommended       layer-streamed" in out and "3 × h100-80gb" in out
    assert main(["plan", "maverick", "--device", "h200-141gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recommended"] == "layer-streamed" and d["modes"][2]["detail"]["n_devices"] == 6
    assert main(["plan", "nope"]) == 2


def test_plan_knows_int4_and_fp8_scout_fits():
    """Scout fits one 80 GB device in int4 (experts quantized) and one 141 GB device in fp8, not in bf16."""
    from workbench.plan import make_plan

    def fits(dtype, device):
        return next(m for m in make_plan("scout", dtype=dtype, device=device).modes if m.name == "in-memory").fits

    assert fits("int4", "h100-80gb")
    assert fits("fp8", "h200-141gb") and not fits("fp8", "h100-80gb")
    assert not fits("bf16", "h200-141gb")


# ------------------------------------------------------------------------------- expert parallel
def _ep(plan):
    modes = {m.name: m for m in plan.modes}
    return modes["expert-parallel"], modes["in-memory"]


@pytest.mark.parametrize("name,W", [("scout", 4), ("maverick", 16)])
def test_expert_parallel_per_rank_bytes_from_parameter_counts(name, W):
    """Per rank: all non-expert weights + 1/W of the routed experts (bf16) + what one process holds per
    document (KV, probe values, activations) + the all-reduce's S×D copy; W the smallest divisor of E
    that fits an H100. Counts from the meta-device model, not the planner's own formula."""
    cfg = preset(name)
    counts = count_params(cfg)
    plan = make_plan(name, dtype="bf16", device="h100-80gb", tokens=8192)
    ep, mem = _ep(plan)
    E = cfg.num_local_experts
    replicated = mem.detail["kv_cache"] + mem.detail["probe_values"] + mem.detail["activations"]
    collective = 4096 * cfg.hidden_size * 2

    def per_rank(w):
        return 2 * (counts["total"] - counts["routed_experts"]) + 2 * counts["routed_experts"] / w + replicated \
            + (collective if w > 1 else 0)

    d = ep.detail
    assert ep.fits and d["n_devices"] == W and d["experts_per_rank"] == E // W and E % W == 0
    assert d["non_expert_weights"] == 2 * (counts["total"] - counts["routed_experts"])
    assert ep.device_bytes == d["per_rank_bytes"] == pytest.approx(per_rank(W), rel=1e-12)
    usable = plan.device.usable_bytes
    smaller = [w for w in range(1, W) if E % w == 0]
    assert per_rank(W) <= usable and all(per_rank(w) > usable for w in smaller)
    assert d["min_by_bytes"] == W                    # here the byte bound is itself a divisor of E
    # docs/full-models.md: 22.3 / 28.3 GB of non-expert weights on every rank; 72.9 / 79.0 GB per rank
    assert round(d["non_expert_weights"] / 1e9, 1) == {"scout": 22.3, "maverick": 28.3}[name]
    assert round(ep.device_bytes / 1e9, 1) == {"scout": 72.9, "maverick": 79.0}[name]
    # EP replicates what layer placement splits, so it never needs fewer devices than its byte bound
    assert W >= {m.name: m for m in plan.modes}["devices"].detail["lower_bound"]
    assert plan.recommended == "layer-streamed"     # single-device modes are still preferred


@pytest.mark.parametrize("E,by_bytes,W", [(10, 3, 5), (7, 2, 7), (12, 3, 3)])
def test_expert_parallel_world_must_divide_the_expert_count(E, by_bytes, W):
    cfg = preset("scout").replace(num_local_experts=E)
    ep, _ = _ep(make_plan(cfg, device="h100-80gb"))
    d = ep.detail
    assert d["divisors"] == [w for w in range(1, E + 1) if E % w == 0]
    assert d["min_by_bytes"] == by_bytes and d["n_devices"] == W and E % W == 0
    if by_bytes != W:                                      # the runtime refuses the byte bound itself
        with pytest.raises(ValueError, match=rf"num_local_experts={E} is not divisible by world size {by_bytes}"):
            expert_range(E, 0, by_bytes)


def test_expert_parallel_maverick_on_h200_rounds_up_to_a_divisor_and_reports_it(capsys):
    ep, _ = _ep(make_plan("maverick", device="h200-141gb"))
    assert ep.detail["min_by_bytes"] == 7 and ep.detail["n_devices"] == 8
    assert main(["plan", "maverick", "--device", "h200-141gb"]) == 0
    out = capsys.readouterr().out
    assert "8 × h200-141gb (16 of 128 experts per rank" in out and "7 would fit by bytes, but W must divide 128" in out
    assert main(["plan", "scout", "--device", "h100-80gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["modes"][3]
    assert d["name"] == "expert-parallel" and d["fits"] and d["detail"]["n_devices"] == 4


def test_expert_parallel_when_nothing_fits_or_nothing_is_needed():
    # every rank holds Maverick's 28.3 GB of non-expert weights: no W fits a 24 GB card
    ep, _ = _ep(make_plan("maverick", device="rtx4090-24gb"))
    assert not ep.fits and ep.detail["n_devices"] is None and ep.detail["min_by_bytes"] is None
    assert ep.detail["experts_per_rank"] == 1          # the floor it reports is W = E
    # W = 1 is the in-memory mode, byte for byte (no collective)
    ep, mem = _ep(make_plan("tiny", dtype="fp32", device="cpu:1"))
    assert ep.detail["n_devices"] == 1 and ep.device_bytes == mem.device_bytes and ep.detail["collective"] == 0
    # a dense model has nothing to split
    dense = preset("tiny").replace(moe_layers=[])
    ep, mem = _ep(make_plan(dense, dtype="fp32", device="cpu:1"))
    assert ep.detail["n_devices"] == 1 and ep.detail["expert_weights_per_rank"] == 0


def test_expert_parallel_quantized_is_planned_from_the_quantized_expert_bytes(capsys):
    cfg = preset("maverick")
    plan = make_plan("maverick", dtype="int4", device="h100-80gb")
    ep, _ = _ep(plan)
    q = weight_bytes_breakdown(cfg, "int4")
    assert ep.detail["non_expert_weights"] == q["total"] - q["experts"]
    assert ep.detail["expert_weights_per_rank"] == q["experts"] / ep.detail["n_devices"]
    assert ep.detail["n_devices"] == 8 and ep.detail["min_by_bytes"] == 5 and not ep.detail["runnable"]
    assert main(["plan", "maverick", "--dtype", "int4", "--device", "h100-80gb"]) == 0
    assert "[planned only: expert_parallel loads plain-dtype shards]" in capsys.readouterr().out


@pytest.mark.parametrize("name,bias", [("tiny", False), ("tiny", True), ("scout", False)])
def test_layer_tensor_bytes_follow_the_load_order(name, bias):
    """streamed.py loads a layer's tensors in state_dict order; the planner's load peak walks the same list."""
    from workbench.model.transformer import Llama4TextDecoderLayer
    from workbench.plan import layer_tensor_bytes

    cfg = preset(name).replace(attention_bias=bias)
    for i in sorted({cfg.is_moe.index(True), *([cfg.is_moe.index(False)] if False in cfg.is_moe else [])}):
        with torch.device("meta"):
            layer = Llama4TextDecoderLayer(cfg, i)
        assert layer_tensor_bytes(cfg, i, 2) == [2 * t.numel() for t in layer.state_dict().values()]


def test_layer_load_peak_is_the_tensors_before_plus_twice_the_one_being_copied():
    from workbench.plan import layer_load_peak

    assert layer_load_peak([1, 10, 5, 1]) == 1 + 2 * 10             # the copy and its mapped pages
    assert layer_load_peak([1, 4, 5]) == 1 + 4 + 2 * 5
    assert layer_load_peak([]) == 0


def test_cpu_plan_is_a_peak_rss_and_gpu_plan_device_memory():
    """On a CPU (one memory) layer-streamed peaks at the larger of running a layer and loading one, and the
    plan includes the process after imports; on a GPU the device holds the running layer and the host the
    mapped pages of the largest tensor."""
    from workbench.plan import CPU_PROCESS_BASELINE_BYTES

    cpu = {m.name: m for m in make_plan("scout", device="cpu:1000", tokens=8192).modes}
    gpu = {m.name: m for m in make_plan("scout", device="h200-141gb", tokens=8192).modes}
    s, g = cpu["layer-streamed"], gpu["layer-streamed"]
    assert s.device_bytes == max(s.detail["running_peak"], s.detail["loading_peak"]) + CPU_PROCESS_BASELINE_BYTES
    # Scout's MoE layer without statistics: loading (attention + router, then the 2 × gate_up copy) outgrows
    # running it
    router = make_plan("scout", device="cpu:1000", tokens=8192, probes=("router",)).modes[1].detail
    assert router["loading_peak"] > router["running_peak"]
    assert g.device_bytes == g.detail["running_peak"]
    # the CPU statistics path copies a layer's keys to fp32 (twice: centred) and keeps fp32 per-query buffers
    # of its flash passes (8 rows of H·Dh instead of 3); GPUs tile instead
    cfg = preset("scout")
    extra = s.detail["running_peak"] - g.detail["running_peak"]
    H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert 0 < extra <= 2 * 8192 * Hkv * Dh * 4 + 5 * 4096 * H * Dh * 4
    assert g.host_bytes - s.host_bytes == g.detail["largest_tensor"]
    # in memory: loading reads each tensor into its own storage through at most one slab (no shard stays
    # mapped): on a CPU the same memory, on a GPU host memory
    ci, gi = cpu["in-memory"], gpu["in-memory"]
    assert ci.detail["running_peak"] - gi.detail["running_peak"] == extra
    assert ci.device_bytes == max(ci.detail["running_peak"], ci.detail["loading_peak"]) + CPU_PROCESS_BASELINE_BYTES
    assert ci.detail["loading_peak"] == ci.detail["weights"] + READ_SLAB_BYTES
    assert ci.detail["loading_peak"] == gi.host_bytes - ci.host_bytes + ci.detail["weights"]
    pre = make_plan("scout", device="cpu:1000", tokens=8192, prefetch=True).modes[1]
    assert pre.detail["loading_peak"] > s.detail["loading_peak"]         # the next layer loads while one runs


def test_in_memory_load_peak_is_the_weights_plus_one_read_slab(tmp_path):
    """Shards are read tensor by tensor into their own storage (tensor_reader), so a checkpoint's shard
    sizes no longer matter (sparse files here: nothing is read). For a one-token document loading sets
    the peak: the weights + one slab + the process."""
    cfg = preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    for name, size in (("model-00001-of-00002.safetensors", 3 * 10**9), ("model-00002-of-00002.safetensors", 1000)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    m = make_plan(tmp_path, dtype="fp32", device="cpu:1").modes[0]
    assert m.detail["loading_peak"] == m.detail["weights"] + READ_SLAB_BYTES
    assert make_plan("tiny", dtype="fp32", device="cpu:1").modes[0].detail == m.detail
    big = make_plan("scout", dtype="bf16", device="cpu:1000", tokens=1, probes=("router",)).modes[0]
    assert big.detail["loading_peak"] > big.detail["running_peak"]
    assert big.device_bytes == big.detail["weights"] + READ_SLAB_BYTES + big.detail["process_baseline"]




def test_activation_term_counts_the_padded_statistics_buffers():
    """fp32 key ranges of ≥ PAD_MIN_KEYS take attention_stats' padded call (k', v' at 2·Dh): the CPU
    statistics term doubles its per-key bytes there; bf16 keeps the fused path's two fp32 copies."""
    from workbench.model.attention_stats import PAD_MIN_KEYS
    from workbench.plan import activation_bytes

    cfg = preset("tiny")
    per_key = cfg.num_key_value_heads * cfg.head_dim * 4
    seg = 2048                                  # attention's term is the layer's largest at this segment

    def term(b, keys):
        return activation_bytes(cfg, seg, b, keys, cpu_stats=True)
    assert term(2, PAD_MIN_KEYS) - term(2, PAD_MIN_KEYS - 1) == 2 * per_key
    below = term(4, PAD_MIN_KEYS - 1)
    assert term(4, PAD_MIN_KEYS) - below == (4 * PAD_MIN_KEYS - 2 * (PAD_MIN_KEYS - 1)) * per_key \
        + seg * 4 * cfg.num_attention_heads * cfg.head_dim * 4

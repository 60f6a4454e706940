"""Memory planner: parameter counts against the spec (§1.3), KV growth, and known fits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.cli import main
from workbench.config import preset
from workbench.model import Llama4ForCausalLM
from workbench.params import count_params
from workbench.plan import DEVICES, kv_cache_bytes, layer_params, make_plan, param_counts, parse_device

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
    # byte lower bound (expert parallelism would reach it)
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

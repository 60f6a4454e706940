"""Quantized weights: the int4 format (pack/unpack, error bounds, matmul == dequantised reference
bitwise), Int4Experts vs the float experts, in-place and streaming quantization with save/reload,
FP8 checkpoints in the released per-expert layout, the planner's byte counts, per-layer quality."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.checkpoint import CheckpointError, load_model, save_model
from workbench.config import Llama4TextConfig, preset
from workbench.instrument.hooks import run_with_cache
from workbench.model import Llama4ForCausalLM
from workbench.model.moe import Llama4TextExperts
from workbench.params import count_params
from workbench.quant import (
    Float32Router,
    Fp8Experts,
    Int4Experts,
    Int4Linear,
    dequantize_fp8,
    dequantize_int4,
    fp8_matmul_supported,
    load_fp8,
    load_quantized,
    quantize_checkpoint,
    quantize_fp8,
    quantize_int4,
    quantize_model,
    save_fp8_checkpoint,
    save_quantized,
    weight_bytes,
    weight_bytes_breakdown,
)
from workbench.quant.int4 import pack_int4, unpack_int4
from workbench.quant.quality import compare, markdown

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 384, (2, 48), generator=GEN)      # crosses the tiny preset's chunk (32) and floor_scale (16)
G = 32                                                     # tiny preset: hidden = expert width = 64


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


# --------------------------------------------------------------------------------------- format
def test_pack_unpack_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8, generator=GEN)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert int(pack_int4(torch.tensor([1, 2], dtype=torch.uint8))[0]) == 1 | 2 << 4   # low nibble = even index


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype, slack", [(torch.float32, 1e-5), (torch.bfloat16, 7 * 2**-8)])
def test_quantization_error_is_at_most_half_a_step(symmetric, scale_dtype, slack):
    """|w − dequant(w)| ≤ scale/2 per element. With bf16 scales, rounding the scale down can push the
    largest code past the clamp by up to 7 · (relative bf16 rounding ≤ 2⁻⁸) steps."""
    w = torch.randn(48, 256, generator=GEN) * torch.logspace(-3, 0, 48)[:, None]     # rows of varied size
    w[0, :64] = 0.0                                                                  # an all-zero group
    w[1, :64] = torch.rand(64, generator=GEN) + 0.5                                 # a one-signed group
    q = quantize_int4(w, 64, symmetric, scale_dtype)
    assert (q.zeros is None) == symmetric
    err = (dequantize_int4(*q) - w).abs()
    step = q.scales.float().repeat_interleave(64, -1)
    assert bool((err <= step * (0.5 + slack) + 1e-12).all()), float((err / step).max())
    assert float(err[0, :64].max()) == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_16bit_dequantisation_is_bitwise_the_float32_one(symmetric):
    w = torch.randn(64, 256, generator=GEN) * 3
    for dt in (torch.bfloat16, torch.float16):
        q = quantize_int4(w, 64, symmetric, dt)
        assert torch.equal(dequantize_int4(*q, dtype=dt), dequantize_int4(*q).to(dt))


def test_group_size_must_divide_the_input_dim():
    with pytest.raises(ValueError, match=r"input dim 64 is not a multiple of group_size=128 \(try group_size in"):
        quantize_int4(torch.randn(4, 64), 128)
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_model(load_model("tiny"), group_size=128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_equals_dequantised_reference_bitwise(dtype):
    lin = torch.nn.Linear(128, 96, bias=False)
    from workbench.quant.int4 import Int4Spec
    q = Int4Linear.from_weight(lin.weight.detach(), Int4Spec(group_size=32, symmetric=False))
    x = torch.randn(7, 128, generator=GEN).to(dtype)
    ref = F.linear(x, dequantize_int4(q.qweight, q.scales, q.zeros).to(dtype))
    assert torch.equal(q(x), ref)


def _experts_case(K: int):
    torch.manual_seed(1)
    E, D, Fw, N = 6, 64, 32, 40
    ex = Llama4TextExperts(E, D, Fw)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.1)
        ex.down_proj.normal_(0, 0.1)
    x = torch.randn(N, D)
    ids = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])   # expert E-1 never chosen
    gate = torch.rand(N, K)
    return ex, x, ids, gate


@pytest.mark.parametrize("K", [1, 2])
def test_int4_experts_match_float_experts_on_dequantised_weights(K, monkeypatch):
    """Int4Experts == Llama4TextExperts holding the dequantised weights (fp32; tolerance only for the
    summation order of grouped vs per-expert matmuls), and only routed experts are unpacked."""
    from workbench.quant.int4 import Int4Spec
    ex, x, ids, gate = _experts_case(K)
    q = Int4Experts.from_float(ex, Int4Spec(group_size=32))
    deq = Llama4TextExperts(*ex.gate_up_proj.shape[:2], ex.down_proj.shape[1])
    with torch.no_grad():
        deq.gate_up_proj.copy_(q.gate_up_proj.weight().transpose(1, 2))
        deq.down_proj.copy_(q.down_proj.weight().transpose(1, 2))
    unpacked = []
    real = Int4Linear.weight
    monkeypatch.setattr(Int4Linear, "weight", lambda self, dtype=torch.float32, index=None:
                        unpacked.append(index) or real(self, dtype, index))
    out = q(x, ids, gate)
    torch.testing.assert_close(out, deq(x, ids, gate), rtol=1e-5, atol=1e-6)
    assert sorted(set(unpacked)) == sorted(set(ids.flatten().tolist())) and 5 not in unpacked
    # against the unquantized experts: Gaussian weights, symmetric g32 → step ≈ 2.1σ/7, rms error
    # step/√12 ≈ 9 % per matrix; two matrices measure ≈ 0.16 here. 0.25 still catches a broken format.
    rel = (out - ex(x, ids, gate)).norm() / ex(x, ids, gate).norm()
    assert rel < 0.25, rel


def test_int4_experts_are_differentiable_in_the_activations():
    from workbench.quant.int4 import Int4Spec
    ex, x, ids, gate = _experts_case(1)
    q = Int4Experts.from_float(ex, Int4Spec(group_size=32))
    x.requires_grad_(True)
    q(x, ids, gate).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- model conversion
def test_quantize_model_end_to_end_error_bounds(tiny):
    """Tiny preset, fp32 compute, symmetric g32. Measured rel. logit error / top-1 agreement:
    experts only 0.0065 / 0.99; experts + shared + attention + MLP 0.18 / 0.79 (random weights: the
    routed experts add little to the residual, every other matrix a lot). Bounds ≈ 2–3× the measured
    error; a swapped nibble order measures 0.051 and 1.1, so both bounds catch a broken format."""
    ref = _logits(tiny)
    for targets, bound, top1 in ((("experts",), 0.02, 0.95),
                                 (("experts", "shared_expert", "attention", "mlp"), 0.35, 0.6)):
        m = quantize_model(load_model("tiny"), targets, group_size=G)
        out = _logits(m)
        rel = float((out - ref).norm() / ref.norm())
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        assert rel < bound and agree >= top1, (targets, rel, agree)


def test_quantized_model_keeps_taps_and_routes_in_float32():
    m = quantize_model(load_model("tiny", dtype="bf16"), ("experts",), group_size=G)
    moe = m.model.layers[0].feed_forward
    assert isinstance(moe.router, Float32Router) and moe.router.weight.dtype == torch.float32
    out, cache = run_with_cache(m, IDS, ["*.hook_router_logits", "*.hook_topk_ids", "*.hook_mlp_out"])
    assert cache["model.layers.0.feed_forward.hook_router_logits"].dtype == torch.float32
    assert cache["model.layers.0.feed_forward.hook_topk_ids"].shape == (IDS.numel(), 1)
    assert cache["model.layers.0.hook_mlp_out"].dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(m, group_size=G)


def test_save_quantized_roundtrip_is_exact(tmp_path):
    m = quantize_model(load_model("tiny"), ("experts", "attention"), group_size=G, symmetric=False)
    path = save_quantized(m, tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "workbench-int4"
    back = load_quantized(path)
    assert torch.equal(_logits(back), _logits(m))
    assert back.tokenizer is not None


def test_quantize_checkpoint_layout_and_equality_with_in_memory(tmp_path, tiny):
    src = save_model(tiny, tmp_path / "src", max_shard_size="100KB")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 263, 264]}))
    dst = quantize_checkpoint(src, tmp_path / "q", targets=("experts", "shared_expert"), group_size=G,
                              max_shard_size="60KB")
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 3 and (dst / "model.safetensors.index.json").exists()
    assert (dst / "tokenizer.json").exists() and (dst / "generation_config.json").exists()
    tensors = {}
    for s in shards:
        tensors.update(load_file(str(s)))
    k = "model.layers.0.feed_forward.experts.gate_up_proj"
    assert tensors[f"{k}.qweight"].shape == (4, 128, 32) and tensors[f"{k}.qweight"].dtype == torch.uint8
    assert tensors[f"{k}.scales"].shape == (4, 128, 2) and tensors[f"{k}.scales"].dtype == torch.bfloat16
    assert f"{k}.zeros" not in tensors and k not in tensors
    assert tensors["model.layers.0.feed_forward.shared_expert.down_proj.qweight"].shape == (64, 32)
    assert tensors["model.layers.0.feed_forward.router.weight"].dtype == torch.float32
    assert tensors["model.layers.2.feed_forward.gate_proj.weight"].dtype == torch.float32   # dense layer kept
    loaded = load_quantized(dst)
    mem = quantize_model(load_model("tiny"), ("experts", "shared_expert"), group_size=G)
    assert torch.equal(_logits(loaded), _logits(mem))


def test_quantize_checkpoint_from_bf16_release_layout(tmp_path):
    """A bf16 checkpoint with the composite config and `language_model.` prefix (as on the hub)."""
    src = save_fp8_checkpoint(load_model("tiny", dtype="bf16"), tmp_path / "bf16", targets=())
    dst = quantize_checkpoint(src, tmp_path / "q", group_size=G)
    m = load_quantized(dst)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert isinstance(m.model.layers[0].feed_forward.experts, Int4Experts)
    assert _logits(m).dtype == torch.bfloat16


def test_quantized_checkpoint_errors(tmp_path, tiny):
    src = save_model(tiny, tmp_path / "src")
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(src)
    dst = quantize_checkpoint(src, tmp_path / "q", group_size=G)
    t = load_file(str(dst / "model.safetensors"))
    del t["model.layers.1.feed_forward.experts.down_proj.scales"]
    save_file(t, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*experts.down_proj.scales"):
        load_quantized(dst)
    with pytest.raises(ValueError, match="source directory"):
        quantize_checkpoint(src, src)
    f8 = save_fp8_checkpoint(tiny, tmp_path / "f8")
    with pytest.raises(CheckpointError, match="load_fp8"):
        quantize_checkpoint(f8, tmp_path / "q8", group_size=G)


PEAK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from workbench.config import preset
    from workbench.model import Llama4ForCausalLM
    from workbench.quant import quantize_checkpoint

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def high_water():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    with torch.device("meta"):          # warm up: the first meta-device build pages in torch code
        Llama4ForCausalLM(preset("tiny"))
    # reset the peak: ru_maxrss would keep import-time transients, which vary from run to run
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss()
    quantize_checkpoint(sys.argv[1], sys.argv[2], group_size=128, max_shard_size="8MB")
    print(base, high_water())
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_streaming_quantization_peak_ram(tmp_path):
    """~50 MB bf16 checkpoint (75 % routed experts) in 40 MB shards: quantizing it raises peak RSS by
    well under half the checkpoint (measured 0.34–0.36×: an 8 MB output shard, one expert slice,
    row-block temporaries). A load-then-quantize converter peaks at ≥ 1× (the bf16 model) plus its output."""
    cfg = Llama4TextConfig(vocab_size=384, hidden_size=512, intermediate_size=256, intermediate_size_mlp=1024,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                           num_local_experts=16, moe_layers=[0, 1, 3], no_rope_layer_interval=2,
                           attention_chunk_size=32, floor_scale=16)
    model = Llama4ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():                      # finite values (loaders refuse NaN/inf, e.g. uninitialised experts)
        for p in model.parameters():
            p.normal_(0, 0.02)
    nbytes = sum(p.numel() * 2 for p in model.parameters())
    src = save_model(model, tmp_path / "src", max_shard_size="40MB")
    del model
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(tmp_path / "q")], capture_output=True,
                         text=True, timeout=300, check=True)
    base, peak = map(int, out.stdout.split())
    ratio = (peak - base) / nbytes
    assert ratio < 0.6, f"peak RSS {peak / 1e6:.0f} MB = baseline {base / 1e6:.0f} MB + {ratio:.2f}× bf16 checkpoint"
    assert load_quantized(tmp_path / "q").config.num_local_experts == 16


# ----------------------------------------------------------------------------------------- FP8
def test_fp8_quantize_roundtrip_relative_error():
    w = torch.randn(64, 96, generator=GEN) * torch.logspace(-2, 1, 64)[:, None]
    for per_channel in (True, False):
        q, s = quantize_fp8(w, per_channel)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == ((64, 1) if per_channel else (1,))
        err = (dequantize_fp8(q, s) - w).abs()
        # e4m3: 3 mantissa bits → relative rounding ≤ 2⁻⁴ for normal values; subnormals within 2⁻⁹·scale
        assert bool((err <= w.abs() * 2**-4 + s * 2**-9 + 1e-12).all())


def test_fp8_checkpoint_has_the_released_per_expert_layout(tmp_path, tiny):
    path = save_fp8_checkpoint(tiny, tmp_path / "f8", targets=("experts", "shared_expert"))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        g = f.get_slice("language_model.model.layers.0.feed_forward.experts.3.gate_proj.weight")
        assert g.get_dtype() == "F8_E4M3" and g.get_shape() == [64, 64]           # [out=F, in=D]
        assert f.get_tensor("language_model.model.layers.0.feed_forward.experts.3.down_proj.weight_scale").shape == (
            64, 1)
    assert "language_model.model.layers.0.feed_forward.experts.gate_up_proj" not in keys
    assert "language_model.model.layers.0.feed_forward.shared_expert.up_proj.weight_scale" in keys


@pytest.mark.parametrize("per_channel", [True, False])
def test_load_fp8_dequantises_into_the_fused_layout_exactly(tmp_path, tiny, per_channel):
    path = save_fp8_checkpoint(tiny, tmp_path / "f8", targets=("experts", "shared_expert"), per_channel=per_channel)
    m = load_fp8(path, dtype=torch.float32, keep_fp8=False)
    gu = tiny.model.layers[1].feed_forward.experts.gate_up_proj.detach()            # (E, D, 2F)
    e, Fh = 2, gu.shape[-1] // 2
    q, s = quantize_fp8(gu[e, :, Fh:].t(), per_channel)                              # the up_proj rows
    got = m.model.layers[1].feed_forward.experts.gate_up_proj[e, :, Fh:].t()
    assert torch.equal(got, dequantize_fp8(q, s))
    rel = float((_logits(m) - _logits(tiny)).norm() / _logits(tiny).norm())
    assert rel < 0.03, rel                      # measured ≈ 0.006 (per channel) on the tiny preset


def test_load_fp8_keeping_fp8_storage_matches_dequantised_load(tmp_path, tiny):
    path = save_fp8_checkpoint(tiny, tmp_path / "f8", targets=("experts", "shared_expert", "attention"))
    deq = load_fp8(path, dtype=torch.float32, keep_fp8=False)
    kept = load_fp8(path, dtype=torch.float32, keep_fp8=True)
    moe = kept.model.layers[0].feed_forward
    assert isinstance(moe.experts, Fp8Experts) and moe.experts.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(moe.router, Float32Router)
    # same dequantised weights; grouped vs per-expert matmul summation order differs (fp32)
    torch.testing.assert_close(_logits(kept), _logits(deq), rtol=1e-4, atol=1e-5)
    auto = load_fp8(path, dtype=torch.float32)              # "auto": no FP8 GEMM on CPU → dequantised load
    assert not auto.quantization["kept_fp8"]


def test_load_fp8_errors_list_missing_experts(tmp_path, tiny):
    path = save_fp8_checkpoint(tiny, tmp_path / "f8")
    t = load_file(str(path / "model.safetensors"))
    del t["language_model.model.layers.3.feed_forward.experts.2.down_proj.weight_scale"]
    t["language_model.model.layers.3.feed_forward.experts.0.up_proj.input_scale"] = torch.ones(1)
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing per-expert tensors \(1\).*experts.2.down_proj.weight_scale"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_fp8(path)


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_matmul_supported("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs a GPU with FP8 GEMM (compute capability ≥ 9.0)")
def test_scaled_mm_path_matches_dequantised_path_on_gpu(tmp_path, tiny):
    """The only check of the `torch._scaled_mm` path; never run on the CPU-only CI."""
    path = save_fp8_checkpoint(tiny, tmp_path / "f8", targets=("experts", "shared_expert"))
    kept = load_fp8(path, dtype=torch.bfloat16, device="cuda", keep_fp8=True)
    ids = IDS.cuda()
    fast = _logits(kept, ids).float()
    for mod in kept.modules():
        if hasattr(mod, "scaled_mm"):
            mod.scaled_mm = False
    slow = _logits(kept, ids).float()
    assert float((fast - slow).norm() / slow.norm()) < 0.05


# --------------------------------------------------------------------------------------- planner
def test_weight_bytes_counts_scales_and_matches_param_counts():
    scout = preset("scout")
    n = count_params(scout)
    assert weight_bytes(scout, "bf16") == 2 * n["total"]
    b = weight_bytes_breakdown(scout, "int4", group_size=128)
    E, D, Fw, L = 16, 5120, 8192, 48
    routed = L * E * 3 * D * Fw
    assert b["experts"] == routed // 2 + (routed // 128) * 2              # codes + one bf16 scale per group
    assert b["router"] == L * E * D * 4                                    # float32 router
    assert b["total"] == 2 * n["total"] - 2 * routed + b["experts"] + L * E * D * 2
    f8 = weight_bytes_breakdown(scout, "fp8")
    assert f8["experts"] == routed + 4 * L * E * (2 * Fw + D)             # per-channel float32 scales
    assert 70e9 < b["total"] < 75e9 and 115e9 < f8["total"] < 122e9        # Scout: int4 fits 80 GB, FP8 141 GB
    asym = weight_bytes(scout, "int4", symmetric=False)
    assert asym - b["total"] == routed // 128
    with pytest.raises(ValueError, match="unknown scheme"):
        weight_bytes(scout, "int3")


# --------------------------------------------------------------------------------------- quality
def test_quality_compare_rows(tiny):
    same = compare(tiny, tiny, IDS)
    assert [r.layer for r in same] == [0, 1, 2, 3]
    assert all(r.top1_agree == 1.0 and r.logit_rel_err == 0.0 for r in same)
    assert same[2].routing_agree is None and same[0].routing_agree == 1.0
    q = quantize_model(load_model("tiny"), group_size=G)
    rows = compare(tiny, q, IDS)
    assert all(0.5 <= r.routing_agree <= 1.0 for r in rows if r.routing_agree is not None)
    assert 0 < rows[-1].logit_rel_err < 0.02 and rows[-1].kl >= 0
    final = _logits(q)
    assert abs(rows[-1].top1_agree - float((final.argmax(-1) == _logits(tiny).argmax(-1)).float().mean())) < 1e-9
    table = markdown({"int4": rows})
    assert table.count("\n") == 1 + 4 and "| int4 | 2 | dense |" in table


def test_env_override_disables_fp8_matmul(monkeypatch):
    monkeypatch.setenv("WORKBENCH_FP8_MATMUL", "0")
    assert not fp8_matmul_supported("cpu")


@pytest.mark.slow
def test_quality_benchmark_quick_runs():
    from conftest import require_data

    corpus = require_data("domain_texts", "domain text corpus")      # its trained section reads held-out text
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/quant_quality.py", "--quick", "--corpus", str(corpus)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| int4 experts g32 | 3 |" in proc.stdout and "| fp8 experts (per-channel) | 2 | dense |" in proc.stdout

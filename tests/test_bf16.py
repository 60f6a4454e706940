"""bf16 execution against float32 on the same weights, with the statistics accumulated in float32.

Models: `tiny` (4 experts; MoE layers 0, 1, 3) and a 16-expert variant (Scout's expert count, every
layer MoE), random weights at `build_model`'s init scale (std 0.02), one 200-token document run the
way `record` runs it (segments of 64 on the KV cache; chunk 32, so chunked and global layers, several
chunks and temperature tuning past floor_scale 16 are all exercised).

Why these tolerances (bf16 keeps 8 significant bits: unit roundoff u = 2⁻⁸ ≈ 0.004):
  * logits: relative L2 error ≤ 0.03 ≈ 8 u. Every weight and every activation is rounded once or
    more per layer; measured 0.008 (tiny) and 0.016 (16 experts), so the bound has ≈ 2× headroom.
    Next-token argmax agrees on ≥ 95 % of positions (measured 98 %): flips only where the top two
    logits are within that error.
  * routing: a flip is legitimate only when the float32 margin between the expert bf16 chose and the
    float32 choice is within the bf16 error of the router logits. So: every flipped token's float32
    margin (top-1 − top-2 logit) is ≤ 2 ε, ε = the layer's largest |Δ router logit|; and ≥ 95 % of
    tokens keep their expert per layer (measured ≥ 96.5 %).
  * gates (tokens that kept their experts): |Δ| ≤ ε/4 + 2⁻⁸ — sigmoid's slope is ≤ 1/4, and the
    gate, computed in float32, is rounded once to bf16 (half an ulp below 1 is 2⁻⁹; 2⁻⁸ leaves slack).
  * attention entropy: stored in float32 whatever the model dtype. Against float32 execution its
    error is that of bf16 q and k: ≤ 0.15 nats per value, ≤ 0.02 nats on average (measured 0.07 and
    < 0.01; entropies here are ≈ 3.2 nats). Against a float64 entropy of the *same* bf16 q and k, both
    kernels agree to 1e-5: the tiled one (every device; the GPU path) upcasts each tile (measured 5e-7),
    and the fused CPU one runs its statistics call (V := K − mean K) on float32 copies of q and k.
    (Before that it passed bf16 to the flash kernel, which returns Σ a·k in its input dtype: errors up
    to 5e-3 nats.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_streamed import fast_model

from workbench.config import preset
from workbench.instrument.hooks import run_with_cache
from workbench.model.attention_stats import attend_with_stats
from workbench.recording import run_document

pytestmark = pytest.mark.usefixtures("one_thread")

T, SEGMENT = 200, 64
PROBES = ("router", "router_logits", "entropy")
CONFIGS = {"tiny": preset("tiny"),
           "16 experts": preset("tiny").replace(hidden_size=128, intermediate_size=128, head_dim=32,
                                                num_local_experts=16, moe_layers=None, interleave_moe_layer_step=1)}


def _pair(cfg):
    """(float32 model, the same weights in bf16): RoPE frequencies stay float32 in both (as HF)."""
    m32 = fast_model(cfg, seed=0, std=0.02)
    m16 = fast_model(cfg, seed=0, std=0.02).to(torch.bfloat16)
    m16.model.inv_freq = m32.model.inv_freq.clone()
    return m32, m16


def _ids(cfg):
    return torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_agrees_with_fp32_within_stated_tolerances(name):
    cfg = CONFIGS[name]
    m32, m16 = _pair(cfg)
    ids = _ids(cfg)
    with torch.no_grad():
        l32, l16 = m32(ids).logits.float(), m16(ids).logits.float()
    assert float((l16 - l32).norm() / l32.norm()) <= 0.03
    assert float((l16.argmax(-1) == l32.argmax(-1)).float().mean()) >= 0.95

    a = run_document(m32, ids[0].tolist(), PROBES, SEGMENT)
    b = run_document(m16, ids[0].tolist(), PROBES, SEGMENT)
    for key in ("router/weights", "router/logits", "attention/entropy", "attention/entropy_no_temp"):
        assert b[key].dtype == np.float32, key                 # what the store receives
    for j in range(len(cfg.moe_layer_index)):
        lg32, lg16 = a["router/logits"][j], b["router/logits"][j]            # (T, E)
        eps = float(np.abs(lg32 - lg16).max())
        ids32, ids16 = a["router/experts"][j][:, 0], b["router/experts"][j][:, 0]
        flips = ids32 != ids16
        assert flips.mean() <= 0.05, f"layer {j}: {flips.mean():.1%} of tokens changed expert"
        top2 = -np.sort(-lg32, axis=-1)[:, :2]
        margin = top2[:, 0] - top2[:, 1]
        assert (margin[flips] <= 2 * eps).all(), f"layer {j}: a flip with a clear float32 margin"
        gate_err = np.abs(a["router/weights"][j] - b["router/weights"][j])[~flips]
        assert gate_err.max() <= eps / 4 + 2 ** -8, f"layer {j}"
    dH = np.abs(a["attention/entropy"] - b["attention/entropy"])
    assert dH.max() <= 0.15 and dH.mean() <= 0.02
    assert np.array_equal(a["attention/n_keys"], b["attention/n_keys"])


def test_bf16_statistics_are_accumulated_in_fp32():
    """Entropies from the bf16 model's own q and k against a float64 computation; gates = sigmoid in
    float32 rounded once; router logits in the model's dtype (as HF)."""
    cfg = CONFIGS["tiny"]
    _, m16 = _pair(cfg)
    sites = ["*.self_attn.hook_q", "*.self_attn.hook_k", "*.feed_forward.hook_router_logits",
             "*.feed_forward.hook_topk_ids", "*.feed_forward.hook_topk_gates"]
    with torch.no_grad():
        _, c = run_with_cache(m16, _ids(cfg), sites)
    pos = torch.arange(T)
    for i, layer in enumerate(m16.model.layers):
        att = layer.self_attn
        q, k = c[f"model.layers.{i}.self_attn.hook_q"], c[f"model.layers.{i}.self_attn.hook_k"]   # (1, T, H·, Dh)
        assert q.dtype == torch.bfloat16
        G = q.shape[2] // k.shape[2]
        q64, k64 = q[0].double(), k[0].double().repeat_interleave(G, dim=1)
        s = torch.einsum("thd,shd->hts", q64, k64) * att.scaling
        visible = pos[None] <= pos[:, None]
        if att.chunk:
            visible &= pos[None] // att.chunk == pos[:, None] // att.chunk
        logp = s.masked_fill(~visible, -math.inf).log_softmax(-1)
        ref = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)                      # (H, T) float64
        beta = att.temperature(pos) if att.temperature_tuning else None
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        for method in ("tiled", "fused"):
            _, st = attend_with_stats(qt, kt, kt, 0, 0, att.chunk, att.scaling, beta, method=method)
            assert st.entropy_BHT.dtype == torch.float32
            err = float((st.entropy_BHT[0].double() - ref).abs().max())
            assert err <= 1e-5, f"layer {i} {method}: {err:.2e} > 1e-5"
    for j in cfg.moe_layer_index:
        base = f"model.layers.{j}.feed_forward."
        logits, ids, gates = (c[base + s] for s in ("hook_router_logits", "hook_topk_ids", "hook_topk_gates"))
        assert logits.dtype == gates.dtype == torch.bfloat16
        assert torch.equal(gates, torch.sigmoid(logits.gather(-1, ids).float()).to(torch.bfloat16))

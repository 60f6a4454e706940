"""Streaming attention statistics vs entropies of HF eager attention weights, plus invariants."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ours_from_hf, random_hf_model
from tolerances import entropy_tol, model_tol, reorder_tol

from workbench.config import Llama4TextConfig
from workbench.instrument.hooks import hooks, run_with_cache
from workbench.model.attention_kernel import attend, n_keys
from workbench.model.attention_stats import attend_with_stats

CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, moe_layers=[1, 2, 3],
           no_rope_layer_interval=2, attention_chunk_size=16, floor_scale=8, attn_scale=0.5,
           rope_theta=10000.0, max_position_embeddings=4096)


def entropy_of(weights_BHTS: torch.Tensor) -> torch.Tensor:
    w = weights_BHTS.double()
    return -(torch.where(w > 0, w * w.log(), torch.zeros_like(w))).sum(-1)


def _stats(model, ids):
    with torch.no_grad():
        _, cache = run_with_cache(model, ids, ["*.hook_entropy", "*.hook_entropy_no_temp", "*.hook_n_keys",
                                               "*.hook_sink_mass"],
                                  attn_stats=True)
    return cache


@pytest.mark.parametrize("T", [70, 97])
def test_entropy_matches_hf_eager_weights(T):
    cfg = Llama4TextConfig(**CFG)
    hf = random_hf_model(cfg, std=0.15)
    ours = ours_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions
    cache = _stats(ours, ids)
    for i in range(cfg.num_hidden_layers):
        H = cache[f"model.layers.{i}.self_attn.hook_entropy"]
        torch.testing.assert_close(H.double(), entropy_of(ref[i]), rtol=0, atol=entropy_tol(cfg, T))
        sink = cache[f"model.layers.{i}.self_attn.hook_sink_mass"]
        torch.testing.assert_close(sink, ref[i][..., 0], rtol=0, atol=model_tol(cfg, n_keys=T))  # 0: key 0 masked
        n_ref = (ref[i][0, 0] > 0).sum(-1)
        assert torch.equal(cache[f"model.layers.{i}.self_attn.hook_n_keys"].long(), n_ref)


def test_counterfactual_equals_hf_without_tuning_at_first_nope_layer():
    cfg = Llama4TextConfig(**CFG)
    hf = random_hf_model(cfg, std=0.15)
    ours = ours_from_hf(cfg, hf)
    first_nope = cfg.use_rope.index(False)
    hf_off = random_hf_model(cfg.replace(attn_temperature_tuning=False), std=0.15)
    hf_off.load_state_dict(hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 90))
    with torch.no_grad():
        ref = hf_off(ids, output_attentions=True).attentions[first_nope]
    cache = _stats(ours, ids)
    H0 = cache[f"model.layers.{first_nope}.self_attn.hook_entropy_no_temp"]
    H = cache[f"model.layers.{first_nope}.self_attn.hook_entropy"]
    torch.testing.assert_close(H0.double(), entropy_of(ref), rtol=0, atol=entropy_tol(cfg, 90))
    assert (H - H0).abs().max() > 1e-3            # tuning (attn_scale 0.5) really changes entropy


def test_invariants_tuning_lowers_entropy_and_resets():
    cfg = Llama4TextConfig(**CFG)
    model = ours_from_hf(cfg, random_hf_model(cfg, std=0.15))
    ids = torch.randint(0, cfg.vocab_size, (1, 80))
    cache = _stats(model, ids)
    for i in range(cfg.num_hidden_layers):
        H = cache[f"model.layers.{i}.self_attn.hook_entropy"][0]
        H0 = cache[f"model.layers.{i}.self_attn.hook_entropy_no_temp"][0]
        assert (H <= H0 + 1e-5).all()                          # dH/dβ ≤ 0
        before = cfg.floor_scale - 1                            # β = 1 for pos < floor_scale - 1
        torch.testing.assert_close(H[:, :before], H0[:, :before], rtol=0, atol=1e-6)
        assert H[:, 0].abs().max() == 0                         # first position of the sequence
        if cfg.is_chunked[i]:
            C = cfg.attention_chunk_size
            assert H[:, C::C].abs().max() == 0                  # first position of every chunk
            torch.testing.assert_close(H0, H)                   # no temperature on RoPE layers


def test_uniform_rows_give_log_n():
    cfg = Llama4TextConfig(**CFG)
    model = ours_from_hf(cfg, random_hf_model(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 50))
    with torch.no_grad(), hooks(model, {"*.self_attn.hook_q": lambda q, s: torch.zeros_like(q)}):
        cache = _stats(model, ids)
    for i in range(cfg.num_hidden_layers):
        n = cache[f"model.layers.{i}.self_attn.hook_n_keys"].double()
        H = cache[f"model.layers.{i}.self_attn.hook_entropy"][0].double()
        torch.testing.assert_close(H, n.log().expand_as(H), rtol=0, atol=1e-5)


# global layers always keep the whole cache (k0 = 0); chunked caches may start later
@pytest.mark.parametrize("method,dense_keys", [("tiled", 6), ("tiled", 4096), ("fused", 0), ("padded", 0)])
@pytest.mark.parametrize("chunk,q0,k0", [(None, 0, 0), (None, 13, 0), (7, 0, 0), (7, 13, 0), (7, 13, 7)])
def test_kernel_paths_agree(chunk, q0, k0, method, dense_keys):
    """Blockwise-with-stats and SDPA paths agree, including prefill on top of a cache."""
    g = torch.Generator().manual_seed(0)
    Tq, S = 20, 20 + q0 - k0
    q = torch.randn(2, 4, Tq, 8, generator=g)
    k, v = torch.randn(2, 2, S, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    if chunk and k0:       # a chunked cache starts at the chunk of the first new query
        k0 = (q0 // chunk) * chunk
        k, v = k[:, :, -(Tq + q0 - k0):], v[:, :, -(Tq + q0 - k0):]
    a = attend(q, k, v, q0, k0, chunk, 0.3)
    b, st = attend_with_stats(q, k, v, q0, k0, chunk, 0.3, None, dense_keys=dense_keys, method=method)
    ref_out, ref = attend_with_stats(q, k, v, q0, k0, chunk, 0.3, None, dense_keys=4096, method="tiled")
    torch.testing.assert_close(st.entropy_BHT, ref.entropy_BHT, rtol=0, atol=reorder_tol(S, magnitude=math.log(S)))
    torch.testing.assert_close(st.sink_mass_BHT, ref.sink_mass_BHT, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert st.n_keys_T.min() >= 1


@pytest.mark.parametrize("Tq,q0,chunk,k0", [(1, 0, None, 0), (1, 40, None, 0), (1, 37, 16, 32), (3, 40, None, 0),
                                           (5, 33, 16, 32), (16, 48, 16, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_path_equals_tiled(Tq, q0, chunk, k0, dtype):
    """method="auto" sends up to DECODE_QUERIES queries of one key range (decode steps) through the
    dense per-kv-head path; it must equal the tiled reference: output, entropy as run and without
    temperature, keys per query and sink mass (k0 = 0), for GQA groups of 4."""
    g = torch.Generator().manual_seed(3)
    S = q0 + Tq - k0
    q = torch.randn(1, 8, Tq, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, S, 16, generator=g).to(dtype) for _ in range(2))
    beta = torch.linspace(1.1, 1.3, Tq)
    out, st = attend_with_stats(q, k, v, q0, k0, chunk, 0.25, beta, method="auto")
    ref_out, ref = attend_with_stats(q, k, v, q0, k0, chunk, 0.25, beta, method="tiled")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ("entropy_BHT", "entropy_no_temp_BHT", "sink_mass_BHT"):
        torch.testing.assert_close(getattr(st, name), getattr(ref, name), rtol=0, atol=2e-6, msg=name)
    assert torch.equal(st.n_keys_T, ref.n_keys_T)
    if S > 1:                                                           # one key: both are exactly 0
        assert not torch.equal(st.entropy_BHT, st.entropy_no_temp_BHT)  # the counterfactual is computed


def test_streaming_entropy_long_shifted_scores_fp64_reference():
    """Large |scores| (no cancellation) and many blocks: matches dense entropy."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 300, 16, generator=g) * 4
    k = torch.randn(1, 2, 300, 16, generator=g) * 4 + 3.0
    v = torch.randn(1, 2, 300, 16, generator=g)
    s = (q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5
    s = s.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), -math.inf)
    ref = entropy_of(torch.softmax(s, -1))
    for method in ("fused", "padded", "tiled"):
        _, st = attend_with_stats(q, k, v, 0, 0, None, 16 ** -0.5, None, dense_keys=64, method=method)
        torch.testing.assert_close(st.entropy_BHT.double(), ref, rtol=0, atol=1e-4)


def _eager_stats(q, k, v, q0, k0, chunk, scale, beta):
    """float64 reference from explicit softmax weights: out, H, H without temperature, first-token mass."""
    G = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    qpos, kpos = torch.arange(q0, q0 + q.shape[2])[:, None], torch.arange(k0, k0 + k.shape[2])[None, :]
    visible = kpos <= qpos
    if chunk:
        visible &= kpos // chunk == qpos // chunk
    s = (qd @ kd.transpose(-1, -2)) * scale
    logp = s.masked_fill(~visible, -math.inf).log_softmax(-1)
    h = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    logp0 = (s / beta.double()[:, None]).masked_fill(~visible, -math.inf).log_softmax(-1)
    h0 = -(logp0.exp() * logp0.nan_to_num(neginf=0.0)).sum(-1)
    sink = logp.exp()[..., 0] if k0 == 0 else torch.zeros_like(h)
    return logp.exp() @ vd, h, h0, sink


@pytest.mark.parametrize("method", ["padded", "fused", "tiled"])
@pytest.mark.parametrize("chunk,q0,k0,T", [(16, 0, 0, 64), (16, 0, 0, 71), (None, 0, 0, 60), (None, 24, 0, 30),
                                          (16, 20, 16, 30)])
def test_prefill_paths_against_float64_softmax(method, chunk, q0, k0, T):
    """Every prefill path on the projections' memory layout ((B, T, H, Dh) transposed, as attention.py
    hands them over), batch 2, GQA 2, runs of whole chunks folded into the batch axis, temperature on,
    prefill on top of a cache: output, both entropies and first-token mass against float64 softmax."""
    g = torch.Generator().manual_seed(7)
    S = q0 + T - k0
    q = (torch.randn(2, T, 4, 16, generator=g) * 2).transpose(1, 2)
    k = (torch.randn(2, S, 2, 16, generator=g) * 2 + 0.5).transpose(1, 2)
    v = torch.randn(2, S, 2, 16, generator=g).transpose(1, 2)
    beta = torch.linspace(1.0, 1.4, T)
    out, st = attend_with_stats(q, k, v, q0, k0, chunk, 0.25, beta, method=method)
    ref_out, h, h0, sink = _eager_stats(q, k, v, q0, k0, chunk, 0.25, beta)
    tol = reorder_tol(S, magnitude=math.log(S) + 4.0)          # |scores| up to ~4 here: the LSE's round-off
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=reorder_tol(S, magnitude=4.0))
    torch.testing.assert_close(st.entropy_BHT.double(), h, rtol=0, atol=tol)
    torch.testing.assert_close(st.entropy_no_temp_BHT.double(), h0, rtol=0, atol=tol)
    torch.testing.assert_close(st.sink_mass_BHT.double(), sink, rtol=0, atol=reorder_tol(S))
    assert torch.equal(st.n_keys_T, n_keys(q0, T, k0, chunk))


def test_padded_output_equals_the_bare_attention():
    """The padded call's zeros add nothing to q·k: its output is the bare forward's attention (fp32)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 96, h, 16, generator=g).transpose(1, 2) for h in (4, 2, 2))
    for chunk in (32, None):
        out, _ = attend_with_stats(q, k, v, 0, 0, chunk, 0.25, None, method="padded")
        torch.testing.assert_close(out, attend(q, k, v, 0, 0, chunk, 0.25), rtol=0, atol=reorder_tol(96, magnitude=4.0))


def test_method_errors_name_the_problem():
    q = torch.randn(1, 2, 40, 8)
    with pytest.raises(ValueError, match="method must be one of .*'flash'"):
        attend_with_stats(q, q, q, 0, 0, None, 0.3, None, method="flash")
    with pytest.raises(ValueError, match="padded.*float32.*bfloat16"):
        attend_with_stats(q.bfloat16(), q.bfloat16(), q.bfloat16(), 0, 0, None, 0.3, None, method="padded")


@pytest.mark.parametrize("chunk,T,dtype,padded", [(None, 600, torch.float32, True), (512, 1024, torch.float32, True),
                                                  (64, 256, torch.float32, False), (None, 100, torch.float32, False),
                                                  (None, 600, torch.bfloat16, False)])
def test_auto_pads_fp32_groups_from_pad_min_keys(monkeypatch, chunk, T, dtype, padded):
    """method="auto" takes the padded call for fp32 query groups of at least PAD_MIN_KEYS keys (where it
    was measured faster), the fused two calls below that and for bf16 (whose Σ a·k must stay fp32)."""
    import workbench.model.attention_stats as stats

    calls = []
    real = stats._padded
    monkeypatch.setattr(stats, "_padded", lambda *a: calls.append(a[1].shape) or real(*a))
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, T, h, 8, generator=g).transpose(1, 2).to(dtype) for h in (4, 2, 2))
    stats.attend_with_stats(q, k, v, 0, 0, chunk, 0.3, None)
    assert bool(calls) == padded
    assert all(shape[2] >= stats.PAD_MIN_KEYS for shape in calls)

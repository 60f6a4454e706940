"""The lean decode step (workbench/model/decode.py) against the module forward it stands in for.

`generate` and `generate_recorded` take `DecodeStep` for every token after the prefill. It must give the
module forward's logits (to round-off: fused q/k/v and gate/up matmuls may block their reductions
differently on another CPU), the same greedy tokens, the same cache, the same recorded statistics —
across chunk boundaries and past floor_scale — and keep the hook contract: hooks on taps fire with the
module forward's shapes and a returned tensor replaces the value. Interventions and batches go through
it too; anything it cannot take (hooks on non-tap modules, a replaced forward) falls back to the module.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import model_close

import workbench
from workbench.config import preset
from workbench.generation import generate
from workbench.instrument.hooks import ablate, hooks, intervene
from workbench.live import generate_recorded
from workbench.model.decode import DecodeStep
from workbench.model.kv_cache import KVCache
from workbench.model.moe import grouped_mm, one_token
from workbench.recording import run_document

CONFIGS = {
    # tiny preset: chunk 32, floor_scale 16, QK norm, NoPE every 4th layer, 8 experts top-1
    "tiny": {},
    "scout-shaped": dict(interleave_moe_layer_step=1, moe_layers=None, num_local_experts=16, num_experts_per_tok=1,
                         no_rope_layer_interval=4, no_rope_layers=None, use_qk_norm=True),
    "top2-interleaved": dict(interleave_moe_layer_step=2, moe_layers=None, num_local_experts=8, num_experts_per_tok=2,
                             no_rope_layer_interval=4, no_rope_layers=None, use_qk_norm=False),
}
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, dtype=torch.float32):
    if (name, dtype) not in _MODELS:
        torch.manual_seed(0)
        cfg = preset("tiny").replace(**CONFIGS[name])
        _MODELS[name, dtype] = workbench.build_model(cfg, dtype=dtype).eval()
    return _MODELS[name, dtype]


def _module_greedy(model, prompt, n):
    """Greedy decoding through the module forward only (the reference the lean step must equal)."""
    ids = torch.tensor([prompt])
    cache = KVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True).logits[:, -1]
        out = []
        for _ in range(n):
            tok = int(logits.argmax(-1)[0])
            out.append(tok)
            logits = model(torch.tensor([[tok]]), cache=cache, last_only=True).logits[:, -1]
    return prompt + out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_equals_module_forward_across_chunks_and_floor_scale(name, dtype):
    model = _model(name, dtype)
    cfg = model.config
    step = DecodeStep.for_model(model)
    assert step is not None
    T0, n = 5, 2 * cfg.attention_chunk_size + 3          # crosses two chunk boundaries and floor_scale
    assert T0 + n > cfg.floor_scale
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, T0 + n), generator=g)       # batch of 2: routes differ per row
    close = model_close(cfg, n_keys=T0 + n, dtype=dtype)
    with torch.no_grad():
        c_lean, c_mod = KVCache(cfg.num_hidden_layers, capacity=T0 + n), KVCache(cfg.num_hidden_layers)
        model(ids[:, :T0], cache=c_lean)
        model(ids[:, :T0], cache=c_mod)
        for pos in range(T0, T0 + n):
            lean = step(ids[:, pos], c_lean, pos)
            ref = model(ids[:, pos:pos + 1], cache=c_mod, last_only=True).logits[:, -1]
            torch.testing.assert_close(lean, ref, **close)
    for a, b in zip(c_lean.layers, c_mod.layers):
        assert a.start == b.start and a.k.shape == b.k.shape
        torch.testing.assert_close(a.k, b.k, **close)
        torch.testing.assert_close(a.v, b.v, **close)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_greedy_equals_module_decoding(name):
    model = _model(name)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    n = 2 * cfg.attention_chunk_size + 3
    got = generate(model, prompt, n, stop_ids=[])[0].tolist()
    assert got == _module_greedy(model, prompt, n)


def test_recorded_generation_equals_run_document_past_chunks_and_floor_scale():
    model = _model("scout-shaped")
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    probes = ("router", "router_logits", "entropy", "norms", "sink")     # every tap the collector reads
    rec = generate_recorded(model, prompt, 2 * cfg.attention_chunk_size, probes=probes, stop_ids=[])
    ref = run_document(model, rec.tokens, probes)
    assert set(rec.arrays) == set(ref)
    close = model_close(cfg, n_keys=len(rec.tokens))
    for key, a in rec.arrays.items():
        if a.dtype.kind in "iu":
            assert (a == ref[key]).all(), key                   # expert ids and key counts: exact
        else:
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(ref[key]), **close)


def test_tap_hooks_see_module_shapes_and_can_write():
    """A read hook sees each tap's value with the module forward's shape; a write hook's value is used."""
    model = _model("tiny")
    cfg = model.config
    prompt = list(range(3, 12))
    seen: dict[str, list] = {}

    def keep(value, site):
        seen.setdefault(site, []).append(tuple(value.shape))

    sites = ["model.layers.0.hook_resid_pre", "model.layers.1.self_attn.hook_q", "model.layers.1.self_attn.hook_z",
             "model.layers.1.feed_forward.hook_topk_ids", "model.hook_final_norm", "model.hook_embed"]
    with hooks(model, {s: keep for s in sites}):
        generate(model, prompt, 4, stop_ids=[])
    D, H, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    decode_shapes = {"model.layers.0.hook_resid_pre": (1, 1, D), "model.layers.1.self_attn.hook_q": (1, 1, H, Dh),
                     "model.layers.1.self_attn.hook_z": (1, 1, H, Dh),
                     "model.layers.1.feed_forward.hook_topk_ids": (1, cfg.num_experts_per_tok),
                     "model.hook_final_norm": (1, 1, D), "model.hook_embed": (1, 1, D)}
    for s, shape in decode_shapes.items():
        assert len(seen[s]) == 4 and seen[s][1:] == [shape] * 3, (s, seen[s])   # prefill, then 3 decode steps

    # a write hook (zero the attention output of layer 2) changes the tokens exactly as in the module forward
    site = {"model.layers.2.hook_attn_out": ablate("zero")}
    with hooks(model, site):
        got = generate(model, prompt, 12, stop_ids=[])[0].tolist()
        want = _module_greedy(model, prompt, 12)
    assert got == want and got != generate(model, prompt, 12, stop_ids=[])[0].tolist()


def test_interventions_go_through_the_step():
    model = _model("scout-shaped")
    prompt = list(range(5, 14))
    settings = dict(mask_experts={0: [0, 1, 2]}, drop_shared=[1], temperature_tuning=False, top_k=2)
    with intervene(model, **settings):
        got = generate(model, prompt, 40, stop_ids=[])[0].tolist()
        want = _module_greedy(model, prompt, 40)
    assert got == want and got != generate(model, prompt, 40, stop_ids=[])[0].tolist()


def test_unequal_batches_and_sampling_match_single_rows():
    model = _model("top2-interleaved")
    rows = [list(range(3, 10)), list(range(20, 24)), list(range(40, 47))]
    ids, lengths = generate(model, rows, 20, temperature=0.8, seed=5, stop_ids=[], return_lengths=True)
    for b, r in enumerate(rows):
        alone = generate(model, r, 20, temperature=0.8, seed=5 + b, stop_ids=[])[0]
        assert ids[b, :lengths[b]].tolist() == alone.tolist()


def test_falls_back_where_it_cannot_stand_in():
    model = _model("tiny")
    assert DecodeStep.for_model(model) is not None
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: o * 2)   # not a tap
    try:
        assert DecodeStep.for_model(model) is None
        prompt = list(range(3, 12))
        assert generate(model, prompt, 6, stop_ids=[])[0].tolist() == _module_greedy(model, prompt, 6)
    finally:
        h.remove()
    assert DecodeStep.for_model(model) is not None
    assert DecodeStep.for_model(torch.nn.Linear(2, 2)) is None


def test_one_token_experts_equal_the_grouped_kernel():
    torch.manual_seed(0)
    E, D, F = 8, 32, 48
    gu, down = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    x = torch.randn(1, D)
    for ids in ([[3]], [[5, 1]]):
        ids_t = torch.tensor(ids)
        gate = torch.rand(1, len(ids[0]))
        ref = 0
        for k, e in enumerate(ids[0]):          # the grouped kernel, one one-row group at a time
            counts = torch.zeros(E, dtype=torch.long)
            counts[e] = 1
            g, u = grouped_mm(x * gate[:, k:k + 1], gu, counts).chunk(2, dim=-1)
            ref = ref + grouped_mm(u * torch.nn.functional.silu(g), down, counts)
        torch.testing.assert_close(one_token(x, ids_t, gate, gu, down), ref, rtol=0, atol=1e-5)


def test_cache_buffers_written_in_place_and_bounded_per_chunk():
    model = _model("tiny")
    cfg = model.config
    C = cfg.attention_chunk_size
    cache = KVCache(cfg.num_hidden_layers, capacity=4 * C)
    step = DecodeStep.for_model(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 3 * C), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids[:, :2 * C + 5], cache=cache)              # a prefill longer than a chunk
        buffers = [lc._k.data_ptr() for lc in cache.layers]
        for pos in range(2 * C + 5, 3 * C):
            step(ids[:, pos], cache, pos)
    for i, lc in enumerate(cache.layers):
        assert lc._k.data_ptr() == buffers[i]             # no reallocation during decode
        if cfg.is_chunked[i]:
            assert lc.allocated_bytes() == 2 * C * cfg.num_key_value_heads * cfg.head_dim * 4
            assert lc.start == 3 * C and lc.n == 0               # the next chunk starts empty
    with pytest.raises(ValueError, match="one cache serves one batch"):
        cache.layers[0].update(torch.zeros(2, cfg.num_key_value_heads, 1, cfg.head_dim),
                               torch.zeros(2, cfg.num_key_value_heads, 1, cfg.head_dim), cache.layers[0].end)
    with pytest.raises(ValueError, match="capacity must be a positive"):
        KVCache(2, capacity=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_are_hf_bit_for_bit(dtype):
    """`rms_norm` / `rms_normalize` (one `F.rms_norm` call in float32) equal HF's Llama4TextRMSNorm and
    L2Norm formulas exactly: upcast, x·rsqrt(mean(x²) + eps), cast back, then the weight."""
    from workbench.model.attention import rms_normalize
    from workbench.model.transformer import rms_norm

    g = torch.Generator().manual_seed(5)
    for shape in [(1, 128), (2, 1, 64), (3, 7, 6, 32)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=g).to(dtype)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x)
        assert torch.equal(rms_norm(x, w, 1e-5), normed * w)
        assert torch.equal(rms_normalize(x, 1e-5), normed)


def test_recorded_generation_hands_user_hooks_and_collector_the_same_values():
    """generate_recorded's collector takes the decode steps' tap values directly (no hook machinery); a
    user's hook on the same tap still fires at every step, first, and a value it writes is what gets
    recorded — as with the collector's hooks registered after the user's."""
    model = _model("tiny")
    prompt = list(range(3, 12))
    seen = []

    def zero(value, site):
        seen.append(tuple(value.shape))
        return torch.zeros_like(value)
    with hooks(model, {"model.layers.1.self_attn.hook_entropy": zero}):
        rec = generate_recorded(model, prompt, 6, stop_ids=[])
    H = model.config.num_attention_heads
    assert seen == [(1, H, len(prompt))] + [(1, H, 1)] * 6           # the prefill, then every decode step
    assert (rec.arrays["attention/entropy"][1] == 0).all()
    assert (rec.arrays["attention/entropy"][0, :, len(prompt):] > 0).any()   # other layers recorded as run
    plain = generate_recorded(model, prompt, 6, stop_ids=[])
    assert rec.tokens == plain.tokens                                 # entropy is read-only: tokens unchanged


def test_cache_reserves_global_layers_only_and_grows_modestly():
    cfg = _model("tiny").config
    C = cfg.attention_chunk_size
    cache = KVCache.for_generation(cfg, 10_000)
    assert [lc.capacity for lc in cache.layers] == [C if ch else 10_000 for ch in cfg.is_chunked]
    with pytest.raises(ValueError, match="capacity lists 2 layers, the cache has 3"):
        KVCache(3, [1, 2])
    # without a hint: a multi-token write gets exactly its room (the planner's count), one token a quarter more
    lc = KVCache(1).layers[0]
    kv = torch.zeros(1, 2, 300, 8)
    lc.update(kv[:, :, :5], kv[:, :, :5], 0)
    assert lc._k.shape[2] == 5
    lc.update(kv[:, :, :7], kv[:, :, :7], 5)
    assert lc._k.shape[2] == 12
    lc.update(kv[:, :, :1], kv[:, :, :1], 12)
    assert lc._k.shape[2] == 12 + 256 and lc.k.shape[2] == 13


def test_inference_mode_never_leaks_into_what_users_keep():
    """Hook-free decode steps run in inference mode; nothing a user keeps may be an inference tensor
    (autograd refuses to save those): the generated ids, a hook's values, and the cache's buffers, which a
    later prefill outside inference mode writes in place — including buffers grown during a step."""
    model = _model("tiny")
    cfg = model.config
    prompt = list(range(5, 5 + 2 * cfg.attention_chunk_size // 3))
    ids = generate(model, prompt, 6, stop_ids=[])
    assert not ids.is_inference()
    emb = torch.nn.functional.embedding(ids, model.model.embed_tokens.weight)   # saves ids for backward
    emb.sum().backward()
    model.zero_grad(set_to_none=True)

    kept = []
    with hooks(model, {"model.layers.0.hook_resid_post": lambda out, _name: kept.append(out)}):
        with_hook = generate(model, prompt, 6, stop_ids=[])
    assert torch.equal(with_hook, ids)
    assert len(kept) == 6 and not any(v.is_inference() for v in kept)
    w = torch.ones(cfg.hidden_size, requires_grad=True)
    (kept[-1] * w).sum().backward()                                  # a probe trained on kept values
    assert w.grad is not None

    cache = KVCache(cfg.num_hidden_layers)                           # no capacity: steps grow the buffers
    step = DecodeStep.for_model(model)
    seq = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(seq[:, :3], cache=cache)
        for pos in range(3, 30):
            step(seq[:, pos], cache, pos)
        assert not any(lc._k.is_inference() or lc.k_rows.is_inference() for lc in cache.layers)
        out = model(seq[:, 30:], start=30, cache=cache).logits            # writes the buffers in place
        ref = model(seq).logits[:, 30:]
    torch.testing.assert_close(out, ref, **model_close(cfg, n_keys=seq.shape[1]))

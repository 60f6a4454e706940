"""GPU-ready hot paths, checked on CPU: the text model's prefill forward and decode step trace into ONE graph
under `torch.compile(fullgraph=True)` — no graph break, hence no host synchronisation (`.item()`,
`.tolist()`, `bool(tensor)`) anywhere in them — and the compiled function equals eager.

Traced in bf16 and fp32. bf16 is the dtype the GPU paths run: the routed experts trace as the native
`torch._grouped_mm`. fp32 is the default dtype of the library and of every CPU parity test; the native
op's meta kernel takes bf16/fp16 only (fp32 failed to compile at all before), so under torch.compile fp32
goes through the opaque custom op `workbench::grouped_mm` (moe.py), which runs eager's own kernel (CPU
grouped mm, or the loop, whose host sync then stays inside the op) — the graph is still one graph.
fp16 traces like bf16 (same native op); float64 takes the custom op like fp32. The `eager` backend checks
the capture itself; code generation (inductor) is a GPU-machine concern (benchmarks/gpu_check.py times
compiled vs eager there).

Paths that still synchronise with the host, by design, and are therefore NOT compiled here:
  * the routed-expert loop fallback (`moe.grouped_mm` where `grouped_mm_kind` says "loop": CUDA below
    sm90 or not bf16, float64, torch < 2.9 on CPU, unaligned widths) — one `.tolist()` on the counts; under
    torch.compile it runs inside the `workbench::grouped_mm` op, so it syncs at run time without a break;
  * expert parallelism (`Llama4TextExperts` holding a slice of the experts): one `int(counts.sum())`;
  * input validation (`Llama4ForCausalLM.check_inputs`: token-id range) — compile `model.model`, as here;
  * attention statistics (`attn_stats=True`): short-cuts on β ≡ 1 and on fully visible tiles.
"""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.config import preset
from workbench.model.kv_cache import KVCache

CONFIGS = {
    # Scout's schedule at tiny widths: MoE on every layer, top-1 of 16, QK norm, NoPE every 4th layer
    "scout-shaped": dict(interleave_moe_layer_step=1, moe_layers=None, num_local_experts=16, num_experts_per_tok=1,
                         no_rope_layer_interval=4, no_rope_layers=None, use_qk_norm=True),
    # top-2 routing, MoE interleaved with dense layers (Maverick's step 2), no QK norm
    "top2-interleaved": dict(interleave_moe_layer_step=2, moe_layers=None, num_local_experts=8, num_experts_per_tok=2,
                             no_rope_layer_interval=4, no_rope_layers=None, use_qk_norm=False),
}


def _model(name, dtype=torch.bfloat16):
    cfg = preset("tiny").replace(**CONFIGS[name])
    return workbench.build_model(cfg, dtype=dtype).eval()


@pytest.mark.slow   # dynamo traces 4 decoder layers three times (prefill, two decode positions): ~20-60 s
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_compile_fullgraph_and_equal_eager(name, dtype):
    torch._dynamo.reset()
    model = _model(name, dtype)
    cfg = model.config
    assert any(cfg.is_moe) and not all(cfg.use_rope) and any(cfg.is_chunked)   # every layer kind traced
    if name == "top2-interleaved":
        assert cfg.num_experts_per_tok == 2 and not all(cfg.is_moe)

    def step(ids, cache, start):
        x, _ = model.model(ids, start=start, cache=cache)
        return model.lm_head(x[:, -1:])

    compiled = torch.compile(step, fullgraph=True, backend="eager")   # raises on any graph break
    T = 2 * cfg.attention_chunk_size + 5               # crosses chunk boundaries and floor_scale
    assert T > cfg.floor_scale
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c_eager, c_comp = KVCache(cfg.num_hidden_layers), KVCache(cfg.num_hidden_layers)
        torch.testing.assert_close(compiled(ids, c_comp, 0), step(ids, c_eager, 0), rtol=0, atol=0)
        for pos in range(T, T + 3):                    # decode steps (the position becomes dynamic)
            tok = ids[:, pos - T:pos - T + 1]
            torch.testing.assert_close(compiled(tok, c_comp, pos), step(tok, c_eager, pos), rtol=0, atol=0)
    for a, b in zip(c_comp.layers, c_eager.layers):    # the compiled step updated the cache as eager does
        assert a.start == b.start and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)

"""Generation and the KV cache: greedy decoding token-for-token equal to HF `generate` across chunk
boundaries and past floor_scale; cached logits equal full-sequence logits; chunked layers keep only the
current chunk (spec llama4.md §2.6–2.7); sampling, stop tokens, streaming, batching."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ours_from_hf, random_hf_model

from workbench.checkpoint import load_model
from workbench.config import Llama4TextConfig, preset
from workbench.generation import _as_batch, _sample, generate
from workbench.model import KVCache

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            no_rope_layer_interval=2, attention_chunk_size=16, floor_scale=8, attn_scale=0.1,
            rope_theta=10000.0, max_position_embeddings=4096, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "scout_like": dict(BASE, interleave_moe_layer_step=1, use_qk_norm=True,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "maverick_like": dict(BASE, interleave_moe_layer_step=2, use_qk_norm=False, num_local_experts=8),
    "interval4_top2": dict(BASE, num_hidden_layers=5, no_rope_layer_interval=4, num_experts_per_tok=2,
                           attention_chunk_size=12, floor_scale=20),
    "tiny_preset": None,
}


def _cfg(name) -> Llama4TextConfig:
    return preset("tiny") if CONFIGS[name] is None else Llama4TextConfig(**CONFIGS[name])


# Token-by-token decoding of a tiny model is all per-op overhead: extra intra-op threads only spin
# (5–10× the CPU time on a shared 2-core runner).
pytestmark = pytest.mark.usefixtures("one_thread")


_PAIRS: dict[str, tuple] = {}


def _pair(name):
    """(cfg, HF model, ours) on identical random weights; cached per config (models are read-only here)."""
    if name not in _PAIRS:
        cfg = _cfg(name)
        hf = random_hf_model(cfg)
        _PAIRS[name] = (cfg, hf, ours_from_hf(cfg, hf))
    return _PAIRS[name]


def _hf_greedy(hf, ids, n):
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    # HF fills an unset eos_token_id from the model's own generation_config: a greedy row that drew that id
    # would stop there, while ours (stop_ids=[]) goes on; unset it for the call
    eos, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return hf.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))
    finally:
        hf.generation_config.eos_token_id = eos


# ------------------------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompt_len,new", [(10, 60), (37, 30)])
def test_greedy_matches_hf_generate(name, prompt_len, new):
    cfg, hf, ours = _pair(name)
    C = cfg.attention_chunk_size
    assert (prompt_len + new) // C >= 2 and prompt_len + new > 2 * cfg.floor_scale   # decode crosses chunks
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = _hf_greedy(hf, ids, new)
    got = generate(ours, ids, new, stop_ids=[])
    assert expected.shape == (1, prompt_len + new)
    assert got.tolist() == expected.tolist()


def test_greedy_batch_matches_hf_generate():
    cfg, hf, ours = _pair("maverick_like")
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    assert generate(ours, ids, 40, stop_ids=[]).tolist() == _hf_greedy(hf, ids, 40).tolist()


def test_chunked_prefill_gives_the_same_tokens():
    cfg, _, ours = _pair("scout_like")
    ids = torch.randint(0, cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(5))
    whole = generate(ours, ids, 20, stop_ids=[])
    for step in (1, 7, 16, 100):
        assert torch.equal(generate(ours, ids, 20, stop_ids=[], prefill_chunk=step), whole), step


# ------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("name", ["scout_like", "maverick_like", "interval4_top2"])
@pytest.mark.parametrize("prefill", [1, 5, 16, 23])
def test_cached_logits_equal_full_forward_at_every_step(name, prefill):
    cfg, _, ours = _pair(name)
    T = 75
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        full = ours(ids).logits                                                     # (B, T, V)
        cache = KVCache(cfg.num_hidden_layers)
        steps = [ours(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, T):
            steps.append(ours(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_chunked_layer_cache_holds_only_the_current_chunk():
    cfg, _, ours = _pair("scout_like")
    C = cfg.attention_chunk_size
    ids = torch.randint(0, cfg.vocab_size, (1, 70), generator=torch.Generator().manual_seed(1))
    cache = KVCache(cfg.num_hidden_layers)
    with torch.no_grad():
        ours(ids[:, :10], cache=cache)
        for t in range(10, 70):
            ours(ids[:, t:t + 1], cache=cache)
            nxt = t + 1                                  # the next query needs keys [⌊nxt/C⌋·C, nxt)
            assert cache.seq_len == nxt
            for i, lc in enumerate(cache.layers):
                held = lc.k.shape[2]
                assert lc.v.shape[2] == held
                if cfg.is_chunked[i]:
                    assert held == nxt % C and lc.start == nxt - nxt % C, (t, i, held)
                    assert held < C
                else:
                    assert held == nxt and lc.start == 0
    # memory: the chunked layers' share is bounded by C, the global layers' grows with T
    per_key = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    n_global = cfg.num_hidden_layers - sum(cfg.is_chunked)
    assert cache.nbytes() == per_key * (n_global * 70 + sum(cfg.is_chunked) * (70 % C))


def test_cache_rejects_non_contiguous_positions():
    cfg, _, ours = _pair("scout_like")
    cache = KVCache(cfg.num_hidden_layers)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        ours(ids, cache=cache)
        with pytest.raises(ValueError, match="KV cache holds positions up to 8, got new tokens at 12"):
            ours(ids[:, :1], cache=cache, start=12)


# ------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_sampling_is_reproducible_with_a_seed_and_leaves_global_rng_alone(tiny):
    prompt = [256, 72, 105]
    state = torch.get_rng_state()
    a = generate(tiny, prompt, 30, temperature=1.5, seed=7, stop_ids=[])
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(tiny, prompt, 30, temperature=1.5, seed=7, stop_ids=[])
    c = generate(tiny, prompt, 30, temperature=1.5, seed=8, stop_ids=[])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(tiny, prompt, 30, stop_ids=[]))     # sampling actually samples


def test_tiny_top_p_is_greedy(tiny):
    prompt = [256, 72, 105]
    greedy = generate(tiny, prompt, 20, stop_ids=[])
    for seed in range(3):
        assert torch.equal(generate(tiny, prompt, 20, temperature=5.0, top_p=1e-6, seed=seed, stop_ids=[]), greedy)


def test_top_p_nucleus_edges():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    draw = lambda top_p: set(_sample(logits, 1.0, top_p, gen).tolist())
    # a token is kept while the mass ranked above it is below top_p (so the top token always is)
    assert draw(1e-9) == draw(0.49) == {0}
    assert draw(0.51) == draw(0.79) == {0, 1}
    assert draw(0.81) == draw(0.94) == {0, 1, 2}
    assert draw(0.96) == draw(1.0) == {0, 1, 2, 3}
    counts = torch.bincount(_sample(logits, 1.0, 0.81, gen), minlength=4).float() / 2000
    torch.testing.assert_close(counts[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.04, rtol=0)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
    (dict(temperature=-1.0), r"temperature must be ≥ 0 .*-1\.0"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be ≥ 0, got -1"),
    (dict(prefill_chunk=0), r"prefill_chunk must be a positive number of tokens, got 0"),
])
def test_bad_sampling_arguments(tiny, kwargs, pattern):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        generate(tiny, [256, 72], **kwargs)


# ------------------------------------------------------------------------------ stops, streaming
def test_stop_token_ends_generation(tiny):
    prompt = [256, 72, 105]
    free = generate(tiny, prompt, 30, stop_ids=[])[0, 3:].tolist()
    stop = free[5]
    first = free.index(stop)
    out = generate(tiny, prompt, 30, stop_ids=[stop])[0, 3:].tolist()
    assert out == free[:first + 1]
    # default stops come from the tokenizer (config eos [257, 263, 264] for the tiny preset)
    assert tiny.tokenizer.stop_ids == [257, 263, 264]


def test_default_stop_ids_without_tokenizer_use_config_eos(tiny):
    prompt = [256, 72, 105]
    free = generate(tiny, prompt, 30, stop_ids=[])[0, 3:].tolist()
    saved_tok, saved_eos = tiny.tokenizer, tiny.config.eos_token_id
    try:
        tiny.tokenizer, tiny.config.eos_token_id = None, free[4]
        out = generate(tiny, prompt, 30)[0, 3:].tolist()
    finally:
        tiny.tokenizer, tiny.config.eos_token_id = saved_tok, saved_eos
    assert out == free[:free.index(free[4]) + 1]


def test_batch_rows_stop_independently_and_on_token_streams_in_order(tiny):
    prompts = [[256, 72, 105, 33], [256, 87, 111, 33]]
    solo = [generate(tiny, p, 25, stop_ids=[])[0, 4:].tolist() for p in prompts]
    # a stop token that ends row 0 early and row 1 strictly later (or never)
    stop = next(t for t in solo[0][:12] if t not in solo[1][:solo[0].index(t) + 1])
    seen: dict[int, list[int]] = {0: [], 1: []}
    order: list[int] = []

    def on_token(b, tok):
        seen[b].append(tok)
        order.append(b)

    out = generate(tiny, prompts, 25, stop_ids=[stop], on_token=on_token)
    rows = out[:, 4:].tolist()
    k0 = solo[0].index(stop) + 1
    assert rows[0][:k0] == solo[0][:k0]
    assert set(rows[0][k0:]) <= {stop}                  # finished rows repeat their stop token as filler
    k1 = solo[1].index(stop) + 1 if stop in solo[1] else len(rows[1])
    assert rows[1][:k1] == solo[1][:k1]
    assert seen[0] == rows[0][:k0] and seen[1] == rows[1][:k1]     # streamed: every new token, in order, once
    assert order[:2 * k0] == [0, 1] * k0                             # rows interleave step by step


def test_batch_of_equal_length_prompts_equals_separate_runs(tiny):
    prompts = [[256, 72, 101, 108, 108, 111], [256, 87, 111, 114, 108, 100]]
    batch = generate(tiny, prompts, 40, stop_ids=[])
    for b, p in enumerate(prompts):
        assert batch[b].tolist() == generate(tiny, p, 40, stop_ids=[])[0].tolist()
    assert torch.equal(generate(tiny, torch.tensor(prompts), 40, stop_ids=[]), batch)


def test_string_prompts_use_the_tokenizer(tiny):
    out = generate(tiny, "Hi!", 5, stop_ids=[])
    assert out[0, :4].tolist() == [256, 72, 105, 33]           # <|begin_of_text|> then bytes
    both = generate(tiny, ["Hi!", "Yo!"], 5, stop_ids=[])
    assert torch.equal(both[0], out[0])


def test_prompt_errors(tiny):
    # (prompts of unequal length are supported: see the "unequal lengths" tests below)
    for empty in ([], [[]], [[], []], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="at least one token"):
            generate(tiny, empty, 4)
    assert generate(tiny, "", 1, stop_ids=[]).shape == (1, 2)          # "" is <|begin_of_text|> alone
    with pytest.raises(ValueError, match=r"token id 384 is out of range for vocab_size=384"):
        generate(tiny, [256, 384], 4)
    with pytest.raises(ValueError, match=r"token id -3 is out of range"):
        generate(tiny, [256, -3], 4)
    limit = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt \(3\) \+ max_new_tokens \({limit}\) exceeds "
                                         rf"max_position_embeddings={limit}"):
        generate(tiny, [256, 1, 2], limit)


def test_prompt_longer_than_context():
    short = load_model("tiny")
    short.config = short.config.replace(max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"reaches position 40, beyond max_position_embeddings=32"):
        generate(short, list(range(40)), 1)
    assert generate(short, list(range(30)), 2, stop_ids=[]).shape == (1, 32)


def test_zero_new_tokens_returns_the_prompt(tiny):
    assert generate(tiny, [256, 1, 2], 0).tolist() == [[256, 1, 2]]


# ------------------------------------------------------------------------------- unequal lengths
def _solo(model, p, n, **kw):
    return generate(model, p, n, **kw)[0].tolist()


def test_unequal_batch_greedy_equals_hf_per_row_across_chunks_and_floor_scale():
    cfg, hf, ours = _pair("scout_like")            # chunk 16, floor_scale 8: every row crosses both
    g = torch.Generator().manual_seed(11)
    lens = [5, 19, 5, 33, 16]                       # a repeated length (a group of two), a chunk-sized prompt
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    ids, lengths = generate(ours, prompts, 30, stop_ids=[], return_lengths=True)
    assert ids.shape == (5, 33 + 30) and lengths.tolist() == [n + 30 for n in lens]
    for b, p in enumerate(prompts):
        want = _hf_greedy(hf, torch.tensor([p]), 30)[0].tolist()
        assert ids[b, :lengths[b]].tolist() == want == _solo(ours, p, 30, stop_ids=[])
        assert set(ids[b, lengths[b]:].tolist()) <= {cfg.pad_token_id}          # right-padded
    # chunked prefill inside each group changes nothing
    assert torch.equal(generate(ours, prompts, 30, stop_ids=[], prefill_chunk=7), ids)


def test_unequal_batch_of_strings_and_tensor_rows(tiny):
    prompts = ["Hi!", "Hello there", "Yo!"]         # lengths 4, 12, 4
    out = generate(tiny, prompts, 20, stop_ids=[], pad_token_id=0)
    assert out.shape == (3, 32)
    for b, p in enumerate(prompts):
        solo = _solo(tiny, p, 20, stop_ids=[])
        assert out[b, :len(solo)].tolist() == solo and set(out[b, len(solo):].tolist()) <= {0}
    # the default pad is config.pad_token_id
    assert generate(tiny, prompts, 20, stop_ids=[])[0, 24:].tolist() == [tiny.config.pad_token_id] * 8


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_unequal_batch_seeded_sampling_is_per_row(tiny, top_p):
    prompts = [[256, 72, 105], [256, 87, 111, 114, 108, 100, 33, 32, 72], [256, 65, 66], [256, 1]]
    kw = dict(temperature=1.3, top_p=top_p, stop_ids=[])
    ids, lengths = generate(tiny, prompts, 40, seed=7, return_lengths=True, **kw)
    for b, p in enumerate(prompts):                                     # an int seed: row b draws from seed + b
        assert ids[b, :lengths[b]].tolist() == _solo(tiny, p, 40, seed=7 + b, **kw), b
    # one seed per row: every row is sampled as it would be alone with that seed
    ids, lengths = generate(tiny, prompts, 40, seed=[3, 3, 9, 3], return_lengths=True, **kw)
    for b, (p, s) in enumerate(zip(prompts, [3, 3, 9, 3])):
        assert ids[b, :lengths[b]].tolist() == _solo(tiny, p, 40, seed=s, **kw), b
    # a row's draws do not depend on the rest of the batch
    sub = generate(tiny, prompts[2:], 40, seed=[9, 3], **kw)
    assert sub[0, :43].tolist() == ids[2, :43].tolist()
    # identical prompts under one int seed get different samples (rows have different seeds)
    same = generate(tiny, [prompts[0]] * 2, 40, seed=7, **kw)
    assert not torch.equal(same[0], same[1]) and same[0].tolist() == _solo(tiny, prompts[0], 40, seed=7, **kw)


def test_unequal_batch_stops_per_row_and_streams_in_order(tiny):
    prompts = [[256, 72, 105, 33], [256, 87, 111, 114, 108, 100, 33], [256, 65, 33, 33]]
    free = [_solo(tiny, p, 25, stop_ids=[])[len(p):] for p in prompts]
    stop = next(t for t in free[0][:12] if t not in free[1][:free[0].index(t) + 1])   # row 0 stops first
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    order: list[int] = []

    def on_token(b, tok):
        seen[b].append(tok)
        order.append(b)

    ids, lengths = generate(tiny, prompts, 25, stop_ids=[stop], on_token=on_token, return_lengths=True)
    for b, p in enumerate(prompts):
        solo = _solo(tiny, p, 25, stop_ids=[stop])
        assert lengths[b] == len(solo) and ids[b, :len(solo)].tolist() == solo
        assert set(ids[b, len(solo):].tolist()) <= {tiny.config.pad_token_id}
        assert seen[b] == solo[len(p):]                     # every new token, in order, once
    k0 = lengths[0] - 4
    assert stop in seen[0] and seen[0][-1] == stop and k0 < 25
    # rows 0 and 2 (length 4) interleave step by step, then row 1 (length 7) runs alone
    n02 = len(seen[0]) + len(seen[2])
    assert set(order[:n02]) == {0, 2} and order[n02:] == [1] * len(seen[1])
    assert order[:2 * k0] == [0, 2] * k0


def test_unequal_batch_zero_new_tokens_and_equal_lengths_report_lengths(tiny):
    ids, lengths = generate(tiny, [[256, 1], [256, 1, 2]], 0, return_lengths=True)
    assert ids.tolist() == [[256, 1, 274], [256, 1, 2]] and lengths.tolist() == [2, 3]
    prompts = [[256, 72, 105, 33], [256, 87, 111, 33]]
    free = _solo(tiny, prompts[0], 20, stop_ids=[])[4:]
    ids, lengths = generate(tiny, prompts, 20, stop_ids=[free[3]], return_lengths=True)
    assert lengths[0] == 4 + free.index(free[3]) + 1       # equal lengths: one block, lengths mark each row's end
    assert torch.equal(ids, generate(tiny, prompts, 20, stop_ids=[free[3]]))


def test_unequal_batch_errors(tiny):
    saved = tiny.config.pad_token_id
    try:
        tiny.config.pad_token_id = None
        with pytest.raises(ValueError, match=r"unequal length \(lengths \[3, 5\]\).*pass pad_token_id="):
            generate(tiny, [[1, 2, 3], [1, 2, 3, 4, 5]], 4)
        assert generate(tiny, [[1, 2, 3], [1, 2, 3, 4, 5]], 1, pad_token_id=0, stop_ids=[]).shape == (2, 6)
        assert generate(tiny, [[1, 2, 3], [4, 5, 6]], 1, stop_ids=[]).shape == (2, 4)   # equal: no pad needed
    finally:
        tiny.config.pad_token_id = saved
    with pytest.raises(ValueError, match=r"empty prompt in row 1 of 3: give at least one token per row"):
        generate(tiny, [[1, 2], [], [3]], 4)
    with pytest.raises(ValueError, match=r"mixes strings and token lists"):
        generate(tiny, [[1, 2], "ab"], 4)
    with pytest.raises(ValueError, match=r"seed must be an int or one int per prompt \(2\), got \[1\]"):
        generate(tiny, [[1, 2], [3]], 4, temperature=1.0, seed=[1])
    fired = []
    with pytest.raises(ValueError, match=r"token id 999 is out of range"):    # every row checked before any runs
        generate(tiny, [[1, 2], [3, 4, 999]], 4, on_token=lambda b, t: fired.append(b))
    assert fired == []
    limit = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt \(5\) \+ max_new_tokens \({limit - 4}\) exceeds"):
        generate(tiny, [[1, 2], [1, 2, 3, 4, 5]], limit - 4)     # the longest prompt sets the limit


def test_single_block_helper_still_rejects_unequal_lengths(tiny):
    # `live.generate_recorded` takes one (1, T) block through `_as_batch`
    with pytest.raises(ValueError, match=r"equal length \(got lengths \[2, 4\]\)"):
        _as_batch(tiny, ["a", "abc"])                     # bos + bytes

"""Training: the aux-loss formulas, the BPE tokenizer's Llama 4 special tokens, data splits, a
seconds-long training smoke test, exact resume, and the shipped `workbench/models/tiny-moe` checkpoint."""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest
import torch
from conftest import DATA, REPO, require_data

from workbench.config import Llama4TextConfig
from workbench.tokenizer import llama4_special_tokens
from workbench.train.bpe import special_ids, train_bpe
from workbench.train.data import (
    Stream,
    encode_docs,
    eval_windows,
    kv_document,
    sample_batch,
    split_text,
    synthetic_texts,
)
from workbench.train.loop import TrainSettings, heldout_losses, load_balancing_loss, lr_at, router_z_loss, train

SHIPPED = REPO / "workbench" / "models" / "tiny-moe"
CORPUS = DATA / "domain_texts"


# ------------------------------------------------------------------------------ aux losses
def test_load_balance_uniform_is_one_and_collapse_is_E():
    E = 8
    sharp = 50.0 * torch.eye(E).repeat(4, 1)                       # (32, E): every expert 4 tokens, P one-hot
    assert float(load_balancing_loss(sharp)) == pytest.approx(1.0, abs=1e-6)
    assert float(load_balancing_loss(torch.zeros(32, E))) == pytest.approx(1.0)   # P uniform: 1 whatever f is
    collapsed = torch.zeros(32, E)
    collapsed[:, 3] = 50.0
    assert float(load_balancing_loss(collapsed)) == pytest.approx(E, rel=1e-6)
    # top-2, balanced: f counts slots, so still 1 (HF's load_balancing_loss_func would give k = 2)
    two = torch.zeros(32, E)
    for i in range(32):
        two[i, i % E], two[i, (i + 1) % E] = 50.0, 49.0
    assert float(load_balancing_loss(two, top_k=2)) == pytest.approx(1.0, abs=1e-3)


def test_load_balance_matches_probe_convention():
    from probes.routing import expert_load, router_probs, switch_balance

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 8, generator=g) * 2
    ids = logits.argmax(-1, keepdim=True).numpy()
    want = switch_balance(expert_load(ids, 8), router_probs(logits.numpy()).mean(0))
    assert float(load_balancing_loss(logits)) == pytest.approx(want, rel=1e-5)


def test_load_balance_gradient_reaches_router_only_through_P():
    logits = torch.randn(16, 4, requires_grad=True)
    load_balancing_loss(logits).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_router_z_loss_known_case():
    assert float(router_z_loss(torch.zeros(10, 8))) == pytest.approx(math.log(8) ** 2)


def test_lr_schedule_warmup_and_cosine_floor():
    s = TrainSettings(steps=100, warmup=10, lr=1.0, min_lr_frac=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(100, s) == pytest.approx(0.1)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 100))


# ------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def small_tok():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "router", "expert", "token", "layer", "def", "return"]
    texts = [" ".join(rng.choice(words) for _ in range(40)) + "\n" for _ in range(200)]
    texts += synthetic_texts("kv", 50, 0) + synthetic_texts("arith", 50, 0)
    return train_bpe(texts, vocab_size=512, n_special=128)


def test_bpe_special_tokens_keep_llama4_names_order_and_roles(small_tok):
    tok = small_tok
    assert tok.get_vocab_size() == 512
    names = llama4_special_tokens(128)
    assert [tok.id_to_token(384 + i) for i in range(128)] == names        # Llama 4 order, at the end
    ids = special_ids(tok)
    assert tok.id_to_token(ids["bos_token_id"]) == "<|begin_of_text|>"
    assert [tok.id_to_token(i) for i in ids["eos_token_id"]] == ["<|end_of_text|>", "<|eom|>", "<|eot|>"]
    assert tok.id_to_token(ids["pad_token_id"]) == "<|finetune_right_pad|>"
    enc = tok.encode("gamma <|eot|> delta")
    assert enc.ids[0] == ids["bos_token_id"]                               # post-processor adds BOS
    assert 384 + 8 in enc.ids                                              # a special token is never split
    text = "Größe: 42 + 7 = 49\n\tdef f(): return 'ü'"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text   # byte-level: lossless


# ------------------------------------------------------------------------------ data
def test_split_text_is_a_line_aligned_partition():
    text = "".join(f"line {i}\n" for i in range(100))
    tr, ho = split_text(text, 0.1)
    assert tr + ho == text and ho.startswith("line ") and tr.endswith("\n")
    assert 0.08 < len(ho) / len(text) < 0.12


def test_kv_document_prompt_and_answer():
    rng = random.Random(0)
    doc = kv_document(rng, 10, n_lookups=2, depth=0.0)
    assert doc.text.startswith(doc.prompt + doc.answer)
    key = doc.prompt.rsplit("Lookup k ", 1)[1].split()[0]
    assert f"k {key} v{doc.answer}\n" in doc.text.split("Lookup")[0]      # the needle is the first record
    assert doc.prompt.index(f"k {key} ") < 20


def test_sample_batch_is_a_function_of_the_generator(small_tok):
    s = encode_docs(small_tok, synthetic_texts("kv", 40, 1), bos=384, eos=385)
    streams = {"kv": s, "flat": Stream(torch.arange(1000) % 512)}
    w = {"kv": 1.0, "flat": 1.0}
    a = sample_batch(streams, w, 6, 16, torch.Generator().manual_seed(5))
    b = sample_batch(streams, w, 6, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y, dom = a
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (x[dom == 0, 0] == 384).all()                                   # synthetic windows start at BOS


# ------------------------------------------------------------------------------ training
def _tiny_setup(tok, seed=0):
    from workbench.checkpoint import build_model

    cfg = Llama4TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256, num_local_experts=4, moe_layers=[1, 2],
        no_rope_layer_interval=2, attention_chunk_size=16, floor_scale=16, rope_theta=10000.0,
        rope_scaling=None, **special_ids(tok))
    assert set(cfg.layer_kinds()) == {"rope-chunked/dense", "rope-chunked/moe", "nope-global/dense",
                                      "nope-global/moe"}
    streams = {d: encode_docs(tok, synthetic_texts(d, 200, 0), 384, 385) for d in ("kv", "arith")}
    return build_model(cfg, seed=seed), streams


def test_training_reduces_loss(small_tok):
    model, streams = _tiny_setup(small_tok)
    held = {d: eval_windows(encode_docs(small_tok, synthetic_texts(d, 40, 9), 384, 385), 32, 4) for d in streams}
    before = heldout_losses(model, held)
    s = TrainSettings(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup=4, eval_every=1000, ckpt_every=1000,
                      threads=1)
    hist = train(model, streams, {}, s, progress=False)
    after = heldout_losses(model, held)
    ce = [h["ce"] for h in hist]
    assert np.mean(ce[-5:]) < np.mean(ce[:5]) - 1.0
    assert all(after[d] < before[d] - 1.0 for d in held), (before, after)
    assert all(0.99 < h["balance"] < 4.0 for h in hist)                   # 1 = uniform, E = 4 = collapsed


def test_resume_equals_uninterrupted(small_tok, tmp_path):
    s = TrainSettings(steps=4, batch_size=2, seq_len=32, warmup=2, eval_every=1000, ckpt_every=1000, z_coef=1e-3,
                      threads=1)
    ref, streams = _tiny_setup(small_tok)
    h_ref = train(ref, streams, {}, s, progress=False)
    part, _ = _tiny_setup(small_tok)
    train(part, streams, {}, s, work_dir=tmp_path, progress=False, stop_after=2)
    assert (tmp_path / "state.pt").exists() and not list(tmp_path.glob(".*.tmp"))   # atomic: no leftovers
    resumed, _ = _tiny_setup(small_tok, seed=123)           # different init: everything must come from state.pt
    h_res = train(resumed, streams, {}, s, work_dir=tmp_path, progress=False)
    assert [h["step"] for h in h_res] == [1, 2, 3, 4]
    assert [h["ce"] for h in h_res] == [h["ce"] for h in h_ref]
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_cli_parser():
    from workbench.train.cli import add_train_parser

    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(["train", "run", "--out", "x", "--steps", "3", "--corpus", "c"])
    assert (a.steps, a.corpus, a.fn.__name__) == (3, "c", "cmd_train_run")
    assert p.parse_args(["train", "eval", "workbench/models/tiny-moe"]).fn.__name__ == "cmd_train_eval"


# ------------------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def shipped():
    import workbench

    assert (SHIPPED / "model.safetensors").exists(), "workbench/models/tiny-moe is shipped in the repo; it is missing"
    return workbench.load_model(str(SHIPPED), dtype="fp32", device="cpu")


def test_shipped_model_files_and_layer_kinds(shipped):
    cfg = shipped.config
    assert (SHIPPED / "model.safetensors").stat().st_size < 25e6
    assert {"rope-chunked/dense", "rope-chunked/moe", "nope-global/dense", "nope-global/moe"} == set(cfg.layer_kinds())
    assert cfg.num_local_experts >= 8 and cfg.attention_chunk_size == cfg.floor_scale == 128
    tok = shipped.tokenizer
    assert tok.vocab_size == cfg.vocab_size
    assert tok.tok.id_to_token(cfg.bos_token_id) == "<|begin_of_text|>"
    assert tok.tok.id_to_token(cfg.pad_token_id) == "<|finetune_right_pad|>"
    assert tok.stop_ids == cfg.eos_token_id


def test_shipped_model_beats_uniform_on_synthetic_heldout(shipped):
    tok = shipped.tokenizer.tok
    bos, eos = shipped.config.bos_token_id, shipped.config.eos_token_id[0]
    # seed 10_000 = the held-out synthetic seed of a seed-0 run (data.build_streams)
    held = {d: eval_windows(encode_docs(tok, synthetic_texts(d, 40, 10_000), bos, eos), 256, 2)
            for d in ("kv", "arith")}
    losses = heldout_losses(shipped, held)
    assert all(v < math.log(shipped.config.vocab_size) - 4.0 for v in losses.values()), losses


@pytest.fixture(scope="module")
def heldout_text_windows(shipped):
    from workbench.train.data import TEXT_DOMAINS, Stream, encode_text

    require_data("domain_texts", "domain text corpus")
    out = {}
    for d in TEXT_DOMAINS:
        _, ho = split_text((CORPUS / f"{d}.txt").read_text(encoding="utf-8"), 0.1)
        out[d] = eval_windows(Stream(encode_text(shipped.tokenizer.tok, ho)), 256, 4)
    return out


def test_shipped_model_heldout_text_loss_well_below_uniform(shipped, heldout_text_windows):
    losses = heldout_losses(shipped, heldout_text_windows)
    assert all(v < math.log(shipped.config.vocab_size) - 2.0 for v in losses.values()), losses


def test_shipped_model_experts_specialize_by_domain(shipped, heldout_text_windows):
    from workbench.train.evaluate import routing_counts

    counts, moe = routing_counts(shipped, heldout_text_windows)                # (L, D, E)
    n = torch.tensor([w[:, :-1].numel() for w in heldout_text_windows.values()]).view(1, -1, 1)
    spec = counts.double() / n                                                 # OLMoE DomSpec, held-out text
    uniform = shipped.config.num_experts_per_tok / shipped.config.num_local_experts
    # the full 64-window table is in workbench/models/tiny-moe/TRAINING.md (GitHub: 37 % at layer 5, uniform 12.5 %)
    assert float(spec.max()) > 2 * uniform, spec.amax(-1)

"""Expert parallelism: W gloo ranks on CPU, each holding 1/W of every MoE layer's experts, give the
single-process model's logits, taps, gradients and `record` store.

Tolerance: none. Each token's routed output is non-zero on one rank (top-1) or two (top-2); x + 0 and
a + b = b + a are exact in IEEE arithmetic, so the all-reduce reproduces `sum(1)` bit for bit
(workbench/expert_parallel.py). The brief's bound (fp32, atol 1e-5) is asserted as well, so a
future kernel whose rows depend on the batch size fails with a readable message first.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from test_streamed import assert_same_run, docs_of, fast_model

from workbench.checkpoint import load_model, save_model
from workbench.cli import main
from workbench.config import preset
from workbench.distributed import spawn
from workbench.expert_parallel import (
    expert_range,
    load_expert_parallel,
    record_ep,
    record_ep_rank,
    resident_bytes,
)
from workbench.instrument.hooks import run_with_cache
from workbench.model.moe import Llama4TextExperts
from workbench.recording import record
from workbench.store import open_run

PROBES = ("router", "router_logits", "entropy", "norms", "sink")
SITES = ["*.feed_forward.hook_topk_ids", "*.feed_forward.hook_topk_gates", "*.feed_forward.hook_routed_out",
         "*.self_attn.hook_entropy"]


def _ids():
    return torch.randint(0, 384, (2, 45), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tiny (layers 0, 1, 3 MoE, layer 2 dense; top-1) and a top-2 variant whose MoE layers come from
    interleave_moe_layer_step=2 (layers 1, 3, as Maverick's odd layers), both in many small shards."""
    root = tmp_path_factory.mktemp("ep")
    top1 = preset("tiny")
    top2 = top1.replace(num_experts_per_tok=2, moe_layers=None, interleave_moe_layer_step=2)
    assert top1.is_moe == [True, True, False, True] and top2.is_moe == [False, True, False, True]
    out = {}
    for name, cfg in (("top1", top1), ("top2", top2)):
        out[name] = save_model(fast_model(cfg, seed=1), root / name, max_shard_size="40KB")
    return out


def _rank_work(checkpoints: dict, out_dir: str, docs: list, world_check: int) -> None:
    """Runs in every rank: logits, taps and gradients of each checkpoint, a refused mismatched split,
    and an expert-parallel `record` of `docs`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {}
    for name, ck in checkpoints.items():
        model = load_expert_parallel(ck, rank, world, dtype="fp32", device="cpu")
        with torch.no_grad():
            logits, cache = run_with_cache(model, _ids(), SITES)
        model.zero_grad()
        model(_ids()).logits.square().mean().backward()          # the same (replicated) loss on every rank
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res[name] = {"logits": logits.logits, "taps": cache, "grads": grads, "bytes": resident_bytes(model),
                     "first": {i: layer.feed_forward.experts.first for i, layer in enumerate(model.model.layers)
                               if layer.is_moe}}
    try:
        load_expert_parallel(checkpoints["top1"], rank, world_check, device="cpu")
        res["mismatch"] = None
    except ValueError as e:
        res["mismatch"] = str(e)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    record_ep_rank(checkpoints["top1"], docs, os.path.join(out_dir, "ep.zarr"), PROBES, dtype="fp32",
                   device="cpu", segment=16)


@pytest.mark.slow  # spawns W gloo ranks (torch.multiprocessing), each importing torch (≈ 15–30 s on 2 cores)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_single_process(checkpoints, tmp_path, world):
    docs = docs_of((40, 7, 66))
    spawn(_rank_work, world, dict(checkpoints={k: str(v) for k, v in checkpoints.items()}, out_dir=str(tmp_path),
                                  docs=docs, world_check=world * 2))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, ck in checkpoints.items():
        ref = load_model(ck, dtype="fp32")
        logits, cache = run_with_cache(ref, _ids(), SITES)
        ref.zero_grad()
        ref(_ids()).logits.square().mean().backward()
        E = ref.config.num_local_experts
        for r, res in enumerate(ranks):
            got = res[name]
            torch.testing.assert_close(got["logits"], logits.logits, rtol=0, atol=1e-5)
            assert torch.equal(got["logits"], logits.logits), f"{name} rank {r}: logits not bit-equal"
            assert got["taps"].keys() == cache.keys()
            for site, value in cache.items():          # every tap fires with the same value on every rank
                assert torch.equal(got["taps"][site], value), f"{name} rank {r}: {site}"
            # gradients: non-expert weights whole; experts: this rank's rows of the full gradient
            for n, p in ref.named_parameters():
                g = p.grad
                if ".experts." in n:
                    lo = got["first"][int(n.split(".")[2])]
                    g = g[lo:lo + E // world]
                torch.testing.assert_close(got["grads"][n], g, rtol=1e-5, atol=1e-7, msg=f"{name} rank {r}: {n}")
            # resident expert bytes: 1/W of the total; every other weight is whole on every rank
            full = resident_bytes(ref)
            assert got["bytes"]["experts"] * world == full["experts"] and got["bytes"]["other"] == full["other"]
        assert sorted(f for res in ranks for f in res[name]["first"].values()) == sorted(
            r * (E // world) for r in range(world) for _ in ref.config.moe_layer_index)
        assert all(res["mismatch"] and f"rank {r} of {world * 2}" in res["mismatch"]
                   and f"size {world}" in res["mismatch"] for r, res in enumerate(ranks))
    single = record(load_model(checkpoints["top1"], dtype="fp32"), docs, tmp_path / "single.zarr", PROBES,
                    segment=16, progress=False, model_source=str(checkpoints["top1"]))
    assert_same_run(single, tmp_path / "ep.zarr")
    execution = open_run(tmp_path / "ep.zarr").attrs["execution"]
    assert execution["mode"] == "expert-parallel" and execution["expert_parallel"] == world


@pytest.mark.slow  # `workbench record --ep 2` spawns 2 ranks (≈ 15 s); resumes a run holding one document
def test_cli_ep_resumes_and_equals_single_process(checkpoints, tmp_path):
    ck = str(checkpoints["top2"])
    docs = docs_of((33, 12, 50))
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    single = record(load_model(ck), docs, tmp_path / "single.zarr", ("router", "entropy"), segment=16,
                    progress=False, model_source=ck)
    out = tmp_path / "ep.zarr"
    record(load_model(ck), docs[:1], out, ("router", "entropy"), segment=16, progress=False, model_source=ck,
           finish=False)
    assert main(["record", "--model", ck, "--input", str(inp), "--out", str(out), "--probes", "router,entropy",
                 "--segment", "16", "--quiet", "--ep", "2"]) == 0
    assert_same_run(single, out)


@pytest.mark.parametrize("N,K", [(0, 1), (1, 1), (37, 1), (29, 2)])
def test_expert_slices_sum_to_the_whole_layer(N, K):
    """`Llama4TextExperts` holding experts first..first+E/W−1 of E, summed over the W slices, equals the
    whole layer bit for bit (top-1 and top-2; a slice may receive no tokens at all)."""
    g = torch.Generator().manual_seed(N + K)
    whole = Llama4TextExperts(8, 16, 12)
    with torch.no_grad():
        whole.gate_up_proj.normal_(0, 0.2, generator=g)
        whole.down_proj.normal_(0, 0.2, generator=g)
    x = torch.randn(N, 16, generator=g)
    ids = (torch.stack([torch.randperm(6, generator=g)[:K] for _ in range(N)]) if N
           else torch.zeros(0, K, dtype=torch.long))
    gate = torch.rand(N, K, generator=g)
    ref = whole(x, ids, gate)
    for world in (2, 4, 8):
        parts = []
        for r in range(world):
            part = Llama4TextExperts(8 // world, 16, 12, first=r * 8 // world, total=8)
            with torch.no_grad():
                part.gate_up_proj.copy_(whole.gate_up_proj[part.first:part.first + 8 // world])
                part.down_proj.copy_(whole.down_proj[part.first:part.first + 8 // world])
            parts.append(part(x, ids, gate))
        assert torch.equal(sum(parts), ref), world         # experts 6, 7 are never routed: some slices idle


def test_rank_slices_without_a_process_group(checkpoints):
    """Loading needs no process group: each rank's experts are its rows of the checkpoint's, every
    other weight is whole; the forward refuses to run without the group."""
    ck = checkpoints["top1"]
    full = load_model(ck)
    assert expert_range(4, 1, 2) == range(2, 4)
    for r in range(2):
        m = load_expert_parallel(ck, r, 2, device="cpu")
        assert resident_bytes(m)["experts"] * 2 == resident_bytes(full)["experts"]
        for i in full.config.moe_layer_index:
            a, b = m.model.layers[i].feed_forward.experts, full.model.layers[i].feed_forward.experts
            assert (a.first, a.total) == (2 * r, 4)
            assert torch.equal(a.gate_up_proj, b.gate_up_proj[2 * r:2 * r + 2])
            assert torch.equal(a.down_proj, b.down_proj[2 * r:2 * r + 2])
        assert torch.equal(m.model.embed_tokens.weight, full.model.embed_tokens.weight)
        with pytest.raises(RuntimeError, match=r"rank 1 of 2\) needs an initialised process group" if r else
                           r"rank 0 of 2\) needs an initialised process group"):
            m(_ids())
    one = load_expert_parallel(ck, 0, 1)            # world 1: the whole model, no collective
    assert torch.equal(one(_ids()).logits, full(_ids()).logits)


def test_clear_errors(checkpoints, tmp_path, monkeypatch, capsys):
    ck = checkpoints["top1"]
    divisible = r"num_local_experts=4 is not divisible by world size 3; use one of \[1, 2, 4\]"
    with pytest.raises(ValueError, match=divisible):
        load_expert_parallel(ck, 0, 3)
    with pytest.raises(ValueError, match=r"rank 2 outside 0\.\.1"):
        load_expert_parallel(ck, 2, 2)
    with pytest.raises(ValueError, match="not divisible by world size 3"):   # refused before spawning
        record_ep(ck, [[1, 2, 3]], tmp_path / "x.zarr", nprocs=3)
    inp = tmp_path / "d.txt"
    inp.write_text("hello\n")
    args = ["record", "--model", str(ck), "--input", str(inp), "--out", str(tmp_path / "r.zarr"), "--quiet"]
    assert main(args + ["--ep", "2", "--dp", "2"]) == 2
    assert "--ep (expert parallelism) cannot be combined with --dp" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")          # as torchrun would set it
    assert main(args + ["--ep", "4"]) == 2
    assert "--ep 4 but torchrun started 2 ranks" in capsys.readouterr().err
    assert not (tmp_path / "r.zarr").exists()

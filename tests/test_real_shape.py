"""The real-shape dress rehearsal (benchmarks/real_shape.py), scaled down to toy widths: the same script and
steps — a checkpoint in the released Llama4ForConditionalGeneration layout and sharding written tensor by
tensor, info, plan, layer-streamed and in-memory records that cross the chunk and floor_scale, int4
quantize_checkpoint and a record from it — each in a fresh process, every store checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from safetensors import safe_open


@pytest.mark.slow  # six child processes (each imports torch): ~30-60 s
def test_scaled_dress_rehearsal_runs_every_step(tmp_path):
    work = tmp_path / "rs"
    env = dict(os.environ, OUT=str(tmp_path), WORKBENCH_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/real_shape.py", "--scaled", "--workdir", str(work), "--keep"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    R = json.loads((tmp_path / "real_shape.json").read_text())
    assert R["ok"] and R["info"]["ok"] and "nope-global" in R["info"]["text"]
    steps = {(r["step"], r.get("tokens")) for r in R["steps"]}
    assert {("streamed", 64), ("streamed", 128), ("in-memory", 64), ("in-memory", 128), ("int4", 64)} <= steps
    for r in R["steps"]:
        assert "error" not in r and "skipped" not in r, r
        if r["step"] != "quantize":
            assert r["store"]["ok"] and r["store"]["n_tokens"] == r["tokens"] and r["peak_rss"] > 0
            if r["tokens"] > 32:                                  # past the chunk and floor_scale (32)
                assert r["store"]["max_keys_per_layer"] == [32, r["tokens"]]
                assert r["store"]["temperature_active_past_floor_scale"]
    # the released layout: composite config, language_model.* keys, a projector, an index over several shards
    ck = work / "checkpoint"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"] and cfg["text_config"]["num_hidden_layers"] == 2
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "language_model.lm_head.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in keys
    assert len(set(index["weight_map"].values())) > 1
    with safe_open(str(ck / index["weight_map"]["language_model.model.embed_tokens.weight"]), "pt") as f:
        emb = f.get_tensor("language_model.model.embed_tokens.weight")
    assert str(emb.dtype) == "torch.bfloat16" and 0.015 < float(emb.float().std()) < 0.025
    assert "| streamed | 128 |" in proc.stdout

"""Recording: stored router choices and entropies equal what transformers computes; resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ours_from_hf, random_hf_model
from test_attention_stats import CFG, entropy_of
from tolerances import entropy_tol, model_tol

import workbench
from workbench.config import Llama4TextConfig
from workbench.recording import read_inputs, record
from workbench.store import open_run


@pytest.fixture(scope="module")
def pair():
    cfg = Llama4TextConfig(**dict(CFG, num_experts_per_tok=2, num_local_experts=6))
    hf = random_hf_model(cfg, std=0.15)
    return cfg, hf, ours_from_hf(cfg, hf)


def test_router_and_entropy_equal_transformers(pair, tmp_path):
    cfg, hf, ours = pair
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (75, 40)]
    run_path = record(ours, docs, tmp_path / "r.zarr", probes=("router", "router_logits", "entropy"),
                      progress=False, segment=32)        # segments exercise the cache path too
    run = open_run(run_path)
    moe = cfg.moe_layer_index
    for d, toks in enumerate(docs):
        logits = {}
        handles = [hf.model.layers[i].feed_forward.router.register_forward_hook(
            lambda m, inp, out, i=i, logits=logits: logits.__setitem__(i, out[1])) for i in moe]
        with torch.no_grad():
            att = hf(torch.tensor([toks]), output_attentions=True).attentions
        for h in handles:
            h.remove()
        sl = run.doc_slice(d)
        experts = run.array("router/experts")[:, sl]
        weights = run.array("router/weights")[:, sl]
        for j, i in enumerate(moe):
            top = torch.topk(logits[i], cfg.num_experts_per_tok, dim=-1)
            np.testing.assert_array_equal(experts[j], top.indices.numpy())
            # logits (and their sigmoid, slope ≤ 1/4) agree to fp32 round-off: sparse vs dense MoE matmuls
            tol = model_tol(cfg, n_keys=len(toks))
            np.testing.assert_allclose(weights[j], torch.sigmoid(top.values).numpy(), atol=tol)
            np.testing.assert_allclose(run.array("router/logits")[j, sl], logits[i].numpy(), atol=tol)
        ent = run.array("attention/entropy")[:, :, sl]
        for i in range(cfg.num_hidden_layers):
            np.testing.assert_allclose(ent[i], entropy_of(att[i])[0].numpy(), atol=entropy_tol(cfg, len(toks)))
        np.testing.assert_array_equal(run.tokens(d), toks)


def test_record_appends_and_skips_done(tmp_path):
    model = workbench.load_model("tiny")
    out = tmp_path / "r.zarr"
    record(model, [{"text": "alpha beta", "id": "a"}], out, progress=False)
    record(model, [{"text": "alpha beta", "id": "a"}, {"text": "gamma", "id": "b", "domain": "wiki"}], out,
           progress=False)
    run = open_run(out)
    assert run.n_docs == 2 and run.attrs["complete"]
    assert list(run.read("doc_domain")) == ["", "wiki"]


def test_read_inputs_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: malformed JSON"):
        read_inputs(p)
    q = tmp_path / "e.txt"
    q.write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        read_inputs(q)
    b = tmp_path / "b.txt"
    b.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_inputs(b)
    with pytest.raises(ValueError, match="unknown probes"):
        record(workbench.load_model("tiny"), ["x"], tmp_path / "z.zarr", probes=("routr",))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    docs = [{"text": f"document {i} " + "lorem ipsum " * (3 + i), "id": f"d{i}"} for i in range(40)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs))
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    cmd = [sys.executable, "-m", "workbench", "record", "--model", "tiny", "--input", str(src),
           "--probes", "router,entropy", "--flush-tokens", "300"]
    proc = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:                    # kill once some documents are committed
        if (killed / "zarr.json").exists():
            try:
                if 3 <= open_run(killed).n_docs:
                    break
            except Exception:
                pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = open_run(killed)
    assert 0 < partial.n_docs < len(docs) and not partial.attrs["complete"]
    subprocess.run(cmd + ["--out", str(killed)], check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(clean)], check=True, capture_output=True)
    a, b = open_run(killed), open_run(clean)
    assert a.n_docs == b.n_docs == len(docs) and a.attrs["complete"]
    for name in ("tokens", "doc_offsets", "router/experts", "router/weights", "attention/entropy",
                 "attention/entropy_no_temp", "attention/n_keys"):
        np.testing.assert_array_equal(a.array(name)[...], b.array(name)[...], err_msg=name)
    assert list(a.read("doc_id")) == [d["id"] for d in docs]
    assert a.attrs["input_hash"] == b.attrs["input_hash"]

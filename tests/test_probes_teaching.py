"""probes.teaching: the teaching computations agree with the model and the library's own code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench
from probes import teaching as T
from workbench.model.attention_kernel import n_keys
from workbench.params import count_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


def test_import_without_torch():
    code = "import sys, probes.teaching; assert 'torch' not in sys.modules, 'probes.teaching imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))


@pytest.mark.parametrize("chunk", [None, 1, 7, 16, 100])
def test_attention_mask_matches_kernel_convention(chunk):
    m = T.attention_mask(50, chunk)
    np.testing.assert_array_equal(m.sum(1), n_keys(0, 50, 0, chunk).numpy())
    assert not np.triu(m, 1).any()                                   # causal


def test_rope_scores_depend_only_on_distance(model):
    s = T.rope_scores(model.config, range(0, 200, 7), [0, 1, 5, 40])
    assert np.ptp(s, axis=1).max() < 1e-4 * np.abs(s).max()          # each row flat in p
    assert np.ptp(s[:, 0]) > 1e-2                                    # but rows differ with Δ
    fig = T.rope_figure(model.config, 3, 10, 5)
    assert len(fig.data) == 4 + 4 + 1


def test_token_journey_agrees_with_the_moe_block(model):
    ids = model.tokenizer.encode("gate scales the input")
    j = T.token_journey(model, ids, 5, 3)
    np.testing.assert_allclose(j["gates_K"], 1 / (1 + np.exp(-j["logits_E"][j["ids_K"]])), rtol=1e-5)
    assert j["ids_K"][0] == np.argmax(j["logits_E"])
    np.testing.assert_allclose(j["scaled_norms_K"], j["gates_K"] * j["x_norm"], rtol=1e-5)
    np.testing.assert_allclose(j["routed_norm"], j["expert_norms_K"][0], rtol=1e-5)   # top-1: one expert
    assert j["out_norm"] <= j["shared_norm"] + j["routed_norm"] + 1e-6
    k2 = T.token_journey(model, ids, 5, 3, top_k=2, mask_experts={3: [int(j["ids_K"][0])]}, drop_shared=True)
    assert len(k2["ids_K"]) == 2 and int(j["ids_K"][0]) not in k2["ids_K"] and k2["shared_norm"] == 0.0
    assert T.journey_figure(j, "<t>").layout.title.text.count("&lt;t&gt;") == 1
    with pytest.raises(ValueError, match="dense"):
        T.token_journey(model, ids, 0, 2)


def test_next_token_probs_and_shift(model):
    ids = model.tokenizer.encode("next")
    p = T.next_token_probs(model, ids)
    with torch.no_grad():
        ref = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-6)
    q = T.next_token_probs(model, ids, drop_shared=True)
    s = T.distribution_shift(p, q)
    assert s["kl"] > 0 and 0 < s["tv"] <= 1
    assert T.distribution_shift(p, p) == {"kl": 0.0, "tv": 0.0, "argmax_changed": False}
    fig = T.next_token_figure(p, q, model.tokenizer.token_strings(range(model.config.vocab_size)), top_n=5)
    assert len(fig.data) == 2 and len(fig.data[0].x) <= 10


def test_recorded_path_matches_store(model, tmp_path):
    workbench.record(model, ["path test"], tmp_path / "r.zarr", probes=("router", "router_logits"), progress=False)
    run = workbench.open_run(tmp_path / "r.zarr")
    p = T.recorded_path(run, 4)
    np.testing.assert_array_equal(p["experts"], run.array("router/experts")[:, 4])
    assert p["logits"].shape == (3, 4) and list(p["layer_index"]) == [0, 1, 3]
    assert len(T.path_figure(p, 4, "x", 4).data) == 2
    with pytest.raises(IndexError):
        T.recorded_path(run, run.n_tokens)


def test_param_breakdown_matches_count_params(model):
    cfg = workbench.preset("scout")
    got = T.param_breakdown(cfg, 32, 2)
    ref = count_params(cfg.replace(num_local_experts=32, num_experts_per_tok=2))
    assert {k: got[k] for k in ref} == ref and (got["n_experts"], got["top_k"]) == (32, 2)
    fig = T.param_figure(got, "scout")
    assert sum(tr.y[0] for tr in fig.data) == got["total"] and sum(tr.y[1] for tr in fig.data) == got["active"]
    with pytest.raises(ValueError):
        T.param_breakdown(cfg, 2, 3)


def test_display_token_escapes_and_shows_whitespace():
    assert T.display_token("<b>x</b> \n") == "&lt;b&gt;x&lt;/b&gt;␣↵"
    assert T.display_token("") == "∅"

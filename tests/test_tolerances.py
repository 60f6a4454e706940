"""The round-off tolerances of tests/tolerances.py are tight enough to catch the bugs they guard against:
a wrong temperature (attn_scale off by 10 %) or a dropped temperature step moves the recorded entropy by
far more than `entropy_tol`, while a reordering of the same maths (another prefill segmentation) stays
inside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ours_from_hf, random_hf_model
from test_attention_stats import CFG
from tolerances import SAFETY, entropy_tol, eps, reorder_tol

from workbench.config import Llama4TextConfig
from workbench.instrument.hooks import intervene
from workbench.recording import run_document

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reorder_tol_is_the_stated_formula():
    assert reorder_tol(64) == pytest.approx(SAFETY * eps() * 8)
    assert reorder_tol(64, magnitude=2, depth=3) == pytest.approx(6 * reorder_tol(64))
    assert reorder_tol(64, dtype=torch.bfloat16) > 1e4 * reorder_tol(64, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= 1"):
        reorder_tol(0)


def test_entropy_tol_separates_round_off_from_real_errors():
    cfg = Llama4TextConfig(**CFG)
    model = ours_from_hf(cfg, random_hf_model(cfg, std=0.15))
    ids = torch.randint(0, cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    base = run_document(model, ids, ("entropy",))["attention/entropy"]
    tol = entropy_tol(cfg, len(ids))
    segmented = run_document(model, ids, ("entropy",), segment=9)["attention/entropy"]   # same maths, reordered
    assert np.abs(segmented - base).max() <= tol
    past_floor = slice(cfg.floor_scale, None)
    for knobs in (dict(attn_scale=cfg.attn_scale * 1.1), dict(temperature_tuning=False)):
        with intervene(model, **knobs):
            wrong = run_document(model, ids, ("entropy",))["attention/entropy"]
        assert np.abs(wrong[..., past_floor] - base[..., past_floor]).max() > 10 * tol, knobs

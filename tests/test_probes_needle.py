"""Needle probe: haystack construction, scoring equals a full forward, grid store round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from probes.needle import load_grid, make_haystack, needle_figure, needle_grid, save_grid, score


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


def test_haystack_places_fact_at_depth(model):
    tok = model.tokenizer
    for depth in (0.0, 0.5, 1.0):
        h = make_haystack(tok, 300, depth, seed=3)
        assert abs(len(h.prefix) - 300) <= 2
        text = tok.decode(h.prefix[h.fact_start:h.fact_start + 40])
        assert text.lstrip().startswith("The secret code for")
        assert tok.decode(h.value).strip().isdigit()
    with pytest.raises(ValueError, match="depth"):
        make_haystack(tok, 300, 1.5)
    with pytest.raises(ValueError, match="too short"):
        make_haystack(tok, 10, 0.5)


def test_segmented_score_equals_full_forward(model):
    h = make_haystack(model.tokenizer, 150, 0.3)
    lp, exact = score(model, h, segment=40)            # segments cross chunk and floor_scale boundaries
    ids = torch.tensor([h.prefix + h.value])
    with torch.no_grad():
        logits = model(ids).logits[0, len(h.prefix) - 1:-1]
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(h.value)[:, None]).sum()
    assert lp == pytest.approx(float(ref), abs=1e-3)
    assert exact == bool((logits.argmax(-1) == torch.tensor(h.value)).all())


def test_grid_roundtrip_and_tuning_matters_only_past_floor(model, tmp_path):
    grid = needle_grid(model, lengths=[120, 200], depths=[0.2, 0.8])
    assert grid.logprob.shape == (2, 2, 2)
    fs = model.config.floor_scale
    assert 120 > fs                                  # both lengths are past floor_scale: tuning changes scores
    assert (grid.logprob[0] != grid.logprob[1]).all()     # random tiny weights: small but real effect
    save_grid(grid, tmp_path / "n.zarr")
    back = load_grid(tmp_path / "n.zarr")
    np.testing.assert_allclose(back.logprob, grid.logprob, rtol=1e-6)
    fig = needle_figure(back)
    assert len(fig.data) == 2
    import xarray as xr
    ds = xr.open_zarr(tmp_path / "n.zarr", consolidated=False)
    assert ds["logprob"].dims == ("tuning", "length", "depth")

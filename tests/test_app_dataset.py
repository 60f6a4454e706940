"""The app opens several runs as one (apps/views.py: '+'-joined names and globs -> RunSet), and its
aggregated views equal those of one run holding the same documents."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dataset_runs import merged_run, three_runs

from apps import views as v
from workbench.store import RunSet


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_runs") / "runs"
    paths = three_runs(root)
    merged_run(paths, root / "merged.zarr")
    return root


def test_names_and_globs_open_as_one_runset(runs_dir):
    path = v.resolve_run(runs_dir, "a.zarr+b.zarr+c.zarr")
    assert path.name == "a.zarr+b.zarr+c.zarr"
    assert v.resolve_run(runs_dir, "[abc].zarr") == path            # a glob over run names
    assert v.resolve_run(runs_dir, "a.zarr+[bc].zarr+a.zarr") == path  # each run once
    assert v.resolve_run(runs_dir, "merged.zarr") == runs_dir.resolve() / "merged.zarr"
    run = v.open_cached(path)
    assert isinstance(run, RunSet) and run.n_tokens == 327 and v.open_cached(path) is run   # cached
    assert "a.zarr+b.zarr+c.zarr" in v.run_summary_html(run) and "327" in v.run_summary_html(run)
    for bad, msg in (("a.zarr+../x.zarr", "Invalid run name"), ("a.zarr+nope.zarr", "No run named"),
                     ("*.nothing", "No runs match"), (".hidden*", "Invalid run pattern"),
                     ("sub/*.zarr", "Invalid run pattern")):
        with pytest.raises(v.UserError, match=msg):
            v.resolve_run(runs_dir, bad)


def test_aggregated_views_equal_one_run(runs_dir):
    many = v.open_cached(v.resolve_run(runs_dir, "[abc].zarr"))
    one = v.open_cached(v.resolve_run(runs_dir, "merged.zarr"))
    pd.testing.assert_frame_equal(v.load_views(many, 2)[2], v.load_views(one, 2)[2])
    np.testing.assert_array_equal(v.transition_view(many, 0, 2, normalize=False)[0].data[0].z,
                                  v.transition_view(one, 0, 2, normalize=False)[0].data[0].z)
    assert v.domain_view(many, 2)[1] == v.domain_view(one, 2)[1]
    assert v.consecutive_view(many).to_json() == v.consecutive_view(one).to_json()
    fig_a, tab_a = v.layer_head_view(many)
    fig_b, tab_b = v.layer_head_view(one)
    pd.testing.assert_frame_equal(tab_a, tab_b, rtol=1e-12)
    group = v.layer_groups(many)[0][1]
    a, b = v.entropy_profile_view(many, group), v.entropy_profile_view(one, group)
    assert a.layout.title.text == b.layout.title.text and len(a.data) == len(b.data)
    for ta, tb in zip(a.data, b.data):
        np.testing.assert_allclose(np.asarray(ta.y, dtype=float), np.asarray(tb.y, dtype=float), rtol=1e-12)
    x_many = v.routing_tokens(many, 4, 0, 32, 2)
    x_one = v.routing_tokens(one, 4, 0, 32, 2)
    assert str(x_many) == str(x_one)   # a document read across run boundaries is the same document


def test_token_views_read_across_runs(runs_dir):
    many = v.open_cached(v.resolve_run(runs_dir, "a.zarr+b.zarr+c.zarr"))
    one = v.open_cached(v.resolve_run(runs_dir, "merged.zarr"))
    for token in (0, 120, 121, 326):          # the last token of run a, the first of run b, the very last
        assert v.token_path_view(many, token)[1] == v.token_path_view(one, token)[1]

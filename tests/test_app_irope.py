"""Teach iRoPE tab: the mask view's chunk default, the live retrieval/entropy panel on a recall-trained
model, and the experiment-report view (pure views, no browser)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import workbench
from apps import teach_views as tv
from apps.views import UserError


def test_mask_default_shows_chunks_on_first_open():
    cfg = workbench.preset("tiny").replace(attention_chunk_size=128)     # the bundled models' chunk
    chunk, hi = tv.mask_defaults(cfg, 48)
    assert 1 <= chunk < 48 and chunk <= hi                            # inside the slider, smaller than the sequence
    fig = tv.mask_view(48, chunk)
    chunked, glob = (np.asarray(t.z) for t in fig.data[:2])
    assert not np.array_equal(chunked, glob)                          # the two masks differ
    assert tv.mask_defaults(cfg.replace(attention_chunk_size=8), 48)[0] == 8   # a small chunk is kept


@pytest.fixture(scope="module")
def irope(tmp_path_factory):
    """A recall-trained iRoPE checkpoint with task.json beside it (a short run of the test spec, exported)."""
    from test_experiment import spec_with

    from workbench.experiment.export import export_run
    from workbench.experiment.runner import run_experiment
    d = tmp_path_factory.mktemp("irope")
    run_experiment(spec_with(**{"train__steps": 30, "eval_multiples": [1, 2], "variants": [{"name": "irope"}]}),
                   d / "exp", progress=False, report=False)
    export_run(d / "exp", "irope", 0, d / "model")
    return workbench.load_model(str(d / "model"))


def test_irope_panel_defaults_show_the_effect(irope):
    lo, hi, n0, step = tv.irope_length_slider(irope)
    assert lo < irope.config.floor_scale < n0 <= hi
    fig, md = tv.irope_recall_view(irope, threading.Lock(), n0, True, tv.IROPE_ATTN_SCALE)
    names = [t.name for t in fig.data]
    assert any("entropy as run" in n for n in names) and "ln n" in names
    as_run = next(t for t in fig.data if t.name.startswith("entropy as run"))
    no_temp = next(t for t in fig.data if t.name == "entropy without temperature")
    beyond = [i for i, x in enumerate(as_run.x) if x > irope.config.floor_scale]
    assert beyond and all(as_run.y[i] < no_temp.y[i] for i in beyond)    # the step lowers entropy on first open
    at_train = [i for i, x in enumerate(as_run.x) if x < irope.config.floor_scale]
    assert all(as_run.y[i] == pytest.approx(no_temp.y[i], abs=1e-5) for i in at_train)   # β = 1 there
    assert "the model answers" in md


def test_irope_panel_rejects_bad_input(irope):
    lock = threading.Lock()
    with pytest.raises(UserError, match="Length must be between"):
        tv.irope_recall_view(irope, lock, 10 ** 6, True, 0.3)
    with pytest.raises(UserError, match="attn_scale"):
        tv.irope_recall_view(irope, lock, 32, True, -1.0)
    with pytest.raises(UserError, match="No recall-trained model"):
        tv.irope_recall_view(None, lock, 32, True, 0.3)
    with pytest.raises(UserError, match="task.json"):
        tv.irope_recall_view(workbench.load_model("tiny"), lock, 32, True, 0.3)


def test_experiment_report_view(tmp_path):
    from test_experiment import spec_with

    from workbench.experiment.runner import run_experiment
    run_experiment(spec_with(**{"train__steps": 2, "eval_multiples": [1]}), tmp_path / "experiments" / "tiny",
                   progress=False, report=False)
    assert tv.list_experiments(tmp_path) == ["experiments/tiny"]
    md, acc, ent = tv.experiment_report_view(tmp_path, "experiments/tiny")
    assert "| irope |" in md and "| all-rope |" in md and acc.data and ent.data
    with pytest.raises(UserError, match="not an experiment directory"):
        tv.experiment_report_view(tmp_path, "../..")
    with pytest.raises(UserError, match="Pick an experiment"):
        tv.experiment_report_view(tmp_path, None)


def test_bundled_tiny_irope_is_the_panel_default_and_shows_the_effect():
    """The app loads tiny-irope for the live panel by default; on first open (default length, temperature on,
    default attn_scale) it retrieves at its training length and its NoPE entropy drops below the
    temperature-off entropy beyond floor_scale."""
    model = tv.load_irope_model()
    assert model is not None and model.source == "tiny-irope"
    lo, hi, n0, step = tv.irope_length_slider(model)
    assert lo == 16 and n0 > model.config.floor_scale and hi >= n0
    fig, md = tv.irope_recall_view(model, threading.Lock(), n0, True, tv.IROPE_ATTN_SCALE)
    acc = next(t for t in fig.data if t.name.startswith("clean (temperature on"))
    assert acc.x[0] == lo and acc.y[0] >= 0.95                          # retrieves at its training length
    as_run = next(t for t in fig.data if t.name.startswith("entropy as run"))
    no_temp = next(t for t in fig.data if t.name == "entropy without temperature")
    beyond = [i for i, x in enumerate(as_run.x) if x > model.config.floor_scale]
    assert beyond and all(as_run.y[i] < no_temp.y[i] for i in beyond)
    assert f"Query at {n0} tokens" in md


def test_demo_example_experiment_replaces_an_older_study(tmp_path):
    import importlib.util

    from conftest import REPO
    spec = importlib.util.spec_from_file_location("_demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    old = tmp_path / "experiments" / "irope"
    (old / "runs" / "gone-variant" / "seed0").mkdir(parents=True)
    (old / "spec.json").write_text("{}")
    (old / "report").mkdir()
    (old / "report" / "report.md").write_text("old")
    out = demo.ensure_example_experiment(tmp_path)
    assert out == old and not (old / "runs" / "gone-variant").exists()
    assert (out / "spec.json").read_text() == (demo.EXAMPLE_EXPERIMENT / "spec.json").read_text()
    assert (out / "report" / "report.md").read_text() != "old"

"""Architecture experiments: spec validation, the recall task layout, resume after a kill, a
two-variant run that learns, the report (tables, CSV, figures, metrics.zarr with provenance)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.experiment.recall import RecallTask, TaskError
from workbench.experiment.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]

# A spec small enough to train in about a second per variant on one thread.
TINY = {
    "name": "tiny", "seeds": [0], "eval_multiples": [1, 2],
    "base": {"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "num_layers": 2, "nope_interval": 2,
             "chunk_size": 16, "floor_scale": 17, "num_experts": 2, "intermediate_size": 32,
             "intermediate_size_mlp": 64},
    "recall": {"train_length": 16, "pairs": 2, "queries": 2, "vocab_size": 64, "key_ids": [4, 12],
               "value_ids": [12, 20], "filler_ids": [20, 64], "distractor_density": 0.05},
    "train": {"steps": 8, "batch_size": 4, "warmup": 2, "ckpt_every": 2, "threads": 1},
    "eval": {"sequences": 4, "needle_sequences": 2},
    "variants": [{"name": "irope"}, {"name": "irope-no-temp", "from": "irope", "temperature_tuning": False},
                 {"name": "all-rope", "nope_interval": "none"}],
}


def spec_with(**changes):
    d = json.loads(json.dumps(TINY))
    for path, value in changes.items():
        keys = path.split("__")
        t = d
        for k in keys[:-1]:
            t = t[int(k)] if isinstance(t, list) else t[k]
        t[keys[-1]] = value
    return d


# ------------------------------------------------------------------------------ spec validation
@pytest.mark.parametrize("changes, words", [
    ({"variants__2__nope_every": 3}, ["all-rope", "nope_every", "unknown knob"]),
    ({"variants__2__chunk_size": -4}, ["all-rope", "chunk_size", "-4"]),
    ({"variants__2__attn_scale": float("nan")}, ["attn_scale", "nan"]),
    ({"variants__2__top_k": 3}, ["all-rope", "top_k=3", "num_experts=2"]),
    ({"variants__2__temperature_tuning": False}, ["all-rope", "temperature_tuning", "no effect"]),
    ({"variants__1__nope_interval": 1}, ["irope-no-temp", "nope_interval", "changes training"]),
    ({"variants__1__from": "nowhere"}, ["irope-no-temp", "from", "nowhere"]),
    ({"variants__2__nope_interval": 7}, ["all-rope", "nope_interval=7", "no NoPE layer"]),
    ({"variants__2__num_heads": 3}, ["all-rope", "hidden_size=32", "num_heads=3"]),
    ({"variants__2__moe_interval": "none", "variants__2__num_experts": 4}, ["num_experts", "no MoE"]),
    ({"variants__2__shared_expert": "yes"}, ["shared_expert", "'yes'"]),
    ({"variants__2__name": "irope"}, ["irope", "duplicate"]),
    ({"base__hidden": 64}, ["[base]", "hidden"]),
    ({"train__lr": 0}, ["[train]", "lr", "0"]),
    ({"train__stepz": 5}, ["[train]", "stepz"]),
    ({"recall__pairs": 1}, ["queries=2", "pairs=1"]),
    ({"recall__key_ids": [4, 14]}, ["key_ids", "value_ids", "overlap"]),
    ({"seeds": [0, 0]}, ["seeds"]),
    ({"eval_multiples": [2, 1]}, ["eval_multiples"]),
    ({"task": "vision"}, ["task", "vision"]),
    ({"variants": []}, ["variants"]),
    ({"recall__curriculum_steps": 8}, ["curriculum_steps=8", "no step of the task"]),
    ({"recall__curriculum_steps": 2, "recall__curriculum_length": 5}, ["curriculum_length=5", "[8, train_length=16]"]),
    ({"recall__curriculum_steps": 2, "recall__curriculum_length": 20}, ["curriculum_length=20"]),
    ({"recall__curriculum_steps": 2, "recall__curriculum_pairs": 3}, ["curriculum_pairs=3", "pairs=2"]),
    ({"recall__curriculum_mix": -1}, ["curriculum_mix", "-1"]),
])
def test_spec_rejects_bad_input_naming_variant_key_value(changes, words):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(**changes))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_spec_files_the_repo_ships_are_valid():
    spec = load_spec(REPO / "experiments" / "irope.toml")
    names = [v.name for v in spec.variants]
    assert {"irope", "irope-no-temp", "all-rope", "all-nope"} <= set(names)
    assert len(spec.seeds) >= 3 and spec.eval_multiples == [1, 2, 4, 8, 16, 32]
    irope = spec.variant("irope")
    # training sees no temperature step: floor(p+1 / floor_scale) = 0 for every training position
    assert spec.train_length < irope.knobs["floor_scale"]
    scales = {v.knobs["attn_scale"] for v in spec.variants if v.knobs["nope_interval"] != "none"}
    assert {0.1, 0.3, 0.6} <= scales


def test_bad_toml_file_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("name = 'x'\n[base\n")
    with pytest.raises(SpecError, match="bad.toml.*not valid TOML"):
        load_spec(p)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_cli_check_reports_error_and_exit_code(tmp_path, capsys):
    from workbench.cli import main
    p = tmp_path / "s.toml"
    p.write_text('name = "s"\n[[variants]]\nname = "a"\nnum_expertz = 2\n')
    assert main(["experiment", "check", str(p)]) == 2
    err = capsys.readouterr().err
    assert "variant 'a'" in err and "num_expertz" in err
    assert main(["experiment", "check", str(REPO / "experiments" / "irope.toml")]) == 0


# ------------------------------------------------------------------------------ the recall task
def test_recall_layout_matches_task_json():
    task = RecallTask(vocab_size=64, key_ids=(4, 12), value_ids=(12, 20), filler_ids=(20, 64), pairs=3, queries=2,
                      train_length=24)
    x, y, pp = task.batch(16, 40, torch.Generator().manual_seed(0), distractor_density=0.1)
    assert x.shape == (16, 40) and (x[:, 0] == task.bos_id).all()
    ans = task.answer_positions(40)
    assert ans.tolist() == [36, 38]
    assert ((y >= 0).sum(1) == 2).all() and (y[:, ans] >= 0).all()
    for b in range(16):
        for j, a in enumerate(ans.tolist()):
            key, val = int(x[b, a]), int(x[b, a + 1])
            assert 4 <= key < 12 and 12 <= val < 20 and int(y[b, a]) == val
            p = int(pp[b, j])                              # the planted pair: same key, same value
            assert int(x[b, p]) == key and int(x[b, p + 1]) == val and p < 40 - 4
            # the queried key occurs exactly once in the haystack (distractors never use planted keys)
            assert int((x[b, 1:36] == key).sum()) == 1
        hay = x[b, 1:36]
        n_keys = int(((hay >= 4) & (hay < 12)).sum())
        assert n_keys >= 3                                  # planted + distractors
        keys_at = torch.nonzero((hay >= 4) & (hay < 12)).squeeze(1)
        assert ((hay[keys_at + 1] >= 12) & (hay[keys_at + 1] < 20)).all()   # every key is followed by a value


def test_needle_depth_and_task_json_round_trip(tmp_path):
    task = RecallTask()
    x, y, pp = task.batch(1, 256, torch.Generator().manual_seed(1), pairs=1, queries=1, needle_depth=0.5)
    assert abs(int(pp[0, 0]) - 128) < 8
    p = task.save(tmp_path / "task.json")
    d = json.loads(p.read_text())
    for k in ("task", "bos_id", "key_ids", "value_ids", "filler_ids", "pairs", "queries", "train_length"):
        assert k in d
    assert RecallTask.load(p) == task
    d["filler_ids"] = [100, 300]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(TaskError, match="bad.json.*filler_ids"):
        RecallTask.load(tmp_path / "bad.json")


def test_length_curriculum_shapes():
    """Short sequences first, then lengths in [curriculum_length, train_length] whose layout fits, then the
    task; the shape at a step depends on the step's generator alone (resume stays exact)."""
    from workbench.experiment.runner import _recall_shape
    from workbench.train.loop import batch_generator
    spec = parse_spec(spec_with(**{"train__steps": 40, "recall__curriculum_steps": 10, "recall__curriculum_mix": 20,
                                   "recall__curriculum_length": 8, "recall__curriculum_pairs": 1,
                                   "recall__curriculum_queries": 1}))
    task = spec.recall_task()
    shapes = [_recall_shape(spec, task, s, batch_generator(0, s)) for s in range(40)]
    assert shapes[:10] == [(8, 1, 1)] * 10 and shapes[30:] == [(16, 2, 2)] * 10
    mixed = shapes[10:30]
    assert len({n for n, _, _ in mixed}) > 3 and all(8 <= n <= 16 and 1 + 2 * P + 2 * Q + 1 <= n and Q <= P
                                                      for n, P, Q in mixed)
    assert mixed == [_recall_shape(spec, task, s, batch_generator(0, s)) for s in range(10, 30)]
    for s, (n, P, Q) in enumerate(shapes):                  # the batches the trainer draws have that shape
        x, y, _ = task.batch(2, n, batch_generator(0, s), pairs=P, queries=Q)
        assert x.shape == (2, n) and int((y[0] >= 0).sum()) == Q


# ------------------------------------------------------------------------------ runs
def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    from workbench.experiment.runner import train_run
    spec = parse_spec(spec_with(**{"variants": [{"name": "irope"}]}))
    v = spec.variant("irope")
    assert train_run(spec, v, 0, tmp_path / "a", progress=False, stop_after=3) == {}
    assert (tmp_path / "a/runs/irope/seed0/state.pt").exists()
    info = train_run(spec, v, 0, tmp_path / "a", progress=False)
    assert info["steps"] == 8
    train_run(spec, v, 0, tmp_path / "b", progress=False)
    wa, wb = _weights(tmp_path / "a/runs/irope/seed0/model"), _weights(tmp_path / "b/runs/irope/seed0/model")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert not (tmp_path / "a/runs/irope/seed0/state.pt").exists()


@pytest.mark.slow
def test_cli_run_killed_then_rerun_finishes_without_retraining(tmp_path):
    d = spec_with(**{"train__steps": 400, "train__ckpt_every": 5})
    import tomllib  # noqa: F401  (the CLI reads TOML; write the same spec as TOML)

    from workbench.experiment.toml_out import dumps
    assert tomllib.loads(dumps(d)) == d
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(dumps(d))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "workbench", "experiment", "run", str(spec_path), "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "runs/irope/seed0/state.pt"
    t0 = time.time()
    while not state.exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "the run never checkpointed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(state, weights_only=True)["step"]
    assert 0 < saved < 400
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    done = json.loads((out / "runs/irope/seed0/done.json").read_text())
    assert done["steps"] == 400
    hist = json.loads((out / "runs/irope/seed0/history.json").read_text())
    assert [h["step"] for h in hist] == list(range(1, 401))           # resumed, every step once
    mtime = (out / "runs/irope/seed0/model/model.safetensors").stat().st_mtime
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0   # finished: nothing retrained
    assert (out / "runs/irope/seed0/model/model.safetensors").stat().st_mtime == mtime
    assert (out / "report" / "report.md").exists()


def test_different_spec_into_same_dir_is_refused(tmp_path):
    from workbench.experiment.runner import run_experiment
    spec = spec_with(**{"variants": [{"name": "irope"}], "train__steps": 2, "eval_multiples": [1]})
    run_experiment(spec, tmp_path, progress=False, report=False)
    grown = json.loads(json.dumps(spec))
    grown["variants"].append({"name": "all-nope", "nope_interval": "all"})     # appending variants continues
    run_experiment(grown, tmp_path, only="all-nope", progress=False, report=False)
    rows = json.loads((tmp_path / "runs/all-nope/seed0/eval.json").read_text())["rows"]
    assert {"acc", "acc_first", "acc_distractor", "acc_needle", "entropy", "entropy_no_temp", "ln_n", "key_mass",
            "balance", "load_entropy"} <= set(rows[0])
    assert all(0 <= r["acc_first"] <= 1 for r in rows)
    spec["train"]["lr"] = 1e-3
    with pytest.raises(SpecError, match="different spec"):
        run_experiment(spec, tmp_path, progress=False)
    reordered = json.loads(json.dumps(grown))
    reordered["variants"].reverse()
    with pytest.raises(SpecError, match="different spec"):
        run_experiment(reordered, tmp_path, progress=False)
    with pytest.raises(SpecError, match="--only 'nope'"):
        run_experiment(spec_with(**{"variants": [{"name": "irope"}], "train__steps": 2, "eval_multiples": [1]}),
                       tmp_path, only="nope", progress=False)


LEARN = {
    "name": "learn", "seeds": [0], "eval_multiples": [1, 2],
    "base": {"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "num_layers": 2, "nope_interval": 2,
             "chunk_size": 12, "floor_scale": 13, "num_experts": 2, "intermediate_size": 32,
             "intermediate_size_mlp": 64},
    "recall": {"train_length": 12, "pairs": 2, "queries": 2, "vocab_size": 32, "key_ids": [4, 8],
               "value_ids": [8, 12], "filler_ids": [12, 32]},
    "train": {"steps": 150, "batch_size": 32, "lr": 1e-2, "warmup": 10, "weight_decay": 0.0, "threads": 1},
    "eval": {"sequences": 32, "needle_sequences": 4},
    "variants": [{"name": "irope"}, {"name": "irope-hot", "from": "irope", "attn_scale": 0.6}],
}


@pytest.mark.slow
def test_two_variant_run_learns_and_reports(tmp_path):
    import xarray as xr

    from workbench.experiment.report import open_metrics
    from workbench.experiment.runner import run_experiment
    out = run_experiment(LEARN, tmp_path, progress=False)
    ds = open_metrics(out)
    assert isinstance(ds, xr.Dataset)
    chance = math.log(4)                                # 4 values: the loss without any retrieval
    hist = json.loads((out / "runs/irope/seed0/history.json").read_text())
    assert np.mean([h["ce"] for h in hist[-20:]]) < chance - 0.5, "no retrieval learned"
    acc = ds["acc"].sel(variant="irope", seed=0, length=12).item()
    assert acc > 0.6, acc                                    # chance: 0.25
    # the inference-only variant shares the trained model: identical at the training length
    # (β = 1 below floor_scale), different entropy beyond it
    assert ds["acc"].sel(variant="irope-hot", length=12).item() == acc
    e_hot = ds["entropy"].sel(variant="irope-hot", seed=0, length=24).item()
    e_off = ds["entropy_no_temp"].sel(variant="irope-hot", seed=0, length=24).item()
    assert e_hot < e_off
    assert json.loads(ds.attrs["spec"])["name"] == "learn" and "torch" in json.loads(ds.attrs["versions"])
    assert ds["train_loss"].sizes == {"trained_variant": 1, "seed": 1, "step": 150}
    rep = out / "report"
    md = (rep / "report.md").read_text()
    assert "| irope |" in md and "| irope-hot |" in md and "recall accuracy" in md
    assert (rep / "results.csv").read_text().count("\n") == 1 + 2 * 2
    assert (rep / "accuracy.html").exists() and (rep / "entropy.html").exists()
    assert (rep / "accuracy.png").exists() or "PNG export failed" in md


def test_report_of_an_experiment_with_no_evaluated_runs_is_a_clear_error(tmp_path):
    """A directory holding only the spec (a run killed before its first evaluation, or a results bundle
    copied without its runs/) is refused by name, not turned into an empty figure grid."""
    from workbench.experiment.report import ReportError, write_report

    (tmp_path / "spec.json").write_text(json.dumps(TINY))
    with pytest.raises(ReportError, match="no evaluated runs"):
        write_report(tmp_path, png=False)
    assert not (tmp_path / "report").exists()

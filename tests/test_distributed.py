"""Data-parallel recording: ranks split documents deterministically; the merged store equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_streamed import assert_same_run, docs_of, fast_model

import workbench
from workbench.checkpoint import save_model
from workbench.cli import main
from workbench.config import preset
from workbench.distributed import assign, merge_parts, parts_dir, record_dp
from workbench.recording import _normalise_inputs, record
from workbench.store import open_run

REPO = Path(__file__).resolve().parents[1]


def test_assign_is_deterministic_balanced_and_complete():
    lengths = [100, 5, 80, 80, 7, 300, 1, 50]
    for world in (1, 2, 3, 8, 11):
        parts = assign(lengths, world)
        assert parts == assign(lengths, world)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        assert all(p == sorted(p) for p in parts)
    loads = [sum(lengths[i] for i in p) for p in assign(lengths, 2)]
    assert max(loads) - min(loads) <= max(lengths)          # LPT bound
    assert assign([10] * 4, 2) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError):
        assign([1], 0)


def test_merge_parts_restores_input_order(tmp_path):
    """The merge on its own (no processes): parts recorded separately, merged in input order."""
    model = workbench.load_model("tiny")
    docs = docs_of((30, 12, 45, 8, 20))
    ref = record(model, docs, tmp_path / "ref.zarr", progress=False, model_source="tiny")
    out = tmp_path / "run.zarr"
    for r, idx in enumerate(assign([len(d["tokens"]) for d in docs], 2)):
        record(model, [docs[i] for i in idx], parts_dir(out) / f"rank{r:03d}-of-002.zarr", progress=False,
               model_source="tiny")
    merge_parts(out, _normalise_inputs(model, docs), parts_dir(out), world=2)
    assert_same_run(ref, out)
    assert not parts_dir(out).exists()
    assert list(open_run(out).read("doc_id")) == [d["id"] for d in docs]


def test_merge_refuses_missing_documents(tmp_path):
    model = workbench.load_model("tiny")
    docs = docs_of((10, 11))
    out = tmp_path / "run.zarr"
    record(model, docs[:1], parts_dir(out) / "rank000-of-002.zarr", progress=False)
    with pytest.raises(RuntimeError, match=r"documents \['doc11'\] are in no part store"):
        merge_parts(out, _normalise_inputs(model, docs), parts_dir(out))


@pytest.mark.slow  # starts 2 gloo ranks with torchrun, each importing torch (≈ 20–40 s on 2 busy cores)
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    docs = docs_of((40, 7, 66, 23, 31))
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    single = tmp_path / "single.zarr"
    assert main(["record", "--model", "tiny", "--input", str(inp), "--out", str(single),
                               "--probes", "router,entropy,sink", "--segment", "16", "--quiet"]) == 0
    out = tmp_path / "dp.zarr"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "workbench", "record", "--model", "tiny", "--input", str(inp), "--out", str(out),
           "--probes", "router,entropy,sink", "--segment", "16", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "with 2 ranks" in res.stdout
    assert_same_run(single, out)
    run = open_run(out)
    assert run.attrs["execution"]["data_parallel"] == 2 and not parts_dir(out).exists()


@pytest.mark.slow  # spawns 2 ranks (torch.multiprocessing), each streaming the checkpoint layer by layer
def test_dp_spawn_streamed_equals_single_process(tmp_path):
    ck = tmp_path / "ck"
    save_model(fast_model(preset("tiny")), ck, max_shard_size="60KB")
    docs = docs_of((40, 7, 66))
    single = record(workbench.load_model(ck), docs, tmp_path / "single.zarr", progress=False,
                    model_source=str(ck), segment=16)
    out = tmp_path / "dp.zarr"
    # a first attempt already recorded one document: the ranks split only the other two
    record(workbench.load_model(ck), docs[:1], out, progress=False, model_source=str(ck), segment=16, finish=False)
    record_dp(str(ck), docs, out, nprocs=2, segment=16, streamed=True, stream_options={"batch_tokens": 50})
    assert_same_run(single, out)

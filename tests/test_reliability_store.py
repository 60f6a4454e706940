"""Run stores that are not whole (issue 17, audit): readers open only bounded regular files inside the
run, `open_run` refuses a run whose committed chunks are missing or replaced, and `Run.verify()` /
`workbench verify` find what only the data can show (swapped chunks, edited doc_offsets, out-of-range
ids). Every case must end in a `StoreError` naming the array or file — never a hang, a fill value read
as data, or a traceback. Hangs are guarded by running the open in a thread with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from workbench.cli import main
from workbench.config import preset
from workbench.store import RunWriter, StoreError, list_runs, open_run

LAYOUT = dict(n_layers=4, n_heads=4, moe_layer_index=[0, 1, 3], top_k=2, n_experts=4, router=True,
              entropy=True)
VOCAB = preset("tiny").vocab_size


def _doc(rng, T, i):
    return {"tokens": rng.integers(0, VOCAB, T), "router/experts": np.stack(
                [np.stack([rng.permutation(4)[:2] for _ in range(T)]) for _ in range(3)]),
            "router/weights": rng.random((3, T, 2)), "attention/entropy": rng.random((4, 4, T)),
            "attention/entropy_no_temp": rng.random((4, 4, T)), "attention/n_keys": rng.integers(1, 9, (4, T)),
            "doc_id": f"d{i}", "domain": "arxiv" if i % 2 else ""}


@pytest.fixture
def run_path(tmp_path):
    path = tmp_path / "runs" / "r.zarr"
    rng = np.random.default_rng(0)
    with RunWriter.create(path, attrs={"model_source": "tiny", "config": preset("tiny").to_hf()},
                          layout=LAYOUT, flush_tokens=1) as w:
        for i in range(3):
            w.append(_doc(rng, 5 + i, i))
        w.finish()
    return path


def _chunks(run: Path, array: str) -> list[Path]:
    return [p for p in sorted((run / array / "c").rglob("*")) if p.is_file()]


def _within(seconds, fn):
    """fn() in a thread; fail (not hang) if it has not returned after `seconds`. Returns its exception."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:      # noqa: BLE001 — handed back to the test
            box["e"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} still running after {seconds} s (hang)"
    return box.get("e")


def test_a_whole_run_opens_and_verifies(run_path):
    run = open_run(run_path)
    run.verify()
    assert set(run.attrs["data_digests"]) >= {"tokens", "router/experts", "doc_id", "doc_domain"}
    assert _chunks(run_path, "doc_domain"), "all-empty domain chunks are written too"


# ----------------------------------------------------------------------------- hangs / unbounded memory
@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "elsewhere"])
def test_chunk_that_is_a_symlink_or_fifo_is_refused_without_hanging(run_path, tmp_path, target):
    chunk = _chunks(run_path, "tokens")[0]
    chunk.unlink()
    if target == "fifo":
        os.mkfifo(chunk)
    elif target == "elsewhere":
        (tmp_path / "x").write_bytes(b"\0" * 64)
        chunk.symlink_to(tmp_path / "x")
    else:
        chunk.symlink_to(target)
    err = _within(20, lambda: open_run(run_path))
    assert isinstance(err, StoreError), err
    assert "tokens/c/0" in str(err) and ("symlink" in str(err) or "FIFO" in str(err)), err


def test_reads_refuse_a_fifo_or_device_even_after_open(run_path):
    run = open_run(run_path)             # the files change after the cheap check: the store still refuses
    chunk = _chunks(run_path, "router/weights")[0]
    chunk.unlink()
    os.mkfifo(chunk)
    err = _within(20, lambda: run.read("router/weights"))
    assert isinstance(err, StoreError) and "FIFO" in str(err), err
    chunk.unlink()
    chunk.symlink_to("/dev/zero")
    err = _within(20, lambda: run.read("router/weights"))
    assert isinstance(err, StoreError) and "symlink" in str(err), err


def test_oversized_chunk_is_refused_by_its_metadata_bound(run_path):
    chunk = _chunks(run_path, "tokens")[0]
    chunk.write_bytes(os.urandom(300_000))          # tokens chunks hold ≤ 65536 int32 = 256 KiB raw
    with pytest.raises(StoreError, match=r"tokens.*larger than a chunk can be"):
        open_run(run_path)


def test_root_metadata_fifo_and_list_runs_do_not_hang(run_path):
    shutil.copytree(run_path, run_path.parent / "b.zarr")
    meta = run_path.parent / "b.zarr" / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    err = _within(20, lambda: open_run(meta.parent))
    assert isinstance(err, (StoreError, FileNotFoundError)), err
    box = {}
    assert _within(20, lambda: box.setdefault("rows", list_runs(run_path.parent))) is None
    assert [Path(r["path"]).name for r in box["rows"]] == ["r.zarr"]


# ----------------------------------------------------------------------------- silent wrong data: cheap checks
def test_deleted_chunk_under_n_tokens_is_an_error_not_fill_values(run_path):
    for array in ("tokens", "router/experts", "doc_id", "attention/entropy", "doc_domain"):
        path = run_path.parent / f"{array.replace('/', '_')}.zarr"
        shutil.copytree(run_path, path)
        _chunks(path, array)[0].unlink()
        with pytest.raises(StoreError, match=rf"array '{array}': 1 chunk\(s\) of the committed data are missing"):
            open_run(path)


def test_chunk_path_that_is_a_directory(run_path):
    chunk = _chunks(run_path, "router/experts")[0]
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(StoreError, match=r"router/experts.*is a directory"):
        open_run(run_path)


def test_array_symlinked_to_another_runs_array(run_path):
    other = run_path.parent / "other.zarr"
    shutil.copytree(run_path, other)
    shutil.rmtree(run_path / "router" / "experts")
    (run_path / "router" / "experts").symlink_to(other / "router" / "experts")
    with pytest.raises(StoreError, match=r"router/experts is a symlink"):
        open_run(run_path)


def test_layer_index_disagreeing_with_the_layout(run_path):
    zarr.open_array(run_path / "router" / "layer_index", mode="r+")[:] = np.array([0, 2, 3], dtype=np.int32)
    with pytest.raises(StoreError, match=r"router/layer_index \[0, 2, 3\] disagrees with .*\[0, 1, 3\]"):
        open_run(run_path)


# ----------------------------------------------------------------------------- silent wrong data: verify
def test_swapped_chunks_fail_verification(run_path):
    a, b = _chunks(run_path, "router/weights")[:2]           # layer 0's and layer 1's chunk, both valid
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    run = open_run(run_path)                                  # cheap checks cannot see it
    with pytest.raises(StoreError, match=r"'router/weights' does not match its committed digest"):
        run.verify()


def test_edited_doc_offsets_fail_verification(run_path):
    arr = zarr.open_array(run_path / "doc_offsets", mode="r+")
    arr[1] = int(arr[1]) + 2                                  # still rising from 0 to n_tokens
    run = open_run(run_path)
    with pytest.raises(StoreError) as e:
        run.verify()
    assert "positions disagree with doc_offsets" in str(e.value) and "input_hash" in str(e.value)


@pytest.mark.parametrize("array,value,pattern", [
    ("tokens", VOCAB + 5, r"tokens.*outside \[0, 384\)"),
    ("router/experts", 9, r"router/experts.*outside \[0, 4\)"),
])
def test_out_of_range_ids_are_refused_on_read_and_by_verify(run_path, array, value, pattern):
    arr = zarr.open_array(run_path / array, mode="r+")
    if array == "tokens":
        arr[2] = value
    else:
        arr[0, 1, 0] = value
    run = open_run(run_path)
    with pytest.raises(StoreError, match=pattern):
        run.read(array)
    with pytest.raises(StoreError, match=pattern):
        run.verify()


def test_verify_via_cli(run_path, capsys):
    assert main(["verify", str(run_path)]) == 0
    assert "ok" in capsys.readouterr().out
    a, b = _chunks(run_path, "attention/entropy")[:2]
    da = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(da)
    assert main(["verify", str(run_path)]) == 2
    err = capsys.readouterr().err
    assert "attention/entropy" in err and "Traceback" not in err


def test_resumed_run_keeps_its_digests(run_path):
    rng = np.random.default_rng(5)
    with RunWriter.open_append(run_path) as w:
        w.append(_doc(rng, 4, 7))
    run = open_run(run_path)
    assert run.n_docs == 4
    run.verify()


def test_runs_without_digests_still_verify_what_they_can(run_path):
    meta = json.loads((run_path / "zarr.json").read_text())
    del meta["attributes"]["data_digests"]
    (run_path / "zarr.json").write_text(json.dumps(meta))
    open_run(run_path).verify()                               # older runs: no digests, still whole
    arr = zarr.open_array(run_path / "doc_offsets", mode="r+")
    arr[1] = int(arr[1]) + 1
    with pytest.raises(StoreError, match="input_hash"):
        open_run(run_path).verify()


def test_list_runs_survives_a_dangling_symlink_inside_a_run(run_path):
    (run_path / "tokens" / "c" / "dangling").symlink_to(run_path.parent / "nowhere")
    assert [Path(r["path"]).name for r in list_runs(run_path.parent)] == ["r.zarr"]
    with pytest.raises(StoreError, match="dangling is a symlink"):
        open_run(run_path)

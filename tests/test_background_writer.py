"""The background store writer (workbench/store/background.py): the same run as inline writing, bounded
memory, batches that coalesce when writing is slow, and worker errors raised on the caller with only
committed documents left (resume then completes the run)."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest

import workbench
from workbench.recording import record
from workbench.store import RunWriter, open_run
from workbench.store.background import BackgroundWriter

DOCS = [{"tokens": list(range(1 + i, 40 + 7 * i)), "id": f"d{i}"} for i in range(6)]
LAYOUT = dict(n_layers=2, n_heads=2, moe_layer_index=[0, 1], top_k=2, n_experts=8, router=True,
              router_logits=False, entropy=False, norms=False, sink=False)


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


def _doc(i: int, T: int = 50) -> dict:
    rng = np.random.default_rng(i)
    return {"tokens": rng.integers(0, 1000, T), "doc_id": f"doc-{i}",
            "router/experts": rng.integers(0, 8, (2, T, 2)), "router/weights": rng.random((2, T, 2)).astype("float32")}


def _same_run(a, b) -> None:
    ra, rb = open_run(a), open_run(b)
    assert ra.n_docs == rb.n_docs and ra.attrs["input_hash"] == rb.attrs["input_hash"]
    assert ra.attrs["complete"] and rb.attrs["complete"]
    for name in ra.layout.arrays():
        x, y = ra.read(name), rb.read(name)
        if x.dtype.kind in "OUT":
            assert list(x) == list(y), name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("flush_tokens", [None, 1])
def test_background_record_equals_inline(model, tmp_path, flush_tokens):
    a = record(model, DOCS, tmp_path / "bg.zarr", progress=False, flush_tokens=flush_tokens, background=True)
    b = record(model, DOCS, tmp_path / "inline.zarr", progress=False, flush_tokens=flush_tokens, background=False)
    _same_run(a, b)


class SlowWriter:
    """Wraps RunWriter.append/flush with a delay; records the flush sizes and the queue's high-water mark."""

    def __init__(self, monkeypatch, delay: float):
        self.flushed, self.high, self.delay = [], 0, delay
        real_append, real_flush = RunWriter.append, RunWriter.flush
        outer = self

        def append(w, doc):
            time.sleep(outer.delay)
            return real_append(w, doc)

        def flush(w):
            if w._pending:
                outer.flushed.append(len(w._pending))
            return real_flush(w)
        monkeypatch.setattr(RunWriter, "append", append)
        monkeypatch.setattr(RunWriter, "flush", flush)


def test_batches_coalesce_and_the_queue_stays_bounded(tmp_path, monkeypatch):
    slow = SlowWriter(monkeypatch, 0.05)
    docs = [_doc(i) for i in range(20)]
    one = sum(v.nbytes for v in docs[0].values() if isinstance(v, np.ndarray))
    w = BackgroundWriter(RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=LAYOUT), max_bytes=3 * one)
    high = 0
    for d in docs:                          # the producer is far faster than the (slowed) writer
        w.append(d)
        high = max(high, w._queued_bytes)
    w.finish()
    w.close()
    assert high <= 3 * one                  # never more than max_bytes waiting
    assert sum(slow.flushed) == 20 and len(slow.flushed) < 20     # several documents per commit
    run = open_run(tmp_path / "r.zarr")
    assert run.n_docs == 20 and run.attrs["complete"]
    for i in (0, 7, 19):
        np.testing.assert_array_equal(run.tokens(i), docs[i]["tokens"])


def test_a_document_larger_than_the_bound_still_goes_through(tmp_path):
    w = BackgroundWriter(RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=LAYOUT), max_bytes=1)
    for i in range(3):
        w.append(_doc(i, 200))
    w.finish()
    w.close()
    assert open_run(tmp_path / "r.zarr").n_docs == 3


def test_worker_error_is_raised_on_the_caller_and_nothing_more_is_written(tmp_path, monkeypatch):
    real = RunWriter.flush
    calls = {"n": 0}

    def failing(w):
        if w._pending:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(w)
    monkeypatch.setattr(RunWriter, "flush", failing)
    w = BackgroundWriter(RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=LAYOUT, flush_tokens=1))
    with pytest.raises(OSError, match="No space left") as e:
        for i in range(50):
            w.append(_doc(i))
            time.sleep(0.01)
        w.finish()
    assert e.value.errno == errno.ENOSPC
    w.close()                               # already reported: close does not raise it again
    run = open_run(tmp_path / "r.zarr")
    assert run.n_docs < 50 and not run.attrs["complete"]
    for i in range(run.n_docs):             # a committed prefix, every document whole
        np.testing.assert_array_equal(run.tokens(i), _doc(i)["tokens"])


def test_record_raises_the_worker_error_and_resume_completes(model, tmp_path, monkeypatch):
    ref = record(model, DOCS, tmp_path / "ref.zarr", progress=False, flush_tokens=1, background=False)
    real = RunWriter._commit
    calls = {"n": 0}

    def failing(w, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(w, *a, **kw)
    monkeypatch.setattr(RunWriter, "_commit", failing)
    out = tmp_path / "run.zarr"
    with pytest.raises(OSError, match="No space left"):
        record(model, DOCS, out, progress=False, flush_tokens=1, background=True)
    assert 0 < open_run(out).n_docs < len(DOCS)
    monkeypatch.setattr(RunWriter, "_commit", real)
    record(model, DOCS, out, progress=False, background=True)
    _same_run(out, ref)


def test_close_stops_the_worker_thread(tmp_path):
    before = {t.name for t in threading.enumerate()}
    w = BackgroundWriter(RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=LAYOUT))
    w.append(_doc(0))
    w.close()
    assert {t.name for t in threading.enumerate()} == before
    assert open_run(tmp_path / "r.zarr").n_docs == 1


def test_commits_wait_for_commit_tokens_not_every_document(tmp_path, monkeypatch):
    # Committing every document rewrote each partly filled chunk once per document; the worker commits
    # once `commit_tokens` are pending (and on finish), so 10 documents of 50 tokens at 120 -> 3 + the rest.
    slow = SlowWriter(monkeypatch, 0.0)
    w = BackgroundWriter(RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=LAYOUT), commit_tokens=120)
    for i in range(10):
        w.append(_doc(i))
        time.sleep(0.02)                    # one document per worker batch
    w.finish()
    w.close()
    assert sum(slow.flushed) == 10 and all(n >= 3 for n in slow.flushed[:-1]), slow.flushed
    assert len(slow.flushed) <= 4
    run = open_run(tmp_path / "r.zarr")
    assert run.n_docs == 10 and run.attrs["complete"]
    np.testing.assert_array_equal(run.tokens(9), _doc(9)["tokens"])


def test_commit_tokens_default_and_bad_values(tmp_path):
    w = RunWriter.create(tmp_path / "r.zarr", attrs={}, layout=LAYOUT, flush_tokens=100)
    bw = BackgroundWriter(w)
    assert bw._commit_tokens == 100          # never later than the writer's own flush threshold
    bw.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="commit_tokens must be a positive integer"):
            BackgroundWriter(w, commit_tokens=bad)


@pytest.mark.parametrize("background", [True, False])
def test_record_reports_the_time_spent_in_store_calls(model, tmp_path, background):
    stats = {}
    record(model, DOCS, tmp_path / "r.zarr", progress=False, background=background, stats=stats)
    assert stats["recorded"] == len(DOCS)
    assert 0 < stats["store_seconds"] < stats["seconds"]
    assert stats["store_cpu_seconds"] > 0


def test_creating_on_the_worker_and_its_errors(tmp_path):
    path = tmp_path / "r.zarr"
    w = BackgroundWriter.creating(path, lambda: RunWriter.create(path, attrs={}, layout=LAYOUT))
    assert w.done_ids == set()
    for i in range(3):
        w.append(_doc(i))
    w.finish()
    w.close()
    run = open_run(path)
    assert run.n_docs == 3 and run.attrs["complete"]
    with pytest.raises(FileExistsError, match="exists"):
        BackgroundWriter.creating(path, lambda: RunWriter.open_append(path))

    def no_space():
        raise OSError(errno.ENOSPC, "No space left on device")
    w = BackgroundWriter.creating(tmp_path / "full.zarr", no_space)
    with pytest.raises(OSError, match="No space left"):
        w.append(_doc(0))
        w.finish()
    w.close()                               # already reported: close does not raise it again
    assert not (tmp_path / "full.zarr").exists()

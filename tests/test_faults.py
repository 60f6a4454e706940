"""Faults: SIGKILL during `save_model`, a full disk during recording, and a reader opening a run while
another process writes it. (SIGKILL during `record` and during store appends: tests/test_record.py,
tests/test_store.py.)

Kills are real SIGKILLs of a forked copy of this process, delivered at every atomic write of a save
(mid-write, written but not renamed, renamed), at every step of a re-save's directory swap (with
renameat2(RENAME_EXCHANGE) and with the two-rename fallback) and at random moments of a save loop; the
parent then inspects what is on disk. A full disk is simulated by making zarr's file write raise ENOSPC at the
k-th write of a recording, for k spread over the whole write sequence.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import workbench
import workbench.checkpoint as ck  # save_model's file writes (_atomic)
import workbench.checkpoint_dir as cd  # the directory swap (_step, _exchange, _fsync, _remove_tree)
from workbench.checkpoint import CheckpointError, build_model, load_model, save_model
from workbench.config import preset
from workbench.recording import record
from workbench.store import RunWriter, StoreError, open_run
from workbench.store.schema import GROWING_DIMS, SCHEMA
from workbench.tokenizer import preset_tokenizer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked children (POSIX)")
SHARD = "300KB"                 # tiny splits into 5 shards: kill points between and inside files


def tiny(seed: int):
    model = build_model(preset("tiny"), seed=seed)
    model.tokenizer = preset_tokenizer(model.config)
    return model


@pytest.fixture(scope="module")
def models():
    return tiny(1), tiny(2)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def in_child(fn) -> int:
    """Run fn() in a forked child that must die of SIGKILL; return how it ended (signal number)."""
    pid = os.fork()
    if pid == 0:                                    # child: never returns into pytest
        try:
            fn()
        finally:
            os._exit(3)                             # reached only when no kill happened
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("forked saver hung")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def killing_save(model, out: Path, point: int, phase: str):
    """save_model that SIGKILLs itself at its `point`-th atomic file write, in `phase`."""
    real, count = ck._atomic, [0]

    def atomic(final, write):
        i, count[0] = count[0], count[0] + 1
        if i != point:
            return real(final, write)
        if phase == "after-rename":
            real(final, write)
            die()

        def then_die(tmp):
            write(tmp)
            if phase == "mid-write":                # a torn temp file, as a kill inside write() leaves
                os.truncate(tmp, os.path.getsize(tmp) // 2)
            die()
        return real(final, then_die)

    ck._atomic = atomic
    save_model(model, out, max_shard_size=SHARD)


def inspect_checkpoint(out: Path, candidates: dict[str, dict]) -> str:
    """What a kill left: every visible file must be complete, and the directory must either load as
    exactly one of `candidates` (no mixture) or be refused with a documented error. Loading comes first:
    it puts back a checkpoint that a kill between the two renames of the fallback swap left aside."""
    try:
        got = weights(load_model(out))
    except (FileNotFoundError, CheckpointError) as e:
        got, outcome = None, f"refused ({type(e).__name__})"
    for f in out.iterdir() if out.exists() else ():
        if f.name.startswith("."):      # a killed write's temp file (ours: .NAME.*.tmp; the tokenizers
            continue                    # library's own: .tmpXXXXXX): hidden, never read by load_model
        if f.suffix == ".safetensors":           # a visible shard is never torn
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    h.get_tensor(k)
        elif f.suffix == ".json":
            json.loads(f.read_text())
    if got is None:
        return outcome
    for name, want in candidates.items():
        if got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want):
            return f"loads {name}"
    raise AssertionError(f"{out} loads, but as a mixture of {sorted(candidates)}")


def leftovers(out: Path) -> list[str]:
    """Hidden siblings of `out` that a save made (staging directories, a checkpoint set aside)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def count_writes(model, tmp_path) -> int:
    n = [0]
    real = ck._atomic

    def counting(final, write):
        n[0] += 1
        return real(final, write)

    ck._atomic = counting
    try:
        save_model(model, tmp_path / "count", max_shard_size=SHARD)
    finally:
        ck._atomic = real
    return n[0]


PHASES = ("mid-write", "before-rename", "after-rename")


def test_sigkill_at_every_write_of_a_fresh_save(models, tmp_path):
    new = models[0]
    n_writes = count_writes(new, tmp_path)
    assert n_writes >= 6                                   # shards, config, tokenizer, index
    outcomes = {}
    for point in range(n_writes):
        for phase in PHASES:
            out = tmp_path / f"ck-{point}-{phase}"
            assert in_child(lambda o=out, k=point, ph=phase: killing_save(new, o, k, ph)) == signal.SIGKILL
            outcomes[(point, phase)] = inspect_checkpoint(out, {"new": weights(new)})
    # only a kill after the last rename (the index, written last) leaves a loadable checkpoint
    loads = [k for k, v in outcomes.items() if v.startswith("loads")]
    assert loads == [(n_writes - 1, "after-rename")], outcomes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a fresh save made hidden siblings"
    print(f"\n[faults] save_model into a fresh directory: {len(outcomes)} SIGKILL points, "
          f"{len(outcomes) - len(loads)} refused with a clear error, {len(loads)} complete, 0 torn or mixed")


def kill_at(point: str) -> None:
    """Arm this (child) process to SIGKILL itself at `point` of its next save: "fsync-N" (the N-th fsync:
    mid-way through writing the new files), a named step of the directory swap (`checkpoint._step`:
    "staged", "moved-aside", "swapped"), or "mid-removal" (half-way through deleting the old checkpoint)."""
    if point.startswith("fsync-"):
        real, calls = cd._fsync, [0]

        def fsync(path):
            calls[0] += 1
            if calls[0] == int(point.removeprefix("fsync-")):
                die()
            real(path)
        cd._fsync = fsync
    elif point == "mid-removal":
        def remove(path):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[: len(files) // 2]:
                f.unlink()
            die()
        cd._remove_tree = remove
    else:
        cd._step = lambda name: die() if name == point else None


def killing_step(model, out: Path, step: str):
    kill_at(step)
    save_model(model, out, max_shard_size=SHARD)


def swap_steps(model, tmp_path) -> list[str]:
    """The named steps of a re-save, in order."""
    out, seen = tmp_path / "steps", []
    save_model(model, out, max_shard_size=SHARD)
    real, cd._step = cd._step, seen.append
    try:
        save_model(model, out, max_shard_size=SHARD)
    finally:
        cd._step = real
    return seen


@pytest.mark.parametrize("swap", ["exchange", "two-rename"])
def test_sigkill_during_a_resave_never_loses_the_checkpoint(models, tmp_path, monkeypatch, swap):
    """A re-save over an existing checkpoint: at every kill point the directory loads as the complete old
    checkpoint (kills before the swap) or the complete new one (after it), the user's own files survive,
    and the next save leaves no staging or set-aside directory behind."""
    old, new = models
    if swap == "two-rename":                            # kernels/filesystems without RENAME_EXCHANGE
        monkeypatch.setattr(cd, "_exchange", lambda a, b: False)
    n_writes = count_writes(new, tmp_path)
    steps = swap_steps(new, tmp_path)
    if swap == "exchange" and "moved-aside" in steps:
        pytest.skip(f"renameat2(RENAME_EXCHANGE) unsupported on {tmp_path}: the fallback ran")
    assert steps == (["staged", "swapped"] if swap == "exchange" else ["staged", "moved-aside", "swapped"])
    points = [(k, ph) for k in range(n_writes) for ph in PHASES] + [(None, st) for st in steps + ["mid-removal"]]
    outcomes, left, readme = {}, 0, "# notes the user keeps next to the weights\n"
    for k, what in points:
        out = tmp_path / f"ck-{k}-{what}"
        save_model(old, out, max_shard_size=SHARD)
        (out / "README.md").write_text(readme)
        kill = (lambda o=out, k=k, ph=what: killing_save(new, o, k, ph)) if k is not None else \
            (lambda o=out, st=what: killing_step(new, o, st))
        assert in_child(kill) == signal.SIGKILL
        outcomes[(k, what)] = inspect_checkpoint(out, {"old": weights(old), "new": weights(new)})
        assert (out / "README.md").read_text() == readme, (k, what)
        left += bool(leftovers(out))
        save_model(new, out, max_shard_size=SHARD)      # the next save clears whatever the kill left
        assert leftovers(out) == [] and inspect_checkpoint(out, {"new": weights(new)}) == "loads new"
    swapped = [(None, "swapped"), (None, "mid-removal")]
    assert {p: v for p, v in outcomes.items() if p not in swapped} == dict.fromkeys(points[:-2], "loads old")
    assert [outcomes[p] for p in swapped] == ["loads new", "loads new"]
    assert left >= n_writes * len(PHASES)              # the cleanup above was exercised, not vacuous
    print(f"\n[faults] save_model over an existing checkpoint ({swap}): {len(outcomes)} SIGKILL points — "
          + ", ".join(f"{v}: {list(outcomes.values()).count(v)}" for v in sorted(set(outcomes.values())))
          + f"; 0 refused, torn or mixed; README.md kept; {left} kills left a hidden staging or set-aside "
          "directory, 0 after the next save")


def _files(path: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != "README.md"}


@pytest.fixture(scope="module")
def savers(models, tmp_path_factory):
    """name → (save(which, out), load(out)) for every saver that shares `checkpoint_dir`."""
    from workbench.checkpoint_vision import build_multimodal, load_multimodal, save_multimodal
    from workbench.config_vision import vision_preset
    from workbench.quant import (
        load_fp8,
        load_quantized,
        quantize_checkpoint,
        quantize_model,
        save_fp8_checkpoint,
        save_quantized,
    )

    vision = {}
    for which, seed in (("old", 1), ("new", 2)):
        vision[which] = build_multimodal(vision_preset("tiny-vision"), seed=seed)
        vision[which].tokenizer = preset_tokenizer(vision[which].config.text_config)
    text = dict(zip(("old", "new"), models))
    int4 = {k: quantize_model(tiny(i + 1), group_size=32) for i, k in enumerate(("old", "new"))}
    src_dir = tmp_path_factory.mktemp("src")
    srcs = {k: save_model(m, src_dir / k, max_shard_size=SHARD) for k, m in text.items()}
    return {
        "save_multimodal": (lambda w, o: save_multimodal(vision[w], o, max_shard_size=SHARD), load_multimodal),
        "save_quantized": (lambda w, o: save_quantized(int4[w], o, max_shard_size=SHARD), load_quantized),
        "quantize_checkpoint": (lambda w, o: quantize_checkpoint(srcs[w], o, group_size=32, max_shard_size=SHARD),
                                load_quantized),
        "save_fp8_checkpoint": (lambda w, o: save_fp8_checkpoint(text[w], o), load_fp8),
    }


@pytest.mark.parametrize("saver", ["save_multimodal", "save_quantized", "quantize_checkpoint",
                                   "save_fp8_checkpoint"])
def test_sigkill_during_a_resave_by_the_other_savers(savers, saver, tmp_path):
    """The multimodal and quantized savers re-save through the same staged swap: killed while writing,
    before or after the swap, or while deleting the old files, the directory holds exactly the old or the
    new checkpoint's files (byte for byte) and loads."""
    save, load = savers[saver]
    ref = {w: _files(save(w, tmp_path / f"ref-{w}")) for w in ("old", "new")}
    assert ref["old"] != ref["new"]
    want = {"fsync-2": "old", "staged": "old", "swapped": "new", "mid-removal": "new"}
    for point, expected in want.items():
        out = tmp_path / f"ck-{point}"
        save("old", out)
        (out / "README.md").write_text("mine")
        assert in_child(lambda p=point, o=out: (kill_at(p), save("new", o))) == signal.SIGKILL
        load(out)
        assert _files(out) == ref[expected], point
        assert (out / "README.md").read_text() == "mine"
        save("new", out)
        assert leftovers(out) == [] and _files(out) == ref["new"]
    print(f"\n[faults] {saver} over an existing checkpoint: {len(want)} SIGKILL points, each left the old or "
          "the new files byte for byte, 0 leftovers after the next save")


def test_a_later_save_spares_a_live_saves_staging_directory(models, tmp_path):
    """Leftovers are told from a concurrent save's work in progress by the flocks a live saver holds (on its
    staging directory, and on the checkpoint directory it replaces); a killed saver's are gone."""
    import fcntl

    old, new = models
    out = save_model(old, tmp_path / "ck", max_shard_size=SHARD)
    live, dead = tmp_path / ".ck.staging-live0", tmp_path / ".ck.staging-dead0"
    for d in (live, dead):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_model(new, out, max_shard_size=SHARD)
        assert leftovers(out) == [live.name]
    finally:
        os.close(fd)
    dead.mkdir()
    fd = os.open(out, os.O_RDONLY)                      # a save into `out` is running: it cleans nothing
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_model(old, out, max_shard_size=SHARD)
        assert leftovers(out) == [dead.name, live.name]
    finally:
        os.close(fd)
    save_model(old, out, max_shard_size=SHARD)
    assert leftovers(out) == [] and inspect_checkpoint(out, {"old": weights(old)}) == "loads old"


def test_sigkill_at_random_moments_of_a_save_loop(models, tmp_path):
    """Asynchronous kills: the parent picks the moment, as an OOM killer or a user would."""
    old, new = models
    out = save_model(old, tmp_path / "ck", max_shard_size=SHARD)       # every save in the loop is a re-save
    rng = random.Random(0)
    seen = []

    def save_forever():
        for i in range(10**6):
            save_model(new if i % 2 else old, out, max_shard_size=SHARD)

    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            try:
                save_forever()
            finally:
                os._exit(3)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        seen.append(inspect_checkpoint(out, {"old": weights(old), "new": weights(new)}))
    print(f"\n[faults] save loop killed at 6 random moments: {seen}")
    assert set(seen) <= {"loads old", "loads new"}, seen
    save_model(new, out, max_shard_size=SHARD)
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------- full disk
DOCS = [{"text": f"document {i}: " + "lorem ipsum " * (i + 1), "id": f"d{i}"} for i in range(6)]


@pytest.fixture(scope="module")
def recorder():
    return workbench.load_model("tiny")


def commit_every_doc(mp) -> None:
    """Commit after every document, so a full disk can strike between, during and after commits."""
    create = RunWriter.create.__func__
    mp.setattr(RunWriter, "create", classmethod(lambda cls, path, **kw: create(cls, path, **dict(kw, flush_tokens=1))))


class DiskFull:
    """zarr's LocalStore writes every file through zarr.storage._local._put; fail the k-th call."""

    def __init__(self, monkeypatch, fail_at: int | None):
        import zarr.storage._local as local

        self.real, self.fail_at, self.calls = local._put, fail_at, 0
        monkeypatch.setattr(local, "_put", self)

    def __call__(self, path, value, exclusive=False):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return self.real(path, value, exclusive=exclusive)


@pytest.fixture(scope="module")
def reference(recorder, tmp_path_factory):
    """The uninterrupted recording and its number of file writes."""
    mp = pytest.MonkeyPatch()
    commit_every_doc(mp)
    disk = DiskFull(mp, None)
    path = record(recorder, DOCS, tmp_path_factory.mktemp("ref") / "ref.zarr", progress=False)
    mp.undo()
    return open_run(path), disk.calls


def assert_prefix(run, ref, n: int) -> None:
    """`run` holds exactly the first n documents of `ref`, in every array."""
    assert run.n_docs == n and run.n_tokens == int(ref.doc_offsets[n])
    length = {"token": run.n_tokens, "doc": n, "doc_edge": n + 1}
    for name in run.layout.arrays():
        sel = tuple(slice(0, length[d]) if d in GROWING_DIMS else slice(None) for d in SCHEMA[name].dims)
        got, want = run.read(name), ref.read(name)[sel]
        if got.dtype.kind in "OUT":
            assert list(got) == list(want), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("where", [0.1, 0.3, 0.5, 0.7, 0.9, 0.999])
def test_full_disk_during_recording(where, recorder, reference, monkeypatch, tmp_path):
    ref, n_writes = reference
    commit_every_doc(monkeypatch)
    k = max(1, int(where * n_writes))
    out = tmp_path / "run.zarr"
    disk = DiskFull(monkeypatch, k)
    with pytest.raises(OSError, match="No space left on device") as e:
        record(recorder, DOCS, out, progress=False)
    assert e.value.errno == errno.ENOSPC
    disk.fail_at = None                                        # space freed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "half-created run left behind"
    if out.exists():                       # else the disk filled while the run was created: nothing left at all
        run = open_run(out)                                    # readable, with only committed documents
        assert not run.attrs["complete"]
        assert_prefix(run, ref, run.n_docs)
    record(recorder, DOCS, out, progress=False)                # resume = the uninterrupted result
    done = open_run(out)
    assert done.attrs["complete"] and done.attrs["input_hash"] == ref.attrs["input_hash"]
    assert_prefix(done, ref, len(DOCS))


def test_full_disk_via_cli_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from workbench.cli import main

    src, out = tmp_path / "in.txt", tmp_path / "run.zarr"
    src.write_text("one\ntwo\nthree\n")
    DiskFull(monkeypatch, 20)
    assert main(["record", "--model", "tiny", "--input", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 28] No space left on device") and "Traceback" not in err, err


# ------------------------------------------------------------------------------------- concurrent reader
LAYOUT = dict(n_layers=2, n_heads=2, moe_layer_index=[0, 1], top_k=2, n_experts=8, router=True,
              router_logits=False, entropy=False, norms=False, sink=False)


def make_doc(i: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(1000 + i)
    T = int(rng.integers(1, 300))
    return {"tokens": rng.integers(0, 50_000, T), "doc_id": f"doc-{i}",
            "router/experts": rng.integers(0, 8, (2, T, 2)),
            "router/weights": rng.random((2, T, 2)).astype("float32")}


WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from workbench.store import RunWriter
{make_doc}
path, n = sys.argv[1], int(sys.argv[2])
with RunWriter.create(path, attrs={{}}, layout={layout!r}, flush_tokens=1) as w:
    print("created", flush=True)
    for i in range(n):
        w.append(make_doc(i))
        time.sleep(0.01)
    w.finish()
"""


def test_reader_sees_a_consistent_prefix_while_another_process_writes(tmp_path):
    path, n = tmp_path / "live.zarr", 80
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(Path(__file__).resolve().parents[1]),
                                    make_doc=textwrap.dedent(inspect.getsource(make_doc)), layout=LAYOUT))
    docs = [make_doc(i) for i in range(n)]
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "created"
        counts, xarray_refusals, opens = [], 0, 0
        while True:
            finished = proc.poll() is not None
            run = open_run(path)
            opens += 1
            counts.append(run.n_docs)
            for i in range(run.n_docs):                        # every committed document is whole and right
                np.testing.assert_array_equal(run.tokens(i), docs[i]["tokens"])
                np.testing.assert_array_equal(run.read("router/experts", doc=i), docs[i]["router/experts"])
                np.testing.assert_array_equal(run.read("router/weights", doc=i), docs[i]["router/weights"])
                assert run.read("doc_id", doc=i) == docs[i]["doc_id"]
            try:
                run.to_xarray()
            except StoreError:              # arrays of unequal length mid-flush: a documented refusal
                xarray_refusals += 1
            if finished:
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert counts == sorted(counts) and counts[-1] == n and open_run(path).attrs["complete"]
    assert len(set(counts)) >= 3, counts                      # the reads really overlapped the writes
    print(f"\n[faults] concurrent reader: {opens} opens during {n} commits by another process, "
          f"{len(set(counts))} distinct committed prefixes seen, 0 inconsistent; "
          f"to_xarray refused {xarray_refusals} times (StoreError)")

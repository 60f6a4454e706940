"""Property-based fuzzing (hypothesis) of the three loaders that read untrusted files: the config
loader, the image processor and the run-store reader. Each may only fail with its documented error:

    Llama4TextConfig.from_hf   ConfigError  (a ValueError naming the field and value)
    ImageProcessor / load_image ImageError  (a ValueError naming the image and the reason)
    open_run / Run.read         StoreError  (a ValueError naming the store, and the array for array data)
    list_runs                   skips what it cannot read; never raises for a corrupt run

Every test counts its generated cases by outcome and prints the summary (`pytest -s` shows it;
docs/reliability.md quotes it). WORKBENCH_FUZZ_SCALE=10 multiplies every example budget.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from workbench.config import PRESETS, ConfigError, Llama4TextConfig
from workbench.image import ImageError, ImageProcessor
from workbench.store import Layout, RunWriter, StoreError, list_runs, open_run
from workbench.store.schema import PROBE_ARRAYS

SCALE = float(os.environ.get("WORKBENCH_FUZZ_SCALE", "1"))


def budget(n: int) -> settings:
    # database=None: no .hypothesis/ directory in the repo; deadline=None: the machine is shared
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def report(target: str, outcomes: collections.Counter) -> None:
    total = sum(outcomes.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"\n[fuzz] {target}: {total} cases — {parts}")


# ------------------------------------------------------------------------------------- config
FIELDS = [f.name for f in dataclasses.fields(Llama4TextConfig) if f.init]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=8)


def field_value(name: str):
    seen = [p[name] for p in PRESETS.values() if name in p]
    if name == "num_hidden_layers":
        # bounded: the schedule lists are built eagerly, so 10**9 layers exhausts RAM instead of
        # raising (a reported bug, see docs/reliability.md "known gaps")
        return st.integers(-3, 10_000)
    return st.one_of(json_value, st.integers(-3, 70), st.sampled_from(seen or [None]))


@st.composite
def hf_configs(draw):
    if draw(st.integers(0, 19)) == 0:                     # 5%: not even an object
        return draw(json_value)
    d = dict(draw(st.sampled_from(list(PRESETS.values()))))
    for key in draw(st.lists(st.sampled_from(FIELDS + ["rope_parameters", "layer_types", "some_unknown_key"]),
                             max_size=4, unique=True)):
        d[key] = draw(field_value(key))
    for key in draw(st.lists(st.sampled_from(sorted(d)), max_size=2, unique=True)):
        del d[key]
    return {"text_config": d, "model_type": "llama4"} if draw(st.booleans()) else d


def test_config_loader_raises_only_config_error():
    outcomes: collections.Counter = collections.Counter()

    @budget(600)
    @given(hf_configs())
    def check(d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")               # unknown keys are warned about, by design
            try:
                cfg = Llama4TextConfig.from_hf(d)
            except ConfigError as e:
                assert str(e).startswith("config:"), e    # the message names its source
                outcomes["ConfigError"] += 1
                return
            # accepted: the schedule is complete and consistent, and the config survives a JSON round trip
            L = cfg.num_hidden_layers
            assert len(cfg.use_rope) == len(cfg.is_chunked) == len(cfg.is_moe) == L
            assert cfg.head_dim % 2 == 0 and cfg.num_attention_heads % cfg.num_key_value_heads == 0
            again = Llama4TextConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
            assert json.dumps(again.to_hf(), sort_keys=True) == json.dumps(cfg.to_hf(), sort_keys=True)
        outcomes["accepted"] += 1

    check()
    report("Llama4TextConfig.from_hf", outcomes)
    assert outcomes["ConfigError"] and outcomes["accepted"]     # both sides were exercised


# ------------------------------------------------------------------------------------- images
PROC = ImageProcessor(tile_size=56)          # small tiles: the same code paths, less arithmetic


def _seed_images() -> dict[str, bytes]:
    """Small valid files in every format PIL writes here, as seeds for byte-level mutation."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = {}
    for fmt, mode in [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"),
                      ("JPEG", "CMYK"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "F"),
                      ("WEBP", "RGB"), ("ICO", "RGBA"), ("PPM", "RGB"), ("TGA", "RGB"), ("PCX", "RGB")]:
        if mode == "I;16":
            im = Image.fromarray(a[..., 0].astype(np.uint16) * 257)
        elif mode == "F":
            im = Image.fromarray(a[..., 0].astype(np.float32))
        else:
            im = Image.fromarray(a).convert(mode)
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt)
        except (OSError, KeyError):                   # a codec missing from this PIL build
            continue
        out[f"{fmt}/{mode}"] = buf.getvalue()
    return out


SEEDS = _seed_images()


@st.composite
def mutated_files(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[:i]
        elif op == "insert":
            data[i:i] = draw(st.binary(max_size=8))
        else:
            data[i] = draw(st.integers(0, 255))
    return name, bytes(data)


def _process(image) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pv, (lay,) = PROC(image)
        except ImageError as e:
            assert str(e).startswith("image 0: "), e      # names which image
            return "ImageError"
    assert pv.shape == (lay.n_tiles, 3, 56, 56) and pv.dtype == torch.bfloat16
    assert torch.isfinite(pv.float()).all()
    return "accepted"


def test_image_processor_on_mutated_files_raises_only_image_error():
    outcomes: collections.Counter = collections.Counter()

    @budget(500)
    @given(mutated_files() | st.tuples(st.just("random"), st.binary(max_size=256)))
    def check(case):
        outcomes[_process(case[1])] += 1

    check()
    report(f"ImageProcessor on mutated files ({len(SEEDS)} formats/modes seeded)", outcomes)
    assert outcomes["ImageError"] and outcomes["accepted"]


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16B", "F"]


def test_image_processor_on_random_sizes_and_modes():
    outcomes: collections.Counter = collections.Counter()

    @budget(150)
    @given(st.sampled_from(MODES), st.integers(1, 120), st.integers(1, 120), st.integers(0, 2**32 - 1),
           st.booleans())
    def check(mode, h, w, seed, transparency):
        raw = np.random.default_rng(seed).integers(0, 256, 8 * h * w, dtype=np.uint8).tobytes()
        im = Image.frombytes(mode, (w, h), raw)
        if transparency and mode in ("L", "P"):
            im.info["transparency"] = 0
        outcome = _process(im)
        # the documented contract: 8-bit modes are processed; 16/32-bit and premultiplied L are refused
        assert (outcome == "ImageError") == (mode in ("I", "I;16", "I;16B", "F", "La")), (mode, outcome)
        outcomes[outcome] += 1

    check()
    report(f"ImageProcessor on random sizes (1-120 px) and {len(MODES)} modes", outcomes)
    assert outcomes["ImageError"] and outcomes["accepted"]


# ------------------------------------------------------------------------------------- store
LAYOUT = dict(n_layers=2, n_heads=2, moe_layer_index=[0, 1], top_k=1, n_experts=4, router=True,
              router_logits=False, entropy=True, norms=False, sink=False)


def _doc(i: int) -> dict:
    rng, lay, T = np.random.default_rng(i), Layout.from_dict(LAYOUT), 4 + i
    doc = {"tokens": rng.integers(0, 100, T), "doc_id": f"d{i}", "domain": "web"}
    for name in PROBE_ARRAYS:
        if name in lay.arrays():
            shape = lay.shape(name, n_tokens=T)
            doc[name] = (rng.integers(0, 4, shape) if name == "router/experts" else
                         rng.integers(1, 9, shape) if name == "attention/n_keys" else
                         rng.standard_normal(shape).astype(np.float32))
    return doc


@pytest.fixture(scope="module")
def pristine_store():
    root = Path(tempfile.mkdtemp(prefix="wb-fuzz-"))
    path = root / "runs" / "r.zarr"
    with RunWriter.create(path, attrs={"model_source": "tiny"}, layout=LAYOUT) as w:
        for i in range(3):
            w.append(_doc(i))
        w.finish()
    run = open_run(path)
    truth = {name: run.read(name) for name in run.layout.arrays()}
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    yield path, files, truth
    shutil.rmtree(root, ignore_errors=True)


def _corrupt(path: Path, op: str, k: int, blob: bytes, value) -> None:
    data = path.read_bytes()
    if op == "truncate":
        path.write_bytes(data[: k % max(len(data), 1)])
    elif op == "flip":
        b = bytearray(data)
        b[k % len(b)] ^= 1 << (k % 8)
        path.write_bytes(bytes(b))
    elif op == "replace":
        path.write_bytes(blob)
    elif op == "delete":
        path.unlink()
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "swap":                             # exchange with another file of the run (valid bytes, wrong place)
        other = blob
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
    elif op in ("fifo", "devzero"):                # a reader must neither block nor read without bound
        path.unlink()
        os.mkfifo(path) if op == "fifo" else path.symlink_to("/dev/zero")
    elif op == "edit-json":                        # a well-formed zarr.json with one value changed
        meta = json.loads(data)
        paths = []

        def walk(node, at):
            if isinstance(node, dict):
                for key, v in node.items():
                    paths.append(at + [key])
                    walk(v, at + [key])
        walk(meta, [])
        where = paths[k % len(paths)]
        node = meta
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
        path.write_text(json.dumps(meta))


@st.composite
def corruptions(draw, files):
    f = draw(st.sampled_from(files))
    ops = ["truncate", "flip", "replace", "delete", "empty", "swap", "fifo", "devzero"] + \
        (["edit-json"] * 2 if f.endswith("zarr.json") else [])
    op = draw(st.sampled_from(ops))
    blob = draw(st.sampled_from([g for g in files if g != f and "/c/" in g and "/c/" in f] or [f])) \
        if op == "swap" else draw(st.binary(min_size=1, max_size=64))
    value = draw(st.sampled_from([None, -1, 0, 1.5, "x", [], {}, 10**12, True]))
    return (f, op, draw(st.integers(0, 10**6)), blob, value)


def test_store_reader_raises_only_store_error(pristine_store):
    path, files, truth = pristine_store

    outcomes: collections.Counter = collections.Counter()
    known_escapes: list[tuple] = []
    silent: list[tuple] = []

    @budget(120)
    @given(corruptions(files))
    def check(c):
        f, op, k, blob, value = c
        target = path / f
        original = target.read_bytes()
        other = path / blob if op == "swap" else None
        other_bytes = other.read_bytes() if other is not None else None
        if op == "swap":
            blob = other
        try:
            _corrupt(target, op, k, blob, value)
            try:
                outcome = _read_everything(path, truth)
                if outcome.startswith("read, data changed"):
                    outcome += " via metadata" if f.endswith("zarr.json") else " in a chunk"
                    silent.append((f, op, value))
            except StoreError as e:
                assert str(path) in str(e), e
                outcome = "StoreError"
            except Exception as e:                                        # noqa: BLE001 — classified below
                # Known bug (docs/reliability.md, known gaps): reader.py does not wrap a corrupt *metadata*
                # document (an array's zarr.json, or ill-typed n_docs/n_tokens) into StoreError. Chunk
                # data must never escape: an escape outside a zarr.json fails here.
                assert f.endswith("zarr.json"), (f, op, type(e).__name__, e)
                known_escapes.append((f, op, type(e).__name__, str(e)[:100]))
                outcome = f"undocumented {type(e).__name__}"
            listed = [r["path"] for r in list_runs(path.parent)]          # never raises; skips what it can't read
            assert listed in ([], [str(path)]), listed
        finally:
            if target.is_symlink() or (target.exists() and not target.is_file()):
                target.unlink()
            target.write_bytes(original)
            if other is not None:
                other.write_bytes(other_bytes)
        outcomes[outcome] += 1

    check()
    report("open_run / Run.read / Run.verify / list_runs on a corrupted store", outcomes)
    assert not silent, f"corruptions that open and verify with changed data: {silent[:5]}"
    if known_escapes:
        pytest.xfail(f"{len(known_escapes)} corrupt-metadata cases escaped as non-StoreError, e.g. "
                     f"{known_escapes[0]} (reported bug: workbench/store/reader.py _load)")


def _read_everything(path: Path, truth: dict) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = open_run(path)
        same = True
        for name in run.layout.arrays():
            data = run.read(name)
            for i in range(run.n_docs):
                run.read(name, doc=i)
            same &= name in truth and data.shape == truth[name].shape and bool(
                np.array_equal(data, truth[name], equal_nan=data.dtype.kind == "f"))
        run.verify()      # the full check (crc32c chunks, digests, input_hash): what it passes must be intact
    return "read, data intact" if same else "read, data changed"

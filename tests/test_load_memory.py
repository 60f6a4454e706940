"""In-memory loading holds the weights plus one read slab, never a shard (tensor_reader, issue 20).

A child process loads a generated multi-shard checkpoint after a warm-up load (lazy imports and torch's
kernel pages belong to the process), resets its peak RSS (/proc/self/clear_refs) and reports VmHWM.
Reading a shard through one mapping, as `load_model` did before, held the whole largest shard on top
of the weights (4.4 GB at Scout's widths); here the transient must stay far below one shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from workbench.checkpoint import CheckpointError, build_model, load_model, save_model
from workbench.config import Llama4TextConfig, preset
from workbench.tensor_reader import READ_SLAB_BYTES, ShardReader

MiB = 2**20
# ≈ 70 M parameters (280 MB fp32) in ≤ 128 MB shards; the embedding is a slab and a bit (a partial last slab)
CONFIG = dict(vocab_size=8200, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_hidden_layers=4, num_local_experts=8,
              num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=64,
              max_position_embeddings=4096, tie_word_embeddings=False)
SLACK = 12 * MiB           # allocator and interpreter noise around a load; one shard here is ≈ 10× this

CHILD = textwrap.dedent("""
    import gc, json, sys, torch
    from workbench.checkpoint import load_model
    torch.set_num_threads(1)
    ck, warm, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    m = load_model(warm, dtype=dtype)              # the process's own first-use costs, not the load's
    del m
    gc.collect()
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    base = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                               # VmHWM := VmRSS
    model = load_model(ck, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": vm("VmHWM"), "weights": weights}))
""")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("loadmem")
    ck, warm = d / "ck", d / "warm"
    save_model(build_model(Llama4TextConfig.from_hf(CONFIG)), ck, max_shard_size="128MB")
    save_model(build_model(preset("tiny")), warm)
    return ck, warm


def _child(ck: Path, warm: Path, dtype: str) -> dict:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    p = subprocess.run([sys.executable, "-c", CHILD, str(ck), str(warm), dtype], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, transient", [("float32", 0), ("bfloat16", READ_SLAB_BYTES)])
def test_in_memory_load_peaks_at_the_weights_plus_one_slab(sharded, dtype, transient):
    """fp32 as stored: read straight into the parameters; bf16: converted through one slab."""
    ck, warm = sharded
    shards = [f.stat().st_size for f in ck.glob("*.safetensors")]
    assert len(shards) >= 2 and max(shards) > 3 * (READ_SLAB_BYTES + SLACK)     # the test can tell them apart
    # a second try only when the first is over: on a shared machine an unrelated anonymous excess of a
    # few hundred MiB was seen in ~1 of 30 loads in every way of reading (benchmarks/load_memory.py); the
    # mapping load_model used before held one shard every time (+115 MiB here, both tries)
    for _ in range(2):
        r = _child(ck, warm, dtype)
        over = r["peak"] - r["base"] - r["weights"]
        if over <= transient + SLACK:
            break
    assert 0.99 * sum(shards) < r["weights"] * (4 // getattr(torch, dtype).itemsize) <= sum(shards)
    assert over <= transient + SLACK, (f"load held {over / MiB:.0f} MiB beyond its {r['weights'] / MiB:.0f} MiB of "
                                       f"weights (largest shard {max(shards) / MiB:.0f} MiB)")


def test_loaded_weights_equal_the_saved_ones_in_every_dtype_path(sharded):
    """Direct reads, slab conversion (tensors larger than one slab included) and the finite check."""
    ck, _ = sharded
    ref = build_model(Llama4TextConfig.from_hf(CONFIG))
    sizes = sorted(t.numel() * 4 for t in ref.state_dict().values())
    assert sizes[-1] >= 2 * READ_SLAB_BYTES and any(n > READ_SLAB_BYTES and n % READ_SLAB_BYTES for n in sizes)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_model(ck, dtype=dtype)
        got = model.state_dict()
        for name, want in ref.state_dict().items():
            assert got[name].dtype == dtype
            assert torch.equal(got[name], want.to(dtype)), (dtype, name)


def test_shard_reader_reads_every_stored_dtype_and_refuses_what_it_cannot(tmp_path):
    from safetensors.torch import save_file

    ts = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
          "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False]),
          "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    if hasattr(torch, "float8_e4m3fn"):
        ts["f8"] = torch.randn(4).to(torch.float8_e4m3fn)
    path = tmp_path / "m.safetensors"
    save_file(ts, str(path))
    with ShardReader(path) as r:
        assert sorted(r.keys()) == sorted(ts)
        for k, v in ts.items():
            got = r.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.view(torch.uint8) if v.dtype.itemsize == 1 and v.is_floating_point() else got,
                               v.view(torch.uint8) if v.dtype.itemsize == 1 and v.is_floating_point() else v), k
        assert torch.equal(r.read("bf16", dtype=torch.float32), ts["bf16"].float())
        with pytest.raises(ValueError, match=r"m\.safetensors: no tensor 'nope' in this shard"):
            r.read("nope")
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan"), float("inf"), 2.0])}, str(bad))
    with ShardReader(bad, error=CheckpointError) as r, pytest.raises(CheckpointError, match=r"'w' holds 2 NaN/inf"):
        r.read("w", check_finite=True)


def test_a_shard_truncated_after_its_header_was_read_is_an_error_not_sigbus(tmp_path):
    """pread sees the short file and names it; a mapping would have killed the process with SIGBUS."""
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(1000), "b": torch.randn(1000)}, str(path))
    with ShardReader(path, error=CheckpointError) as r:
        os.truncate(path, path.stat().st_size - 100)
        assert r.read("a").shape == (1000,)
        with pytest.raises(CheckpointError, match=r"m\.safetensors: file ends inside 'b'.*truncated or rewritten"):
            r.read("b")


@pytest.mark.parametrize("header, message", [
    (b"\xff" * 8, "header length"),
    (b"not json", "header is not JSON"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', r"'w' holds 8 bytes but F32 \[4\] needs 16"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}', "lies outside the file"),
    (b'{"w": {"dtype": "F32", "shape": [4]}}', r"corrupt header entry for 'w'"),
])
def test_shard_reader_names_a_corrupt_header(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    body = header if header.startswith(b"\xff") else len(header).to_bytes(8, "little") + header + b"\0" * 16
    path.write_bytes(body)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{message}"):
        ShardReader(path, error=CheckpointError)


def test_shard_reader_refuses_a_fifo(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is a FIFO"):
        ShardReader(fifo, error=CheckpointError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_counts_exactly_even_where_a_block_sum_overflows(tmp_path, dtype):
    """The check sums blocks of 4 M values; large finite weights whose sum overflows are not refused, and
    NaN/inf are counted wherever they are (two blocks here)."""
    from safetensors.torch import save_file

    big = torch.finfo(dtype).max / 2
    w = torch.full(((1 << 22) + 5,), big, dtype=dtype)
    path = tmp_path / "m.safetensors"
    save_file({"w": w}, str(path))
    with ShardReader(path, error=CheckpointError) as r:
        assert torch.equal(r.read("w", check_finite=True), w)
    w[3], w[-1] = float("nan"), float("-inf")
    save_file({"w": w}, str(path))
    with ShardReader(path, error=CheckpointError) as r, pytest.raises(CheckpointError, match=r"'w' holds 2 NaN/inf"):
        r.read("w", check_finite=True)


@pytest.mark.slow  # benchmarks/load_memory.py end to end on a few-MB checkpoint: 8 child loads (≈ 30 s)
def test_load_memory_benchmark_small_runs_and_reports_every_way(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "benchmarks/load_memory.py", "--small", "--workdir", str(tmp_path / "w"),
                        "--keep"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "w" / "load_memory.json").read_text())
    assert set(r["results"]) == {"bf16", "fp32"}
    for ways in r["results"].values():
        assert set(ways) == {"pread (load_model)", "mapped shard", "mapped tensor", "madvise"}
        pread = ways["pread (load_model)"][0]
        assert pread["samples"]["peak_file"] - pread["start"]["file"] < READ_SLAB_BYTES   # pread maps nothing
    assert "| bf16 | pread (load_model) |" in p.stdout

"""Which routed-expert kernel runs where (workbench/model/moe.py): `torch._grouped_mm` on CPU (torch ≥ 2.9,
fp32/bf16/fp16) and on CUDA only for bf16 on sm90+; the per-expert loop everywhere else. The CUDA side is
checked on CPU with the capability query monkeypatched (no GPU needed), including that `grouped_mm`
really dispatches to the loop when the check says no, with equal results."""

from __future__ import annotations

import pytest
import torch

from workbench.model import moe

CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, dtype, kind", [
    ((9, 0), torch.bfloat16, "grouped"),      # H100 / H200
    ((10, 0), torch.bfloat16, "grouped"),     # Blackwell
    ((8, 0), torch.bfloat16, "loop"),         # A100: the kernel needs sm90+
    ((8, 9), torch.bfloat16, "loop"),         # L40S / RTX 4090
    ((9, 0), torch.float32, "loop"),          # the CUDA kernel is bf16-only
    ((9, 0), torch.float16, "loop"),
])
def test_cuda_selection_by_capability_and_dtype(monkeypatch, capability, dtype, kind):
    monkeypatch.setattr(moe, "cuda_capability", lambda index: capability)
    monkeypatch.setattr(moe, "_GROUPED_MM_CUDA", True)
    assert moe.grouped_mm_kind(CUDA0, dtype) == kind


def test_cuda_without_the_op_uses_the_loop(monkeypatch):
    monkeypatch.setattr(moe, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(moe, "_GROUPED_MM_CUDA", False)
    assert moe.grouped_mm_kind(CUDA0, torch.bfloat16) == "loop"


def test_cuda_device_without_index_asks_the_current_device(monkeypatch):
    seen = []
    monkeypatch.setattr(moe, "cuda_capability", lambda index: seen.append(index) or (9, 0))
    monkeypatch.setattr(moe, "_GROUPED_MM_CUDA", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert moe.grouped_mm_kind(torch.device("cuda"), torch.bfloat16) == "grouped" and seen == [3]


@pytest.mark.parametrize("torch_ok, dtype, kind", [
    (True, torch.float32, "grouped"), (True, torch.bfloat16, "grouped"), (True, torch.float16, "grouped"),
    (True, torch.float64, "loop"), (False, torch.float32, "loop"),
])
def test_cpu_selection(monkeypatch, torch_ok, dtype, kind):
    monkeypatch.setattr(moe, "_GROUPED_MM_CPU", torch_ok)
    assert moe.grouped_mm_kind(torch.device("cpu"), dtype) == kind


def test_other_devices_use_the_loop():
    assert moe.grouped_mm_kind(torch.device("meta"), torch.bfloat16) == "loop"


def _inputs(dtype=torch.float32, width=16):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), width, generator=g).to(dtype)
    w = torch.randn(4, width, 8, generator=g).to(dtype)
    return x, w, counts


def test_grouped_mm_dispatches_on_the_selection(monkeypatch):
    """Forced to "loop", the op is never called and the loop's result equals the grouped kernel's."""
    x, w, counts = _inputs()
    want = moe.grouped_mm(x, w, counts)                       # grouped on this CPU when torch ≥ 2.9
    calls = []
    real = getattr(torch, "_grouped_mm", None)
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k), raising=False)
    monkeypatch.setattr(moe, "grouped_mm_kind", lambda device, dtype: "loop")
    got = moe.grouped_mm(x, w, counts)
    assert not calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe, "grouped_mm_kind", lambda device, dtype: "grouped")
    if moe._GROUPED_MM_CPU:
        torch.testing.assert_close(moe.grouped_mm(x, w, counts), want, rtol=0, atol=0)
        assert calls


def test_unaligned_widths_fall_back_to_the_loop():
    """An odd inner width (a stride not a multiple of 16 bytes) is refused by the kernel: the loop runs."""
    x, w, counts = _inputs(width=5)
    assert not moe._grouped_mm_ok(x, w)
    ref = torch.cat([x[:3] @ w[0], x[3:8] @ w[2], x[8:] @ w[3]])
    torch.testing.assert_close(moe.grouped_mm(x, w, counts), ref, rtol=1e-6, atol=1e-6)

"""The speed paths (grouped expert matmul, SDPA-native GQA, chunks folded into the batch axis) equal
their plain fallbacks, in values and gradients, including the edge cases that take the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import workbench.model.attention_kernel as ak
from workbench.model import moe


def _loop_mm(x, w, counts):
    out, at = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(x[at:at + n] @ w[e])
        at += n
    return torch.cat(out)


def _reference_experts(ex, x_ND, ids_NK, gate_NK):
    """The original dispatch: per-expert loop, then zeros + index_add_ back to token order."""
    K = ids_NK.shape[1]
    flat = ids_NK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    x_in = x_ND[order // K] * gate_NK.reshape(-1)[order, None]
    counts = torch.bincount(flat, minlength=ex.gate_up_proj.shape[0])
    g, u = _loop_mm(x_in, ex.gate_up_proj, counts).chunk(2, dim=-1)
    y = _loop_mm(u * F.silu(g), ex.down_proj, counts)
    return torch.zeros_like(x_ND).index_add_(0, order // K, y)


def test_grouped_mm_matches_loop_with_empty_groups_and_grads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 0])
    a, b = moe.grouped_mm(x, w, counts), _loop_mm(x, w, counts)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    up = torch.randn_like(a)
    for ga, gb in zip(torch.autograd.grad(a, (x, w), up), torch.autograd.grad(b, (x, w), up)):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])     # fp32: the CPU grouped kernel; fp64: the loop
def test_grouped_mm_custom_op_equals_eager_in_values_and_gradients(dtype):
    """`workbench::grouped_mm`, the opaque op torch.compile traces for dtypes the native op's meta kernel
    refuses, gives eager's values and the loop's gradients, with empty groups; `opcheck` validates its
    fake (shape) kernel and autograd registration."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 16, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, generator=g, dtype=dtype, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 0])
    a, b = torch.ops.workbench.grouped_mm(x, w, counts), _loop_mm(x, w, counts)
    torch.testing.assert_close(a, moe.grouped_mm(x, w, counts), rtol=0, atol=0)
    if dtype == torch.float64:                   # the same loop: bitwise (fp32 runs the grouped kernel)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    up = torch.randn(a.shape, generator=g, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ga, gb in zip(torch.autograd.grad(a, (x, w), up), torch.autograd.grad(b, (x, w), up)):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)
    torch.library.opcheck(torch.ops.workbench.grouped_mm.default, (x, w, counts))


@pytest.mark.parametrize("D,Fw", [(64, 48), (8, 6), (5, 3)])   # aligned; down_proj unaligned; all unaligned
@pytest.mark.parametrize("N,K", [(0, 1), (37, 1), (29, 2)])
def test_experts_match_reference_dispatch(D, Fw, N, K):
    torch.manual_seed(D + N + K)
    ex = moe.Llama4TextExperts(5, D, Fw)
    torch.nn.init.normal_(ex.gate_up_proj, 0, 0.2)
    torch.nn.init.normal_(ex.down_proj, 0, 0.2)
    x = torch.randn(N, D, requires_grad=True)
    ids = torch.stack([torch.randperm(4)[:K] for _ in range(N)]) if N else torch.zeros(0, K, dtype=torch.long)
    gate = torch.rand(N, K)
    a, b = ex(x, ids, gate), _reference_experts(ex, x, ids, gate)     # expert 4 is never routed
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if N:
        ga = torch.autograd.grad(a.square().sum(), (x, ex.gate_up_proj, ex.down_proj))
        gb = torch.autograd.grad(b.square().sum(), (x, ex.gate_up_proj, ex.down_proj))
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk,q0,k0,Tq", [(7, 0, 0, 20), (None, 0, 0, 20), (7, 13, 7, 20), (5, 0, 0, 23),
                                            (4, 8, 8, 1), (6, 0, 0, 24)])
def test_attend_native_gqa_equals_expanded_kv(monkeypatch, chunk, q0, k0, Tq):
    """SDPA's enable_gqa and folded chunks vs the torch<2.5 fallback that repeats K/V, and both vs a
    dense masked softmax."""
    g = torch.Generator().manual_seed(Tq + q0)
    S = Tq + q0 - k0
    q = torch.randn(2, 4, Tq, 8, generator=g)
    k, v = torch.randn(2, 2, S, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    fast = ak.attend(q, k, v, q0, k0, chunk, 0.3)
    monkeypatch.setattr(ak, "_SDPA_GQA", False)
    slow = ak.attend(q, k, v, q0, k0, chunk, 0.3)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    qpos, kpos = torch.arange(q0, q0 + Tq)[:, None], torch.arange(k0, q0 + Tq)[None, :]
    visible = (kpos <= qpos) & (True if chunk is None else kpos // chunk == qpos // chunk)
    kx, vx = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = (q @ kx.transpose(-1, -2) * 0.3).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(fast, torch.softmax(s, -1) @ vx, rtol=1e-5, atol=1e-6)

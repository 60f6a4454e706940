"""Feed-forward blocks: the Llama 4 MoE (router + routed experts + shared expert) and the dense MLP.

MoE (spec llama4.md §3.1):
    logits_NE = router(x)                       bias-free linear
    ids_NK, top_NK = topk(logits, k)            no softmax, no renormalisation
    gate_NK = sigmoid(top)                      computed in float32, cast back
    out = shared_expert(x) + Σ_k expert_{ids}(gate · x)     ← the gate scales the expert INPUT

Sparse dispatch: each expert runs only on the tokens routed to it (sort by expert, then one grouped
matmul over the fused `gate_up_proj [E, D, 2F]` and one over `down_proj [E, F, D]`). HF runs every
expert on every token; the results agree because unrouted rows are exactly zero there.

Interventions (runtime state, never saved): mask experts, force an expert, override top-k,
drop the shared expert — see `MoEIntervention`.

Legend: N tokens (B·T flattened), D hidden, E experts, K top-k, F expert width;
grouped_mm: M sorted rows, I/O in/out width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import Llama4TextConfig
from workbench.instrument.tap import Tap


class Llama4TextMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)). Used for dense layers and as the shared expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# `torch._grouped_mm` has a CPU kernel from torch 2.9 (2.8 has the op but raises NotImplementedError
# on CPU); it wants 16-byte-aligned data pointers and strides (transformers PR #46743 tabulates this).
# On CUDA the kernel is bf16-only and needs sm90+ (Hopper: H100/H200); elsewhere the loop runs.
_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_GROUPED_MM_CPU = hasattr(torch, "_grouped_mm") and _TORCH >= (2, 9)
_GROUPED_MM_CUDA = hasattr(torch, "_grouped_mm")
GROUPED_MM_MIN_CAPABILITY = (9, 0)


@torch.compiler.assume_constant_result
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device `index`; a constant to torch.compile (no guard, no graph break)."""
    return tuple(torch.cuda.get_device_capability(index))


def grouped_mm_kind(device: torch.device, dtype: torch.dtype) -> str:
    """"grouped" where `torch._grouped_mm` runs this device and dtype, else "loop" (one matmul per expert,
    with a host sync on the counts). CPU: fp32/bf16/fp16 on torch ≥ 2.9. CUDA: bf16 on sm90+ only."""
    if device.type == "cpu":
        return "grouped" if _GROUPED_MM_CPU and dtype in (torch.float32, torch.bfloat16, torch.float16) else "loop"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        ok = _GROUPED_MM_CUDA and dtype == torch.bfloat16 and cuda_capability(index) >= GROUPED_MM_MIN_CAPABILITY
        return "grouped" if ok else "loop"
    return "loop"


def _grouped_mm_ok(x_MI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """The grouped kernel can take these: a supported device and dtype (`grouped_mm_kind`), equal dtypes,
    16-byte-aligned data pointers, and every non-unit stride of the inputs and of the (M, O) output a
    multiple of 16 bytes. Under torch.compile the pointers are not known while tracing; the compiler's
    buffers and the allocator's are aligned, and the strides (static) are still checked."""
    if x_MI.dtype != w_EIO.dtype or grouped_mm_kind(x_MI.device, x_MI.dtype) != "grouped":
        return False
    es = x_MI.element_size()
    strides = [*x_MI.stride(), *w_EIO.stride(), w_EIO.shape[-1]]
    if not all(s == 1 or s * es % 16 == 0 for s in strides):
        return False
    return torch.compiler.is_compiling() or (x_MI.data_ptr() % 16 == 0 and w_EIO.data_ptr() % 16 == 0)


# dtypes `torch._grouped_mm`'s meta (tracing) kernel accepts; its CPU kernel also runs fp32 eagerly
_GROUPED_MM_TRACEABLE = (torch.bfloat16, torch.float16)


def grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert times that expert's matrix: (M, I) · (E, I, O) → (M, O), where the first
    counts[0] rows use w[0], the next counts[1] rows w[1], and so on.

    Where `torch._grouped_mm` runs (`grouped_mm_kind`: CPU on torch ≥ 2.9; CUDA bf16 on sm90+), one
    differentiable op runs every group: no Python loop, no host sync on the counts, no concatenation,
    so the MoE layer compiles as one graph. Elsewhere (older GPUs, fp32 on CUDA, float64, older torch,
    unaligned widths) one matmul per non-empty expert; the results are equal.

    Under torch.compile, dtypes the native op cannot trace (its meta kernel takes bf16/fp16 only, so fp32
    would fail to compile at all) go through the opaque custom op `workbench::grouped_mm`: the graph stays
    whole, and at run time the op does exactly what eager does (the CPU grouped kernel for fp32, or the
    loop, whose host sync then happens inside the op)."""
    if torch.compiler.is_compiling() and x_MI.dtype not in _GROUPED_MM_TRACEABLE:
        return torch.ops.workbench.grouped_mm(x_MI, w_EIO, counts_E)
    return _grouped_mm_eager(x_MI, w_EIO, counts_E)


def _grouped_mm_eager(x_MI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_ok(x_MI, w_EIO):
        return torch._grouped_mm(x_MI, w_EIO, offs=counts_E.cumsum(0).to(torch.int32))
    pieces, at = [], 0
    for e, n in enumerate(counts_E.tolist()):          # host sync: the loop fallback only
        if n:
            pieces.append(x_MI[at:at + n] @ w_EIO[e])
            at += n
    return torch.cat(pieces) if pieces else x_MI.new_zeros(0, w_EIO.shape[-1])


@torch.library.custom_op("workbench::grouped_mm", mutates_args=())
def _grouped_mm_op(x_MI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` as one opaque op for torch.compile (dtypes the native op's meta kernel refuses)."""
    return _grouped_mm_eager(x_MI, w_EIO, counts_E)            # a new tensor (cat or the kernel)


@_grouped_mm_op.register_fake
def _(x_MI, w_EIO, counts_E):
    return x_MI.new_empty(x_MI.shape[0], w_EIO.shape[-1])


@torch.library.custom_op("workbench::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(grad_MO: torch.Tensor, x_MI: torch.Tensor, w_EIO: torch.Tensor,
                         counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂x, ∂w) of `grouped_mm`: ∂x = grad · w[e]ᵀ per group, ∂w[e] = x_eᵀ · grad_e (empty groups: 0)."""
    grad_x, grad_w, at = torch.zeros_like(x_MI), torch.zeros_like(w_EIO), 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            grad_x[at:at + n] = grad_MO[at:at + n] @ w_EIO[e].transpose(0, 1)
            grad_w[e] = x_MI[at:at + n].transpose(0, 1) @ grad_MO[at:at + n]
            at += n
    return grad_x, grad_w


@_grouped_mm_backward.register_fake
def _(grad_MO, x_MI, w_EIO, counts_E):
    return torch.empty_like(x_MI), torch.empty_like(w_EIO)


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_grad(ctx, grad_MO):
    x_MI, w_EIO, counts_E = ctx.saved_tensors
    grad_x, grad_w = torch.ops.workbench.grouped_mm_backward(grad_MO, x_MI, w_EIO, counts_E)
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


def one_token(x_1D: torch.Tensor, ids_1K: torch.Tensor, gate_1K: torch.Tensor, gate_up_EDF: torch.Tensor,
              down_EFD: torch.Tensor) -> torch.Tensor:
    """The routed experts for ONE token (a decode step): its k experts' matrices by index, one matmul each —
    not the grouped kernel, which visits every expert (~90 µs per call at E=8 on one CPU thread, against
    ~10 µs here). The k ids of one token are distinct, so each expert sees one row, the same product the
    grouped kernel forms for a one-row group (tests/test_decode_step.py checks equality with it). One
    host read of the ids (`tolist`): eager only — under torch.compile `forward` keeps the grouped op."""
    out = None
    ids = ids_1K.tolist()[0]                      # weights may also be per-expert lists (the decode step's views)
    for k, e in enumerate(ids):
        x_in = x_1D * (gate_1K if len(ids) == 1 else gate_1K[:, k:k + 1])
        gate, up = torch.mm(x_in, gate_up_EDF[e]).chunk(2, dim=-1)
        y = torch.mm(up * F.silu(gate), down_EFD[e])
        out = y if out is None else out + y
    return out


class Llama4TextExperts(nn.Module):
    """The routed experts, fused: `gate_up_proj` (E, D, 2F), `down_proj` (E, F, D).

    Expert parallelism (workbench/expert_parallel.py): a module may hold a contiguous slice of a
    layer's experts — global ids `first`…`first + E − 1` of `total`. `forward` takes global ids, runs
    only the slots routed to its own experts and leaves the other slots zero; the ranks' partial sums
    then add up to the full layer's output."""

    def __init__(self, num_experts: int, hidden: int, inner: int, *, first: int = 0, total: int | None = None):
        super().__init__()
        self.first, self.total = first, num_experts if total is None else total
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inner))  # (E, D, 2F)
        self.down_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))         # (E, F, D)

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, gate_NK: torch.Tensor) -> torch.Tensor:
        N, K = ids_NK.shape
        E = self.gate_up_proj.shape[0]
        if N == 1 and E == self.total and not torch.compiler.is_compiling():
            return one_token(x_ND, ids_NK, gate_NK, self.gate_up_proj, self.down_proj)
        flat_ids = ids_NK.reshape(-1)                                # (N·K,) slot n·K + k
        part = E != self.total
        if part:         # other experts' slots get id E: they sort last and are cut off below
            flat_ids = flat_ids - self.first
            flat_ids = torch.where((flat_ids >= 0) & (flat_ids < E), flat_ids, E)
        order = torch.argsort(flat_ids, stable=True)                 # slots grouped by expert
        # counts by scatter-add, not bincount: a static (E,) shape, which torch.compile can trace
        counts_E = torch.zeros(E + int(part), dtype=torch.long, device=flat_ids.device).scatter_add_(
            0, flat_ids, torch.ones_like(flat_ids))[:E]
        if part:
            order = order[:int(counts_E.sum())]                      # host sync; the local slots only
        gate_in = gate_NK.reshape(-1)[order, None]                   # (M, 1); the gate scales the input
        x_in = x_ND.index_select(0, order // K) * gate_in            # (M, D), M = N·K unless part
        gate, up = grouped_mm(x_in, self.gate_up_proj, counts_E).chunk(2, dim=-1)          # (M, F) each
        out_sorted = grouped_mm(up * F.silu(gate), self.down_proj, counts_E)              # (M, D)
        D = x_ND.shape[-1]
        if part:         # into zeros: the slots of other ranks' experts stay exactly zero
            out = out_sorted.new_zeros(N * K, D).index_copy(0, order, out_sorted)
        else:            # back to slot order with one gather (cheaper than zeros + index_add_)
            out = out_sorted.index_select(0, torch.argsort(order))
        out_NKD = out.view(N, K, D)
        return out_NKD[:, 0] if K == 1 else out_NKD.sum(1)      # sum the k slots


@dataclass
class MoEIntervention:
    """Per-layer routing edits. `mask`: expert ids never chosen; `force`: expert id(s) always chosen
    (gate = sigmoid of its own logit); `top_k`: override k; `drop_shared`: remove the shared expert;
    `drop_routed`: remove the routed contribution."""
    mask: tuple[int, ...] = ()
    force: tuple[int, ...] = ()
    top_k: int | None = None
    drop_shared: bool = False
    drop_routed: bool = False

    def is_identity(self) -> bool:
        return self == MoEIntervention()


class Llama4TextMoe(nn.Module):
    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = Llama4TextExperts(self.num_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert = Llama4TextMLP(config.hidden_size, config.intermediate_size)
        self.intervention = MoEIntervention()
        for name in ("router_logits", "topk_ids", "topk_gates", "shared_out", "routed_out"):
            setattr(self, f"hook_{name}", Tap(f"feed_forward.hook_{name}"))

    def route(self, logits_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        iv, k = self.intervention, self.top_k
        if iv.top_k is not None:
            if not 1 <= iv.top_k <= self.num_experts:
                raise ValueError(f"top_k override {iv.top_k} outside 1..{self.num_experts}")
            k = iv.top_k
        sel = logits_NE
        if iv.mask:
            bad = [e for e in iv.mask if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"masked expert ids {bad} outside 0..{self.num_experts - 1}")
            if len(set(iv.mask)) > self.num_experts - k:
                raise ValueError(f"masking {len(set(iv.mask))} of {self.num_experts} experts leaves "
                                 f"fewer than top_k={k}")
            sel = sel.index_fill(-1, torch.tensor(iv.mask, device=sel.device), float("-inf"))
        if iv.force:
            if len(iv.force) > k or any(not 0 <= e < self.num_experts for e in iv.force):
                raise ValueError(f"forced experts {iv.force} must be ≤ top_k={k} valid ids")
            sel = sel.index_fill(-1, torch.tensor(iv.force, device=sel.device), float("inf"))
        ids_NK = torch.topk(sel, k, dim=-1).indices
        top_NK = logits_NE.gather(-1, ids_NK)
        return ids_NK, torch.sigmoid(top_NK.float()).to(logits_NE.dtype)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        shape = x_BTD.shape
        x_ND = x_BTD.reshape(-1, shape[-1])
        logits_NE = self.hook_router_logits(self.router(x_ND))
        ids_NK, gate_NK = self.route(logits_NE)
        ids_NK, gate_NK = self.hook_topk_ids(ids_NK), self.hook_topk_gates(gate_NK)
        iv = self.intervention
        shared = self.hook_shared_out(
            torch.zeros_like(x_ND) if iv.drop_shared else self.shared_expert(x_ND))
        routed = self.hook_routed_out(
            torch.zeros_like(x_ND) if iv.drop_routed else self.experts(x_ND, ids_NK, gate_NK))
        return (shared + routed).view(shape)

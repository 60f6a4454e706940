"""Routed experts over compressed weights: the dispatch shared by the int4 and FP8 expert modules, and
the float32 router that quantized MoE layers use.

Same contract as `workbench.model.moe.Llama4TextExperts.forward(x_ND, ids_NK, gate_NK)`: the gate scales
the expert INPUT (spec llama4.md §3.1), tokens are sorted by expert, and each expert runs only on its
own rows. The difference is the weights: each *active* expert's matrices are decompressed on the fly
(`linear(x, e)`), so an expert no token chose is never unpacked and at most one expert's dequantised
weights exist at a time.

Legend: N tokens, D hidden, E experts, K top-k, F expert width, M rows routed to one expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Float32Router(nn.Linear):
    """Router logits in float32 whatever the activations' dtype. The weight is kept in float32 (it is
    E × D, negligible next to the experts): routing decisions are exactly what a researcher reads, so a
    quantized model should not add bf16 rounding on top of the noise its experts already bring.
    The logits, top-k and gates leave this layer in float32; the quantized expert modules accept that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


def dispatch(x_ND: torch.Tensor, ids_NK: torch.Tensor, gate_NK: torch.Tensor, num_experts: int,
             expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_k expert_{ids[n,k]}(gate[n,k] · x[n]) with `expert(e, x_MD) -> (M, D)` called once per active
    expert. Output has x's dtype; a float32 gate (from `Float32Router`) is applied in float32 and the
    product rounded once to x's dtype."""
    N, K = ids_NK.shape
    flat = ids_NK.reshape(-1)                                      # (N·K,) slot n·K + k
    order = torch.argsort(flat, stable=True)                       # slots grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync: the loop needs it anyway
    x_in = (x_ND[order // K] * gate_NK.reshape(-1)[order, None]).to(x_ND.dtype)   # (N·K, D)
    pieces, at = [], 0
    for e, n in enumerate(counts):
        if n:
            pieces.append(expert(e, x_in[at:at + n]).to(x_ND.dtype))
            at += n
    out = torch.cat(pieces) if pieces else x_in.new_zeros(0, x_ND.shape[-1])
    out_NKD = out[torch.argsort(order)].view(N, K, -1)             # back to slot order
    return out_NKD[:, 0] if K == 1 else out_NKD.sum(1)


def swiglu_expert(gate_up: Callable, down: Callable) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """expert(e, x) = down_e(silu(gate_e(x)) · up_e(x)) from two `linear(x, e)` callables whose weights
    are [out, in]: gate_up has out = 2F (gate rows first, then up, as HF's fused `gate_up_proj`)."""
    def expert(e: int, x_MD: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up(x_MD, e).chunk(2, dim=-1)               # (M, F) each
        return down(up * F.silu(gate), e)                          # (M, D)
    return expert

"""Tolerances for comparing the same maths computed in another order — stated once, here.

Two evaluations of one expression that differ only in the order of their floating-point operations
(decode steps vs one pass, a fused kernel vs the tiled reference, our model vs `transformers`, an AVX-512
kernel vs an AVX2 or scalar one on another CPU) do not agree bit for bit. Their difference is round-off,
and its size follows from the dtype and the size of the reductions, not from the machine the suite was
tuned on:

- one reduction of `n` terms of size `magnitude` rounds each partial sum with a relative error of at
  most eps/2 (eps = machine epsilon of the dtype); with random rounding the accumulated error has a
  standard deviation of about eps·√n·magnitude/√12, and the difference of two orderings √2 times that;
- a model chains such reductions: every layer adds its own, and later layers carry the earlier ones
  forward, so the bound grows with the number of layers (`depth`).

`reorder_tol` is eps·√n·magnitude·depth times SAFETY = 8: about 20 standard deviations of the
random-rounding estimate, which leaves room for the conditioning of softmax/log (small amplification)
and for kernels that block reductions differently (Intel vs AMD, `ATEN_CPU_CAPABILITY=avx2|default`),
while staying orders of magnitude below the errors a real bug makes (a misplaced temperature step or a
wrong chunk mask moves entropy by 1e-2…1 nats, logits by ≫ 1e-3).

The tests use these instead of literal 1e-5s. Where a comparison must be *exact* (expert ids, counts,
the same kernel on the same data) the tests say so with `assert_array_equal` instead.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    return float(torch.finfo(dtype).eps)


def reorder_tol(n: int, *, magnitude: float = 1.0, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for two orderings of `depth` chained reductions of `n` terms of size `magnitude`."""
    if n < 1 or depth < 1 or magnitude <= 0:
        raise ValueError(f"reorder_tol: need n >= 1, depth >= 1, magnitude > 0 (got {n}, {depth}, {magnitude})")
    return SAFETY * eps(dtype) * math.sqrt(n) * magnitude * depth


def model_tol(config, *, n_keys: int = 1, magnitude: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Tolerance for a quantity read out of a whole text model (logits, hidden states, per-layer
    statistics): the widest reduction is the hidden size, an FFN width or the keys attended to, and the
    error builds up over every decoder layer."""
    widths = [config.hidden_size, n_keys, getattr(config, "intermediate_size", 1),
              getattr(config, "intermediate_size_mlp", 1)]
    return reorder_tol(max(widths), magnitude=magnitude, depth=config.num_hidden_layers, dtype=dtype)


def entropy_tol(config, n_keys: int, *, dtype: torch.dtype = torch.float32) -> float:
    """Attention entropy (nats) recomputed in another order: it is bounded by ln(n_keys), and its inputs
    (q, k) carry the model's round-off from the layers below."""
    return model_tol(config, n_keys=n_keys, magnitude=max(1.0, math.log(n_keys)), dtype=dtype)


def model_close(config, *, n_keys: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """`torch.testing.assert_close` keywords for whole-model outputs of order one (hidden states, logits):
    the absolute and the relative bound are both `model_tol` (relative covers the residual stream's growth)."""
    tol = model_tol(config, n_keys=n_keys, dtype=dtype)
    return dict(rtol=tol, atol=tol)


def multimodal_close(config, *, n_keys: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """`model_close` for a vision-language model: the vision encoder's layers come before the text
    model's, and its reductions (width, MLP, the patches each patch attends to) join the widest."""
    v, t = config.vision_config, config.text_config
    n_patches = (v.image_size // v.patch_size) ** 2 + 1
    width = max(v.hidden_size, v.intermediate_size, n_patches, t.hidden_size, n_keys,
                getattr(t, "intermediate_size", 1), getattr(t, "intermediate_size_mlp", 1))
    tol = reorder_tol(width, depth=v.num_hidden_layers + t.num_hidden_layers, dtype=dtype)
    return dict(rtol=tol, atol=tol)

"""Parameter accounting from a config alone (meta device; nothing is allocated)."""

from __future__ import annotations

import torch

from workbench.config import Llama4TextConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int4": 0.5}


def count_params(config: Llama4TextConfig) -> dict[str, int]:
    """total, active per token (shared + k routed experts; embeddings and lm_head included),
    routed-expert parameters, and the per-layer split."""
    from workbench.model.transformer import Llama4ForCausalLM

    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    E, k = config.num_local_experts, config.num_experts_per_tok
    active = total - routed + routed * k // E
    embed = model.model.embed_tokens.weight.numel()
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    return {"total": total, "active": active, "routed_experts": routed, "embedding": embed, "lm_head": head}


def human(n: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for div, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"

"""The tap vocabulary: every site name, the shape of the value it carries, and what it means.

Full names are module paths, e.g. `model.layers.3.self_attn.hook_entropy`; the tables below give
the per-layer suffix. Shape letters: B batch, T tokens, D hidden, H query heads, Hkv kv heads,
Dh head dim, N = B·T flattened tokens, E experts, K top-k, V vocab.
Stats sites fire only when attention statistics are requested (`attn_stats=...`).
The multimodal model nests the text model under `language_model.` and adds vision sites
(`workbench.model.multimodal.VISION_SITES`, `multimodal_site_names(config)`).
"""

from __future__ import annotations

MODEL_SITES: dict[str, tuple[str, str]] = {
    "model.hook_embed": ("B T D", "token embeddings (after image-feature scatter for multimodal)"),
    "model.hook_final_norm": ("B T D", "output of the final RMSNorm (input to lm_head)"),
}

LAYER_SITES: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("B T D", "residual stream entering the block"),
    "hook_attn_out": ("B T D", "attention output after o_proj"),
    "hook_resid_mid": ("B T D", "residual after adding attention"),
    "hook_mlp_out": ("B T D", "feed-forward output (MoE: shared + routed; dense: MLP)"),
    "hook_resid_post": ("B T D", "residual leaving the block"),
    "self_attn.hook_q": ("B T H Dh", "queries after RoPE, QK norm and temperature scaling"),
    "self_attn.hook_k": ("B T Hkv Dh", "new keys after RoPE and QK norm (as cached)"),
    "self_attn.hook_v": ("B T Hkv Dh", "new values"),
    "self_attn.hook_z": ("B T H Dh", "per-head attention result before o_proj"),
    "self_attn.hook_entropy": ("B H T", "attention entropy (nats) as run [stats]"),
    "self_attn.hook_entropy_no_temp": ("B H T", "entropy with temperature tuning off (= entropy on RoPE layers)"
                                                " [stats]"),
    "self_attn.hook_n_keys": ("T", "number of keys each query attends to [stats]"),
    "self_attn.hook_sink_mass": ("B H T", "attention probability on the document's first token (0 if not visible)"
                                          " [stats]"),
}

MOE_SITES: dict[str, tuple[str, str]] = {
    "feed_forward.hook_router_logits": ("N E", "raw router logits (edit here to steer routing)"),
    "feed_forward.hook_topk_ids": ("N K", "chosen experts"),
    "feed_forward.hook_topk_gates": ("N K", "sigmoid of the chosen logits: scales the expert INPUT"),
    "feed_forward.hook_shared_out": ("N D", "shared-expert output"),
    "feed_forward.hook_routed_out": ("N D", "sum of routed-expert outputs, expert(gate·x)"),
}


def site_names(config) -> dict[str, tuple[str, str]]:
    """All full site names of a text model built from `config`, with (shape, meaning)."""
    out = dict(MODEL_SITES)
    for i in range(config.num_hidden_layers):
        for suffix, spec in LAYER_SITES.items():
            out[f"model.layers.{i}.{suffix}"] = spec
        if config.is_moe[i]:
            for suffix, spec in MOE_SITES.items():
                out[f"model.layers.{i}.{suffix}"] = spec
    return out

"""Quality of a quantized model measured against a reference, layer by layer.

For every decoder layer i, on the same token ids:
  * logit error — the layer's residual stream (`model.layers.{i}.hook_resid_post`) read out through
    each model's own final norm and lm_head (the logit lens); relative L2 error ‖Δ‖/‖ref‖ over all
    positions, and the mean KL(ref ‖ candidate) of the next-token distributions. The last layer's
    readout *is* the model's output.
  * top-1 agreement — fraction of positions whose argmax next token is the same.
  * routing agreement — fraction of (token, slot) choices where the candidate picks an expert the
    reference also picks (`model.layers.{i}.feed_forward.hook_topk_ids`; for top-1 routing: the same
    expert). Measured as run: a flip at layer i includes the effect of every earlier layer's error,
    which is what a researcher recording the quantized model sees.

    rows = compare(reference, candidate, ids)
    print(markdown(rows))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from workbench.instrument.hooks import run_with_cache

_SITES = ["model.layers.*.hook_resid_post"]
_ROUTING = "model.layers.*.feed_forward.hook_topk_ids"


@dataclass
class LayerQuality:
    layer: int
    logit_rel_err: float            # ‖logits_cand − logits_ref‖ / ‖logits_ref‖ (logit lens of this layer)
    kl: float                       # mean KL(ref ‖ cand) of next-token distributions, nats
    top1_agree: float               # fraction of positions with the same argmax
    routing_agree: float | None     # fraction of routing choices shared; None for dense layers

    def as_dict(self) -> dict:
        return asdict(self)


def _readout(model, resid: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(resid)).float()


@torch.no_grad()
def compare(reference, candidate, input_ids: torch.Tensor) -> list[LayerQuality]:
    """Per-layer quality of `candidate` against `reference` on `input_ids` (B, T). Both models must
    share config and device; their dtypes and weight formats may differ."""
    if reference.config.num_hidden_layers != candidate.config.num_hidden_layers:
        raise ValueError("reference and candidate have different numbers of layers")
    sites = _SITES + ([_ROUTING] if any(reference.config.is_moe) else [])
    _, ref = run_with_cache(reference, input_ids, sites)
    _, cand = run_with_cache(candidate, input_ids, sites)
    rows = []
    for i in range(reference.config.num_hidden_layers):
        key = f"model.layers.{i}.hook_resid_post"
        lr, lc = _readout(reference, ref[key]), _readout(candidate, cand[key])
        logp_r, logp_c = lr.log_softmax(-1), lc.log_softmax(-1)
        kl = (logp_r.exp() * (logp_r - logp_c)).sum(-1).mean()
        routing = None
        rkey = f"model.layers.{i}.feed_forward.hook_topk_ids"
        if rkey in ref:
            a, b = ref[rkey], cand[rkey]                                   # (N, K)
            routing = float((a[:, :, None] == b[:, None, :]).any(-1).float().mean())
        rows.append(LayerQuality(
            layer=i, logit_rel_err=float((lc - lr).norm() / lr.norm()), kl=float(kl),
            top1_agree=float((lc.argmax(-1) == lr.argmax(-1)).float().mean()), routing_agree=routing))
    return rows


def markdown(rows_by_variant: dict[str, list[LayerQuality]]) -> str:
    """One markdown table: variant | layer | routing agreement | top-1 agreement | logit rel. error | KL."""
    lines = ["| variant | layer | routing agree | top-1 agree | logit rel. err | KL (nats) |",
             "|---|---|---|---|---|---|"]
    for variant, rows in rows_by_variant.items():
        for r in rows:
            routing = "dense" if r.routing_agree is None else f"{r.routing_agree:.3f}"
            lines.append(f"| {variant} | {r.layer} | {routing} | {r.top1_agree:.3f} | "
                         f"{r.logit_rel_err:.4f} | {r.kl:.2e} |")
    return "\n".join(lines)

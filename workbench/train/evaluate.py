"""Evidence for a trained model: held-out loss per domain against a unigram baseline, OLMoE domain
specialization per MoE layer, load balance, and key–value retrieval at several context lengths.

Domain specialization (OLMoE Eq. 7, science.md §1.1): DomSpec(e, D) = N^{(k)}_{e,D} / N_D, the share
of domain-D tokens with expert e among their top-k; the uniform line is k/E. Computed on held-out
windows only. Retrieval: greedy decoding of the looked-up value after `Lookup k KEY v`, exact match,
with NoPE temperature tuning as configured and switched off (`intervene(temperature_tuning=False)`).

Legend: L MoE layers, E experts, D domains, T tokens, V vocab.
"""

from __future__ import annotations

import math
import random

import torch

from workbench.instrument.hooks import hooks, intervene
from workbench.train.data import Stream, kv_document

TOPK_SITE = "model.layers.*.feed_forward.hook_topk_ids"


def unigram_loss(train: Stream, held: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of add-one-smoothed unigram frequencies of the training stream, on the
    held-out next tokens — what a model that ignores context could reach."""
    counts = torch.bincount(train.tokens, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[held[:, 1:].reshape(-1)].mean())


@torch.no_grad()
def routing_counts(model, windows: dict[str, torch.Tensor], batch: int = 8) -> tuple[torch.Tensor, list[int]]:
    """counts (L, D, E): number of held-out tokens of domain d with expert e in their top-k at MoE
    layer l (inputs only, i.e. windows[:, :-1]); and the decoder-layer index of each MoE layer."""
    moe = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
    E = model.config.num_local_experts
    counts = torch.zeros(len(moe), len(windows), E, dtype=torch.long)
    for d, w in enumerate(windows.values()):
        for i in range(0, len(w), batch):
            ids: list[torch.Tensor] = []
            with hooks(model, {TOPK_SITE: lambda v, _s, ids=ids: ids.append(v)}):
                model(w[i:i + batch, :-1])
            for m, v in enumerate(ids):                                     # v: (N, K)
                counts[m, d] += torch.bincount(v.reshape(-1), minlength=E)
    return counts, moe


def specialization_table(counts_LDE: torch.Tensor, n_tokens_D: list[int], domains: list[str],
                         moe_layers: list[int]) -> list[dict]:
    """One row per (MoE layer, domain): max DomSpec, its expert, and the layer's load entropy."""
    rows = []
    for m, layer in enumerate(moe_layers):
        load = counts_LDE[m].sum(0).double()
        f = load / load.sum()
        ent = float(-(f[f > 0] * f[f > 0].log()).sum() / math.log(len(f)))
        for d, name in enumerate(domains):
            spec = counts_LDE[m, d].double() / n_tokens_D[d]
            rows.append({"layer": layer, "domain": name, "max_spec": float(spec.max()),
                         "expert": int(spec.argmax()), "load_entropy": ent})
    return rows


@torch.no_grad()
def retrieval_accuracy(model, tok, n_tokens: int, n_docs: int = 20, seed: int = 1234,
                       temperature_tuning: bool | None = None, digits: int = 4) -> float:
    """Share of key–value documents of about `n_tokens` tokens whose looked-up value is decoded
    exactly (greedy), with the needle at evenly spread depths; `digits` as in training."""
    rng = random.Random(f"retrieval:{n_tokens}:{seed}")
    example = kv_document(random.Random(0), 1, digits=digits).text.splitlines()[1] + "\n"
    per_record = len(tok.encode(example, add_special_tokens=False).ids)
    n_pairs = max(2, (n_tokens - 12) // per_record)
    bos = tok.token_to_id("<|begin_of_text|>")
    hits = 0
    with intervene(model, temperature_tuning=temperature_tuning):
        for j in range(n_docs):
            doc = kv_document(rng, n_pairs, depth=(j + 0.5) / n_docs, digits=digits)
            prompt = [bos] + tok.encode(doc.prompt, add_special_tokens=False).ids
            want = tok.encode(doc.answer, add_special_tokens=False).ids
            # Greedy decoding reproduces `want` iff every answer token is the argmax given the correct
            # prefix, so one teacher-forced forward pass decides exact match.
            x = torch.tensor([prompt + want[:-1]])
            pred = model(x).logits[0, len(prompt) - 1:].argmax(-1).tolist()
            hits += pred == want
    return hits / n_docs

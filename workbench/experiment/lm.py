"""The domain-text language-model task of an experiment (task = "lm"), on the existing data code.

Training draws windows of `train_length` tokens from the four domain texts (workbench.train.data,
the same corpus as tiny-moe; `[lm] corpus` or WORKBENCH_DATA / ../shared/data) with a BPE tokenizer
trained once per experiment (out/tokenizer.json). Evaluation per length n = m × train_length:
held-out next-token loss over all positions and over the positions beyond the training length
(where length generalization shows), NoPE entropy as run / without temperature averaged over the
positions beyond the training length, `ln n` there, and routing balance.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from workbench.experiment.evaluate import NAN, nope_layers
from workbench.instrument.hooks import hooks, intervene
from workbench.train.loop import load_balancing_loss


def _corpus(spec):
    from workbench.train.data import read_corpus
    return read_corpus(spec.task_options["corpus"], spec.task_options["heldout_frac"])


def _tokenizer(spec, out: Path):
    from workbench.train.recipe import get_tokenizer
    return get_tokenizer(_corpus(spec), Path(out), spec.task_options["vocab_size"], 0)


def lm_setup(spec, variant, seed: int, out: Path):
    """(tokenizer, train streams, model) for one run."""
    from workbench.experiment.runner import build_variant_model
    from workbench.train.bpe import special_ids
    from workbench.train.data import build_streams

    tok = _tokenizer(spec, out)
    ids = special_ids(tok)
    bos, eos = ids["bos_token_id"], ids["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    train, _ = build_streams(tok, _corpus(spec), bos, eos, seed, synthetic_docs={})
    model = build_variant_model(spec, variant, seed, tok.get_vocab_size())
    model.config.bos_token_id, model.config.eos_token_id = bos, eos
    return tok, train, model


@torch.no_grad()
def evaluate_lm(spec, model, variant, out: Path, progress=None) -> list[dict]:
    from workbench.train.bpe import special_ids
    from workbench.train.data import build_streams, eval_windows

    tok = _tokenizer(spec, out)
    ids = special_ids(tok)
    eos = ids["eos_token_id"][0] if isinstance(ids["eos_token_id"], list) else ids["eos_token_id"]
    _, held = build_streams(tok, _corpus(spec), ids["bos_token_id"], eos, 0, synthetic_docs={})
    L = spec.train_length
    knobs = {k: v for k, v in variant.knobs.items() if k in ("temperature_tuning", "attn_scale", "floor_scale")}
    nope = nope_layers(model)
    rows = []
    with intervene(model, **knobs):
        for n in spec.eval_lengths:
            tot = {"loss": 0.0, "n": 0, "loss_beyond": 0.0, "n_beyond": 0, "ent": 0.0, "ent0": 0.0, "lnn": 0.0,
                   "ne": 0, "bal": [], "lent": []}
            for stream in held.values():
                if len(stream.tokens) <= n + 1:
                    continue
                w = eval_windows(stream, n, max(1, spec.task_options["eval_windows"] * L // n))
                for xy in w.split(1):
                    x, y = xy[:, :-1], xy[:, 1:]
                    ent, ent0, routers = {}, {}, []
                    fns = {}
                    for i in nope:
                        fns[f"model.layers.{i}.self_attn.hook_entropy"] = lambda v, s, i=i, e=ent: e.__setitem__(i, v)
                        fns[f"model.layers.{i}.self_attn.hook_entropy_no_temp"] = \
                            lambda v, s, i=i, e=ent0: e.__setitem__(i, v)
                    if model.config.num_moe_layers:
                        fns["model.layers.*.feed_forward.hook_router_logits"] = lambda v, s, r=routers: r.append(v)
                    with hooks(model, fns):
                        lg = model(x, attn_stats=bool(nope)).logits.float()
                    ce = torch.nn.functional.cross_entropy(lg[0], y[0], reduction="none")
                    tot["loss"] += float(ce.sum())
                    tot["n"] += ce.numel()
                    tot["loss_beyond"] += float(ce[L:].sum())
                    tot["n_beyond"] += ce[L:].numel()
                    sel = slice(L, None) if n > L else slice(None)
                    for i in nope:
                        tot["ent"] += float(ent[i][0, :, sel].mean(0).sum())
                        tot["ent0"] += float(ent0[i][0, :, sel].mean(0).sum())
                        pos = torch.arange(n)[sel]
                        tot["lnn"] += float(torch.log(pos.float() + 1).sum())
                        tot["ne"] += pos.numel()
                    E = model.config.num_local_experts
                    for r in routers:
                        tot["bal"].append(float(load_balancing_loss(r, model.config.num_experts_per_tok)))
                        f = torch.bincount(r.argmax(-1), minlength=E).float() / r.shape[0]
                        tot["lent"].append(float(-(f[f > 0] * f[f > 0].log()).sum() / math.log(E)) if E > 1 else 1.0)
            if tot["n"] == 0:
                raise ValueError(f"no held-out domain text has {n + 1} tokens for evaluation length {n}")
            rows.append({"length": n, "multiple": n / L, "loss": tot["loss"] / tot["n"],
                         "loss_beyond": tot["loss_beyond"] / tot["n_beyond"] if tot["n_beyond"] else NAN,
                         "entropy": tot["ent"] / tot["ne"] if tot["ne"] else NAN,
                         "entropy_no_temp": tot["ent0"] / tot["ne"] if tot["ne"] else NAN,
                         "ln_n": tot["lnn"] / tot["ne"] if tot["ne"] else NAN,
                         "balance": sum(tot["bal"]) / len(tot["bal"]) if tot["bal"] else NAN,
                         "load_entropy": sum(tot["lent"]) / len(tot["lent"]) if tot["lent"] else NAN})
            if progress is not None:
                progress.update(1)
    return rows

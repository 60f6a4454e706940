"""Evaluate one trained model at 1…32 × its training length, under given inference knobs.

Per length n (fresh data from a generator seeded by (seed, n), identical across variants):

* `acc`             recall accuracy on the task.json layout (argmax at every answer position)
* `acc_first`       the same on each sequence's first query only: later queries can be answered by
                    elimination (the values not yet used) when queries = pairs; the first cannot
* `acc_distractor`  the same with distractor pairs in the haystack ([eval] distractor_density)
* `acc_needle`      one planted pair, one query, the needle at evenly spread depths
* `entropy`, `entropy_no_temp`   NoPE-layer attention entropy (nats) at the answer positions,
                    as run and with temperature tuning off, from the fused attention statistics
                    (one pass; mean over NoPE layers and heads); `ln_n` = ln(keys visible) there
* `key_mass`        attention mass the NoPE layers put on the queried pair (its key and value
                    tokens), for the head that puts most there, mean over queries
* `balance`, `load_entropy`   routing: Switch E·Σf·P (1 = uniform) and H(f)/ln E, mean over MoE layers
* `loss`            answer-position cross-entropy (nats)

With no NoPE layer the entropy / mass fields are NaN. All inference knobs are applied with
`intervene` and restored afterwards.
"""

from __future__ import annotations

import math

import torch

from workbench.experiment.recall import RecallTask
from workbench.instrument.hooks import hooks, intervene
from workbench.train.loop import load_balancing_loss

NAN = float("nan")


def nope_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if not layer.self_attn.use_rope]


def _eval_gen(seed: int, length: int, kind: str) -> torch.Generator:
    """Evaluation data depend on (seed, length, kind) only: every variant sees the same sequences."""
    code = {"clean": 1, "dist": 2, "needle": 3}[kind]
    return torch.Generator().manual_seed((10_007 * seed + 7919 * length + code) & 0x7FFFFFFF)


@torch.no_grad()
def _forward_stats(model, x, y, pair_pos, nope: list[int], want_stats: bool):
    """One forward pass: answer accuracy/loss, NoPE entropies and key mass at answer positions, routing."""
    ans = (y >= 0)
    B, T = x.shape
    qs, ks, ent, ent0, routers = {}, {}, {}, {}, []
    fns = {"model.layers.*.feed_forward.hook_router_logits": lambda v, _s: routers.append(v)} \
        if any(layer.is_moe for layer in model.model.layers) else {}
    if want_stats and nope:
        for i in nope:
            p = f"model.layers.{i}.self_attn."
            fns[p + "hook_q"] = lambda v, s, i=i: qs.__setitem__(i, v)
            fns[p + "hook_k"] = lambda v, s, i=i: ks.__setitem__(i, v)
            fns[p + "hook_entropy"] = lambda v, s, i=i: ent.__setitem__(i, v)
            fns[p + "hook_entropy_no_temp"] = lambda v, s, i=i: ent0.__setitem__(i, v)
    with hooks(model, fns):
        logits = model(x, attn_stats=want_stats and bool(nope)).logits
    lg = logits[ans].float()
    tgt = y[ans]
    first = ans.float().argmax(1)                                  # each sequence's first answer position
    rows_B = torch.arange(B)
    first_ok = logits[rows_B, first].argmax(-1) == y[rows_B, first]
    out = {"correct": int((lg.argmax(-1) == tgt).sum()), "n": int(tgt.numel()),
           "first_correct": int(first_ok.sum()), "first_n": B,
           "loss_sum": float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum"))}
    if routers:
        E = routers[0].shape[-1]
        k = model.config.num_experts_per_tok
        bal, lent = [], []
        for r in routers:
            bal.append(float(load_balancing_loss(r, k)))
            ids = torch.topk(r, k, dim=-1).indices.reshape(-1)
            f = torch.bincount(ids, minlength=E).float() / ids.numel()
            lent.append(float(-(f[f > 0] * f[f > 0].log()).sum() / math.log(E)) if E > 1 else 1.0)
        out["balance"], out["load_entropy"] = sum(bal) / len(bal), sum(lent) / len(lent)
    if want_stats and nope:
        pos_BQ = torch.stack([torch.nonzero(a).squeeze(1) for a in ans])           # (B, Q) answer positions
        e_run = torch.stack([ent[i].gather(2, pos_BQ[:, None].expand(-1, ent[i].shape[1], -1)) for i in nope])
        e_no = torch.stack([ent0[i].gather(2, pos_BQ[:, None].expand(-1, ent0[i].shape[1], -1)) for i in nope])
        out["entropy_sum"], out["entropy_no_temp_sum"] = float(e_run.mean((0, 2)).sum()), float(e_no.mean((0, 2)).sum())
        out["ent_n"] = int(pos_BQ.numel())
        mass = []
        for i in nope:
            q, k = qs[i], ks[i]                                   # (B, T, H, Dh), (B, T, Hkv, Dh)
            H, Hkv, Dh = q.shape[2], k.shape[2], q.shape[3]
            k = k.repeat_interleave(H // Hkv, dim=2)
            qa = q[torch.arange(B)[:, None], pos_BQ]              # (B, Q, H, Dh)
            s = torch.einsum("bqhd,bthd->bqht", qa.float(), k.float()) * Dh ** -0.5
            vis = torch.arange(T)[None, None, :] <= pos_BQ[:, :, None]                 # causal
            s = s.masked_fill(~vis[:, :, None, :], float("-inf"))
            a = torch.softmax(s, -1)
            kp = pair_pos[:, :, None, None]
            m = a.gather(3, kp.expand(-1, -1, H, 1)) + a.gather(3, (kp + 1).expand(-1, -1, H, 1))
            mass.append(m.squeeze(-1))                            # (B, Q, H)
        out["key_mass_sum"] = float(torch.cat(mass, -1).amax(-1).sum())
        out["ln_n_sum"] = float(torch.log((pos_BQ + 1).float()).sum())
    return out


def _accumulate(model, batches, nope, want_stats):
    tot: dict[str, float] = {}
    for x, y, pp in batches:
        r = _forward_stats(model, x, y, pp, nope, want_stats)
        for k, v in r.items():
            if k in ("balance", "load_entropy"):
                tot[k + "_sum"] = tot.get(k + "_sum", 0.0) + v
                tot["routing_batches"] = tot.get("routing_batches", 0) + (k == "balance")
            else:
                tot[k] = tot.get(k, 0) + v
    return tot


def _batches(task: RecallTask, n: int, length: int, bs: int, gen: torch.Generator, **kw):
    out, left = [], n
    while left > 0:
        b = min(bs, left)
        out.append(task.batch(b, length, gen, **kw))
        left -= b
    return out


@torch.no_grad()
def evaluate_recall(model, task: RecallTask, lengths: list[int], ev: dict, knobs: dict | None = None,
                    seed: int = 0, progress=None) -> list[dict]:
    """One row per length (see the module docstring); `knobs`: temperature_tuning/attn_scale/floor_scale."""
    knobs = {k: v for k, v in (knobs or {}).items() if k in ("temperature_tuning", "attn_scale", "floor_scale")}
    nope = nope_layers(model)
    rows = []
    was = model.training
    model.eval()
    with intervene(model, **knobs):
        for length in lengths:
            bs = max(1, min(ev["batch"], (ev["batch"] * 512) // length))
            clean = _accumulate(model, _batches(task, ev["sequences"], length, bs, _eval_gen(seed, length, "clean")),
                                nope, True)
            dist = _accumulate(model, _batches(task, ev["sequences"], length, bs, _eval_gen(seed, length, "dist"),
                                               distractor_density=ev["distractor_density"]), nope, False)
            gen = _eval_gen(seed, length, "needle")
            nb = [task.batch(1, length, gen, pairs=1, queries=1,
                             needle_depth=(j + 0.5) / ev["needle_sequences"]) for j in range(ev["needle_sequences"])]
            needle = _accumulate(model, [tuple(torch.cat(t) for t in zip(*nb[i:i + bs]))
                                         for i in range(0, len(nb), bs)], nope, False)
            row = {"length": length, "multiple": length / task.train_length,
                   "acc": clean["correct"] / clean["n"], "acc_first": clean["first_correct"] / clean["first_n"],
                   "acc_distractor": dist["correct"] / dist["n"],
                   "acc_needle": needle["correct"] / needle["n"], "loss": clean["loss_sum"] / clean["n"],
                   "entropy": NAN, "entropy_no_temp": NAN, "key_mass": NAN, "ln_n": NAN,
                   "balance": NAN, "load_entropy": NAN}
            if "ent_n" in clean:
                n = clean["ent_n"]
                row |= {"entropy": clean["entropy_sum"] / n, "entropy_no_temp": clean["entropy_no_temp_sum"] / n,
                        "key_mass": clean["key_mass_sum"] / n, "ln_n": clean["ln_n_sum"] / n}
            if clean.get("routing_batches"):
                rb = clean["routing_batches"]
                row |= {"balance": clean["balance_sum"] / rb, "load_entropy": clean["load_entropy_sum"] / rb}
            rows.append(row)
            if progress is not None:
                progress.update(1)
    model.train(was)
    return rows

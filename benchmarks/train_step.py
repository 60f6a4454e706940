"""The experiment trainer's speed: tokens/s of one training step (forward, answers-only loss + load
balance, backward, clip, fused AdamW) for each trained variant of a spec, alternating in one run, and a
torch-profiler breakdown of the first variant's step.

    python benchmarks/train_step.py [--spec experiments/irope.toml] [--steps 12] [--threads 1] [--write]

Ratios only mean something within one run on one machine; the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, pin_threads, time_alternating, write_section  # noqa: E402


def make_step(spec, variant, seed=0):
    from workbench.experiment.runner import _recall_fns, build_variant_model, settings_for
    from workbench.train.loop import make_optimizer, train_step

    task = spec.recall_task()
    model = build_variant_model(spec, variant, seed, task.vocab_size)
    model.train()
    s = settings_for(spec, seed)
    opt = make_optimizer(model, s)
    batch_fn, loss_fn = _recall_fns(spec, task, s)
    batch = batch_fn(0)
    state = {"step": 0}

    def step():
        train_step(model, opt, batch, state["step"], s, loss_fn)
        state["step"] += 1

    return step, batch[0].numel()


def main(argv=None) -> int:
    from workbench.experiment.spec import load_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(Path(__file__).resolve().parents[1] / "experiments" / "irope.toml"))
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (alternating)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="rewrite the experiment-trainer section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    torch.set_flush_denormal(True)
    spec = load_spec(args.spec)
    trained = [v for v in spec.variants if v.trained]
    steps, tokens = {}, {}
    for v in trained:
        steps[v.name], tokens[v.name] = make_step(spec, v)
    load0 = os.getloadavg()[0]
    t = time_alternating(steps, repeats=args.steps, warmup=2)
    load1 = os.getloadavg()[0]
    base = trained[0].name
    rows = []
    for v in trained:
        med = t.median(v.name)
        rows.append([v.name, f"{med * 1e3:.0f}", f"{tokens[v.name] / med:.0f}", f"{med / t.median(base):.2f}"])
    # profile of the first variant's step
    from torch.profiler import ProfilerActivity, profile
    step = steps[base]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            step()
    ka = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ka)
    prof_rows = [[e.key[:60], f"{100 * e.self_cpu_time_total / total:.1f} %", e.count // 4] for e in ka[:10]]
    info = machine_info()
    body = ["## Experiment trainer (`workbench experiment run`): tokens/s per training step\n",
            f"`python benchmarks/train_step.py --write` on {info.get('cpu', '?')}, {args.threads} thread(s), "
            f"spec `{Path(args.spec).name}` (batch {spec.train['batch_size']} × {spec.train_length} tokens, "
            f"answers-only loss, fused AdamW); median of {args.steps} alternating steps per variant; load "
            f"average {load0:.1f} → {load1:.1f} (a shared machine: compare the ratios, not the absolute times).\n",
            markdown_table(["variant", "ms / step", "tokens/s", f"× {base}"], rows), "",
            f"Profile of one `{base}` step (self CPU time, top 10 ops; calls per step):\n",
            markdown_table(["op", "share", "calls"], prof_rows)]
    text = "\n".join(body)
    print(text)
    if args.write:
        write_section("experiment-trainer", text, "Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

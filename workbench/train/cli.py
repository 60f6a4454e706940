"""`workbench train …` subcommands (wired into `workbench/cli.py` with `add_train_parser(sub)`).

    workbench train run --out workbench/models/tiny-moe [--corpus DIR] [--steps N] …   train + export + evaluate
    workbench train eval workbench/models/tiny-moe [--corpus DIR] [--json]             the model card's tables
    workbench train vlm --out DIR [--steps N] …                               train + export + evaluate tiny-vlm
    workbench train eval-vlm DIR [--json]                                     tiny-vlm accuracy + pointing game

A run keeps its resumable state (optimizer, history, tokenizer) in --work-dir (default
runs/train/<out name>); rerunning the same command resumes from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Every numeric option, checked before any work starts: (minimum, maximum), None = unbounded.
_INT_LIMITS = {"steps": (1, None), "batch_size": (1, None), "seq_len": (1, None), "warmup": (0, None),
               "eval_every": (1, None), "ckpt_every": (1, None), "eval_windows": (1, None),
               "threads": (1, 1024), "seed": (0, 2 ** 63 - 1), "vocab_size": (384, 2 ** 31 - 1),
               "kv_digits": (1, 18), "easy_steps": (0, None), "vision_steps": (0, None),
               "eval_questions": (1, None), "pointing_questions": (0, None), "ig_steps": (1, None),
               "windows": (1, None), "retrieval_docs": (0, None)}
_FLOAT_LIMITS = {"lr": (0.0, False), "grad_clip": (0.0, False), "aux_coef": (0.0, True), "z_coef": (0.0, True)}


def check_options(args) -> None:
    """ValueError naming the first option out of range (`--steps -5`, `--batch-size 0`, a 40-digit
    `--seed`, `--lr nan`, `--heldout-frac 2`, `--out` an existing file) before training starts."""
    import math

    for name, (lo, hi) in _INT_LIMITS.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if v < lo or (hi is not None and v > hi):
            shown = v if abs(v) < 10 ** 20 else f"{str(v)[:8]}… ({len(str(abs(v)))} digits)"
            raise ValueError(f"--{name.replace('_', '-')} must be " + (f"in [{lo}, {hi}]" if hi is not None
                             else f"≥ {lo}") + f", got {shown}")
    for name, (lo, inclusive) in _FLOAT_LIMITS.items():
        v = getattr(args, name, None)
        if v is not None and (not math.isfinite(v) or v < lo or (v == lo and not inclusive)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {'≥' if inclusive else '>'} {lo}, "
                             f"got {v}")
    for name in ("heldout_frac", "kv_weight"):
        v = getattr(args, name, None)
        if v is not None and not (0.0 < v < 1.0):
            raise ValueError(f"--{name.replace('_', '-')} must lie strictly between 0 and 1, got {v}")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is an existing file; the checkpoint is a directory: choose another --out")
    save_dtype = getattr(args, "save_dtype", None)
    if save_dtype is not None and save_dtype not in ("fp32", "bf16", "float32", "bfloat16", "fp16", "float16"):
        raise ValueError(f"--save-dtype must be fp32, bf16 or fp16, got {save_dtype!r}")


def cmd_train_run(args) -> int:
    from workbench.train.loop import TrainSettings
    from workbench.train.recipe import DOMAIN_WEIGHTS, report_markdown, run

    check_options(args)

    s = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=args.warmup, grad_clip=args.grad_clip, aux_coef=args.aux_coef, z_coef=args.z_coef,
                      seed=args.seed, eval_every=args.eval_every, eval_windows=args.eval_windows,
                      ckpt_every=args.ckpt_every, threads=args.threads,
                      weights=dict(DOMAIN_WEIGHTS))
    work = Path(args.work_dir) if args.work_dir else Path("runs") / "train" / Path(args.out).name
    weights = dict(DOMAIN_WEIGHTS)
    if args.kv_weight is not None:      # renormalise the others so the weights still sum to 1
        rest = 1.0 - weights["kv"]
        weights = {d: (args.kv_weight if d == "kv" else w * (1.0 - args.kv_weight) / rest) for d, w in weights.items()}
    s.weights = weights
    res = run(args.out, work, args.corpus, s, vocab_size=args.vocab_size, heldout_frac=args.heldout_frac,
              save_dtype=args.save_dtype, progress=not args.quiet, evaluate=not args.no_eval,
              kv_digits=args.kv_digits)
    print(f"trained {s.steps} steps in {res['train_wall_seconds']:.0f} s; final train "
          + ", ".join(f"{k} {v:.4f}" for k, v in res["final_train"].items()) + f"; wrote {args.out}")
    if "report" in res:
        print(report_markdown(res["report"]))
    return 0


def cmd_train_eval(args) -> int:
    from workbench.train.recipe import evaluate_dir, report_markdown

    check_options(args)
    rep = evaluate_dir(args.model, args.corpus, args.heldout_frac, args.seq_len, windows=args.windows,
                       retrieval_docs=args.retrieval_docs, seed=args.seed, threads=args.threads)
    print(json.dumps(rep, indent=2) if args.json else report_markdown(rep))
    return 0


def cmd_train_vlm(args) -> int:
    from workbench.train.loop import TrainSettings
    from workbench.train.vlm import report_markdown, run

    check_options(args)
    s = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=0, lr=args.lr, warmup=args.warmup,
                      aux_coef=args.aux_coef, seed=args.seed, eval_every=args.eval_every,
                      ckpt_every=args.ckpt_every, threads=args.threads)
    work = Path(args.work_dir) if args.work_dir else Path("runs") / "train" / Path(args.out).name
    res = run(args.out, work, s, eval_per_type=args.eval_questions, pointing_per_type=args.pointing_questions,
              progress=not args.quiet, evaluate=not args.no_eval, easy_steps=args.easy_steps,
              vision_steps=args.vision_steps)
    print(f"trained {s.steps} steps in {res['train_wall_seconds']:.0f} s; wrote {args.out}")
    if "report" in res:
        print(report_markdown(res["report"]))
    return 0


def cmd_train_eval_vlm(args) -> int:
    from workbench.train.vlm import evaluate_dir, report_markdown

    check_options(args)
    rep = evaluate_dir(args.model, args.eval_questions, args.pointing_questions, steps=args.ig_steps,
                       progress=not args.json, threads=args.threads)
    print(json.dumps(rep, indent=2) if args.json else report_markdown(rep))
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` (with `run` and `eval`) to a `workbench` subparsers object."""
    p = subparsers.add_parser("train", help="train a reference model (tiny-moe, tiny-vlm) on CPU, or evaluate it")
    sub = p.add_subparsers(dest="train_cmd", required=True)

    def common(sp):
        sp.add_argument("--corpus", default=None,
                        help="directory with arxiv/c4/github/wikipedia.txt (default ../shared/data/domain_texts)")
        sp.add_argument("--heldout-frac", type=float, default=0.1, help="last fraction of each file held out")
        sp.add_argument("--seq-len", type=int, default=256)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=2, help="torch CPU threads")

    r = sub.add_parser("run", help="train the tiny-moe recipe and export a HF checkpoint")
    r.add_argument("--out", required=True, help="output checkpoint directory (config.json, model.safetensors, …)")
    r.add_argument("--work-dir", default=None, help="resumable state (default runs/train/<out name>)")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--warmup", type=int, default=30)
    r.add_argument("--grad-clip", type=float, default=1.0)
    r.add_argument("--aux-coef", type=float, default=0.01, help="Switch load-balance weight (E·Σ f_i P_i)")
    r.add_argument("--z-coef", type=float, default=0.0, help="router z-loss weight (ST-MoE: 1e-3)")
    r.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary incl. 128 special tokens")
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--ckpt-every", type=int, default=50)
    r.add_argument("--save-dtype", default="fp32", help="fp32 | bf16 weights in model.safetensors")
    r.add_argument("--no-eval", action="store_true", help="skip the final evaluation report")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--eval-windows", type=int, default=4, help="held-out windows per domain at each periodic eval")
    r.add_argument("--kv-digits", type=int, default=4, help="digits of keys/values in the retrieval documents")
    r.add_argument("--kv-weight", type=float, default=None, help="sampling weight of kv retrieval windows "
                   "(default 0.15; the other domains are rescaled)")
    common(r)
    r.set_defaults(fn=cmd_train_run)

    e = sub.add_parser("eval", help="held-out loss vs unigram, domain specialization, retrieval at 1–16× length")
    e.add_argument("model", help="checkpoint directory written by `train run`")
    e.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    e.add_argument("--retrieval-docs", type=int, default=20, help="documents per length and setting")
    e.add_argument("--json", action="store_true")
    common(e)
    e.set_defaults(fn=cmd_train_eval)

    v = sub.add_parser("vlm", help="train the tiny-vlm on synthetic scenes and export a HF checkpoint")
    v.add_argument("--out", required=True, help="output checkpoint directory")
    v.add_argument("--work-dir", default=None, help="resumable state (default runs/train/<out name>)")
    v.add_argument("--steps", type=int, default=5000)
    v.add_argument("--easy-steps", type=int, default=300, help="curriculum: single-object scenes for this many steps")
    v.add_argument("--vision-steps", type=int, default=1500,
                   help="stage 0: pretrain the vision tower on per-token object attributes (0 = skip)")
    v.add_argument("--batch-size", type=int, default=32, help="questions (scenes) per step")
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--warmup", type=int, default=100)
    v.add_argument("--aux-coef", type=float, default=0.01, help="Switch load-balance weight (E·Σ f_i P_i)")
    v.add_argument("--eval-every", type=int, default=250)
    v.add_argument("--ckpt-every", type=int, default=100)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    v.add_argument("--no-eval", action="store_true", help="skip the final evaluation report")
    v.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval-vlm", help="tiny-vlm: held-out accuracy per question type and the pointing game")
    ev.add_argument("model", help="checkpoint directory written by `train vlm`")
    ev.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps in the pointing game")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    for sp in (v, ev):
        sp.add_argument("--eval-questions", type=int, default=200, help="held-out questions per type")
        sp.add_argument("--pointing-questions", type=int, default=40,
                        help="colour and shape questions each in the pointing game")
    v.set_defaults(fn=cmd_train_vlm)
    ev.set_defaults(fn=cmd_train_eval_vlm)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m workbench.train.cli run …` — the same as `workbench train run …`."""
    import sys

    p = argparse.ArgumentParser(prog="python -m workbench.train.cli")
    add_train_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""`workbench experiment …` (wired into `workbench/cli.py` with `add_experiment_parser(sub)`).

    workbench experiment run experiments/irope.toml --out runs/exp/irope [--only VARIANT …]
    workbench experiment report runs/exp/irope          tables, figures, metrics.zarr in DIR/report/
    workbench experiment check experiments/irope.toml   validate a spec (nothing is trained)
    workbench experiment export runs/exp/irope --variant irope --seed 0 --out DIR   one run as a model
                                                        with task.json, eval.json and a model card
"""

from __future__ import annotations

import argparse


def cmd_run(args) -> int:
    from workbench.experiment.runner import run_experiment
    from workbench.experiment.spec import load_spec

    spec = load_spec(args.spec)
    out = run_experiment(spec, args.out, only=args.only, progress=not args.quiet, report=not args.no_report)
    rep = out / "report" / "report.md"
    print(f"experiment {spec.name!r}: results in {out}" + (f"; report {rep}" if rep.exists() else ""))
    return 0


def cmd_report(args) -> int:
    from workbench.experiment.report import write_report

    md = write_report(args.dir, png=not args.no_png)
    print(md.read_text() if args.print else f"wrote {md} (tables, CSV, figures, metrics.zarr in {md.parent})")
    return 0


def cmd_check(args) -> int:
    from workbench.experiment.spec import load_spec

    spec = load_spec(args.spec)
    trained = [v.name for v in spec.variants if v.trained]
    print(f"{args.spec}: ok — {len(spec.variants)} variants ({len(trained)} trained × {len(spec.seeds)} seeds = "
          f"{len(trained) * len(spec.seeds)} training runs of {spec.train['steps']} steps), evaluation lengths "
          f"{spec.eval_lengths}")
    return 0


def cmd_export(args) -> int:
    from workbench.experiment.export import export_run

    out = export_run(args.dir, args.variant, args.seed, args.out, study=args.study)
    ev = __import__("json").loads((out / "eval.json").read_text())["fresh_eval"]["temperature_on"][0]
    print(f"wrote {out}: accuracy at the training length on fresh task.json data {ev['acc']:.3f}")
    return 0


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("experiment", help="train tiny Llama 4 variants side by side from a TOML spec, "
                              "and compare them")
    sub = p.add_subparsers(dest="experiment_cmd", required=True)
    r = sub.add_parser("run", help="train every variant × seed (resumable) and evaluate at 1…32× the training length")
    r.add_argument("spec", help="experiment spec (TOML), e.g. experiments/irope.toml")
    r.add_argument("--out", required=True, help="experiment directory (rerun the same command to resume)")
    r.add_argument("--only", action="append", default=None, metavar="VARIANT",
                   help="run only this variant (repeatable); a variant evaluated 'from' another trains that one")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report", help="tables (markdown, CSV), plotly figures (HTML, PNG), metrics.zarr")
    rep.add_argument("dir", help="experiment directory written by `experiment run`")
    rep.add_argument("--no-png", action="store_true", help="HTML figures only")
    rep.add_argument("--print", action="store_true", help="print report.md")
    rep.set_defaults(fn=cmd_report)
    c = sub.add_parser("check", help="validate a spec without training")
    c.add_argument("spec")
    c.set_defaults(fn=cmd_check)
    e = sub.add_parser("export", help="one trained run as a checkpoint with task.json, eval.json and TRAINING.md")
    e.add_argument("dir", help="experiment directory")
    e.add_argument("--variant", required=True)
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--out", required=True, help="checkpoint directory to write")
    e.add_argument("--study", default=None, help="experiment directory whose tables the model card shows "
                   "(default: DIR)")
    e.set_defaults(fn=cmd_export)
    return p

"""Architecture experiments: train tiny Llama 4 variants side by side from a TOML spec and compare them.

    from workbench.experiment import load_spec, run_experiment, write_report, open_metrics
    run_experiment("experiments/irope.toml", "runs/exp/irope")     # resumable; only=... for some variants
    write_report("runs/exp/irope")                                  # report/: md, CSV, figures, metrics.zarr
    ds = open_metrics("runs/exp/irope")                             # xarray Dataset, spec + versions in attrs

Files: spec (TOML → validated ExperimentSpec), recall (the associative-recall task and task.json),
runner (train + evaluate, resumable), evaluate (recall metrics per length), lm (domain-text task),
report (tables, figures, Zarr), export (one run as a checkpoint with a model card), cli.
"""

from workbench.experiment.recall import RecallTask, TaskError, task_for_model
from workbench.experiment.report import load_results, open_metrics, write_report
from workbench.experiment.runner import eval_run, run_experiment, train_run
from workbench.experiment.spec import ExperimentSpec, SpecError, load_spec, parse_spec

__all__ = ["RecallTask", "TaskError", "task_for_model", "load_results", "open_metrics", "write_report", "eval_run",
           "run_experiment", "train_run", "ExperimentSpec", "SpecError", "load_spec", "parse_spec"]

"""Export one trained run of an experiment as a self-describing checkpoint (how `tiny-irope` ships).

    workbench experiment export runs/exp/irope --variant irope --seed 0 --out workbench/models/tiny-irope

writes the HF checkpoint (config.json, model.safetensors, tokenizer.json), `task.json` (the task
format, enough to draw fresh evaluation data), `eval.json` (a fresh evaluation of this model on
task.json data at 1–32 × the training length, temperature on/off) and `TRAINING.md`, the model card
with the study's tables (from the experiment's report) and the exported model's own numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def fresh_evaluation(model_dir: str | Path, lengths_mult=(1, 2, 4, 8, 16, 32), sequences: int = 64,
                     seed: int = 12345, distractor_density: float = 0.05) -> dict:
    """Accuracy, NoPE entropy as run / no temperature and ln n per length, temperature on and off,
    on data drawn per the directory's task.json with a seed no training or study run used."""
    import workbench
    from workbench.experiment.evaluate import evaluate_recall
    from workbench.experiment.recall import RecallTask

    model_dir = Path(model_dir)
    task = RecallTask.load(model_dir / "task.json")
    model = workbench.load_model(str(model_dir), dtype="fp32", device="cpu")
    ev = {"sequences": sequences, "needle_sequences": 16, "distractor_density": distractor_density, "batch": 8}
    lengths = [m * task.train_length for m in lengths_mult]
    out = {"seed": seed, "sequences_per_length": sequences, "queries_per_sequence": task.queries,
           "floor_scale": model.config.floor_scale, "attn_scale": model.config.attn_scale}
    for name, knobs in (("temperature_on", {"temperature_tuning": True}),
                        ("temperature_off", {"temperature_tuning": False})):
        out[name] = evaluate_recall(model, task, lengths, ev, knobs, seed=seed)
    return out


def card_table(ev: dict) -> str:
    on = {r["length"]: r for r in ev["temperature_on"]}
    off = {r["length"]: r for r in ev["temperature_off"]}
    rows = ["| length | × train | acc (temp on) | acc (off) | distractors on | distractors off | "
            "NoPE entropy as run | entropy, no temperature | ln n | key mass on | key mass off |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(on):
        a, b = on[n], off[n]
        rows.append(f"| {n} | {a['multiple']:g} | {a['acc']:.3f} | {b['acc']:.3f} | {a['acc_distractor']:.3f} | "
                    f"{b['acc_distractor']:.3f} | {a['entropy']:.3f} | {a['entropy_no_temp']:.3f} | {a['ln_n']:.3f} | "
                    f"{a['key_mass']:.3f} | {b['key_mass']:.3f} |")
    return "\n".join(rows)


def export_run(exp_dir: str | Path, variant: str, seed: int, out: str | Path, title: str | None = None,
               study: str | Path | None = None) -> Path:
    """Copy run (variant, seed) of experiment `exp_dir` to `out` with task.json, eval.json, TRAINING.md
    (whose tables come from the experiment `study`, default `exp_dir`)."""
    from workbench.experiment.report import load_results, markdown_tables
    from workbench.experiment.runner import run_dir

    exp_dir, out = Path(exp_dir), Path(out)
    res = load_results(exp_dir)
    spec = res["spec"]
    v = spec.variant(variant)
    if not v.trained:
        raise ValueError(f"variant {variant!r} is evaluated 'from' {v.parent!r}; export the trained variant")
    if spec.task != "recall":
        raise ValueError(f"export writes a recall task.json; experiment {spec.name!r} has task {spec.task!r}")
    src = run_dir(exp_dir, variant, seed)
    if not (src / "done.json").is_file():
        raise FileNotFoundError(f"{src}: run not finished (no done.json); run the experiment first")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy2(src / "model" / f, out / f)
    spec.recall_task().save(out / "task.json")
    shutil.copy2(src / "history.json", out / "loss_curve.json")
    torch.set_num_threads(spec.train["threads"])
    ev = fresh_evaluation(out, spec.eval_multiples, distractor_density=spec.eval["distractor_density"])
    done = json.loads((src / "done.json").read_text())
    (out / "eval.json").write_text(json.dumps({"experiment": spec.name, "variant": variant, "seed": seed,
                                               "training": done, "knobs": v.knobs, "fresh_eval": ev}, indent=2))
    study_res = load_results(study) if study is not None else res
    on = ev["temperature_on"]
    first = on[0]
    beyond = [r for r in on if r["length"] > v.knobs["floor_scale"]]
    lower = all(r["entropy"] < r["entropy_no_temp"] for r in beyond)
    title = title or out.name
    md = [f"# {title}: Llama 4 iRoPE, trained on associative recall\n",
          f"Variant `{variant}`, seed {seed} of the experiment `{spec.name}` (`experiments/{spec.name}.toml`; "
          f"study and reading in `docs/experiments/{study_res['spec'].name}.md`). Knobs: "
          + ", ".join(f"{k}={json.dumps(x)}" for k, x in v.knobs.items()) + ".\n",
          f"Trained {done['steps']} steps × batch {spec.train['batch_size']} × {spec.train_length} tokens on CPU "
          f"({done['train_seconds_in_steps']:.0f} s in steps, {done['tokens_per_second']:.0f} tokens/s); final "
          f"answer loss {done['final_loss']:.4f} nats.\n",
          "`task.json` describes the task format completely; draw fresh data with "
          "`workbench.experiment.recall.RecallTask.load(path).batch(n, length, generator)`.\n",
          f"## This model on fresh task.json data (seed {ev['seed']}, {ev['sequences_per_length']} sequences × "
          f"{ev['queries_per_sequence']} queries per length)\n",
          f"Accuracy at the training length: **{first['acc']:.3f}**. NoPE entropy with temperature on is "
          f"{'below' if lower else 'NOT below'} the entropy without it at every length beyond floor_scale = "
          f"{v.knobs['floor_scale']}.\n", card_table(ev), "",
          f"## The study `{study_res['spec'].name}` (all variants, mean ± sd over seeds)\n",
          markdown_tables(study_res).split("\n", 1)[1]]
    (out / "TRAINING.md").write_text("\n".join(md) + "\n")
    return out

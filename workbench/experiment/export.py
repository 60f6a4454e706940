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
                        ("temperature_off", {"temperature_tuning": False}),
                        (f"attn_scale_{STRONG_SCALE:g}", {"temperature_tuning": True, "attn_scale": STRONG_SCALE})):
        out[name] = evaluate_recall(model, task, lengths, ev, knobs, seed=seed)
    return out


STRONG_SCALE = 0.6      # the card's third setting: DroPE's c ≈ 0.4 end of the range, past Llama 4's 0.1


def card_table(ev: dict) -> str:
    """Accuracy (all queries, first query, with distractors), NoPE entropy against ln n and the NoPE mass
    on the queried pair per length: temperature as shipped, off, and (when evaluated) attn_scale 0.6."""
    on = {r["length"]: r for r in ev["temperature_on"]}
    off = {r["length"]: r for r in ev["temperature_off"]}
    strong = {r["length"]: r for r in ev.get(f"attn_scale_{STRONG_SCALE:g}", [])}
    s = f"{STRONG_SCALE:g}"
    rows = ["| length | × train | acc: temp on | off | " + (f"{s} | " if strong else "") + "first query: on | off | "
            "distractors: on | off | NoPE entropy as run | no temperature | " + (f"{s} | " if strong else "")
            + "ln n | mass on queried pair: on | off |" + (f" {s} |" if strong else ""),
            "|" + "---|" * (13 + 3 * bool(strong))]
    for n in sorted(on):
        a, b, c = on[n], off[n], strong.get(n)
        rows.append(f"| {n} | {a['multiple']:g} | {a['acc']:.3f} | {b['acc']:.3f} | "
                    + (f"{c['acc']:.3f} | " if c else "")
                    + f"{a['acc_first']:.3f} | {b['acc_first']:.3f} | {a['acc_distractor']:.3f} | "
                    f"{b['acc_distractor']:.3f} | {a['entropy']:.3f} | {a['entropy_no_temp']:.3f} | "
                    + (f"{c['entropy']:.3f} | " if c else "")
                    + f"{a['ln_n']:.3f} | {a['key_mass']:.3f} | {b['key_mass']:.3f} |"
                    + (f" {c['key_mass']:.3f} |" if c else ""))
    return "\n".join(rows)


def recipe_lines(spec, variant: str, seed: int) -> list[str]:
    """The task, the curricula and the training settings of one run, as the model card states them."""
    t, o, tr = spec.recall_task(), spec.task_options, spec.train
    out = [f"* **Task** (`task.json`): associative recall, {t.pairs} (key, value) pairs planted in a filler haystack, "
           f"{t.queries} queries at the end; keys {list(t.key_ids)}, values {list(t.value_ids)}, filler "
           f"{list(t.filler_ids)} (`[lo, hi)` token ids), BOS {t.bos_id}; training length {t.train_length} tokens; "
           "loss on the answer positions only."]
    if o.get("curriculum_steps") or o.get("curriculum_mix"):
        out.append(f"* **Length curriculum**: {o['curriculum_steps']} steps on {o['curriculum_length']}-token "
                   f"sequences ({o['curriculum_pairs']} pairs, {o['curriculum_queries']} queries), then "
                   f"{o['curriculum_mix']} steps with lengths uniform in [{o['curriculum_length']}, "
                   f"{t.train_length}], then the task itself.")
    if o.get("distractor_density"):
        out.append(f"* **Distractor pairs** (keys never queried) phased in from {o['distractor_start']:.0%} to "
                   f"{o['distractor_full']:.0%} of training, up to {o['distractor_density']:g} pairs per haystack "
                   "token.")
    out.append(f"* **Training**: {tr['steps']} steps × {tr['batch_size']} sequences, AdamW (β 0.9/0.95) lr "
               f"{tr['lr']:g} with {tr['warmup']} warmup steps and cosine decay to {tr['min_lr_frac']:g}×, weight "
               f"decay {tr['weight_decay']:g}, clipping {tr['grad_clip']:g}, Switch load-balance loss "
               f"{tr['aux_coef']:g}, seed {seed}, {tr['threads']} CPU thread(s).")
    out.append(f"* **Reproduce**: `workbench experiment run experiments/{spec.name}.toml --out runs/exp/{spec.name} "
               f"--only {variant}`, then `workbench experiment export runs/exp/{spec.name} --variant {variant} "
               f"--seed {seed} --out DIR` (the batch at step s is a function of (seed, s) alone).")
    return out


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
          "## Recipe\n", *recipe_lines(spec, variant, seed), "",
          f"## This model on fresh task.json data (seed {ev['seed']}, {ev['sequences_per_length']} sequences × "
          f"{ev['queries_per_sequence']} queries per length)\n",
          f"Accuracy at the training length: **{first['acc']:.3f}**. NoPE entropy with temperature on is "
          f"{'below' if lower else 'NOT below'} the entropy without it at every length beyond floor_scale = "
          f"{v.knobs['floor_scale']}. Columns: accuracy over all queries (later queries can be answered by "
          "elimination), on the first query only, and with distractor pairs (0.05 per haystack token); the NoPE "
          "layers' entropy at the answer positions (nats; ln n = the uniform value over the visible keys); the "
          f"NoPE attention mass on the queried (key, value) pair (best head). Settings: temperature as shipped "
          f"(attn_scale {v.knobs['attn_scale']:g}), off, and attn_scale {STRONG_SCALE:g}.\n", card_table(ev), "",
          f"## The study `{study_res['spec'].name}` (all variants, mean ± sd over seeds)\n",
          markdown_tables(study_res).split("\n", 1)[1]]
    (out / "TRAINING.md").write_text("\n".join(md) + "\n")
    return out

"""Write docs/models.md — the evidence for the bundled tiny-moe, tiny-vlm and tiny-irope — from their eval.json,
or recompute the evaluations from the checkpoints first.

    python scripts/model_cards.py                 # tables from workbench/models/*/eval.json
    python scripts/model_cards.py --recompute     # rerun `workbench train eval` / `eval-vlm` first (minutes)

Recomputing tiny-moe needs the domain corpus (../shared/data/domain_texts or --corpus).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workbench.bundled import MODELS_DIR  # noqa: E402
from workbench.train import recipe, vlm  # noqa: E402

HEADER = """# Bundled models

Three small models trained on CPU ship inside the package (`workbench/models/`) and load by name:
`workbench.load_model("tiny-moe")`, `workbench.load_model("tiny-vlm")`, `workbench.load_model("tiny-irope")`
(Llama 4 iRoPE trained on associative recall; `task.json` beside it). They are ordinary Hugging Face
checkpoints (config.json, model.safetensors, tokenizer.json). Each directory holds its model card
(`TRAINING.md`: data, exact command, settings, wall time), `eval.json` and the loss curve.
This page is written by `python scripts/model_cards.py` from those `eval.json` files
(`--recompute` reruns the evaluations from the checkpoints). The numbers are whatever the models
show, good or bad.
"""


def section(name: str, result: dict, markdown) -> str:
    s = result.get("settings", {})
    lines = [f"## {name}", "",
             f"Card: [`workbench/models/{name}/TRAINING.md`](../workbench/models/{name}/TRAINING.md). "
             f"Training: {s.get('steps')} steps × batch {s.get('batch_size')}, lr {s.get('lr')}, seed {s.get('seed')}, "
             f"{s.get('threads')} CPU thread(s); {result.get('train_wall_seconds', 0) / 60:.1f} min wall "
             f"({result.get('train_seconds_in_steps', 0) / 60:.1f} min in steps).", ""]
    if "data" in result:
        lines += [f"Data options: {json.dumps(result['data'])}.", ""]
    lines.append(markdown(result["report"]) if "report" in result else "_No evaluation in eval.json._")
    return "\n".join(lines) + "\n"


def irope_section(result: dict) -> str:
    """tiny-irope: an exported experiment run (workbench.experiment.export), evaluated on fresh task.json data."""
    from workbench.experiment.export import card_table

    d, ev = result["training"], result["fresh_eval"]
    first = ev["temperature_on"][0]
    return "\n".join([
        "## tiny-irope", "",
        "Card: [`workbench/models/tiny-irope/TRAINING.md`](../workbench/models/tiny-irope/TRAINING.md). "
        f"Variant `{result['variant']}`, seed {result['seed']} of the experiment `{result['experiment']}` "
        f"(docs/experiments/irope.md); {d['steps']} steps, {d['train_seconds_in_steps'] / 60:.1f} min in steps "
        "on one CPU thread.", "",
        f"On fresh data drawn per its `task.json` ({ev['sequences_per_length']} sequences × "
        f"{ev['queries_per_sequence']} queries per length, seed {ev['seed']}): accuracy at the training length "
        f"**{first['acc']:.3f}**; NoPE entropy with the temperature on vs off and ln n per length:", "",
        card_table(ev), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recompute", action="store_true", help="rerun the evaluations from the checkpoints")
    p.add_argument("--corpus", default=None, help="domain corpus for tiny-moe (default ../shared/data/domain_texts)")
    p.add_argument("--out", default=str(REPO / "docs" / "models.md"))
    args = p.parse_args(argv)
    parts = [HEADER]
    for name, markdown in (("tiny-moe", recipe.report_markdown), ("tiny-vlm", vlm.report_markdown)):
        path = MODELS_DIR / name / "eval.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: train the model first (see its TRAINING.md)")
        result = json.loads(path.read_text())
        if args.recompute:
            result["report"] = (recipe.evaluate_dir(MODELS_DIR / name, args.corpus) if name == "tiny-moe"
                                else vlm.evaluate_dir(MODELS_DIR / name, progress=True))
            path.write_text(json.dumps(result, indent=2))
        parts.append(section(name, result, markdown))
    path = MODELS_DIR / "tiny-irope" / "eval.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: export the model first (see docs/experiments/irope.md)")
    result = json.loads(path.read_text())
    if args.recompute:
        from workbench.experiment.export import fresh_evaluation
        result["fresh_eval"] = fresh_evaluation(MODELS_DIR / "tiny-irope")
        path.write_text(json.dumps(result, indent=2))
    parts.append(irope_section(result))
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

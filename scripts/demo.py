"""`make demo`: record an example run of the tiny model and an example attribution of the vision
model and the iRoPE study's experiment report into runs/ (once each), then serve the app.

    python scripts/demo.py [--runs runs] [--model tiny-moe] [--vision-model tiny-vlm|none] [--port 7860]
                           [--no-launch]

The default models are the bundled trained `tiny-moe` (experts that specialise by domain) for the
text tabs and `tiny-vlm` (answers questions about synthetic scenes of coloured shapes) for the
Attribution tab and image chat (docs/models.md), shipped inside the package at workbench/models/.

The example attribution explains tiny-vlm's answer to a colour question about a synthetic scene
(`workbench.train.scenes.example("demo", 0, "colour")`) with integrated gradients, feature ablation
and pixel occlusion, stored with its image so the Attribution tab opens on a meaningful heatmap.

The example run holds a few documents per domain — from the OLMoE domain texts when
`$WORKBENCH_DATA/domain_texts` (default ../shared/data) exists, else short built-in snippets — so the
routing explorer's domain views have something to compare.  The app binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))          # `apps` is a top-level folder of the repository

SNIPPETS = {
    "prose": ["The river bends twice before it reaches the old mill, where the water slows and widens. ",
              "She kept the letters in a tin box under the stairs, tied with string, unread for years. "],
    "code": ["def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
             "for (int i = 0; i < n; ++i) { sum += x[i] * w[i]; }\nreturn sum / n;\n"],
    "math": ["Let $f(x) = \\sum_{k=0}^{n} a_k x^k$. Then $f'(x) = \\sum_{k=1}^{n} k a_k x^{k-1}$. ",
             "By Cauchy-Schwarz, $|\\langle u, v\\rangle| \\le \\|u\\| \\|v\\|$ with equality iff u, v are parallel. "],
}


def example_docs(n_per_domain: int = 2, chars: int = 500) -> list[dict]:
    data = Path(os.environ.get("WORKBENCH_DATA", REPO.parent / "shared" / "data")) / "domain_texts"
    docs = []
    if data.is_dir() and any(data.glob("*.txt")):
        for f in sorted(data.glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            for i in range(n_per_domain):
                docs.append({"text": text[i * chars:(i + 1) * chars], "domain": f.stem, "id": f"{f.stem}-{i}"})
    else:
        for dom, texts in SNIPPETS.items():
            for i, t in enumerate(texts):
                docs.append({"text": t * 4, "domain": dom, "id": f"{dom}-{i}"})
    return docs


def ensure_example(runs: Path, model, source: str) -> Path:
    import workbench

    out = runs / f"example-{Path(source).name}.zarr"
    if not (out / "zarr.json").is_file():
        runs.mkdir(parents=True, exist_ok=True)
        print(f"recording an example run into {out} …", flush=True)
        workbench.record(model, example_docs(), out, probes=("router", "router_logits", "entropy", "norms", "sink"),
                         progress=True, model_source=source)
    return out


EXAMPLE_SCENE = ("demo", 0, "colour")             # scenes.example(seed, index, question type)
EXAMPLE_METHODS = ("ig", "ablation", "occlusion")


def ensure_example_attribution(runs: Path, model, source: str, steps: int = 32) -> Path:
    """The example attribution run of `model` on a synthetic scene (written once)."""
    import io
    import threading

    from apps import attribution_views as av
    from workbench.train import scenes

    name = f"example-attribution-{Path(source).name}.zarr"
    out = runs / name
    if name in av.attribution_runs(runs):
        return out
    ex = scenes.example(*EXAMPLE_SCENE)
    buf = io.BytesIO()
    ex.image.save(buf, format="PNG")
    prompt = scenes.prompt_text(ex.question)
    print(f"attributing {source}'s answer {ex.answer!r} to {ex.question!r} into {out} …", flush=True)
    av.write_attribution_run(model, threading.Lock(), runs, name, ex.image, buf.getvalue(), prompt, " " + ex.answer,
                             list(EXAMPLE_METHODS), steps, "mean", model_source=source,
                             written_by="scripts/demo.py (example attribution)")
    return out


EXAMPLE_EXPERIMENT = REPO / "docs" / "experiments" / "irope" / "results"   # the study's results, no weights


def ensure_example_experiment(runs: Path) -> Path | None:
    """The iRoPE study's evaluations (docs/experiments/irope/results: spec + eval/history JSON, no weights)
    copied to runs/experiments/irope with its report (tables, HTML figures, metrics.zarr): seconds, no
    training. The Teach iRoPE tab opens it."""
    import shutil

    from workbench.experiment.report import write_report

    out = runs / "experiments" / "irope"
    if not (EXAMPLE_EXPERIMENT / "spec.json").is_file():
        return out if out.is_dir() else None
    shipped = (EXAMPLE_EXPERIMENT / "spec.json").read_text()
    same = (out / "spec.json").is_file() and (out / "spec.json").read_text() == shipped
    if same and (out / "report" / "report.md").is_file():
        return out
    if out.is_dir() and not same:           # an older study's copy: replace it, never mix two studies' runs
        shutil.rmtree(out)
    shutil.copytree(EXAMPLE_EXPERIMENT, out, dirs_exist_ok=True)
    write_report(out, png=False)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(REPO / "runs"))
    p.add_argument("--model", default="tiny-moe", help="bundled model, preset or checkpoint directory")
    p.add_argument("--vision-model", default="tiny-vlm",
                   help="multimodal model for attribution and image chat ('none': without one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--no-launch", action="store_true", help="only record the example runs")
    args = p.parse_args(argv)
    import workbench

    model = workbench.load_model(args.model)
    ensure_example(Path(args.runs), model, args.model)
    ensure_example_experiment(Path(args.runs))
    vision_source = None if args.vision_model.lower() in ("", "none") else args.vision_model
    try:
        vision = workbench.load_model(vision_source) if vision_source else None
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}\n(run without a vision model: --vision-model none)") from None
    if vision is not None:
        ensure_example_attribution(Path(args.runs), vision, vision_source)
    if args.no_launch:
        return 0
    from apps.workbench_app import build_app, serve

    demo = build_app(model, args.runs, model_source=args.model, vision_model=vision, vision_source=vision_source)
    print(f"Llama 4 Workbench: http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    serve(demo, args.host, args.port, share=False, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

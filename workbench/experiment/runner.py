"""Run an experiment: train every variant × seed (resumable), then evaluate every variant × seed.

    out/
      spec.json, spec.toml            the spec as given (a rerun with a different spec is refused)
      runs/<variant>/seed<k>/
        state.pt                      the trainer's resumable state (deleted once the model is saved)
        model/                        HF checkpoint (config.json, model.safetensors, tokenizer.json)
        history.json                  loss per step
        done.json                     training finished (wall seconds, steps, tokens/s)
        eval.json                     rows per evaluation length (variants `from` another: eval only)

Killed at any point, the same command continues: a run with done.json is not retrained, a run
with state.pt resumes at its last checkpoint (the batch at step s depends on (seed, s) only, so
the resumed run equals an uninterrupted one), and evaluations already written are kept.
Training reuses `workbench.train.loop.train` (AdamW, warmup + cosine, clipping, the Switch
load-balance loss); the recall task's loss counts answer positions only.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from workbench.experiment.recall import RecallTask, answer_loss, layout_length
from workbench.experiment.spec import ExperimentSpec, SpecError, Variant, load_spec, parse_spec

ROUTER_SITE = "model.layers.*.feed_forward.hook_router_logits"


def versions() -> dict[str, str]:
    import numpy
    import zarr

    import workbench
    return {"workbench": getattr(workbench, "__version__", "0.1.0"), "torch": torch.__version__,
            "numpy": numpy.__version__, "zarr": zarr.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


def recall_tokenizer(task: RecallTask):
    """A word-level tokenizer naming every id: <pad> <bos> <eos> …, K0…, V0…, f0…, so decoded
    sequences read as keys, values and filler (saved as tokenizer.json beside the weights)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    names = {0: "<pad>", task.bos_id: "<|begin_of_text|>", 2: "<|end_of_text|>"}
    for prefix, (lo, hi) in (("K", task.key_ids), ("V", task.value_ids), ("f", task.filler_ids)):
        for i in range(lo, hi):
            names[i] = f"{prefix}{i - lo}"
    vocab = {names.get(i, f"<unused{i}>"): i for i in range(task.vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def _curriculum_density(spec: ExperimentSpec, step: int) -> float:
    o, steps = spec.task_options, spec.train["steps"]
    d, a, b = o["distractor_density"], o["distractor_start"], o["distractor_full"]
    if d <= 0 or step < a * steps:
        return 0.0
    return d if b <= a or step >= b * steps else d * (step - a * steps) / ((b - a) * steps)


def _recall_shape(spec: ExperimentSpec, task: RecallTask, step: int, gen: torch.Generator) -> tuple[int, int, int]:
    """(length, pairs, queries) of the training batch at `step` under the length curriculum: short
    sequences first (a tiny model binds keys to values within a few hundred steps at 8 tokens and stays
    on the 'copy some value' plateau for thousands at 16; docs/experiments/irope.md), then lengths
    uniform in [curriculum_length, train_length] with pairs and queries growing in proportion, then the
    task. Drawn from the step's own generator, so a resumed run equals an uninterrupted one."""
    o = spec.task_options
    c, mix = o["curriculum_steps"], o["curriculum_mix"]
    n0, P0, Q0 = o["curriculum_length"], o["curriculum_pairs"], o["curriculum_queries"]
    if step < c:
        return n0, P0, Q0
    if step < c + mix:
        n = int(torch.randint(n0, spec.train_length + 1, (1,), generator=gen))
        f = (n - n0) / max(1, spec.train_length - n0)
        P = min(task.pairs, P0 + int(f * (task.pairs - P0)))
        Q = min(P, task.queries, Q0 + int(f * (task.queries - Q0)))
        while layout_length(P, Q) > n:            # keep the layout inside n tokens
            if Q > Q0:
                Q -= 1
            else:
                P -= 1
        return n, P, Q
    return spec.train_length, task.pairs, task.queries


def settings_for(spec: ExperimentSpec, seed: int):
    from workbench.train.loop import TrainSettings
    t = spec.train
    return TrainSettings(steps=t["steps"], batch_size=t["batch_size"], seq_len=spec.train_length, lr=t["lr"],
                         min_lr_frac=t["min_lr_frac"], warmup=t["warmup"], weight_decay=t["weight_decay"],
                         grad_clip=t["grad_clip"], aux_coef=t["aux_coef"], seed=seed, eval_every=10 ** 9,
                         ckpt_every=t["ckpt_every"], threads=t["threads"])


def build_variant_model(spec: ExperimentSpec, variant: Variant, seed: int, vocab_size: int):
    from workbench.checkpoint import build_model
    model = build_model(spec.model_config(variant, vocab_size), seed=seed)
    if not variant.knobs["shared_expert"]:
        # no config key turns the shared expert off: it is zeroed and frozen (its output is exactly 0)
        for layer in model.model.layers:
            if layer.is_moe:
                for p in layer.feed_forward.shared_expert.parameters():
                    p.data.zero_()
                    p.requires_grad_(False)
    return model


def _recall_fns(spec: ExperimentSpec, task: RecallTask, s):
    from workbench.instrument.hooks import hooks
    from workbench.train.loop import batch_generator, load_balancing_loss

    def batch_fn(step):
        gen = batch_generator(s.seed, step)
        n, P, Q = _recall_shape(spec, task, step, gen)
        x, y, _ = task.batch(s.batch_size, n, gen, distractor_density=_curriculum_density(spec, step),
                             pairs=P, queries=Q)
        return x, y

    def loss_fn(model, batch, s):
        logits: list[torch.Tensor] = []
        fns = {ROUTER_SITE: lambda v, _s: logits.append(v)} if any(m.is_moe for m in model.model.layers) else {}
        with hooks(model, fns):
            out = model(batch[0]).logits
        ce = answer_loss(out, batch[1])
        zero = ce.new_zeros(())
        bal = sum((load_balancing_loss(r, model.config.num_experts_per_tok) for r in logits), zero)
        bal = bal / max(len(logits), 1)
        return {"loss": ce + s.aux_coef * bal * max(len(logits), 1), "ce": ce, "balance": bal, "z": zero}

    return batch_fn, loss_fn


def _check_out(spec: ExperimentSpec, out: Path) -> None:
    """A new directory gets the spec; an existing one must hold the same spec (else results would mix)."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "spec.json"
    raw = json.loads(json.dumps(spec.raw, default=str))
    if saved.exists():
        old = json.loads(saved.read_text())
        if old != raw:
            # a spec that only appends variants continues the experiment; any other change would mix results
            def rest(d):
                return {k: v for k, v in d.items() if k not in ("variants", "description")}
            same_rest = rest(old) == rest(raw)
            prefix = raw.get("variants", [])[:len(old.get("variants", []))] == old.get("variants", [])
            if not (same_rest and prefix):
                raise SpecError(f"{out} already holds results of a different spec ({saved}); use a new --out "
                                "directory or delete the old one (only appending [[variants]] continues an experiment)")
            saved.write_text(json.dumps(raw, indent=2))
            if spec.source_text:
                (out / "spec.toml").write_text(spec.source_text)
    else:
        saved.write_text(json.dumps(raw, indent=2))
        if spec.source_text:
            (out / "spec.toml").write_text(spec.source_text)
    (out / "versions.json").write_text(json.dumps(versions(), indent=2))


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed{seed}"


def train_run(spec: ExperimentSpec, variant: Variant, seed: int, out: Path, progress: bool = True,
              stop_after: int | None = None) -> dict:
    """Train one variant × seed unless done; returns done.json's content (or {} when stopped early)."""
    from workbench.checkpoint import save_model
    from workbench.tokenizer import TokenizerWrapper
    from workbench.train.loop import train

    rd = run_dir(out, variant.name, seed)
    done = rd / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    rd.mkdir(parents=True, exist_ok=True)
    s = settings_for(spec, seed)
    if spec.task == "recall":
        task = spec.recall_task()
        tok = recall_tokenizer(task)
        model = build_variant_model(spec, variant, seed, task.vocab_size)
        batch_fn, loss_fn = _recall_fns(spec, task, s)
        kw = dict(batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=None)
        streams = None
    else:
        from workbench.experiment.lm import lm_setup
        tok, streams, model = lm_setup(spec, variant, seed, out)
        kw = {}
    t0 = time.perf_counter()
    history = train(model, streams, {}, s, work_dir=rd, progress=progress, stop_after=stop_after,
                    desc=f"{variant.name} seed {seed}", **kw)
    if len(history) == 0 or history[-1].get("step", 0) < s.steps:
        return {}
    cfg = model.config
    model.tokenizer = TokenizerWrapper(tok, cfg.bos_token_id, [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int)
                                       else list(cfg.eos_token_id))
    save_model(model, rd / "model")
    steps = [h for h in history if "ce" in h]
    (rd / "history.json").write_text(json.dumps([{k: (round(v, 6) if isinstance(v, float) else v)
                                                   for k, v in h.items()} for h in steps]))
    tokens = s.batch_size * s.seq_len
    secs = sum(h["seconds"] for h in steps)
    info = {"variant": variant.name, "seed": seed, "steps": s.steps, "train_seconds_in_steps": round(secs, 1),
            "tokens_per_second": round(tokens * len(steps) / max(secs, 1e-9), 1),
            "final_loss": steps[-1]["ce"], "wall_seconds_this_call": round(time.perf_counter() - t0, 1)}
    (rd / "state.pt").unlink(missing_ok=True)
    done.write_text(json.dumps(info, indent=2))
    return info


def eval_run(spec: ExperimentSpec, variant: Variant, seed: int, out: Path, progress: bool = True) -> list[dict]:
    """Evaluate one variant × seed at every length (on its parent's model for `from` variants)."""
    import workbench
    from workbench.experiment.evaluate import evaluate_recall

    rd = run_dir(out, variant.name, seed)
    path = rd / "eval.json"
    if path.exists():
        return json.loads(path.read_text())["rows"]
    src = run_dir(out, variant.parent or variant.name, seed) / "model"
    model = workbench.load_model(str(src), dtype="fp32", device="cpu")
    lengths = spec.eval_lengths
    from tqdm.auto import tqdm
    bar = tqdm(total=len(lengths), desc=f"eval {variant.name} seed {seed}", disable=not progress, unit="length")
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.train["threads"])
    try:
        if spec.task == "recall":
            rows = evaluate_recall(model, spec.recall_task(), lengths, spec.eval, variant.knobs, seed=1000 + seed,
                                   progress=bar)
        else:
            from workbench.experiment.lm import evaluate_lm
            rows = evaluate_lm(spec, model, variant, out, progress=bar)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    rd.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"variant": variant.name, "seed": seed, "knobs": variant.knobs, "rows": rows}, indent=2))
    tmp.replace(path)
    return rows


def run_experiment(spec: ExperimentSpec | str | Path | dict, out: str | Path, only: list[str] | str | None = None,
                   progress: bool = True, report: bool = True) -> Path:
    """Train and evaluate every (selected) variant × seed into `out`, resumably; then write the report
    (when every run of the spec is evaluated). Returns `out`."""
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    elif not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    out = Path(out)
    names = [v.name for v in spec.variants]
    sel = [only] if isinstance(only, str) else list(only or names)
    for n in sel:
        if n not in names:
            raise SpecError(f"--only {n!r}: no such variant in spec {spec.name!r}; variants: {names}")
    # a `from` variant needs its parent trained
    need_train = {spec.variant(n).parent or n for n in sel}
    _check_out(spec, out)
    for v in spec.variants:
        if v.name in need_train and v.trained:
            for seed in spec.seeds:
                train_run(spec, v, seed, out, progress)
    for v in spec.variants:
        if v.name in sel:
            for seed in spec.seeds:
                eval_run(spec, v, seed, out, progress)
    if report and all((run_dir(out, v.name, s) / "eval.json").exists() for v in spec.variants for s in spec.seeds):
        from workbench.experiment.report import write_report
        write_report(out)
    return out


def clean_state(out: Path) -> None:
    """Remove the resumable trainer states of finished runs (they are large; done.json marks them)."""
    for st in Path(out).glob("runs/*/seed*/state.pt"):
        if (st.parent / "done.json").exists():
            st.unlink()



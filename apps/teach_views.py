"""Pure callbacks of the Teach MoE and Teach iRoPE tabs (no gradio import; tested directly).

Every function that touches the shared live model takes the app's lock around its forward passes.
Figures come from `probes.teaching`, `probes.temperature` and `probes.entropy`.
"""

from __future__ import annotations

import html
import threading

import numpy as np
import plotly.graph_objects as go

from apps.views import UserError
from probes import teaching as pt
from probes import temperature as ptemp

MAX_TEACH_TOKENS = 256          # the MoE demo reruns the model on every slider move
MAX_LIVE_ENTROPY_TOKENS = 4096  # entropy-vs-length on the live model (tiny on CPU: < 1 s at 1K)
MAX_MASK_TOKENS = 256


def teach_ids(model, prompt: str | None) -> list[int]:
    """Token ids of a teaching prompt (short: it is rerun on every control change)."""
    text = (prompt or "").strip()
    if not text:
        raise UserError("Type a short prompt first.")
    if model.tokenizer is None:
        raise UserError("This model has no tokenizer, so it cannot take a typed prompt.")
    ids = model.tokenizer.encode(text)
    if len(ids) > MAX_TEACH_TOKENS:
        raise UserError(f"The teaching prompt is {len(ids)} tokens; keep it under {MAX_TEACH_TOKENS}.")
    return ids


def prompt_tokens(model, prompt: str | None) -> tuple[int, str]:
    """(number of tokens, escaped HTML listing them with their positions) for the position slider."""
    ids = teach_ids(model, prompt)
    text = model.tokenizer.token_strings(ids)
    chips = " ".join(f"<span class='wb-tok' title='position {i}, id {t}'><sub>{i}</sub>{html.escape(s)}</span>"
                     for i, (t, s) in enumerate(zip(ids, text)))
    return len(ids), f"<div class='wb-tokens'>{chips}</div>"


def _interventions(model, layer: int, top_k: int | None, mask: list | None, drop_shared: bool,
                   everywhere: bool) -> dict:
    cfg = model.config
    moe = cfg.moe_layer_index
    where = moe if everywhere else [int(layer)]
    mask_ids = sorted({int(str(m).lstrip("E")) for m in (mask or [])})
    iv: dict = {}
    if top_k and int(top_k) != cfg.num_experts_per_tok:
        iv["top_k"] = int(top_k)
    k = iv.get("top_k", cfg.num_experts_per_tok)
    if mask_ids:
        if len(mask_ids) > cfg.num_local_experts - k:
            raise UserError(f"Masking {len(mask_ids)} of {cfg.num_local_experts} experts leaves fewer than "
                            f"top-k = {k} to choose from; unmask one or lower top-k.")
        iv["mask_experts"] = {i: mask_ids for i in where}
    if drop_shared:
        iv["drop_shared"] = list(where)
    return iv


def moe_journey_view(model, lock: threading.Lock, prompt: str, position: int, layer: int, top_k: int | None = None,
                     mask: list | None = None, drop_shared: bool = False, everywhere: bool = False):
    """One token through an MoE layer under the chosen edits, and the next-token distribution
    before/after the edits.  Returns (journey figure, next-token figure, escaped HTML summary)."""
    ids = teach_ids(model, prompt)
    layer = int(layer)
    if layer not in model.config.moe_layer_index:
        raise UserError(f"Layer {layer} is dense; MoE layers are {model.config.moe_layer_index}.")
    position = int(position)
    if not 0 <= position < len(ids):
        raise UserError(f"Token position {position} outside 0..{len(ids) - 1}.")
    iv = _interventions(model, layer, top_k, mask, drop_shared, everywhere)
    with lock:
        journey = pt.token_journey(model, ids, position, layer, **iv)
        p_base = pt.next_token_probs(model, ids)
        p_new = pt.next_token_probs(model, ids, **iv) if iv else p_base
    tok = model.tokenizer.token_strings([ids[position]])[0]
    vocab = model.tokenizer.token_strings(range(model.config.vocab_size)) \
        if model.config.vocab_size <= 4096 else None
    top = np.union1d(np.argsort(-p_base)[:12], np.argsort(-p_new)[:12])
    names = vocab if vocab is not None else _sparse_names(model, top)
    fig_j = pt.journey_figure(journey, tok)
    fig_n = pt.next_token_figure(p_base, p_new, names)
    s = pt.distribution_shift(p_base, p_new)
    edits = ", ".join(f"{k}={v}" for k, v in iv.items()) or "none"
    gates = ", ".join(f"E{int(i)} gate {g:.3f}" for i, g in zip(journey["ids_K"], journey["gates_K"]))
    summary = (f"<p>Token <code>{html.escape(repr(tok))}</code> at position {position}, layer {layer}: {gates}. "
               f"Each chosen expert sees its input scaled by σ(logit) — Llama 4 scales the expert "
               f"<em>input</em>, not the output — and the shared expert always runs.</p>"
               f"<p>Edits: <code>{html.escape(edits)}</code>. KL(before‖after) = {s['kl']:.5f} nats, "
               f"total variation {s['tv']:.4f}{'; the most likely next token changed' if s['argmax_changed'] else ''}."
               "</p>")
    return fig_j, fig_n, summary


def _sparse_names(model, ids) -> dict:
    strings = model.tokenizer.token_strings([int(i) for i in ids])
    return _Names({int(i): s for i, s in zip(ids, strings)})


class _Names(dict):
    def __getitem__(self, i):
        return dict.get(self, int(i), f"#{int(i)}")


def params_view(preset_name: str, n_experts: int | None, top_k: int | None) -> tuple[go.Figure, str]:
    """Active-vs-total parameter calculator on a preset with the expert count and top-k changed."""
    from workbench.config import PRESETS, preset
    from workbench.params import human

    if preset_name not in PRESETS:
        raise UserError(f"Unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}.")
    cfg = preset(preset_name)
    try:
        counts = pt.param_breakdown(cfg, n_experts, top_k)
    except ValueError as e:
        raise UserError(str(e)) from None
    base = pt.param_breakdown(cfg)
    md = (f"**{preset_name}** as shipped: {human(base['total'])} total, {human(base['active'])} active per token "
          f"(top-{base['top_k']} of {base['n_experts']} routed experts + 1 shared). With your settings: "
          f"{human(counts['total'])} total, {human(counts['active'])} active — "
          f"{counts['active'] / counts['total']:.1%} of the weights do the work for each token.")
    return pt.param_figure(counts, preset_name), md


# ------------------------------------------------------------------------------------ iRoPE
def mask_view(n_tokens: int, chunk: int) -> go.Figure:
    n, c = int(n_tokens), int(chunk)
    if not 2 <= n <= MAX_MASK_TOKENS:
        raise UserError(f"Sequence length must be between 2 and {MAX_MASK_TOKENS}.")
    if c < 1:
        raise UserError("Chunk size must be at least 1.")
    return pt.mask_figure(n, c)


def rope_view(config, pair: int, m: int, delta: int) -> go.Figure:
    try:
        return pt.rope_figure(config, int(pair), int(m), int(delta))
    except ValueError as e:
        raise UserError(str(e)) from None


def temperature_view(floor_scale: int, attn_scale: float, train_len: int = 8192, log_x: bool = True) -> go.Figure:
    fs, a = int(floor_scale), float(attn_scale)
    if fs < 1 or a < 0:
        raise UserError("floor_scale must be ≥ 1 and attn_scale ≥ 0.")
    fig = ptemp.temperature_figure(n_max=max(64 * fs, 1 << 20), floor_scale=fs, attn_scale=a,
                                   train_len=int(train_len), log_x=log_x)
    return fig


def live_entropy_view(model, lock: threading.Lock, n_tokens: int, tuning: bool, floor_scale: int | None,
                      attn_scale: float | None, seed: int = 0) -> go.Figure:
    """Entropy vs position on the NoPE layers of the live model for a random token sequence,
    with temperature tuning on or off (the no-temperature curve is computed in the same pass)."""
    n = int(n_tokens)
    if not 2 <= n <= MAX_LIVE_ENTROPY_TOKENS:
        raise UserError(f"Length must be between 2 and {MAX_LIVE_ENTROPY_TOKENS} tokens.")
    cfg = model.config
    if all(cfg.use_rope):
        raise UserError("This model has no NoPE layers, so it has no temperature tuning to show.")
    fs = int(floor_scale) if floor_scale else cfg.floor_scale
    a = float(attn_scale) if attn_scale is not None else cfg.attn_scale
    ids = np.random.default_rng(int(seed)).integers(0, min(cfg.vocab_size, 256), n).tolist()
    with lock:
        prof = pt.live_entropy_profile(model, ids, temperature_tuning=bool(tuning), floor_scale=fs, attn_scale=a)
    nope = prof.attrs["layers"]
    return pt.live_entropy_figure(prof, fs if tuning else None, title=(
        f"NoPE layers {nope}: entropy vs position, temperature tuning {'on' if tuning else 'off'} "
        f"(floor_scale {fs}, attn_scale {a:g}); random tokens"))


# ------------------------------------------------------------------------------------ iRoPE on tiny-irope
IROPE_MAX_MULTIPLE = 32         # the live panel sweeps train_length × 1, 2, 4, … up to this
IROPE_SEQUENCES = 8             # sequences per length (× queries each) in the live panel
IROPE_ATTN_SCALE = 0.3          # default: a clearly visible entropy drop beyond floor_scale (docs/experiments/irope.md)


def mask_defaults(config, n_tokens: int = 48) -> tuple[int, int]:
    """(default, maximum) of the mask view's chunk slider: the model's chunk when it is small enough to
    show chunks in an `n_tokens` sequence, else n_tokens // 3 — so the chunked and global masks differ
    on first open (the bundled models' chunk of 128 ≥ 48 tokens made them identical)."""
    c = config.attention_chunk_size
    default = c if c is not None and c <= n_tokens // 2 else max(1, n_tokens // 3)
    return default, MAX_MASK_TOKENS


def irope_recall_view(model, lock: threading.Lock, length: int, tuning: bool, attn_scale: float,
                      seed: int = 0) -> tuple[go.Figure, str]:
    """The live panel on a recall-trained model (tiny-irope): retrieval accuracy and NoPE entropy vs length
    up to `length` with the chosen temperature settings (dotted: temperature off), and the model's
    answer to one recall query of `length` tokens."""
    from probes import recall as pr
    from workbench.experiment.recall import TaskError, task_for_model

    if model is None:
        raise UserError("No recall-trained model is loaded: export a recall run with `workbench experiment export "
                        "DIR --variant irope --seed 0 --out MODEL_DIR` and open the app with it (build_app(..., "
                        "irope_model=load_model(MODEL_DIR))).")
    try:
        task = task_for_model(model)
    except TaskError as e:
        raise UserError(str(e)) from None
    n, a = int(length), float(attn_scale)
    hi = task.train_length * IROPE_MAX_MULTIPLE
    if not task.train_length <= n <= hi:
        raise UserError(f"Length must be between {task.train_length} and {hi} tokens (1–{IROPE_MAX_MULTIPLE}× "
                        f"the training length {task.train_length}).")
    if not 0.0 <= a <= 2.0:
        raise UserError("attn_scale must be between 0 and 2.")
    with lock:
        rows = pr.length_sweep(model, task, n, temperature_tuning=bool(tuning), attn_scale=a,
                               sequences=IROPE_SEQUENCES, seed=seed)
        off = pr.length_sweep(model, task, n, temperature_tuning=False, sequences=IROPE_SEQUENCES, seed=seed) \
            if tuning else None
        ex = pr.answer_example(model, task, n, temperature_tuning=bool(tuning), attn_scale=a, seed=seed)
    fs = model.config.floor_scale
    fig = pr.recall_length_figure(rows, task.train_length, fs, compare=off, title=(
        f"{getattr(model, 'source', 'model')}: trained at {task.train_length} tokens; temperature "
        f"{'on' if tuning else 'off'} (attn_scale {a:g}, floor_scale {fs})"),
        label=f"temperature {'on' if tuning else 'off'}")
    last = rows[-1]
    md = (f"**Query at {n} tokens** ({n // task.train_length}× the training length): key `{html.escape(ex['key'])}` "
          f"was planted at position {ex['pair_position']} with value `{html.escape(ex['value'])}`; the model "
          f"answers `{html.escape(ex['answer'])}` (p = {ex['p_answer']:.2f}) — "
          f"{'correct' if ex['correct'] else 'wrong'}. At {last['length']} tokens: accuracy {last['acc']:.2f} "
          f"(with distractors {last['acc_distractor']:.2f}); NoPE entropy {last['entropy']:.2f} nats as run vs "
          f"{last['entropy_no_temp']:.2f} without temperature (ln n = {last['ln_n']:.2f}).")
    return fig, md


def load_irope_model():
    """A bundled `tiny-irope` for the live panel when one is installed, else None (the panel then says how to
    get a recall-trained model)."""
    import workbench
    try:
        return workbench.load_model("tiny-irope")
    except (KeyError, OSError, ValueError):
        return None


def irope_length_slider(model) -> tuple[int, int, int, int]:
    """(minimum, maximum, default, step) of the live panel's length slider: 1–32× the training length,
    default 16× — far enough beyond floor_scale that the temperature step shows on first open."""
    from workbench.experiment.recall import TaskError, task_for_model
    try:
        L = task_for_model(model).train_length if model is not None else 32
    except TaskError:
        L = 32
    return L, L * IROPE_MAX_MULTIPLE, L * 16, L


# ------------------------------------------------------------------------------------ experiment reports
def list_experiments(runs_dir) -> list[str]:
    """Experiment directories (written by `workbench experiment run`) under `runs_dir`, by relative path."""
    from pathlib import Path
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = {p.parent for p in root.glob("*/spec.json")} | {p.parent for p in root.glob("*/*/spec.json")}
    return sorted(p.relative_to(root).as_posix() for p in found if (p / "runs").is_dir())


def experiment_report_view(runs_dir, name: str | None) -> tuple[str, go.Figure, go.Figure]:
    """An experiment's comparison: its report tables (markdown) and the accuracy and entropy figures."""
    from pathlib import Path

    from workbench.experiment.report import ReportError, figures, load_results, markdown_tables
    if not name:
        raise UserError("Pick an experiment (directories under the runs folder written by `workbench experiment run`).")
    root = Path(runs_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents or not (path / "spec.json").is_file():
        raise UserError(f"{name!r} is not an experiment directory under the runs folder.")
    try:
        res = load_results(path)
    except (ReportError, ValueError) as e:
        raise UserError(str(e)) from None
    figs = figures(res)
    empty = go.Figure().update_layout(title="(no NoPE layers in this experiment)")
    return markdown_tables(res), figs["accuracy"], figs.get("entropy", empty)

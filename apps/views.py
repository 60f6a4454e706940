"""Pure callbacks of the workbench app: run browsing, live recording, routing and entropy views
(the Attribution tab's are in `apps.attribution_views`).

Nothing here imports gradio: every function takes plain values (a runs directory, a run name, layer
numbers) and returns figures, tables, HTML strings or plain data, so tests call them directly.
`UserError` carries a message meant for the person at the browser; the app shows it with gr.Error.

Safety: `resolve_run` is the only way from a user-supplied run name to a path, and it refuses
anything that is not a run directly inside the runs directory (no separators, no '..', no hidden
names, no symlink leaving the directory).  Every token string reaches HTML either through
`html.escape` or through `probes.teaching.display_token` (plotly labels render a subset of HTML).
"""

from __future__ import annotations

import datetime as _dt
import html
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from apps import private_runs
from apps.decoded import decoded
from probes import entropy as pe
from probes import routing as pr
from probes import routing_figures as rf
from probes import teaching as pt

MAX_PROMPT_CHARS = 4000        # live prompts: a clear limit instead of a slow or failing request
MAX_PROMPT_TOKENS = 2048
MAX_NEW_TOKENS = 64
MAX_WINDOW = 256               # tokens shown at once in the routing text view and grid
LIVE_PROBES = ("router", "router_logits", "entropy", "norms", "sink")


class UserError(ValueError):
    """A problem with what the user asked for; the message is shown as is."""


# ------------------------------------------------------------------------------------ runs
RUNSET_SEP = "+"   # "a.zarr+b.zarr" or a glob "shard-*.zarr": several runs opened as one dataset


def _resolve_set(runs_dir: str | Path, name: str) -> Path:
    """Several runs as one: each '+'-separated part is a run name or a glob over run names, all under
    the single-run rules; -> runs_dir / "a.zarr+b.zarr" (open_cached opens it as a RunSet)."""
    root = Path(runs_dir).resolve()
    names: list[str] = []
    for part in name.split(RUNSET_SEP):
        if set("*?[") & set(part):
            if part.startswith(".") or any(c in part for c in "/\\\x00"):
                raise UserError(f"Invalid run pattern {part!r}: match run names inside the runs directory.")
            hits = sorted(p.name for p in root.glob(part) if not p.name.startswith(".") and p.parent == root
                          and (p / "zarr.json").is_file())
            if not hits:
                raise UserError(f"No runs match {part!r} in {root}.")
            names += hits
        else:
            names.append(resolve_run(runs_dir, part).name)
    names = list(dict.fromkeys(names))   # each run once: a run given twice would count twice
    return root / names[0] if len(names) == 1 else root / RUNSET_SEP.join(names)


def resolve_run(runs_dir: str | Path, name: str | None) -> Path:
    """The path of run `name` directly inside `runs_dir`; anything else raises UserError.  A name
    joining run names with '+' or a glob over run names stands for those runs as one (`_resolve_set`)."""
    if not name or not isinstance(name, str):
        raise UserError("Choose a run first (Runs tab).")
    if private_runs.is_private(name):        # this session's chat / live run (apps/private_runs.py)
        try:
            return private_runs.resolve(runs_dir, name)
        except private_runs.PrivateRunError as e:
            raise UserError(str(e)) from None
    if (RUNSET_SEP in name or set("*?[") & set(name)) and not (Path(runs_dir) / name / "zarr.json").is_file():
        return _resolve_set(runs_dir, name)
    bad = (name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\x00")
           or Path(name).name != name)
    if bad:
        raise UserError(f"Invalid run name {name!r}: give the name of a run inside the runs directory.")
    root = Path(runs_dir).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise UserError(f"Run {name!r} resolves outside the runs directory; refused.")
    if not (path / "zarr.json").is_file():
        raise UserError(f"No run named {name!r} in {root}.")
    return path


VERIFY_MAX_TOKENS = 1_000_000     # runs up to this size are fully verified when opened (~1 s; docs/reliability.md)
_OPEN_LOCK = threading.Lock()
_RUNS: OrderedDict = OrderedDict()
_MEMO: OrderedDict = OrderedDict()


def _stamp(path: Path) -> int:
    return (path / "zarr.json").stat().st_mtime_ns   # changes on every commit: cached views go stale


def open_cached(path: Path):
    """`workbench.store.open_run`, cached per path and commit; a '+'-joined path from `resolve_run`
    opens its runs as one `RunSet` (views then compute through dask)."""
    from workbench.store import RunSet, open_run

    parts = [path.parent / n for n in path.name.split(RUNSET_SEP)]
    many = len(parts) > 1 and not (path / "zarr.json").is_file()

    def load():
        try:
            if many:
                return RunSet(parts)
            run = open_run(path)                 # the cheap wholeness checks, always
            if run.n_tokens <= VERIFY_MAX_TOKENS:
                run.verify()                     # and the full read where it is affordable (once per commit)
            return run
        except Exception as e:
            raise UserError(f"Cannot open run {path.name}: {e}") from e
    stamp = tuple(_stamp(p) for p in parts) if many else _stamp(path)
    return lru_get(_RUNS, _OPEN_LOCK, (str(path), stamp), load, 16)


def memo(run, kind: str, args: tuple, compute: Callable[[], Any]) -> Any:
    """Cache a whole-run statistic (streamed once; the views then redraw from it instantly)."""
    return lru_get(_MEMO, _OPEN_LOCK, (str(run.path), run.n_tokens, kind, args), compute, 128)


def lru_get(store: OrderedDict, lock, key, compute: Callable[[], Any], size: int) -> Any:
    """`store[key]`, computed on a miss (outside `lock`, so a slow computation blocks no other key) and
    kept among the `size` most recently used entries."""
    with lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    value = compute()
    with lock:
        store[key] = value
        while len(store) > size:
            store.popitem(last=False)
    return value


def _human_bytes(n) -> str:
    from workbench.params import human_bytes

    return human_bytes(n or 0)


def runs_table(runs_dir: str | Path) -> pd.DataFrame:
    """One row per run in `runs_dir`, newest first."""
    from workbench.store import list_runs

    cols = ["name", "model", "docs", "tokens", "probes", "size", "created", "complete"]
    try:
        rows = list_runs(runs_dir)
    except FileNotFoundError:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame([{"name": Path(r["path"]).name, "model": str(r["model_source"] or ""), "docs": r["n_docs"],
                        "tokens": r["n_tokens"], "probes": ",".join(r["probes"] or []),
                        "size": _human_bytes(r["size_bytes"]), "created": str(r["created"] or "")[:19],
                        "complete": bool(r["complete"])} for r in rows], columns=cols)
    return df.sort_values("created", ascending=False, kind="stable").reset_index(drop=True)


def run_info(run) -> dict[str, Any]:
    """What the view controls need: layers, kinds, MoE layers, docs, domains, config marks."""
    return memo(run, "info", (), lambda: _run_info(run))


def text_config(attrs) -> dict:
    """The run's text-model config: `config`, or its `text_config` for a multimodal model's run (image chat)."""
    cfg = dict(attrs.get("config") or {})
    return dict(cfg.get("text_config") or cfg)


def _run_info(run) -> dict[str, Any]:
    cfg = text_config(run.attrs)
    lay = run.layout
    kinds = list(run.attrs.get("layer_kinds") or ["layer"] * lay.n_layers)
    info = {"name": run.path.name, "n_docs": run.n_docs, "n_tokens": run.n_tokens, "n_layers": lay.n_layers,
            "n_heads": lay.n_heads, "kinds": kinds, "moe_layers": list(lay.moe_layer_index),
            "n_experts": lay.n_experts, "top_k": lay.top_k, "has_router": run.has("router/experts"),
            "has_logits": run.has("router/logits"), "has_entropy": run.has("attention/entropy"),
            "chunk_size": cfg.get("attention_chunk_size"), "floor_scale": cfg.get("floor_scale"),
            "attn_scale": cfg.get("attn_scale"), "tuning": cfg.get("attn_temperature_tuning", True)}
    ids = run.read("doc_id") if run.n_docs else []
    doms = run.read("doc_domain") if run.n_docs else []
    off = run.doc_offsets
    info["docs"] = [(f"{i}: {ids[i]}" + (f" [{doms[i]}]" if doms[i] else "") + f" · {off[i + 1] - off[i]} tok", i)
                    for i in range(run.n_docs)]
    info["domains"] = sorted({str(d) for d in doms if d})
    return info


def run_summary_html(run) -> str:
    """Metadata, probes, size and a config summary as an escaped HTML table."""
    a, info = run.attrs, run_info(run)
    cfg = text_config(a)
    e = html.escape
    rows = [("run", run.path.name), ("model", a.get("model_source", "")), ("created", a.get("created", "")),
            ("complete", a.get("complete")), ("documents / tokens", f"{run.n_docs} / {run.n_tokens}"),
            ("probes", ", ".join(a.get("probes") or [])), ("dtype / device", f"{a.get('dtype')} / {a.get('device')}"),
            ("layers", f"{info['n_layers']} ({', '.join(info['kinds'])})"),
            ("heads / experts / top-k", f"{info['n_heads']} / {info['n_experts']} / {info['top_k']}"),
            ("hidden / vocab", f"{cfg.get('hidden_size')} / {cfg.get('vocab_size')}"),
            ("chunk / floor_scale / attn_scale",
             f"{info['chunk_size']} / {info['floor_scale']} / {info['attn_scale']}"),
            ("domains", ", ".join(info["domains"]) or "none"),
            ("size", _human_bytes(sum(_dir_size(p) for p in getattr(run, "paths", [run.path]))))]
    body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{e(str(k))}</th><td>{e(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table class='wb-summary'>{body}</table>"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def live_run_name() -> str:
    """A fresh, unguessable run name: concurrent users never write into each other's runs."""
    return f"live-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}.zarr"


def check_prompt(prompt: str | None, tokenizer) -> list[int]:
    """Token ids of a live prompt, or UserError naming the limit it breaks."""
    text = (prompt or "").strip()
    if not text:
        raise UserError("Type a prompt first.")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"The prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}. Shorten it, "
                        "or record long documents with `workbench record`.")
    if tokenizer is None:
        raise UserError("This model has no tokenizer, so it cannot take a typed prompt.")
    ids = tokenizer.encode(text)
    if len(ids) > MAX_PROMPT_TOKENS:
        raise UserError(f"The prompt is {len(ids)} tokens; the limit is {MAX_PROMPT_TOKENS}.")
    return ids


def record_live(model, lock: threading.Lock, runs_dir: str | Path, prompt: str, max_new_tokens: int = 0,
                progress: Callable[[float, str], None] | None = None,
                model_source: str | None = None) -> tuple[str, str]:
    """Prompt → (greedy continuation) → a new run recorded into `runs_dir`.  Returns (run name, text).

    The model is shared: forward passes hold `lock`.  The run is private to the caller's session
    (apps/private_runs.py: a fresh secret name, listed nowhere) until it is published on purpose."""
    from workbench.generation import generate
    from workbench.recording import record

    say = progress or (lambda f, d: None)
    ids = check_prompt(prompt, model.tokenizer)
    n_new = int(max_new_tokens or 0)
    if not 0 <= n_new <= MAX_NEW_TOKENS:
        raise UserError(f"New tokens must be between 0 and {MAX_NEW_TOKENS}, got {n_new}.")
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    name = private_runs.new_name(live_run_name())
    say(0.05, "waiting for the model" if lock.locked() else "running the model")
    with lock:
        if n_new:
            done = []

            def on_token(_b, _tok):
                done.append(_tok)
                say(0.1 + 0.6 * len(done) / n_new, f"generating token {len(done)}/{n_new}")
            ids = generate(model, ids, n_new, on_token=on_token)[0].tolist()
        say(0.75, f"recording {len(ids)} tokens ({', '.join(LIVE_PROBES)})")
        record(model, [{"tokens": ids, "id": "live", "domain": "live"}], private_runs.path_for(runs_dir, name),
               probes=LIVE_PROBES,
               progress=False, model_source=model_source or str(getattr(model, "source", "")))
    say(1.0, "done")
    return name, model.tokenizer.decode(ids)


# ------------------------------------------------------------------------------------ tokens
_TOKENIZERS: dict = {}


def run_tokenizer(run, fallback=None):
    """The tokenizer a run was recorded with: its preset's, its checkpoint's tokenizer.json, or
    `fallback` (the app model's) when the vocab sizes agree; None when unknown (ids are shown)."""
    from workbench.bundled import BUNDLED, bundled_path
    from workbench.config import PRESETS, preset
    from workbench.tokenizer import load_tokenizer, preset_tokenizer

    src = str(run.attrs.get("model_source") or "")
    vocab = text_config(run.attrs).get("vocab_size")
    if src not in _TOKENIZERS:
        tok = None
        try:
            if src in PRESETS:
                tok = preset_tokenizer(preset(src))
            elif src in BUNDLED:
                tok = load_tokenizer(bundled_path(src))
            elif src and Path(src).is_dir():
                tok = load_tokenizer(src)
        except Exception:                 # an unreadable tokenizer only costs the token text
            tok = None
        _TOKENIZERS[src] = tok
    tok = _TOKENIZERS[src]
    if tok is None and fallback is not None and getattr(fallback, "vocab_size", None) == vocab:
        tok = fallback
    return tok


def token_text(tokenizer, ids) -> list[str]:
    """Raw display strings per id (escape before putting them into HTML)."""
    ids = [int(i) for i in ids]
    return tokenizer.token_strings(ids) if tokenizer is not None else [f"#{i}" for i in ids]


def doc_window(run, doc: int, start: int, window: int) -> tuple[int, int]:
    """Global token range [t0, t1) of `window` tokens from `start` inside document `doc`."""
    if run.n_docs == 0:
        raise UserError("This run has no documents yet.")
    sl = run.doc_slice(int(doc))
    window = max(1, min(int(window), MAX_WINDOW))
    t0 = sl.start + max(0, min(int(start), sl.stop - sl.start - 1))
    return t0, min(sl.stop, t0 + window)


# ------------------------------------------------------------------------------------ routing
def _need_router(run) -> dict[str, Any]:
    info = run_info(run)
    if not info["has_router"]:
        raise UserError(f"Run {info['name']} has no router recordings (probe 'router').")
    return info


def routing_tokens(run, doc: int, start: int, window: int, layer: int, tokenizer=None):
    """Text view + grid for a token window.  Returns (highlighted [(token, 'E<id>')], color_map,
    grid figure, t0): tokens coloured by the expert they chose at MoE layer `layer`."""
    info = _need_router(run)
    if int(layer) not in info["moe_layers"]:
        raise UserError(f"Layer {layer} is not an MoE layer; MoE layers are {info['moe_layers']}.")
    t0, t1 = doc_window(run, doc, start, window)
    grid = pr.expert_grid(run, t0, t1)
    m = info["moe_layers"].index(int(layer))
    text = token_text(tokenizer, grid["tokens"])
    highlighted = [(s, f"E{int(e)}") for s, e in zip(text, grid["experts"][m])]
    fig = rf.expert_grid_figure(grid["experts"], grid["gates"], [pt.display_token(s) for s in text],
                                layer_labels=grid["layer_index"], n_experts=info["n_experts"])
    if info["has_logits"]:   # hover: add the token's router logits to the grid (the issue asks for them)
        lg = np.asarray(run.array("router/logits")[:, t0:t1])                        # (M, t, E)
        top = np.argsort(-lg, axis=-1)[..., :4]
        hover = np.array([[", ".join(f"E{e}:{lg[a, b, e]:+.2f}" for e in top[a, b]) for b in range(t1 - t0)]
                          for a in range(lg.shape[0])], dtype=object)
        tr = fig.data[0]
        tr.customdata = np.dstack([np.asarray(tr.customdata, dtype=object), hover])
        tr.hovertemplate = tr.hovertemplate.replace("<extra>", "<br>logits %{customdata[2]}<extra>")
    fig.update_layout(title=f"Expert per token and MoE layer — tokens {t0}–{t1 - 1} (click a cell or a token in the "
                            "text to select it)", meta={"wb_token_offset": int(t0)})   # x + offset = token index
    return highlighted, expert_colors(info["n_experts"]), fig, t0


def expert_colors(n_experts: int) -> dict[str, str]:
    """A fixed colour per expert label, matching plotly's Turbo scale used by the grid."""
    import plotly.colors as pc

    vals = [i / max(n_experts - 1, 1) for i in range(n_experts)]
    cols = pc.sample_colorscale("Turbo", vals) if n_experts > 1 else ["rgb(48,18,59)"]
    return {f"E{i}": c for i, c in enumerate(cols)}


def token_path_view(run, token: int, tokenizer=None) -> tuple[go.Figure, str]:
    """A clicked token's expert at every MoE layer, plus an escaped HTML table of gates."""
    info = _need_router(run)
    path = pt.recorded_path(run, int(token))
    tok = token_text(tokenizer, run.array("tokens")[int(token):int(token) + 1])[0]
    fig = pt.path_figure(path, info["n_experts"], tok, int(token))
    rows = "".join(f"<tr><td>{li}</td><td>{', '.join(f'E{int(x)}' for x in ex)}</td>"
                   f"<td>{', '.join(f'{g:.3f}' for g in gs)}</td></tr>"
                   for li, ex, gs in zip(path["layer_index"], path["experts"], path["gates"]))
    table = (f"<p>token #{int(token)} <code>{html.escape(repr(tok))}</code></p><table class='wb-summary'>"
             f"<tr><th>layer</th><th>experts</th><th>gates</th></tr>{rows}</table>")
    return fig, table


def load_views(run, layer: int) -> tuple[go.Figure, go.Figure, pd.DataFrame]:
    """Expert load of one MoE layer with the uniform line, all layers relative to uniform, metrics."""
    info = _need_router(run)
    counts = memo(run, "loads", (), lambda: pr.expert_loads(run))
    table = memo(run, "load_table", (), lambda: pr.load_table(run))
    m = info["moe_layers"].index(int(layer)) if int(layer) in info["moe_layers"] else 0
    bar = rf.expert_load_figure(counts[m], title=f"Expert load, layer {info['moe_layers'][m]} "
                                                 f"({int(counts[m].sum())} assignments)")
    heat = rf.expert_load_heatmap(counts, info["moe_layers"])
    cols = [c for c in ("layer", "max_load", "min_load", "dead_experts", "load_entropy", "max_vio", "cv",
                        "switch_balance") if c in table]
    return bar, heat, table[cols].round(4)


TRANSITION_VIEWS = (("matrix", "matrix"), ("sankey", "sankey"), ("sankey through the MoE layers between", "path"))


def transition_view(run, layer_a: int, layer_b: int, normalize: bool = True,
                    view: str = "matrix") -> tuple[go.Figure, pd.DataFrame]:
    """Cross-layer expert transitions (first choice) as a matrix, a Sankey of the same counts, or a
    Sankey through every MoE layer from a to b ("path"); and the NMI of consecutive MoE layers."""
    info = _need_router(run)
    moe = info["moe_layers"]
    for v in (layer_a, layer_b):
        if int(v) not in moe:
            raise UserError(f"Layer {v} is not an MoE layer; MoE layers are {moe}.")
    if view not in [v for _, v in TRANSITION_VIEWS]:
        raise UserError(f"Unknown transition view {view!r}; choose one of {[v for _, v in TRANSITION_VIEWS]}.")
    a, b = moe.index(int(layer_a)), moe.index(int(layer_b))

    def counts(i, j):
        return memo(run, "transition", (i, j), lambda: pr.transition_matrix(run, i, j))

    if view == "matrix":
        fig = rf.transition_heatmap(counts(a, b), normalize, str(layer_a), str(layer_b))
    elif view == "sankey" or abs(b - a) < 2:
        fig = rf.transition_sankey(counts(a, b), [layer_a, layer_b])
    else:                                   # every MoE layer on the way, in the direction a → b
        path = list(range(a, b + 1) if b > a else range(a, b - 1, -1))
        fig = rf.transition_sankey([counts(i, j) for i, j in zip(path, path[1:])], [moe[i] for i in path])
    nmi = memo(run, "layer_transitions", (), lambda: pr.layer_transitions(run))
    return fig, nmi.round(4)


def domain_view(run, layer: int) -> tuple[go.Figure | None, str]:
    """OLMoE domain specialization bars for one MoE layer, or a note when the run has < 2 domains."""
    info = _need_router(run)
    if len(info["domains"]) < 2:
        return None, ("This run has no domain labels (or only one), so there is nothing to compare. Record "
                      "documents with a `domain` field (JSONL) to see OLMoE-style specialization bars.")
    table = memo(run, "domain_spec", (), lambda: pr.domain_specialization_table(run))
    sub = table[table["layer"] == int(layer)]
    if sub.empty:
        raise UserError(f"Layer {layer} is not an MoE layer; MoE layers are {info['moe_layers']}.")
    fig = rf.domain_specialization_figure(sub, info["top_k"], info["n_experts"],
                                          title=f"Domain specialization, layer {layer}")
    return fig, f"{len(info['domains'])} domains: {', '.join(html.escape(d) for d in info['domains'])}"


def consecutive_view(run) -> go.Figure:
    _need_router(run)
    return rf.consecutive_rate_figure(memo(run, "consecutive", (), lambda: pr.consecutive_rates(run)))


MODALITY_NOTE = ("**Image vs text routing** needs a multimodal run (image tokens marked in the store). "
                 "This build records the text path only, so every token here is text.")


# ------------------------------------------------------------------------------------ entropy
STAT_LABELS = {"entropy": "entropy H (nats)", "normalized": "H / ln n", "kl": "KL to uniform (nats)",
               "delta": "ΔH = H(no temp) − H"}

def layer_groups(run) -> list[tuple[str, str]]:
    """Dropdown choices: each attention kind (all its layers), then each single layer."""
    kinds = run_info(run)["kinds"]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        groups.setdefault(pe.attention_kind(k), []).append(i)
    out = [(f"all {k} layers ({', '.join(map(str, ls))})", f"kind:{k}") for k, ls in groups.items()]
    return out + [(f"layer {i} · {k}", f"layer:{i}") for i, k in enumerate(kinds)]


def _group_layers(run, group: str) -> list[int]:
    kinds = run_info(run)["kinds"]
    if group.startswith("kind:"):
        ls = [i for i, k in enumerate(kinds) if pe.attention_kind(k) == group[5:]]
    elif group.startswith("layer:") and group[6:].isdigit():
        ls = [int(group[6:])] if int(group[6:]) < len(kinds) else []
    else:
        ls = []
    if not ls:
        raise UserError(f"Unknown layer choice {group!r}.")
    return ls


def entropy_profile_view(run, group: str, head: str | int = "all", stat: str = "entropy",
                         n_bins: int = 512) -> go.Figure:
    """Binned (min/mean/max) entropy vs position for a layer group and head, as run and with
    temperature off, with chunk boundaries (chunked layers) and temperature steps (NoPE layers)."""
    info = run_info(run)
    if not info["has_entropy"]:
        raise UserError(f"Run {info['name']} has no attention-entropy recordings (probe 'entropy').")
    layers = _group_layers(run, group)
    heads = None if head in (None, "", "all") else int(head)
    if heads is not None and not 0 <= heads < info["n_heads"]:
        raise UserError(f"Head {head} outside 0..{info['n_heads'] - 1}.")
    if stat not in pe.STATS:
        raise UserError(f"Statistic must be one of {pe.STATS}.")
    if stat == "delta" and not run.has("attention/entropy_no_temp"):
        raise UserError("ΔH needs entropy_no_temp, which this run did not record.")
    n_bins = int(max(16, min(int(n_bins), 4096)))
    prof = memo(run, "profile", (tuple(layers), heads, stat, n_bins),
                lambda: pe.position_profile(decoded(run, layers), layers, heads, stat=stat, n_bins=n_bins))
    kinds = [pe.attention_kind(info["kinds"][i]) for i in layers]
    chunk = info["chunk_size"] if any(k == "rope-chunked" for k in kinds) else None
    floor = info["floor_scale"] if info["tuning"] and any(k == "nope-global" for k in kinds) else None
    who = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    fig = pe.entropy_position_figure(prof, chunk, floor, show_band=True, title=(
        f"{STAT_LABELS[stat]} vs position — {who}, {'all heads' if heads is None else f'head {heads}'} "
        f"({len(prof)} bins over {info['n_tokens']} tokens)"))
    return fig


def summary_default(run) -> str:
    """normalized_mean when the run has queries long enough for it, else entropy_mean."""
    summary = memo(run, "layer_head", (), lambda: pe.layer_head_summary(run))
    return "normalized_mean" if summary["normalized_mean"].notna().any() else "entropy_mean"


def layer_head_view(run, value: str = "normalized_mean") -> tuple[go.Figure, pd.DataFrame]:
    """Layer × head heatmap of a summary column (collapsed heads marked) and the collapsed list."""
    if not run.has("attention/entropy"):
        raise UserError("This run has no attention-entropy recordings (probe 'entropy').")
    summary = memo(run, "layer_head", (), lambda: pe.layer_head_summary(run))
    if value not in summary:
        raise UserError(f"Unknown summary column {value!r}.")
    fig = pe.layer_head_heatmap(summary, value)
    if summary[value].isna().all():
        why = (f"needs queries that see ≥ {pe.COLLAPSE_MIN_KEYS} keys" if value in ("normalized_mean", "kl_mean")
               else "needs attention/entropy_no_temp")
        fig.add_annotation(text=f"{value} {why}; this run has none", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5)
    cols = ["layer", "head", "kind", "entropy_mean", "normalized_mean", "delta_mean", "collapsed"]
    return fig, summary[cols].round(4)

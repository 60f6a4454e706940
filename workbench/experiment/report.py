"""The comparison report of an experiment directory (written by `run_experiment`).

    report/
      report.md            tables: mean ± sd over seeds per variant and length, training cost
      summary.csv          variant, multiple, metric, mean, sd, min, max, n_seeds
      results.csv          every (variant, seed, length) row
      metrics.zarr         one xarray Dataset: eval metrics (variant, seed, length), training loss
                           (trained_variant, seed, step); attrs: the spec and versions (provenance)
      <figure>.html/.png   plotly: accuracy, entropy vs ln n, key mass, loss curves

PNG export needs kaleido and a Chromium; without them the HTML is written and `report.md`
says why the PNGs are missing (`png_error`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

METRICS = ("acc", "acc_first", "acc_distractor", "acc_needle", "loss", "entropy", "entropy_no_temp", "ln_n", "key_mass",
           "balance", "load_entropy", "loss_beyond")
LABELS = {"acc": "recall accuracy", "acc_first": "accuracy on the first query (no elimination shortcut)",
          "acc_distractor": "accuracy with distractor pairs",
          "acc_needle": "needle (passkey) accuracy", "loss": "answer loss (nats)",
          "entropy": "NoPE entropy as run (nats)", "entropy_no_temp": "NoPE entropy, temperature off (nats)",
          "ln_n": "ln n (keys visible)", "key_mass": "NoPE attention mass on the queried pair",
          "balance": "routing balance E·Σf·P (1 = uniform)", "load_entropy": "expert load entropy H(f)/ln E",
          "loss_beyond": "held-out loss beyond the training length (nats)"}


class ReportError(ValueError):
    pass


def load_results(out: str | Path) -> dict:
    """Everything of an experiment directory as arrays: {"spec", "variants", "seeds", "lengths",
    "metrics": {name: (V, S, N) array}, "loss": (Vt, S, steps), "trained", "done"}."""
    out = Path(out)
    sp = out / "spec.json"
    if not sp.is_file():
        raise ReportError(f"{out} is not an experiment directory (no spec.json); run `workbench experiment run` first")
    from workbench.experiment.spec import parse_spec
    raw = json.loads(sp.read_text())
    spec = parse_spec(raw, str(sp))
    variants = [v.name for v in spec.variants]
    seeds, lengths = spec.seeds, spec.eval_lengths
    metrics = {m: np.full((len(variants), len(seeds), len(lengths)), np.nan) for m in METRICS}
    missing = []
    for vi, v in enumerate(variants):
        for si, s in enumerate(seeds):
            p = out / "runs" / v / f"seed{s}" / "eval.json"
            if not p.is_file():
                missing.append(f"{v}/seed{s}")
                continue
            rows = {r["length"]: r for r in json.loads(p.read_text())["rows"]}
            for li, n in enumerate(lengths):
                for m in METRICS:
                    val = rows.get(n, {}).get(m)
                    if val is not None:
                        metrics[m][vi, si, li] = val
    if len(missing) == len(variants) * len(seeds):
        raise ReportError(f"{out}: no evaluated runs yet (no runs/<variant>/seed<k>/eval.json); run "
                          "`workbench experiment run SPEC --out DIR` first")
    trained = [v.name for v in spec.variants if v.trained]
    hist, done = {}, {}
    for v in trained:
        for s in seeds:
            rd = out / "runs" / v / f"seed{s}"
            if (rd / "history.json").is_file():
                hist[v, s] = [h["ce"] for h in json.loads((rd / "history.json").read_text())]
            if (rd / "done.json").is_file():
                done[v, s] = json.loads((rd / "done.json").read_text())
    steps = spec.train["steps"]
    loss = np.full((len(trained), len(seeds), steps), np.nan)
    for (v, s), h in hist.items():
        loss[trained.index(v), seeds.index(s), :len(h)] = h[:steps]
    used = [m for m in METRICS if not np.all(np.isnan(metrics[m]))]
    return {"spec": spec, "raw": raw, "variants": variants, "seeds": seeds, "lengths": lengths,
            "multiples": spec.eval_multiples, "metrics": {m: metrics[m] for m in used}, "loss": loss,
            "trained": trained, "done": done, "missing": missing, "dir": out}


def _ms(a: np.ndarray) -> tuple[float, float]:
    a = a[~np.isnan(a)]
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _fmt(m: float, s: float, digits: int) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_tables(res: dict) -> str:
    spec = res["spec"]
    out = [f"# Experiment `{spec.name}`\n", spec.description.strip() + "\n" if spec.description else "",
           f"Task `{spec.task}`, training length {spec.train_length}, {spec.train['steps']} steps × batch "
           f"{spec.train['batch_size']}, seeds {res['seeds']}. Entries: mean ± sd over seeds "
           f"(sample sd, n = {len(res['seeds'])}).\n"]
    if res["missing"]:
        out.append(f"**Incomplete**: no evaluation yet for {', '.join(res['missing'])}.\n")
    out.append("| variant | knobs |\n|---|---|")
    for v in spec.variants:
        own = ", ".join(f"{k}={json.dumps(val)}" for k, val in v.own.items()) or "(base)"
        note = f"evaluated on {v.parent}'s models; " if v.parent else ""
        out.append(f"| {v.name} | {note}{own} |")
    head = "| variant | " + " | ".join(f"{m}×" for m in res["multiples"]) + " |"
    sep = "|---" * (len(res["multiples"]) + 1) + "|"
    for m, arr in res["metrics"].items():
        digits = 2 if m.startswith("acc") or m == "key_mass" else 3
        out += ["", f"## {LABELS.get(m, m)}\n", head, sep]
        for vi, v in enumerate(res["variants"]):
            cells = [_fmt(*_ms(arr[vi, :, li]), digits) for li in range(len(res["lengths"]))]
            if all(c == "–" for c in cells):
                continue
            out.append(f"| {v} | " + " | ".join(cells) + " |")
    if res["done"]:
        out += ["", "## Training\n", "| variant | seed | final answer loss | seconds in steps | tokens/s |",
                "|---|---|---|---|---|"]
        for (v, s), d in sorted(res["done"].items()):
            out.append(f"| {v} | {s} | {d['final_loss']:.4f} | {d['train_seconds_in_steps']:.0f} | "
                       f"{d['tokens_per_second']:.0f} |")
    return "\n".join(out) + "\n"


def write_csv(res: dict, rdir: Path) -> tuple[Path, Path]:
    rows_path, sum_path = rdir / "results.csv", rdir / "summary.csv"
    ms = list(res["metrics"])
    with rows_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "length", "multiple", *ms])
        for vi, v in enumerate(res["variants"]):
            for si, s in enumerate(res["seeds"]):
                for li, n in enumerate(res["lengths"]):
                    w.writerow([v, s, n, res["multiples"][li],
                                *[f"{res['metrics'][m][vi, si, li]:.6g}" for m in ms]])
    with sum_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "multiple", "length", "metric", "mean", "sd", "min", "max", "n_seeds"])
        for m in ms:
            for vi, v in enumerate(res["variants"]):
                for li, n in enumerate(res["lengths"]):
                    a = res["metrics"][m][vi, :, li]
                    a = a[~np.isnan(a)]
                    if a.size:
                        mean, sd = _ms(a)
                        w.writerow([v, res["multiples"][li], n, m, f"{mean:.6g}", f"{sd:.6g}", f"{a.min():.6g}",
                                    f"{a.max():.6g}", a.size])
    return rows_path, sum_path


def to_dataset(res: dict):
    """The results as one xarray Dataset (eval metrics and loss curves), provenance in attrs."""
    import xarray as xr

    from workbench.experiment.runner import versions
    data = {m: (("variant", "seed", "length"), a) for m, a in res["metrics"].items()}
    data["train_loss"] = (("trained_variant", "seed", "step"), res["loss"])
    ds = xr.Dataset(data, coords={"variant": res["variants"], "seed": res["seeds"], "length": res["lengths"],
                                  "multiple": ("length", res["multiples"]), "trained_variant": res["trained"],
                                  "step": np.arange(1, res["loss"].shape[-1] + 1)})
    for m in res["metrics"]:
        ds[m].attrs["long_name"] = LABELS.get(m, m)
    ds.attrs.update({"experiment": res["spec"].name, "task": res["spec"].task,
                     "spec": json.dumps(res["raw"], default=str), "versions": json.dumps(versions()),
                     "variant_knobs": json.dumps({v.name: v.knobs for v in res["spec"].variants}, default=str),
                     "variant_parent": json.dumps({v.name: v.parent for v in res["spec"].variants})})
    return ds


def open_metrics(path: str | Path):
    """The report's metrics.zarr as an xarray Dataset (spec/versions in attrs, JSON)."""
    import xarray as xr
    path = Path(path)
    if path.is_dir() and (path / "report" / "metrics.zarr").exists():
        path = path / "report" / "metrics.zarr"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics store (run `workbench experiment report DIR` first)")
    return xr.open_zarr(path, consolidated=False).load()


def _band(fig, x, arr, name, color, row=None, col=None, dash=None):
    import plotly.graph_objects as go
    mean = np.nanmean(arr, 0) if np.isfinite(arr).any() else arr[0]
    lo, hi = np.nanmin(arr, 0), np.nanmax(arr, 0)
    kw = {"row": row, "col": col} if row else {}
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(hi) + list(lo)[::-1], fill="toself",
                             fillcolor=color, opacity=0.15, line={"width": 0}, hoverinfo="skip", showlegend=False,
                             legendgroup=name), **kw)
    fig.add_trace(go.Scatter(x=list(x), y=list(mean), name=name, mode="lines+markers", legendgroup=name,
                             line={"color": color, "dash": dash}), **kw)


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def figures(res: dict) -> dict:
    """{name: plotly Figure}: accuracy (3 panels), entropy vs ln n, key mass, loss curves."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x = res["lengths"]
    figs = {}
    accs = [m for m in ("acc", "acc_first", "acc_distractor", "acc_needle", "loss_beyond") if m in res["metrics"]]
    f = make_subplots(rows=1, cols=len(accs), subplot_titles=[LABELS[m] for m in accs])
    for vi, v in enumerate(res["variants"]):
        for j, m in enumerate(accs):
            _band(f, x, res["metrics"][m][vi], v, COLORS[vi % 10], 1, j + 1)
            if j:
                f.data[-1].showlegend = False
    f.update_xaxes(type="log", title="evaluation length (tokens)")
    f.update_layout(title=f"{res['spec'].name}: retrieval vs length (mean over seeds; band = min–max)",
                    height=420, width=420 * len(accs) + 200)
    figs["accuracy"] = f
    if "entropy" in res["metrics"]:
        f = go.Figure()
        for vi, v in enumerate(res["variants"]):
            a = res["metrics"]["entropy"][vi]
            if np.isnan(a).all():
                continue
            _band(f, x, a, f"{v} as run", COLORS[vi % 10])
            _band(f, x, res["metrics"]["entropy_no_temp"][vi], f"{v} no temperature", COLORS[vi % 10], dash="dot")
        ln = np.nanmean(res["metrics"]["ln_n"], (0, 1))
        f.add_trace(go.Scatter(x=x, y=ln, name="ln n", line={"color": "black", "dash": "dash"}))
        f.update_xaxes(type="log", title="evaluation length (tokens)")
        f.update_layout(title="NoPE-layer attention entropy at the answer positions (nats)", height=450, width=900,
                        yaxis_title="nats")
        figs["entropy"] = f
    if "key_mass" in res["metrics"]:
        f = go.Figure()
        for vi, v in enumerate(res["variants"]):
            a = res["metrics"]["key_mass"][vi]
            if not np.isnan(a).all():
                _band(f, x, a, v, COLORS[vi % 10])
        f.update_xaxes(type="log", title="evaluation length (tokens)")
        f.update_layout(title=LABELS["key_mass"] + " (best head)", height=450, width=900)
        figs["key_mass"] = f
    f = go.Figure()
    for ti, v in enumerate(res["trained"]):
        a = res["loss"][ti]
        if np.isnan(a).all():
            continue
        k = 20
        sm = np.array([np.convolve(r, np.ones(k) / k, mode="valid") for r in np.nan_to_num(a, nan=np.nan)])
        _band(f, np.arange(k, a.shape[-1] + 1), sm, v, COLORS[res["variants"].index(v) % 10])
    f.update_layout(title="training loss (answer positions; moving mean over 20 steps)", xaxis_title="step",
                    yaxis_title="nats", height=450, width=900)
    figs["loss"] = f
    return figs


def write_report(out: str | Path, png: bool = True) -> Path:
    """Write out/report/ (see the module docstring) and return its report.md."""
    out = Path(out)
    res = load_results(out)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    md = markdown_tables(res)
    write_csv(res, rdir)
    ds = to_dataset(res)
    import shutil
    store = rdir / "metrics.zarr"
    tmp = rdir / ".metrics.zarr.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    import warnings
    with warnings.catch_warnings():     # fixed-length string coordinates (variant names) have no v3 spec yet
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        ds.to_zarr(tmp, mode="w", consolidated=False, zarr_format=3)
    shutil.rmtree(store, ignore_errors=True)
    tmp.rename(store)
    png_error = None
    figs = figures(res)
    for name, fig in figs.items():
        fig.write_html(str(rdir / f"{name}.html"), include_plotlyjs="cdn")
        if png and png_error is None:
            try:
                fig.write_image(str(rdir / f"{name}.png"), scale=1)
            except Exception as e:          # kaleido missing, or no Chromium for it to drive
                png_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    md += "\n## Figures\n\n" + "\n".join(
        f"- [{n}]({n}.html)" + (f" ![{n}]({n}.png)" if png_error is None and png else "") for n in figs) + "\n"
    if png_error:
        md += f"\nPNG export failed ({png_error}); the HTML figures are complete. Install `kaleido>=1` and Chromium.\n"
    (rdir / "report.md").write_text(md)
    return rdir / "report.md"

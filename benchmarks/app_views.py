"""How fast the app's views answer on a 1M-token run (issue 18: every view switch and search ≤ 1 s).

Builds two synthetic runs with the bundled tiny-moe's layout (6 layers × 4 heads, MoE layers 1/3/5, 8
experts, top-1) — A and a twin B with 10 % of the routing decisions and the NoPE layers' entropy
changed — of 16 documents × 65536 tokens (so the long-context views see 64K-token documents), then
times every view function the app calls, as the app calls it (the same memo caches):

- "first open": the first call on a freshly opened run (cold caches: whole-run statistics streamed);
- "switch": a second call with other arguments (another layer, expert, window) — what a user waits for
  when clicking around an open run;
- search: text, regex, and filtered (expert + layer + document + position range) searches.

    python benchmarks/app_views.py [--tokens 1048576] [--doc-tokens 65536] [--quick] [--workdir DIR]

Writes its table into docs/benchmarks.md (section app-views) unless --quick.  The runs are cached in
--workdir (default /tmp/wb_app_bench) and reused when present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_info, write_section  # noqa: E402

DOMAINS = ("prose", "code", "math")


def synthetic_run(path: Path, n_tokens: int, doc_tokens: int, twin_of: Path | None = None, seed: int = 0) -> Path:
    """A run with tiny-moe's layout: tokens with a Zipf-like distribution, experts that depend on the token
    id (so vocabulary specialisation is real), entropies ≈ a fraction of ln n_keys."""
    import workbench
    from workbench.recording import layout_for, run_attrs
    from workbench.store import RunWriter, open_run

    if path.exists():
        try:
            if open_run(path).n_tokens == n_tokens:
                return path
        except Exception:
            pass
        shutil.rmtree(path)
    model = workbench.load_model("tiny-moe")
    cfg = model.config
    probes = ("router", "entropy", "sink")
    layout = layout_for(model, probes)
    attrs = run_attrs(model, probes, model_source="tiny-moe")
    L, H, M, E = cfg.num_hidden_layers, cfg.num_attention_heads, len(cfg.moe_layer_index), cfg.num_local_experts
    kinds = cfg.layer_kinds()
    chunk = cfg.attention_chunk_size
    twin_rng = np.random.default_rng(seed + 1)
    with RunWriter.create(path, attrs=attrs, layout=layout, flush_tokens=1 << 16) as w:
        for d in range(n_tokens // doc_tokens):
            T = doc_tokens
            drng = np.random.default_rng(1000 + d)               # A and B share tokens and base statistics
            tok = np.minimum((drng.pareto(1.2, T) * 40).astype(np.int64), cfg.vocab_size - 1).astype(np.int32)
            pos = np.arange(T)
            ex = ((tok[None] * 7 + np.arange(M)[:, None] * 3 + (drng.random((M, T)) < 0.3) *
                   drng.integers(0, E, (M, T))) % E).astype(np.int16)[..., None]
            gw = (0.3 + 0.6 * drng.random((M, T, 1))).astype(np.float32)
            nk = np.stack([np.minimum(pos % chunk + 1, chunk) if k.startswith("rope") else pos + 1
                           for k in kinds]).astype(np.int32)                          # (L, T)
            ent = (np.log(nk)[:, None, :] * (0.5 + 0.4 * drng.random((L, H, T)))).astype(np.float32)
            ent0 = ent + 0.05 * np.asarray([k.startswith("nope") for k in kinds], np.float32)[:, None, None]
            sink = (drng.random((L, H, T)) / np.sqrt(nk[:, None, :])).astype(np.float32)
            if twin_of is not None:                               # B: 10 % routing changed, NoPE entropy shifted
                flip = twin_rng.random((M, T)) < 0.1
                ex[..., 0] = np.where(flip, (ex[..., 0] + 1) % E, ex[..., 0])
                ent = ent0.copy()
            w.append({"tokens": tok, "doc_id": f"d{d}", "domain": DOMAINS[d % 3], "router/experts": ex,
                      "router/weights": gw, "attention/entropy": ent, "attention/entropy_no_temp": ent0,
                      "attention/n_keys": nk, "attention/sink_mass": sink})
        w.finish()
    return path


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--doc-tokens", type=int, default=1 << 16)
    ap.add_argument("--workdir", default="/tmp/wb_app_bench")
    ap.add_argument("--quick", action="store_true", help="64K tokens, docs of 8K; never writes docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.doc_tokens = 1 << 16, 1 << 13
    runs = Path(args.workdir) / ("quick" if args.quick else "full")
    runs.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    synthetic_run(runs / "a.zarr", args.tokens, args.doc_tokens)
    synthetic_run(runs / "b.zarr", args.tokens, args.doc_tokens, twin_of=runs / "a.zarr")
    t_build = time.perf_counter() - t

    from apps import compare_views as cv
    from apps import experts_views as ev
    from apps import longctx_views as lv
    from apps import selection_views as sv
    from apps import views as v
    from workbench.store.index import build_index

    t = time.perf_counter()
    for name in ("a.zarr",):
        build_index(runs / name)
    t_index = time.perf_counter() - t
    A = v.open_cached(v.resolve_run(runs, "a.zarr"))
    B = v.open_cached(v.resolve_run(runs, "b.zarr"))
    tok = v.run_tokenizer(A)
    mid = A.n_tokens // 2
    sel = sv.make_selection("a.zarr", mid + 5)
    rows: list[tuple[str, str, float]] = []

    def add(view, what, fn):
        s = timed(fn)
        rows.append((view, what, s))
        print(f"{view:10s} {what:58s} {s * 1000:9.1f} ms", flush=True)

    last = A.n_docs - 1
    add("Routing", "first open: loads, load table, transitions, NMI, consecutive",
        lambda: (v.load_views(A, 1), v.transition_view(A, 1, 3), v.consecutive_view(A)))
    add("Routing", "switch: token window (64) + grid + path", lambda: (v.routing_tokens(A, last, 100, 64, 3, tok),
                                                                    v.token_path_view(A, mid, tok)))
    add("Routing", "switch: layer (load bars) + transition 3→5 sankey",
        lambda: (v.load_views(A, 5), v.transition_view(A, 3, 5, True, "sankey")))
    add("Entropy", "first open: NoPE profile (512 bins) + layer×head summary",
        lambda: (v.entropy_profile_view(A, "kind:nope-global", "all", "entropy", 512), v.layer_head_view(A)))
    add("Entropy", "switch: head 2, ΔH statistic", lambda: v.entropy_profile_view(A, "kind:nope-global", "2",
                                                                                "delta", 512))
    add("Entropy", "switch: selected token's layer×head entropy + marker",
        lambda: (sv.token_entropy_view(A, sel), sv.selection_html(A, sel, tok)))
    add("Entropy", "first open: sink mass vs position (NoPE layers, 64K docs)", lambda: lv.sink_view(A))
    add("Compare", "first open: alignment + routing table (A vs twin)", lambda: cv.overview(A, "all", B, "all"))
    add("Compare", "first open: load diff, transitions, profiles + ΔH heatmap",
        lambda: (cv.load_diff_view(A, "all", B, "all"), cv.transitions_view(A, "all", B, "all", 1, 3),
                 cv.entropy_compare_view(A, "all", B, "all", "kind:nope-global", "all", 512)))
    add("Compare", "switch: divergence strip + per-token ΔH (64 tokens)",
        lambda: (cv.divergence_view(A, "all", B, "all", mid, 64, tok, mid + 5),
                 cv.delta_h_strip_view(A, "all", B, "all", mid, 64)))
    add("Compare", "switch: document 3 vs document 3 (all views)",
        lambda: (cv.overview(A, 3, B, 3), cv.divergence_view(A, 3, B, 3, 0, 64, tok),
                 cv.load_diff_view(A, 3, B, 3), cv.entropy_compare_view(A, 3, B, 3, "kind:nope-global", "all", 512)))
    add("Experts", "first open: dashboard E0 @ layer 1", lambda: ev.expert_dashboard(A, 1, "E0", 5, 20, tok))
    add("Experts", "switch: dashboard E5 @ layer 5", lambda: ev.expert_dashboard(A, 5, "E5", 5, 20, tok))
    add("Search", "text 'the' (substring)", lambda: ev.search(A, "the", False, tokenizer=tok))
    add("Search", "regex '^[0-9]+$'", lambda: ev.search(A, r"^[0-9]+$", True, tokenizer=tok))
    add("Search", "expert E3 @ layer 3, document 7, positions 1000–9000",
        lambda: ev.search(A, "", False, 3, "E3", 7, "any", 1000, 9000, None, tok))
    add("Search", "text 'e' + any-layer expert E2 + chunk 5",
        lambda: ev.search(A, "e", False, None, "E2", None, "any", None, None, 5, tok))

    load = os.getloadavg()
    worst = max(s for view, what, s in rows if "first open" not in what)
    table = "\n".join(["| view | action | seconds |", "|---|---|---|"] +
                      [f"| {view} | {what} | {s:.3f} |" for view, what, s in rows])
    info = machine_info()
    body = (f"### App views on a {A.n_tokens:,}-token run (`benchmarks/app_views.py`)\n\n"
            f"Synthetic runs with tiny-moe's layout (6 layers × 4 heads, MoE layers 1/3/5, 8 experts, top-1), "
            f"{A.n_docs} documents of {args.doc_tokens:,} tokens; B = A with 10 % of the routing changed and "
            f"the NoPE entropy shifted. Building both runs took {t_build:.0f} s (cached afterwards), "
            f"`workbench index` on A {t_index:.1f} s. CPU: {info.get('cpu', '?')}, load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine). Each figure is the best of one "
            f"call — view functions as the app calls them, caches as in the app.\n\n{table}\n\n"
            f"Slowest switch or search: **{worst:.3f} s** (target ≤ 1 s). \"First open\" streams whole-run "
            f"statistics once per run and is cached for every later switch.\n")
    print(body)
    if not args.quick:
        write_section("app-views", body, "Benchmarks")
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()

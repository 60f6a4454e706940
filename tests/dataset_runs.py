"""Small recorded runs for the dataset tests (tests/test_dataset.py, test_probes_dask.py, test_analyze.py):
written with the real RunWriter, several documents per run (one of a single token), a domain per
document, and a reference run holding every document of several runs in one store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.store import RunWriter, open_run

LAYOUT = {"n_layers": 3, "n_heads": 2, "moe_layer_index": [0, 2], "top_k": 2, "n_experts": 4,
          "router": True, "router_logits": True, "entropy": True}
ATTRS = {"model_source": "synthetic", "config": {"num_local_experts": 4}, "dtype": "float32",
         "layer_kinds": ["rope-chunked/moe", "rope-chunked/dense", "nope-global/moe"]}
PROBE_ARRAYS = ["router/experts", "router/weights", "router/logits", "attention/entropy",
                "attention/entropy_no_temp", "attention/n_keys"]


def write_run(path, seed: int, lengths, domains, layout=None, attrs=None, finish: bool = True,
              flush_tokens: int = 64) -> Path:
    """A run of documents with the given lengths and domains; random top-k routing (rows of distinct
    experts), logits, entropies below ln n_keys and a ΔH ≥ 0 with temperature off."""
    layout = dict(layout or LAYOUT)
    rng = np.random.default_rng(seed)
    m, k, e = len(layout["moe_layer_index"]), layout["top_k"], layout["n_experts"]
    n_layers, n_heads = layout["n_layers"], layout["n_heads"]
    a = {**ATTRS, **(attrs or {})}
    a["config"] = {**a["config"], "num_local_experts": e}
    with RunWriter.create(path, attrs=a, layout=layout, flush_tokens=flush_tokens) as w:
        for i, (n, dom) in enumerate(zip(lengths, domains)):
            x = np.argsort(rng.random((m, n, e)), axis=2)[:, :, :k].astype(np.int16)
            if m > 1:
                x[1, : n // 2] = (x[0, : n // 2] + 1) % e  # some cross-layer structure
            doc = {"tokens": rng.integers(0, 30, n), "domain": dom, "doc_id": f"r{seed}-{i}",
                   "router/experts": x, "router/weights": rng.random((m, n, k)).astype(np.float32)}
            if layout.get("router_logits"):
                doc["router/logits"] = rng.normal(size=(m, n, e)).astype(np.float32)
            if layout.get("entropy"):
                nk = np.broadcast_to(np.arange(1, n + 1), (n_layers, n)).astype(np.int32)
                h = (rng.random((n_layers, n_heads, n)) * np.log(nk)[:, None]).astype(np.float32)
                h[0, 0] *= 0.01  # a collapsed head
                doc["attention/entropy"] = h
                doc["attention/entropy_no_temp"] = (h + rng.random(h.shape) * 0.1).astype(np.float32)
                doc["attention/n_keys"] = nk
            w.append(doc)
        if finish:
            w.finish()
    return Path(path)


def merged_run(paths, out) -> Path:
    """One run holding every document of `paths`, in order: the single-process reference."""
    runs = [open_run(p) for p in paths]
    first = runs[0]
    names = [n for n in PROBE_ARRAYS if first.has(n)]
    attrs = {k: first.attrs[k] for k in ("model_source", "config", "dtype", "layer_kinds") if k in first.attrs}
    with RunWriter.create(out, attrs=attrs, layout=first.layout.to_dict(), flush_tokens=50) as w:
        for r in runs:
            for i in range(r.n_docs):
                doc = {"tokens": r.read("tokens", doc=i), "positions": r.read("positions", doc=i),
                       "domain": str(r.read("doc_domain", doc=i)), "doc_id": f"{r.path.name}/{r.read('doc_id', doc=i)}"}
                doc.update({n: r.read(n, doc=i) for n in names})
                w.append(doc)
        w.finish()
    return Path(out)


def three_runs(root: Path, layout=None) -> list[Path]:
    """Three runs of unequal sizes with one-token, empty-domain and cross-run documents."""
    root.mkdir(parents=True, exist_ok=True)
    return [write_run(root / "a.zarr", 0, [50, 1, 70], ["code", "web", "code"], layout),
            write_run(root / "b.zarr", 1, [33, 90, 2], ["math", "web", ""], layout),
            write_run(root / "c.zarr", 2, [64, 17], ["code", "math"], layout)]

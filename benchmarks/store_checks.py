"""What the run-integrity checks of issue 17 cost, as ratios measured in one run on this machine.

    python benchmarks/store_checks.py [--docs 400] [--tokens 512] [--repeat 5] [--write-docs]

Three pairs on one synthetic run (tiny's layout, router + entropy probes, random values):
  * writing: RunWriter appends with the per-array data digests vs the same writer with digests off;
  * opening: `open_run` (cheap checks: one scandir walk, chunk presence and sizes, layer index) vs
    the same open with `check_files` switched off;
  * verifying: `Run.verify()` vs reading every committed array once with `Run.read` (the data it reads).
With --write-docs the table replaces the C section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from workbench.config import preset
from workbench.store import RunWriter, open_run
from workbench.store import reader as store_reader

LAYOUT = dict(n_layers=4, n_heads=4, moe_layer_index=[0, 1, 3], top_k=1, n_experts=4, router=True, entropy=True)


def _docs(n_docs: int, T: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, 384, T), "router/experts": rng.integers(0, 4, (3, T, 1)),
             "router/weights": rng.random((3, T, 1), dtype=np.float32),
             "attention/entropy": rng.random((4, 4, T), dtype=np.float32),
             "attention/entropy_no_temp": rng.random((4, 4, T), dtype=np.float32),
             "attention/n_keys": rng.integers(1, 999, (4, T)), "doc_id": f"d{i}"} for i in range(n_docs)]


def _write(path: Path, docs: list[dict], digests: bool) -> float:
    with RunWriter.create(path, attrs={"model_source": "tiny", "config": preset("tiny").to_hf()}, layout=LAYOUT,
                          flush_tokens=16384) as w:
        if not digests:
            w._digests = None                     # what a writer without data_digests does
        t0 = time.perf_counter()
        for d in docs:
            w.append(d)
        w.finish()
        return time.perf_counter() - t0


def _digests_alone(docs: list[dict]) -> float:
    """The digest work of a writer on these documents, timed by itself (what the writer adds)."""
    from workbench.store.schema import EMPTY_INPUT_HASH, Layout
    from workbench.store.writer import _chain_digests, digested_arrays

    dtypes = {"tokens": "int32", "router/experts": "int16", "attention/n_keys": "int32"}
    items = [{**{k: (v if k == "doc_id" else np.asarray(v).astype(dtypes.get(k, "float32"))) for k, v in d.items()},
              "positions": np.arange(len(d["tokens"]), dtype=np.int32), "domain": ""} for d in docs]
    digests = {n: EMPTY_INPUT_HASH for n in digested_arrays(Layout.from_dict(LAYOUT))}
    t0 = time.perf_counter()
    for it in items:
        _chain_digests(digests, it)
    return time.perf_counter() - t0


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per document")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    load = os.getloadavg()
    docs = _docs(a.docs, a.tokens)
    root = Path(tempfile.mkdtemp(prefix="wb-checks-"))
    try:
        w_on, w_off, dig = [], [], []
        for i in range(a.repeat):                  # interleaved, so load changes hit both alike
            w_on.append(_write(root / f"on{i}.zarr", docs, True))
            w_off.append(_write(root / f"off{i}.zarr", docs, False))
            dig.append(_digests_alone(docs))
        run_path = root / "on0.zarr"
        n_files = sum(len(f) for _, _, f in os.walk(run_path))
        real = store_reader.check_files
        run = open_run(run_path)                           # warm: imports, page cache
        run.verify()

        def unchecked():
            store_reader.check_files = lambda *args, **kw: []
            try:
                open_run(run_path)
            finally:
                store_reader.check_files = real
        open_on, open_off, read_all, verify = [], [], [], []
        for _ in range(a.repeat):                          # interleaved pairs
            open_on.append(_best(lambda: open_run(run_path), 1))
            open_off.append(_best(unchecked, 1))
            read_all.append(_best(lambda: [run.read(n) for n in run.layout.arrays()], 1))
            verify.append(_best(run.verify, 1))
        open_on, open_off, read_all, verify = map(statistics.median, (open_on, open_off, read_all, verify))
        nbytes = sum(run.read(n).nbytes for n in run.layout.arrays() if run.read(n).dtype.kind != "O")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"docs": a.docs, "tokens": a.docs * a.tokens, "files": n_files, "data_mb": round(nbytes / 2**20, 1),
           "digests_alone_s": round(statistics.median(dig), 3),
           "write_digests_s": round(statistics.median(w_on), 3), "write_plain_s": round(statistics.median(w_off), 3),
           "open_checked_ms": round(open_on * 1e3, 1), "open_unchecked_ms": round(open_off * 1e3, 1),
           "read_all_s": round(read_all, 3), "verify_s": round(verify, 3), "loadavg": [round(x, 2) for x in load]}
    print(json.dumps(res, indent=2))
    if a.write_docs:
        _write_docs(res, argv)
    return res


def _write_docs(r: dict, argv) -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    cmd = "python benchmarks/store_checks.py " + (" ".join(argv) if argv else "--write-docs")
    body = (f"## Run integrity checks (issue 17)\n\n`{cmd}` — one synthetic run of {r['docs']} documents, "
            f"{r['tokens']} tokens (tiny's layout, router + entropy: {r['files']} files, {r['data_mb']} MB "
            f"uncompressed); medians of 5, writes interleaved; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, load average at start {' '.join(map(str, r['loadavg']))}.\n\n"
            "| what | with the check | without | ratio |\n|---|---|---|---|\n"
            f"| write (append + commit, per-array data digests) | {r['write_digests_s']} s | {r['write_plain_s']} s | "
            f"{r['write_digests_s'] / r['write_plain_s']:.2f}× |\n"
            f"| … of which the digests alone (timed by themselves) | {r['digests_alone_s']} s | {r['write_plain_s']} s "
            f"(the write) | {r['digests_alone_s'] / r['write_plain_s']:.2f}× of a write |\n"
            f"| `open_run` (cheap checks: walk, chunk presence/sizes, layer index) | {r['open_checked_ms']} ms | "
            f"{r['open_unchecked_ms']} ms | {r['open_checked_ms'] / r['open_unchecked_ms']:.2f}× |\n"
            f"| `Run.verify()` vs reading every array once | {r['verify_s']} s | {r['read_all_s']} s | "
            f"{r['verify_s'] / r['read_all_s']:.2f}× |\n\n"
            "The write pair is the noisiest figure on a shared machine; the digest work timed by itself is the "
            "cleaner measure of what the digests add to the writer (numpy copies to token-major order + sha256). "
            "A real recording adds the model's forward pass to the writer's time, so their share is smaller there. "
            "Opening stays O(files) `lstat` calls with no chunk data; `verify` reads every committed byte once.\n")
    text = path.read_text()
    begin, end = "<!-- C:begin -->", "<!-- C:end -->"
    block = f"{begin}\n{body}{end}"
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()

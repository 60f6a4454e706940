"""Data-parallel recording over `torch.distributed`: each rank records a share of the documents.

    torchrun --nproc-per-node 8 -m workbench record --model DIR --input docs.jsonl --out run.zarr
    workbench record --model DIR --input docs.jsonl --out run.zarr --dp 2          # spawns 2 local ranks
    record_dp("tiny", docs, "run.zarr", nprocs=2)                                   # the same from Python

    every rank: tokenise all inputs → skip ids already in OUT → assign(lengths, world)
                → record its documents into OUT/../.OUT.parts/rankR-of-W.zarr (resumable, by doc id)
    all_gather(status)   one rank failing fails every rank with its message (no one waits forever)
    rank 0:     append every document from the parts into OUT in input order, finish, remove parts

The merged run equals a single-process run of the same inputs array for array
(tests/test_distributed.py). Ranks write separate stores and rank 0 copies: zarr chunks span several
documents, so two processes writing disjoint documents of one store would read-modify-write the same
chunk files and lose each other's data; zarr has no cross-process lock.

The process group carries only small Python objects (statuses), so it always uses gloo — also on GPU
nodes, where each rank computes on cuda:LOCAL_RANK. Each rank holds a whole model (in memory, or
layer-streamed with `streamed=True`); splitting one model across GPUs is layer placement in
`streamed.py` (`devices=[...]`, one process).
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from workbench.store import RunWriter, open_run
from workbench.store.schema import PROBE_ARRAYS

WINDOW_TOKENS = 65536          # merge reads each part in windows this long (one chunk row per array)


def assign(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Deterministic split of documents over ranks, balanced by tokens: longest first, each to the
    least-loaded rank (ties: lower index, lower rank). Each rank's indices are in input order."""
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(x) for x in out]


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _device_for(device, local_rank: int) -> str:
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu" if device in (None, "auto") else str(device)


def _open_source(source, dtype, device, streamed: bool):
    """(model-like object with .tokenizer and .config, loaded model or None, StreamedCheckpoint or None)."""
    if streamed:
        from workbench.streamed import StreamedCheckpoint
        ck = StreamedCheckpoint(source)
        return ck.skeleton, None, ck
    from workbench.checkpoint import load_model
    model = load_model(source, dtype=dtype, device=device)
    return model, model, None


def _done_ids(out: Path, docs: list[dict] | None = None) -> set[str]:
    """doc ids the run at `out` holds; with `docs`, first refuse any whose content differs from the
    recording under the same id (workbench/resume.py)."""
    if docs is not None:
        from workbench.resume import plan_resume
        plan_resume(out, docs).raise_on_conflict()
    if not out.exists():
        return set()
    run = open_run(out)
    return {str(i) for i in run.read("doc_id")} if run.n_docs else set()


def record_rank(source, inputs: Iterable, out, probes: Sequence[str] = ("router", "entropy"), *,
                dtype=None, device=None, segment: int = 4096, streamed: bool = False,
                stream_options: dict | None = None, progress: bool = False) -> Path:
    """Run on every rank of an initialised process group; returns `out`. Rank 0 writes `out`."""
    from workbench.recording import _normalise_inputs, record

    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    out = Path(out)
    device = _device_for(device, local)
    status: dict = {"rank": rank, "error": None}
    docs: list[dict] = []
    try:
        holder, model, ck = _open_source(source, dtype, device, streamed)
        docs = _normalise_inputs(holder, inputs)
        dup = sorted(i for i, n in Counter(d["doc_id"] for d in docs).items() if n > 1)
        if dup:
            raise ValueError(f"duplicate document ids {dup[:5]} in inputs")
        done = _done_ids(out, docs)
        todo = [d for d in docs if d["doc_id"] not in done]
        mine = [{"tokens": todo[i]["tokens"], "id": todo[i]["doc_id"], "domain": todo[i]["domain"]}
                for i in assign([len(d["tokens"]) for d in todo], world)[rank]]
        part = parts_dir(out) / f"rank{rank:03d}-of-{world:03d}.zarr"
        source_name = str(source)
        if mine:
            if streamed:
                from workbench.streamed import streamed_record
                streamed_record(ck, mine, part, probes, dtype=dtype, device=device, segment=segment,
                                progress=progress and rank == 0, model_source=source_name, **(stream_options or {}))
            else:
                record(model, mine, part, probes, segment=segment, progress=progress and rank == 0,
                       model_source=source_name)
    except Exception as e:           # reported to every rank below; re-raised there
        status["error"] = f"rank {rank}: {type(e).__name__}: {e}"
    gather_status(status, world, "distributed recording")
    merged = {"error": None}
    if rank == 0:
        try:
            merge_parts(out, docs, parts_dir(out), world=world)
        except Exception as e:
            merged["error"] = f"merge on rank 0: {type(e).__name__}: {e}"
    results = [None] * world
    dist.all_gather_object(results, merged)
    if results[0]["error"]:
        raise RuntimeError(results[0]["error"])
    return out


def gather_status(status: dict, world: int, what: str) -> list[dict]:
    """Every rank's status dict ({"error": str | None, …}) on every rank; if any rank failed, every
    rank raises with all their messages — so no rank waits forever in a later collective."""
    statuses = [None] * world
    dist.all_gather_object(statuses, status)
    errors = [s["error"] for s in statuses if s["error"]]
    if errors:
        raise RuntimeError(f"{what} failed: " + "; ".join(errors))
    return statuses


class _PartReader:
    """Sequential reader of one part store: documents come out in the part's order, arrays are read
    in windows of WINDOW_TOKENS so every chunk is decompressed about once."""

    def __init__(self, path: Path):
        self.run = open_run(path)
        self.names = [n for n in PROBE_ARRAYS if self.run.has(n)]
        self.index = {str(i): k for k, i in enumerate(self.run.read("doc_id"))} if self.run.n_docs else {}
        self.domains = self.run.read("doc_domain") if self.run.n_docs else []
        self.lo = self.hi = 0
        self.cache: dict[str, np.ndarray] = {}

    def doc(self, k: int) -> dict:
        a, b = int(self.run.doc_offsets[k]), int(self.run.doc_offsets[k + 1])
        if not (self.lo <= a and b <= self.hi):
            self.lo, self.hi = a, min(max(b, a + WINDOW_TOKENS), self.run.n_tokens)
            for name in ["tokens", "positions", *self.names]:
                arr = self.run.array(name)
                axis = arr.metadata.dimension_names.index("token")
                sel = tuple(slice(self.lo, self.hi) if i == axis else slice(None) for i in range(arr.ndim))
                self.cache[name] = np.asarray(arr[sel])
        out = {}
        for name, window in self.cache.items():
            axis = self.run.array(name).metadata.dimension_names.index("token")
            sel = tuple(slice(a - self.lo, b - self.lo) if i == axis else slice(None) for i in range(window.ndim))
            out[name] = window[sel]
        out["domain"] = str(self.domains[k])
        return out


def merge_parts(out, docs: list[dict], parts: Path, *, world: int | None = None) -> Path:
    """Append every document of `docs` not yet in `out` from the part stores under `parts`, in input
    order; finish the run and remove `parts`. Any part store there counts (an earlier attempt with
    another world size included)."""
    out = Path(out)
    readers = [_PartReader(p) for p in sorted(parts.glob("*.zarr"))] if parts.exists() else []
    where = {}
    for r in readers:
        for doc_id, k in r.index.items():
            where.setdefault(doc_id, (r, k))
    done = _done_ids(out, docs)
    todo = [d for d in docs if d["doc_id"] not in done]
    missing = [d["doc_id"] for d in todo if d["doc_id"] not in where]
    if missing:
        raise RuntimeError(f"merge: documents {missing[:5]} are in no part store under {parts}")
    if not readers and not out.exists():
        raise RuntimeError(f"merge: nothing to merge into {out} (no part stores, no inputs)")
    if readers:
        from workbench.store.writer import WRITER_ATTRS
        attrs = {k: v for k, v in readers[0].run.attrs.items() if k not in (*WRITER_ATTRS, "config_hash")}
        attrs["execution"] = {**attrs.get("execution", {"mode": "in-memory"}), "data_parallel": world,
                              "devices": sorted({str(r.run.attrs.get("device")) for r in readers})}
        layout = readers[0].run.layout
    else:
        run = open_run(out)
        attrs, layout = {"config": run.attrs["config"]}, run.layout
    writer = RunWriter.create(out, attrs=attrs, layout=layout.to_dict(), exist_ok=True)
    try:
        for d in todo:
            reader, k = where[d["doc_id"]]
            arrays = reader.doc(k)
            if not np.array_equal(arrays["tokens"], np.asarray(d["tokens"], dtype=np.int32)):
                raise RuntimeError(f"merge: part store {reader.run.path} holds different tokens for "
                                   f"document {d['doc_id']!r}")
            arrays["doc_id"] = d["doc_id"]
            writer.append(arrays)
        writer.finish()
    finally:
        writer.close()
    shutil.rmtree(parts, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------- launching
def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's variables; False when not under torchrun."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, kwargs: dict, target=None, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if not torch.cuda.is_available():     # share the host's cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    try:
        (target or record_rank)(**kwargs)
    finally:
        dist.destroy_process_group()


def spawn(target, nprocs: int, kwargs: dict, backend: str = "gloo") -> None:
    """Run `target(**kwargs)` in `nprocs` local ranks (torch.multiprocessing) of a fresh process group;
    `target` must be importable (a module-level function). One rank raising stops them all."""
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be ≥ 1, got {nprocs}")
    mp.spawn(_worker, args=(nprocs, _free_port(), kwargs, target, backend), nprocs=nprocs, join=True)


def record_dp(source, inputs: Iterable, out, probes: Sequence[str] = ("router", "entropy"), *, nprocs: int = 2,
              **kwargs) -> Path:
    """Spawn `nprocs` local ranks (torch.multiprocessing) and record `inputs` into `out` with them."""
    args = dict(source=source, inputs=list(inputs), out=str(out), probes=tuple(probes), **kwargs)
    spawn(record_rank, nprocs, args)
    return Path(out)


def cli_record(args, docs: list) -> int:
    """`workbench record` with --streamed, --devices, --dp, or under torchrun."""
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    options = {"batch_tokens": args.batch_tokens, "prefetch": args.prefetch}
    if devices:
        options.update(devices=devices, resident=True)
    streamed = args.streamed or bool(devices)
    distributed = init_from_env()
    if devices and (distributed or args.dp):
        raise ValueError("--devices (layer placement in one process) cannot be combined with data parallelism")
    common = dict(dtype=args.dtype, device=args.device, segment=args.segment, streamed=streamed,
                  stream_options=options, progress=not args.quiet)
    if distributed:
        try:
            record_rank(args.model, docs, args.out, probes, **common)
            if dist.get_rank() == 0:
                print(f"recorded {len(docs)} documents into {args.out} with {dist.get_world_size()} ranks")
        finally:
            dist.destroy_process_group()
    elif args.dp:
        record_dp(args.model, docs, args.out, probes, nprocs=args.dp, **common)
        print(f"recorded {len(docs)} documents into {args.out} with {args.dp} ranks")
    else:
        from workbench.streamed import streamed_record
        streamed_record(args.model, docs, args.out, probes, dtype=args.dtype, device=args.device,
                        segment=args.segment, progress=not args.quiet, model_source=args.model, **options)
        print(f"recorded {len(docs)} documents into {args.out} (layer-streamed)")
    return 0

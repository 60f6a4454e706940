"""Expert parallelism over `torch.distributed`: W ranks, each holding every non-expert weight and a
contiguous E/W slice of every MoE layer's routed experts, read straight from the safetensors shards.

    torchrun --nproc-per-node 8 -m workbench record --model DIR --input docs.jsonl --out run.zarr --ep 8
    workbench record --model DIR --input docs.jsonl --out run.zarr --ep 2         # spawns 2 local ranks
    model = load_expert_parallel(DIR, rank, world, dtype="bf16", device="cuda:0")  # in your own group
    record_ep(DIR, docs, "run.zarr", nprocs=2)                                     # the same from Python

Every rank runs the whole forward on the same (replicated) activations; only the routed experts differ:

    x ─ attention, norms, dense MLPs, router, top-k, gates          identical on every rank (same inputs,
     │                                                              same weights, same kernels)
     ├─ part_r = Σ_{slots routed to experts r·E/W … (r+1)·E/W − 1} expert_e(gate · x)     zero elsewhere
     │  routed = all_reduce(part_r, SUM)                            the one collective per MoE layer
     └─ out = shared_expert(x) + routed                             the shared expert counted once

so every tap (router logits, top-k ids and gates, routed/shared outputs, attention statistics) fires
with the same value on every rank, and `record` runs unchanged: rank 0 writes the store, the others
run the same documents in the same order and drop their tap values.

Equality with one process: with top-1 routing each token's routed output is non-zero on exactly one
rank, and x + 0 is exact, so the sum is bit-equal whatever order the collective adds in; with top-2
the two non-zero terms add commutatively (a + b = b + a in IEEE arithmetic), also exact. From top-3
on the addition order of the collective can differ from `sum(1)` by rounding (tests/test_expert_parallel.py).

Gradients: the forward stays differentiable. The collective is Megatron's pair of conjugate functions
(Shoeybi et al. 2019, §3): `_Replicated` (identity forward, all-reduce of the input gradient — each
rank sees only its experts' share of ∂L/∂x) in front of the local experts, `_Reduce` (all-reduce
forward, identity backward — the loss is replicated, so each rank's part gets the full gradient)
behind them. Every rank must call backward on the same loss.

The process group carries the routed outputs (N × D per MoE layer), so on GPUs it is NCCL for CUDA
tensors and gloo for the objects exchanged at the start (`cpu:gloo,cuda:nccl`).

Legend: N tokens, D hidden, E experts per layer, W ranks (world), r rank.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from workbench.bundled import resolve_source
from workbench.checkpoint import (
    CheckpointError,
    _assign,
    _by_shard,
    _check,
    _open,
    _shard_map,
    finish_loaded,
    load_model,
    read_config,
    read_headers,
    recover_checkpoint,
    resolve_device,
    resolve_dtype,
    stored_dtype,
    stream_tensors,
    text_names,
)
from workbench.config import PRESETS, preset
from workbench.model.moe import Llama4TextExperts
from workbench.model.transformer import Llama4ForCausalLM

_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def expert_range(num_experts: int, rank: int, world: int) -> range:
    """Global ids of the experts rank `rank` of `world` holds in every MoE layer (contiguous)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"expert parallelism: world size must be a positive integer, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"expert parallelism: rank {rank!r} outside 0..{world - 1} (world size {world})")
    E = num_experts
    if E % world:
        ok = [w for w in range(1, E + 1) if E % w == 0]
        raise ValueError(f"expert parallelism: num_local_experts={E} is not divisible by world size {world}; "
                         f"use one of {ok} ranks")
    per = E // world
    return range(rank * per, (rank + 1) * per)


def _check_group(rank: int, world: int, group=None) -> None:
    if world == 1:
        return
    if not dist.is_initialized():
        raise RuntimeError(f"expert-parallel model (rank {rank} of {world}) needs an initialised process group "
                           "(torch.distributed.init_process_group, torchrun, or record_ep)")
    g_world, g_rank = dist.get_world_size(group), dist.get_rank(group)
    if (g_world, g_rank) != (world, rank):
        raise ValueError(f"expert parallelism: the model was split for rank {rank} of {world}, but this process "
                         f"is rank {g_rank} of a process group of size {g_world}")


class _Replicated(torch.autograd.Function):
    """Identity forward; all-reduce (SUM) of the gradient: each rank holds only its experts' share."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Reduce(torch.autograd.Function):
    """All-reduce (SUM) forward; identity backward: the loss is replicated on every rank."""

    @staticmethod
    def forward(ctx, part, group):
        out = part.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ExpertParallelExperts(Llama4TextExperts):
    """This rank's experts of one MoE layer; `forward` returns the whole layer's routed output (the
    sum over ranks), so it is a drop-in for `Llama4TextExperts`. Every rank must call it."""

    def __init__(self, hidden: int, inner: int, *, rank: int, world: int, total: int, group=None):
        ids = expert_range(total, rank, world)
        super().__init__(len(ids), hidden, inner, first=ids.start, total=total)
        self.rank, self.world, self.group = rank, world, group

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, gate_NK: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return super().forward(x_ND, ids_NK, gate_NK)
        _check_group(self.rank, self.world, self.group)
        x_ND, gate_NK = _Replicated.apply(x_ND, self.group), _Replicated.apply(gate_NK, self.group)
        return _Reduce.apply(super().forward(x_ND, ids_NK, gate_NK), self.group)

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.gate_up_proj.shape[0] - 1} of {self.total}, " \
               f"rank {self.rank} of {self.world}"


def _split(model: Llama4ForCausalLM, rank: int, world: int, group) -> list[str]:
    """Swap every MoE layer's experts for this rank's `ExpertParallelExperts` (on the meta device when
    the model is); returns the parameter names of the swapped modules."""
    cfg, names = model.config, []
    expert_range(cfg.num_local_experts, rank, world)
    for i, layer in enumerate(model.model.layers):
        if not layer.is_moe:
            continue
        old = layer.feed_forward.experts
        with torch.device(old.gate_up_proj.device):
            new = ExpertParallelExperts(cfg.hidden_size, cfg.intermediate_size, rank=rank, world=world,
                                        total=cfg.num_local_experts, group=group)
        if old.gate_up_proj.device.type != "meta":      # a materialised model: keep this rank's rows only
            lo, hi = new.first, new.first + new.gate_up_proj.shape[0]
            for p in _EXPERT_PARAMS:
                setattr(new, p, torch.nn.Parameter(getattr(old, p).detach()[lo:hi].clone(),
                                                   requires_grad=getattr(old, p).requires_grad))
        layer.feed_forward.experts = new
        names += [f"model.layers.{i}.feed_forward.experts.{p}" for p in _EXPERT_PARAMS]
    return names


def load_expert_parallel(source: str | os.PathLike, rank: int, world: int, dtype=None, device=None, *,
                         group=None, seed: int = 0) -> Llama4ForCausalLM:
    """Rank `rank` of `world`'s part of a model: every non-expert weight, and experts
    `expert_range(num_local_experts, rank, world)` of every MoE layer, sliced out of the shards with safetensors
    `get_slice` (the other ranks' rows are never read). A preset builds its random model whole and
    keeps this rank's slice (tiny presets only). When a process group is initialised its rank and size
    must be `rank` and `world`."""
    dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if dist.is_initialized():
        _check_group(rank, world, group)
    if isinstance(source, str) and source in PRESETS:
        model = load_model(source, dtype=dtype, device=dev, seed=seed)
        _split(model, rank, world, group)
        model.expert_parallel = {"rank": rank, "world": world}
        return model
    directory = Path(resolve_source(source))
    if not directory.is_dir():
        error = NotADirectoryError if directory.exists() else FileNotFoundError
        raise error(f"{str(source)!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint directory")
    recover_checkpoint(directory)          # a save killed mid-swap (two-rename fallback) left it aside
    config, _ = read_config(directory)
    expert_range(config.num_local_experts, rank, world)   # divisibility, before anything is read
    shard_of = _shard_map(directory)
    names = text_names(shard_of, directory, "not loaded (expert parallelism runs the text path)")
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    shapes, ck_dtypes = read_headers(shard_of, names)
    _check(model, shapes, str(directory))                 # against the whole model: exact keys and shapes
    stored = stored_dtype(set(ck_dtypes.values()), directory,
                          "quantized and integer checkpoints are not supported by expert parallelism")
    dtype = dtype or stored
    sliced = set(_split(model, rank, world, group))
    params = dict(model.named_parameters())
    for name, t in stream_tensors(shard_of, names, keep=lambda n: n in params and n not in sliced,
                                  device=dev, dtype=dtype):      # each read into storage of its own
        _assign(model, name, t)
        del t
    for path, group_names in _by_shard(shard_of, {n: names[n] for n in sorted(sliced)}).items():
        with _open(path) as f:
            for name in group_names:
                ex = model.get_submodule(name.rpartition(".")[0])
                lo, hi = ex.first, ex.first + ex.gate_up_proj.shape[0]
                try:
                    t = f.get_slice(names[name])[lo:hi]   # reads rows lo..hi-1 of (E, …) only
                except Exception as e:                     # safetensors raises its own error types
                    raise CheckpointError(f"{path}: cannot read experts {lo}..{hi - 1} of {names[name]!r} "
                                          f"({e})") from None
                _assign(model, name, t.to(device=dev, dtype=dtype, copy=True))
                del t
    model = finish_loaded(model, config, directory, dev)
    model.expert_parallel = {"rank": rank, "world": world}
    return model


def resident_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of this process's parameters: routed experts and everything else (tied weights once)."""
    out, seen = {"experts": 0, "other": 0}, set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out["experts" if ".experts." in name else "other"] += p.numel() * p.element_size()
    return out


# ------------------------------------------------------------------------------------ recording
def record_ep_rank(source, inputs: Iterable, out, probes: Sequence[str] = ("router", "entropy"), *,
                   dtype=None, device=None, segment: int = 4096, progress: bool = False) -> Path:
    """Run on every rank of an initialised process group. All ranks run every document; rank 0
    decides which are left to do (resume), tells the others, and writes `out`."""
    from workbench.distributed import _device_for, _done_ids, gather_status
    from workbench.recording import _normalise_inputs, record, run_document

    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device_for(device, int(os.environ.get("LOCAL_RANK", rank)))
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    out, probes = Path(out), tuple(probes)
    status: dict = {"error": None, "todo": None}
    try:
        model = load_expert_parallel(source, rank, world, dtype=dtype, device=device)
        if rank == 0:
            docs = _normalise_inputs(model, inputs)
            # create (or reopen and validate) the store before any rank starts a forward: a refusal
            # here reaches every rank; one in mid-run would leave the others waiting in a collective
            record(model, [], out, probes, segment=segment, progress=False, model_source=str(source), finish=False)
            done = _done_ids(out, docs)
            status["todo"] = [d for d in docs if d["doc_id"] not in done]
    except Exception as e:           # reported to every rank below; re-raised there
        status["error"] = f"rank {rank}: {type(e).__name__}: {e}"
    todo = gather_status(status, world, "expert-parallel recording")[0]["todo"]
    if rank == 0:
        record(model, [{"tokens": d["tokens"], "id": d["doc_id"], "domain": d["domain"]} for d in todo], out,
               probes, segment=segment, progress=progress, model_source=str(source))
        _note_execution(out, world, device)
    else:
        for d in todo:               # the same forwards in the same order; the taps' values are dropped
            run_document(model, d["tokens"], probes, segment)
    dist.barrier()                   # every rank returns once the store is complete
    return out


def _note_execution(out: Path, world: int, device) -> None:
    import zarr

    group = zarr.open_group(out, mode="r+")
    group.attrs["execution"] = {"mode": "expert-parallel", "expert_parallel": world, "device_rank0": str(device)}


def backend_for(device) -> str:
    """NCCL for CUDA tensors (the routed outputs), gloo for CPU tensors and objects."""
    use_cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def record_ep(source, inputs: Iterable, out, probes: Sequence[str] = ("router", "entropy"), *, nprocs: int = 2,
              **kwargs) -> Path:
    """Spawn `nprocs` local ranks (one expert slice each) and record `inputs` into `out` with them."""
    from workbench.distributed import spawn

    config = preset(source) if isinstance(source, str) and source in PRESETS else read_config(Path(source))[0]
    expert_range(config.num_local_experts, 0, nprocs)          # refuse here, before any process starts
    args = dict(source=str(source), inputs=list(inputs), out=str(out), probes=tuple(probes), **kwargs)
    spawn(record_ep_rank, nprocs, args, backend=backend_for(kwargs.get("device")))
    return Path(out)


def cli_record_ep(args, docs: list) -> int:
    """`workbench record --ep N`: N local ranks, or under torchrun a world of exactly N ranks."""
    clash = [f for f, on in (("--dp", args.dp), ("--streamed", args.streamed), ("--devices", args.devices)) if on]
    if clash:
        raise ValueError(f"--ep (expert parallelism) cannot be combined with {', '.join(clash)}")
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    common = dict(dtype=args.dtype, device=args.device, segment=args.segment, progress=not args.quiet)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:                   # under torchrun: this process is one of the ranks
        if world != args.ep:
            raise ValueError(f"--ep {args.ep} but torchrun started {world} ranks; they must be equal")
        if not dist.is_initialized():
            dist.init_process_group(backend_for(args.device), timeout=datetime.timedelta(seconds=1800))
        try:
            record_ep_rank(args.model, docs, args.out, probes, **common)
            if dist.get_rank() == 0:
                print(f"recorded {len(docs)} documents into {args.out} with {world} expert-parallel ranks")
        finally:
            dist.destroy_process_group()
        return 0
    record_ep(args.model, docs, args.out, probes, nprocs=args.ep, **common)
    print(f"recorded {len(docs)} documents into {args.out} with {args.ep} expert-parallel ranks")
    return 0

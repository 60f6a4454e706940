"""`workbench` command line. Every subcommand has --help.

    workbench info SOURCE                      config summary, parameters, layer schedule, memory
    workbench generate SOURCE --prompt TEXT    greedy or sampled generation
    workbench record --model SOURCE --input FILE --probes router,entropy --out RUN.zarr
                     [--streamed [--devices cuda:0,cuda:1]] [--dp N | --ep N]   (or under torchrun)
    workbench plan SOURCE [--dtype bf16] [--device h100-80gb|h200-141gb|cpu:GB] [--tokens N]
    workbench runs DIR                         list recorded runs
    workbench analyze RUNS... --out R.zarr|csv [--metrics …] [--workers N | --scheduler ADDR]   (dask)
    workbench verify RUN.zarr …                read a run fully and check it is whole
    workbench app [--runs DIR] [--model SOURCE] [--vision-model SOURCE] [--host 127.0.0.1] [--port 7860]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from workbench.config import PRESETS


def _source_config(source: str):
    from workbench.checkpoint import read_config
    from workbench.config import preset

    if source in PRESETS:
        return preset(source)
    from workbench.bundled import resolve_source
    path = Path(resolve_source(source))
    if not path.exists():
        raise FileNotFoundError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    return read_config(path)[0]


def cmd_info(args) -> int:
    from workbench.params import DTYPE_BYTES, count_params, human, human_bytes

    cfg = _source_config(args.source)
    counts = count_params(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_hf(), "params": counts, "layer_kinds": cfg.layer_kinds()}, indent=2))
        return 0
    print(f"source            {args.source}")
    print(f"layers            {cfg.num_hidden_layers}  (MoE {cfg.num_moe_layers}, dense "
          f"{cfg.num_hidden_layers - cfg.num_moe_layers}; NoPE {cfg.use_rope.count(False)})")
    print(f"hidden / heads    {cfg.hidden_size} / {cfg.num_attention_heads} q, {cfg.num_key_value_heads} kv, "
          f"head_dim {cfg.head_dim}")
    print(f"experts           {cfg.num_local_experts} routed (top-{cfg.num_experts_per_tok}) + 1 shared, "
          f"width {cfg.intermediate_size}; dense MLP width {cfg.intermediate_size_mlp}")
    print(f"attention         chunk {cfg.attention_chunk_size}, qk-norm {cfg.use_qk_norm}, "
          f"temperature tuning {cfg.attn_temperature_tuning} (floor_scale {cfg.floor_scale}, "
          f"attn_scale {cfg.attn_scale})")
    print(f"rope              theta {cfg.rope_theta}, scaling {cfg.rope_scaling}")
    print(f"vocab / context   {cfg.vocab_size} / {cfg.max_position_embeddings}")
    print(f"parameters        total {human(counts['total'])}, active/token {human(counts['active'])}, "
          f"routed experts {human(counts['routed_experts'])}")
    print("weights           " + ", ".join(f"{d} {human_bytes(counts['total'] * b)}" for d, b in DTYPE_BYTES.items()))
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim
    glob = cfg.use_rope.count(False) + sum(1 for r, c in zip(cfg.use_rope, cfg.is_chunked) if r and not c)
    print(f"KV cache (bf16)   {human_bytes(kv * 2 * glob)}/token on {glob} global layers; chunked layers hold "
          f"≤ {cfg.attention_chunk_size} tokens each")
    print("\nlayer  attention      ffn")
    for i, kind in enumerate(cfg.layer_kinds()):
        att, ffn = kind.split("/")
        print(f"{i:>5}  {att:<13}  {ffn}")
    return 0


def _load(args):
    import workbench

    return workbench.load_model(args.source if hasattr(args, "source") else args.model,
                                dtype=args.dtype, device=args.device)


def cmd_generate(args) -> int:
    import workbench

    model = _load(args)
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer.json; cannot encode --prompt")

    def show(_b, tok):
        if args.stream:
            sys.stdout.write(model.tokenizer.decode([tok]))
            sys.stdout.flush()

    ids = workbench.generate(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, on_token=show)
    if args.stream:
        print()
    else:
        print(model.tokenizer.decode(ids[0].tolist()))
    return 0


def cmd_record(args) -> int:
    from workbench.recording import read_inputs, record

    probes = _probe_list(args.probes)
    if args.flush_tokens is not None and args.flush_tokens <= 0:
        raise ValueError(f"--flush-tokens must be a positive number of tokens, got {args.flush_tokens}")
    if args.segment <= 0:
        raise ValueError(f"--segment must be a positive number of tokens, got {args.segment}")
    docs = read_inputs(args.input)
    if args.ep:
        from workbench.expert_parallel import cli_record_ep  # N local ranks, or the torchrun world
        return _index_after(args, cli_record_ep(args, docs))
    if args.streamed or args.dp or args.devices or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from workbench.distributed import cli_record  # layer-streamed and/or data-parallel
        return _index_after(args, cli_record(args, docs))
    model = _load(args)
    stats: dict = {}
    out = record(model, docs, args.out, probes=probes, segment=args.segment, progress=not args.quiet,
                 model_source=args.model, flush_tokens=args.flush_tokens, stats=stats)
    print(f"{out}: {stats['summary']}")
    return _index_after(args, 0)


def _index_after(args, rc: int) -> int:
    """`record --index`: build the run index (the app's Experts tab) once the recording succeeded (rank 0)."""
    if rc == 0 and getattr(args, "index", False) and os.environ.get("RANK", "0") == "0":
        from workbench.store.index import build_index

        print(f"index written to {build_index(args.out, progress=not args.quiet)}")
    return rc


def _probe_list(text: str) -> list[str]:
    """--probes "router,entropy" → names, each checked (an empty list or unknown name is an error)."""
    from workbench.recording import PROBES

    probes = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(probes) - set(PROBES))
    if unknown or not probes:
        raise ValueError(f"--probes {text!r}: " + (f"unknown probes {unknown}; " if unknown else "no probes; ")
                         + f"give a comma list of {','.join(PROBES)}")
    return probes


def cmd_plan(args) -> int:
    from workbench.plan import format_plan, make_plan

    probes = _probe_list(args.probes)
    for name in ("tokens", "segment", "batch_tokens"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of tokens, got {v}")
    plan = make_plan(args.source, dtype=args.dtype, device=args.device, tokens=args.tokens,
                     segment=args.segment, batch_tokens=args.batch_tokens, probes=probes, prefetch=args.prefetch)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_runs(args) -> int:
    from workbench.store import list_runs

    rows = list_runs(args.dir)
    if not rows:
        print(f"no runs in {args.dir}")
    for r in rows:
        print(f"{r['path']}  docs={r['n_docs']} tokens={r['n_tokens']} probes={','.join(r['probes'])} "
              f"complete={r['complete']} size={r['size_bytes']}B model={r['model_source']}")
    return 0


def cmd_index(args) -> int:
    import contextlib

    from workbench.store.index import build_index, open_index
    from workbench.store.index_dask import build_index_dask, choose_engine

    engine = args.engine if args.engine != "auto" else "dask" if args.scheduler else choose_engine(args.run)
    if engine == "memory" and args.scheduler:
        raise ValueError("--scheduler needs --engine dask (or auto)")
    if engine == "memory":
        dest = build_index(args.run, n_top=args.top, n_vocab=args.vocab, progress=not args.quiet)
    else:
        with contextlib.ExitStack() as stack:
            if args.scheduler:
                from distributed import Client
                stack.enter_context(Client(args.scheduler, timeout="30s"))
            dest = build_index_dask(args.run, n_top=args.top, n_vocab=args.vocab,
                                    progress=not args.quiet and not args.scheduler)
    idx = open_index(args.run)
    print(f"[{engine}] ", end="")
    print(f"index written to {dest}: {idx.attrs['n_tokens']} tokens, top {idx.attrs['n_top']} contexts and "
          f"{idx.attrs['n_vocab']} vocabulary entries per (MoE layer, expert), domains {idx.attrs['domains']}")
    return 0


def cmd_verify(args) -> int:
    from workbench.store import open_run

    failed = 0
    for path in args.runs:
        try:
            run = open_run(path)        # the cheap checks: files, chunks present, commit record
            run.verify()                # the full read
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        note = "" if isinstance(run.attrs.get("data_digests"), dict) else \
            " (no data_digests: written before they existed, so swapped probe chunks cannot be detected)"
        print(f"{path}: ok, {run.n_docs} documents, {run.n_tokens} tokens verified{note}")
    return 2 if failed else 0


def cmd_attribute(args) -> int:
    import numpy as np

    import workbench
    from probes.attribution import attribute

    if args.steps < 1:
        raise ValueError(f"--steps must be a positive number of IG steps, got {args.steps}")
    model = workbench.load_model(args.model, dtype=args.dtype, device=args.device)
    if not hasattr(model, "vision_model"):
        raise ValueError(f"{args.model!r} is a text-only model; attribution needs a vision model (e.g. tiny-vision)")
    from workbench.attribution_store import check_store_model
    check_store_model(args.out, model, args.model)       # before the work: never mix models in one run
    results = attribute(model, args.prompt, args.image, args.target, methods=args.methods, baseline=args.baseline,
                        steps=args.steps, progress=not args.quiet)
    for name, res in results.items():
        path = res.save(args.out, name)
        err = getattr(res, "completeness_error", None)
        print(f"{name}: {res.scores.shape[0]} targets × {res.scores.shape[1]} image tokens -> {args.out}/{path}"
              + (f" (IG completeness error, max over targets {float(np.max(err)):.2%})" if err is not None else ""))
    return 0


def cmd_app(args) -> int:
    try:
        from apps.workbench_app import launch
    except ImportError as e:
        raise SystemExit(f"error: the app needs the 'apps' extra (pip install -e '.[apps]'): {e}") from None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be a TCP port in 1..65535, got {args.port}")
    if args.runs is None:
        args.runs = "runs"              # the default is created when absent; a directory the user names must exist
    elif not Path(args.runs).is_dir():
        raise FileNotFoundError(f"--runs {args.runs}: no such directory (create it first, or leave --runs out "
                                "to use ./runs)")
    vision = None if str(args.vision_model).lower() in ("none", "") else args.vision_model
    launch(runs=args.runs, model=args.model, host=args.host, port=args.port, share=args.share, vision_model=vision)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Llama 4 Workbench: an instrumented Llama 4.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_opts(sp):
        sp.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: checkpoint dtype)")
        sp.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")

    s = sub.add_parser("info", help="config summary, parameter counts, layer schedule, memory")
    s.add_argument("source", help=f"preset ({', '.join(PRESETS)}) or HF checkpoint directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("generate", help="generate text from a prompt")
    s.add_argument("source")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    model_opts(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("record", help="record probes for documents into a Zarr run store")
    s.add_argument("--model", required=True, help="preset or checkpoint directory")
    s.add_argument("--input", required=True, help=".txt (one document per line) or .jsonl (text|tokens, id, domain)")
    s.add_argument("--probes", default="router,entropy", help="comma list of router,router_logits,entropy,norms,sink")
    s.add_argument("--out", required=True, help="RUN.zarr (appended to / resumed if it exists)")
    s.add_argument("--segment", type=int, default=4096, help="tokens per forward segment (memory bound)")
    s.add_argument("--flush-tokens", type=int, default=None, help="commit to disk every N tokens (default 65536)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--streamed", action="store_true",
                   help="layer-streamed: load one decoder layer at a time from the checkpoint's shards")
    s.add_argument("--batch-tokens", type=int, default=262144, help="--streamed: tokens per pass over the layers")
    s.add_argument("--prefetch", action="store_true", help="--streamed: load the next layer while one runs")
    s.add_argument("--devices", default=None,
                   help="comma list (cuda:0,cuda:1): layer placement, contiguous layers stay on each device")
    s.add_argument("--dp", type=int, default=0, help="spawn N data-parallel ranks here (torchrun needs no flag)")
    s.add_argument("--ep", type=int, default=0,
                   help="expert parallelism: N ranks each hold 1/N of every MoE layer's experts (spawned here, "
                        "or the N ranks torchrun started)")
    s.add_argument("--index", action="store_true",
                   help="also build the run index for the app's Experts tab (as `workbench index OUT`)")
    model_opts(s)
    s.set_defaults(fn=cmd_record)

    s = sub.add_parser("plan", help="memory plan: parameters, weights, KV cache, and which execution mode fits")
    s.add_argument("source", help=f"preset ({', '.join(PRESETS)}) or HF checkpoint directory (config only)")
    s.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16 | fp8 | int4 (weight storage)")
    s.add_argument("--device", default="h100-80gb",
                   help="h100-80gb | h200-141gb | a100-80gb | a100-40gb | l40s-48gb | rtx4090-24gb | cpu:GiB | gpu:GiB")
    s.add_argument("--tokens", type=int, default=8192, help="tokens per document")
    s.add_argument("--segment", type=int, default=4096, help="tokens per forward segment")
    s.add_argument("--batch-tokens", type=int, default=None, help="layer-streamed batch (default: --tokens)")
    s.add_argument("--probes", default="router,entropy")
    s.add_argument("--prefetch", action="store_true", help="layer-streamed with the next layer prefetched")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("runs", help="list recorded runs in a directory")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("index", help="precompute per-expert indexes (top contexts, vocabulary, token search) "
                                     "into a run, for the app's Experts tab")
    s.add_argument("run", help="run store (RUN.zarr) with router recordings")
    s.add_argument("--top", type=int, default=64, help="top-activating tokens kept per (MoE layer, expert)")
    s.add_argument("--vocab", type=int, default=64, help="most frequent token ids kept per (MoE layer, expert)")
    s.add_argument("--engine", choices=["auto", "memory", "dask"], default="auto",
                   help="memory: one pass in this process; dask: bounded-memory chunk folds (threads, or --scheduler); "
                        "auto: dask when the in-memory pass would need over half the available memory")
    s.add_argument("--scheduler", default=None, help="--engine dask on a running dask.distributed scheduler "
                                                     "(tcp://HOST:8786; workers must see the run at the same path)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("verify", help="read every value of runs and check them against their commit records")
    s.add_argument("runs", nargs="+", help="RUN.zarr directories")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("attribute", help="attribute an answer to image tokens (captum), stored in a run")
    s.add_argument("--model", required=True, help="vision preset (tiny-vision) or multimodal checkpoint directory")
    s.add_argument("--prompt", required=True, help="prompt text with one <|image|> placeholder per image")
    s.add_argument("--image", required=True, nargs="+", help="image file(s)")
    s.add_argument("--target", default=None, help="answer string (default: each greedily generated token)")
    s.add_argument("--method", "--methods", dest="methods", default="ig,gxi,ablation",
                   help="comma list of ig,gxi,ablation,occlusion")
    s.add_argument("--baseline", default="mean", help="IG baseline: zero | mean | blur")
    s.add_argument("--steps", type=int, default=64, help="IG steps")
    s.add_argument("--out", required=True, help="run store (RUN.zarr) to write attribution/<method> into")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    model_opts(s)
    s.set_defaults(fn=cmd_attribute)

    s = sub.add_parser("app", help="launch the Gradio workbench app")
    s.add_argument("--runs", default=None, help="runs directory (must exist; default ./runs, created if absent)")
    s.add_argument("--model", default="tiny-moe",
                   help="model for the text tabs and live runs (bundled model, preset or checkpoint; default tiny-moe)")
    s.add_argument("--vision-model", default="tiny-vlm",
                   help="multimodal model (tiny-vlm, tiny-vision, a checkpoint) for the Attribution tab and image "
                        "chat; the text tabs keep --model; 'none' for none (default tiny-vlm)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    s.set_defaults(fn=cmd_app)

    from workbench.train.cli import add_train_parser  # argparse-only import: startup stays fast
    add_train_parser(sub)
    from workbench.analyze import add_analyze_parser  # argparse-only import (dask loads on use)
    add_analyze_parser(sub)
    from workbench.experiment.cli import add_experiment_parser  # argparse-only import
    add_experiment_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, KeyError) as e:   # OSError: missing/unreadable files, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `tiny-moe` recipe: corpus → BPE tokenizer → Llama 4 model with every layer kind → training →
HF checkpoint + loss curve + evaluation report.

Layer schedule of TINY_MOE (6 layers; MoE on odd layers as Maverick's `interleave_moe_layer_step=2`,
NoPE on every third layer):

    0 rope-chunked/dense   1 rope-chunked/moe   2 nope-global/dense
    3 rope-chunked/moe     4 rope-chunked/dense 5 nope-global/moe

`attention_chunk_size = floor_scale = 128` with 256-token training windows, so chunking and the
NoPE temperature (β = 1 + 0.1·ln(⌊(pos+1)/128⌋ + 1)) are active during training and grow at
4–16× the training length (spec llama4.md §2.5).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from workbench.config import Llama4TextConfig
from workbench.tokenizer import TokenizerWrapper

TINY_MOE = dict(
    hidden_size=128, intermediate_size=128, intermediate_size_mlp=384, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
    num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=3,
    attention_chunk_size=128, attn_temperature_tuning=True, floor_scale=128, attn_scale=0.1,
    use_qk_norm=True, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
)
DOMAIN_WEIGHTS = {"arxiv": 0.2, "c4": 0.2, "github": 0.2, "wikipedia": 0.2, "kv": 0.15, "arith": 0.05}
RETRIEVAL_MULTIPLES = (1, 4, 8, 16)


def model_config(tok, **overrides) -> Llama4TextConfig:
    from workbench.train.bpe import special_ids

    return Llama4TextConfig(**(TINY_MOE | overrides), vocab_size=tok.get_vocab_size(), **special_ids(tok))


def get_tokenizer(corpus: dict, work_dir: Path, vocab_size: int, seed: int):
    """Train the BPE on the training splits (plus synthetic samples) once; reuse it on resume."""
    from tokenizers import Tokenizer

    from workbench.checkpoint import _atomic
    from workbench.train.bpe import train_bpe
    from workbench.train.data import _pieces, synthetic_texts

    path, meta = work_dir / "tokenizer.json", work_dir / "tokenizer_settings.json"
    if path.exists():
        # Resuming: the tokenizer (and the model's embedding) were built for the vocab size given then.
        asked = json.loads(meta.read_text()).get("vocab_size") if meta.is_file() else None
        if asked is not None and asked != vocab_size:
            raise ValueError(f"{work_dir} holds a run trained with --vocab-size {asked}; resuming it with "
                             f"--vocab-size {vocab_size} would silently keep {asked}: pass --vocab-size {asked} to "
                             "resume, or a new --work-dir to start over")
        return Tokenizer.from_file(str(path))
    texts = [p for tr, _ in corpus.values() for p in _pieces(tr)]
    texts += synthetic_texts("kv", 300, seed) + synthetic_texts("arith", 100, seed)
    tok = train_bpe(texts, vocab_size=vocab_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    _atomic(meta, lambda p: Path(p).write_text(json.dumps({"vocab_size": vocab_size})))
    _atomic(path, lambda p: tok.save(str(p)))
    return tok


def run(out: str | Path, work_dir: str | Path, corpus_dir=None, settings=None, vocab_size: int = 4096,
        heldout_frac: float = 0.1, save_dtype: str = "fp32", progress: bool = True, evaluate: bool = True,
        synthetic_docs: dict[str, int] | None = None, model_overrides: dict | None = None,
        kv_digits: int = 4) -> dict:
    """Train and export; returns {"config", "wall_seconds", "history_tail", "report"}."""
    from workbench.checkpoint import build_model, resolve_dtype, save_model
    from workbench.train.data import build_streams, eval_windows, read_corpus
    from workbench.train.loop import TrainSettings, train, write_loss_curve

    s = settings or TrainSettings(weights=dict(DOMAIN_WEIGHTS))
    out, work_dir = Path(out), Path(work_dir)
    t0 = time.perf_counter()
    torch.set_num_threads(s.threads)
    corpus = read_corpus(corpus_dir, heldout_frac)
    tok = get_tokenizer(corpus, work_dir, vocab_size, s.seed)
    cfg = model_config(tok, **(model_overrides or {}))
    bos, eos = cfg.bos_token_id, cfg.eos_token_id[0]
    train_streams, held = build_streams(tok, corpus, bos, eos, s.seed, synthetic_docs, kv_digits)
    windows = {d: eval_windows(held[d], s.seq_len, 64) for d in held}
    model = build_model(cfg, seed=s.seed)
    history = train(model, train_streams, windows, s, work_dir=work_dir, progress=progress)
    wall = time.perf_counter() - t0
    model.tokenizer = TokenizerWrapper(tok, cfg.bos_token_id, list(cfg.eos_token_id))
    save_model(model.to(resolve_dtype(save_dtype)), out)
    model.float()
    write_loss_curve(history, out, title=f"{out.name}: {s.steps} steps × {s.batch_size}×{s.seq_len} tokens")
    result = {"settings": {k: v for k, v in vars(s).items()}, "data": {"kv_digits": kv_digits},
              "train_wall_seconds": round(wall, 1),
              "train_seconds_in_steps": round(sum(h.get("seconds", 0.0) for h in history), 1),
              "final_train": {k: history[-2 if "eval" in history[-1] else -1][k] for k in ("ce", "balance", "z")}}
    if evaluate:
        result["report"] = evaluate_dir(out, corpus_dir, heldout_frac, s.seq_len, seed=s.seed, kv_digits=kv_digits)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_dir(model_dir: str | Path, corpus_dir=None, heldout_frac: float = 0.1, seq_len: int = 256,
                 windows: int = 64, retrieval_docs: int = 20, seed: int = 0, threads: int = 2,
                 kv_digits: int | None = None) -> dict:
    """Everything the model card reports, recomputed from the saved checkpoint (fp32). `kv_digits`
    defaults to the training run's (eval.json "data"), else 4."""
    import workbench
    from workbench.train.data import build_streams, eval_windows, read_corpus
    from workbench.train.evaluate import retrieval_accuracy, routing_counts, specialization_table, unigram_loss
    from workbench.train.loop import heldout_losses

    torch.set_num_threads(threads)
    if kv_digits is None:
        saved = Path(model_dir) / "eval.json"
        kv_digits = json.loads(saved.read_text()).get("data", {}).get("kv_digits", 4) if saved.is_file() else 4
    model = workbench.load_model(str(model_dir), dtype="fp32", device="cpu")
    cfg, tok = model.config, model.tokenizer.tok
    corpus = read_corpus(corpus_dir, heldout_frac)
    train_streams, held = build_streams(tok, corpus, cfg.bos_token_id, cfg.eos_token_id[0], seed, kv_digits=kv_digits)
    win = {d: eval_windows(held[d], seq_len, windows) for d in held}
    with torch.no_grad():
        losses = heldout_losses(model, win)
        counts, moe = routing_counts(model, win)
    rows = [{"domain": d, "heldout_loss": round(losses[d], 4),
             "unigram_loss": round(unigram_loss(train_streams[d], win[d], cfg.vocab_size), 4),
             "tokens": int(win[d][:, 1:].numel())} for d in win]
    n_tok = [int(win[d][:, :-1].numel()) for d in win]
    spec = specialization_table(counts, n_tok, list(win), moe)
    retrieval = []
    for mult in RETRIEVAL_MULTIPLES:
        n = seq_len * mult
        for tt in (True, False):
            acc = retrieval_accuracy(model, tok, n, retrieval_docs, seed=seed, temperature_tuning=tt, digits=kv_digits)
            retrieval.append({"tokens": n, "multiple": mult, "temperature_tuning": tt, "accuracy": acc})
    return {"uniform_loss": round(float(torch.tensor(cfg.vocab_size).log()), 4), "kv_digits": kv_digits,
            "uniform_spec": cfg.num_experts_per_tok / cfg.num_local_experts,
            "losses": rows, "specialization": spec, "retrieval": retrieval}


def report_markdown(report: dict) -> str:
    """The evaluation as markdown tables (pasted into the model card)."""
    out = [f"Held-out loss (nats/token); uniform over the vocabulary = {report['uniform_loss']:.3f}\n",
           "| domain | held-out | unigram baseline | tokens |", "|---|---|---|---|"]
    out += [f"| {r['domain']} | {r['heldout_loss']:.3f} | {r['unigram_loss']:.3f} | {r['tokens']} |"
            for r in report["losses"]]
    spec = report["specialization"]
    layers = sorted({r["layer"] for r in spec})
    domains = list(dict.fromkeys(r["domain"] for r in spec))
    out += ["", f"Domain specialization, max over experts, % (expert); uniform k/E = "
                f"{100 * report['uniform_spec']:.1f} %\n",
            "| domain | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    by = {(r["layer"], r["domain"]): r for r in spec}
    for d in domains:
        out.append(f"| {d} | " + " | ".join(f"{100 * by[i, d]['max_spec']:.1f} (E{by[i, d]['expert']})"
                                            for i in layers) + " |")
    out.append("| load entropy H(f)/ln E | " + " | ".join(f"{by[i, domains[0]]['load_entropy']:.3f}"
                                                        for i in layers) + " |")
    out += ["", "Key–value retrieval, exact match of the looked-up value (greedy)\n",
            "| tokens | × training length | temperature tuning on | off |", "|---|---|---|---|"]
    ret = {(r["tokens"], r["temperature_tuning"]): r for r in report["retrieval"]}
    for n in sorted({r["tokens"] for r in report["retrieval"]}):
        out.append(f"| {n} | {ret[n, True]['multiple']} | {ret[n, True]['accuracy']:.2f} | "
                   f"{ret[n, False]['accuracy']:.2f} |")
    return "\n".join(out)

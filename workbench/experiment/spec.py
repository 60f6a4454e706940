"""Experiment specs: a TOML file → a validated `ExperimentSpec`, before any training starts.

    name = "irope"
    task = "recall"                       # recall | lm
    seeds = [0, 1, 2]
    eval_multiples = [1, 2, 4, 8, 16, 32] # × the training length
    [base]      Llama 4 knobs shared by every variant (KNOBS below)
    [recall]    task options (RecallTask fields + distractor and length curricula) | [lm] for task = "lm"
    [train]     steps, batch_size, lr, warmup, min_lr_frac, weight_decay, grad_clip, aux_coef, threads
    [eval]      sequences, distractor_density, needle_sequences
    [[variants]]
    name = "all-rope"
    nope_interval = "none"
    [[variants]]
    name = "irope-no-temp"
    from = "irope"                         # evaluate irope's trained models with inference knobs changed
    temperature_tuning = false

A variant is a set of knobs over [base]. Variants with `from` are not trained: they re-evaluate
another variant's models with inference-only knobs (temperature_tuning, attn_scale, floor_scale).
Every problem — unknown key, bad value, impossible combination — raises `SpecError` naming the
variant (or table), the key and the value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:          # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from workbench.config import ConfigError, Llama4TextConfig
from workbench.experiment.recall import RecallTask, TaskError, layout_length


class SpecError(ValueError):
    """An experiment spec is invalid; the message names where (variant/table), the key and the value."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# knob → (check, description). Checks get the value and return True when valid.
KNOBS: dict[str, tuple[Any, str]] = {
    "hidden_size": (lambda v: _int(v) and v > 0, "a positive integer"),
    "num_layers": (lambda v: _int(v) and 0 < v <= 64, "an integer in 1..64"),
    "num_heads": (lambda v: _int(v) and v > 0, "a positive integer"),
    "num_kv_heads": (lambda v: _int(v) and v > 0, "a positive integer"),
    "intermediate_size": (lambda v: _int(v) and v > 0, "a positive integer (expert / shared-expert width)"),
    "intermediate_size_mlp": (lambda v: _int(v) and v > 0, "a positive integer (dense-MLP width)"),
    "nope_interval": (lambda v: (_int(v) and v > 0) or v in ("none", "all"),
                      "a positive integer n (every n-th layer is NoPE/global), \"none\" (all RoPE) or \"all\""),
    "chunk_size": (lambda v: (_int(v) and v > 0) or v == "none",
                   "a positive integer or \"none\" (global attention in RoPE layers)"),
    "temperature_tuning": (lambda v: isinstance(v, bool), "true or false"),
    "attn_scale": (lambda v: _num(v) and v >= 0, "a finite number ≥ 0"),
    "floor_scale": (lambda v: _int(v) and v > 0, "a positive integer"),
    "qk_norm": (lambda v: isinstance(v, bool), "true or false"),
    "num_experts": (lambda v: _int(v) and v > 0, "a positive integer"),
    "top_k": (lambda v: _int(v) and v > 0, "a positive integer"),
    "shared_expert": (lambda v: isinstance(v, bool), "true or false"),
    "moe_interval": (lambda v: (_int(v) and v > 0) or v == "none",
                     "a positive integer n (every n-th layer is MoE, as interleave_moe_layer_step) or \"none\""),
    "rope_theta": (lambda v: _num(v) and v > 0, "a positive number"),
}
INFERENCE_KNOBS = ("temperature_tuning", "attn_scale", "floor_scale")
TRAIN_KEYS = {"steps": "a positive integer", "batch_size": "a positive integer", "lr": "a positive number",
              "warmup": "an integer ≥ 0", "min_lr_frac": "a number in [0, 1]", "weight_decay": "a number ≥ 0",
              "grad_clip": "a positive number", "aux_coef": "a number ≥ 0", "threads": "a positive integer",
              "ckpt_every": "a positive integer"}
RECALL_KEYS = {"vocab_size", "bos_id", "key_ids", "value_ids", "filler_ids", "pairs", "queries", "train_length",
               "distractor_density", "distractor_start", "distractor_full", "curriculum_steps", "curriculum_length",
               "curriculum_pairs", "curriculum_queries", "curriculum_mix"}
# The length curriculum (runner._recall_shape): `curriculum_steps` steps on short sequences of
# `curriculum_length` tokens with `curriculum_pairs` pairs and `curriculum_queries` queries, then
# `curriculum_mix` steps with lengths uniform in [curriculum_length, train_length], then the task itself.
RECALL_DEFAULTS = {"distractor_density": 0.0, "distractor_start": 0.5, "distractor_full": 0.8, "curriculum_steps": 0,
                   "curriculum_length": 8, "curriculum_pairs": 2, "curriculum_queries": 1, "curriculum_mix": 0}
LM_KEYS = {"train_length", "corpus", "vocab_size", "heldout_frac", "eval_windows"}
EVAL_KEYS = {"sequences", "distractor_density", "needle_sequences", "batch"}
TOP_KEYS = {"name", "description", "task", "seeds", "eval_multiples", "base", "recall", "lm", "train", "eval",
            "variants"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

DEFAULT_BASE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    intermediate_size_mlp=256, nope_interval=4, chunk_size=64, temperature_tuning=True,
                    attn_scale=0.1, floor_scale=129, qk_norm=True, num_experts=4, top_k=1, shared_expert=True,
                    moe_interval=2, rope_theta=10000.0)
DEFAULT_TRAIN = dict(steps=600, batch_size=32, lr=3e-3, warmup=50, min_lr_frac=0.1, weight_decay=0.1,
                     grad_clip=1.0, aux_coef=0.01, threads=2, ckpt_every=50)
DEFAULT_EVAL = dict(sequences=16, distractor_density=0.05, needle_sequences=16, batch=8)


@dataclass
class Variant:
    name: str
    knobs: dict[str, Any]                   # resolved: base + the variant's own
    own: dict[str, Any]                     # as written in the spec
    parent: str | None = None               # evaluated on this variant's trained models

    @property
    def trained(self) -> bool:
        return self.parent is None


@dataclass
class ExperimentSpec:
    name: str
    task: str
    seeds: list[int]
    eval_multiples: list[int]
    base: dict[str, Any]
    task_options: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    variants: list[Variant]
    description: str = ""
    raw: dict = field(default_factory=dict, repr=False)
    source_text: str = ""

    @property
    def train_length(self) -> int:
        return int(self.task_options["train_length"])

    @property
    def eval_lengths(self) -> list[int]:
        return [m * self.train_length for m in self.eval_multiples]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise SpecError(f"spec {self.name!r} has no variant {name!r}; variants: {[v.name for v in self.variants]}")

    def recall_task(self) -> RecallTask:
        o = self.task_options
        keys = ("vocab_size", "bos_id", "key_ids", "value_ids", "filler_ids", "pairs", "queries", "train_length")
        return RecallTask(**{k: (tuple(o[k]) if isinstance(o[k], list) else o[k]) for k in keys if k in o})

    def model_config(self, variant: Variant, vocab_size: int, bos: int = 1, eos: int = 2) -> Llama4TextConfig:
        # positions cost nothing (RoPE is computed on the fly): room for live sweeps beyond the spec's lengths
        return model_config(variant.knobs, vocab_size, max(8192, *self.eval_lengths), bos, eos,
                            where=f"variant {variant.name!r}")


def model_config(k: dict[str, Any], vocab_size: int, max_len: int, bos: int = 1, eos: int = 2,
                 where: str = "variant") -> Llama4TextConfig:
    """Knobs → a Llama4TextConfig (HF keys); the schedule lists are explicit so every knob value maps."""
    L = k["num_layers"]
    ni = k["nope_interval"]
    if ni == "none":
        no_rope = [1] * L
    elif ni == "all":
        no_rope = [0] * L
    else:
        no_rope = [int((i + 1) % ni != 0) for i in range(L)]
    mi = k["moe_interval"]
    moe_layers = [] if mi == "none" else list(range(mi - 1, L, mi))
    try:
        return Llama4TextConfig(
            vocab_size=vocab_size, hidden_size=k["hidden_size"], intermediate_size=k["intermediate_size"],
            intermediate_size_mlp=k["intermediate_size_mlp"], num_hidden_layers=L,
            num_attention_heads=k["num_heads"], num_key_value_heads=k["num_kv_heads"],
            head_dim=k["hidden_size"] // k["num_heads"], max_position_embeddings=max_len,
            num_local_experts=k["num_experts"], num_experts_per_tok=k["top_k"],
            interleave_moe_layer_step=mi if mi != "none" else 1, moe_layers=moe_layers,
            no_rope_layers=no_rope, no_rope_layer_interval=ni if _int(ni) else 4,
            attention_chunk_size=None if k["chunk_size"] == "none" else k["chunk_size"],
            attn_temperature_tuning=k["temperature_tuning"], floor_scale=k["floor_scale"],
            attn_scale=float(k["attn_scale"]), use_qk_norm=k["qk_norm"], rope_theta=float(k["rope_theta"]),
            rope_scaling=None, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=0)
    except ConfigError as e:
        raise SpecError(f"{where}: the knobs give an invalid model config: {e}") from None


def _check_knobs(where: str, knobs: dict[str, Any]) -> None:
    for key, value in knobs.items():
        if key not in KNOBS:
            raise SpecError(f"{where}: unknown knob {key!r} (= {value!r}); known knobs: {sorted(KNOBS)}")
        check, what = KNOBS[key]
        if not check(value):
            raise SpecError(f"{where}: knob {key!r} must be {what}, got {value!r}")


def _check_combination(where: str, k: dict[str, Any], own: dict[str, Any]) -> None:
    """Impossible or meaningless combinations of resolved knobs `k` (`own`: set by this variant)."""
    L = k["num_layers"]
    if k["hidden_size"] % k["num_heads"]:
        raise SpecError(f"{where}: hidden_size={k['hidden_size']} is not divisible by num_heads={k['num_heads']}")
    if (k["hidden_size"] // k["num_heads"]) % 2:
        raise SpecError(f"{where}: head dim hidden_size/num_heads = {k['hidden_size'] // k['num_heads']} must be even "
                        "(RoPE rotates pairs)")
    if k["num_heads"] % k["num_kv_heads"]:
        raise SpecError(f"{where}: num_heads={k['num_heads']} is not divisible by num_kv_heads={k['num_kv_heads']}")
    if k["top_k"] > k["num_experts"]:
        raise SpecError(f"{where}: top_k={k['top_k']} exceeds num_experts={k['num_experts']}")
    ni, mi = k["nope_interval"], k["moe_interval"]
    if _int(ni) and ni > L:
        raise SpecError(f"{where}: nope_interval={ni} > num_layers={L} leaves no NoPE layer; "
                        "write \"none\" for all-RoPE")
    if _int(mi) and mi > L:
        raise SpecError(f"{where}: moe_interval={mi} > num_layers={L} leaves no MoE layer; write \"none\" for dense")
    if ni == "none":
        for key in INFERENCE_KNOBS:
            if key in own:
                raise SpecError(f"{where}: knob {key!r} = {own[key]!r} has no effect with nope_interval=\"none\" "
                                "(temperature tuning acts on NoPE layers only)")
    if ni == "all" and "chunk_size" in own:
        raise SpecError(f"{where}: knob 'chunk_size' = {own['chunk_size']!r} has no effect with nope_interval=\"all\" "
                        "(chunking applies to RoPE layers only)")
    if mi == "none":
        for key in ("num_experts", "top_k", "shared_expert"):
            if key in own:
                raise SpecError(f"{where}: knob {key!r} = {own[key]!r} has no effect with moe_interval=\"none\" "
                                "(no MoE layers)")


def _check_table(where: str, table, allowed: set[str] | dict) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table, got {table!r}")
    for key, value in table.items():
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r} (= {value!r}); allowed: {sorted(allowed)}")
    return dict(table)


def _check_train(t: dict) -> None:
    for key, v in t.items():
        ok = {"steps": _int(v) and v > 0, "batch_size": _int(v) and v > 0, "lr": _num(v) and v > 0,
              "warmup": _int(v) and v >= 0, "min_lr_frac": _num(v) and 0 <= v <= 1,
              "weight_decay": _num(v) and v >= 0, "grad_clip": _num(v) and v > 0, "aux_coef": _num(v) and v >= 0,
              "threads": _int(v) and v > 0, "ckpt_every": _int(v) and v > 0}[key]
        if not ok:
            raise SpecError(f"[train]: key {key!r} must be {TRAIN_KEYS[key]}, got {v!r}")


def _check_curriculum(o: dict, task: RecallTask, steps: int) -> None:
    for key in ("curriculum_steps", "curriculum_mix", "curriculum_length", "curriculum_pairs", "curriculum_queries"):
        v = o[key]
        if not (_int(v) and v >= (0 if key in ("curriculum_steps", "curriculum_mix") else 1)):
            raise SpecError(f"[recall]: key {key!r} must be an integer ≥ "
                            f"{0 if key in ('curriculum_steps', 'curriculum_mix') else 1}, got {v!r}")
    if not (o["curriculum_steps"] or o["curriculum_mix"]):
        return
    if o["curriculum_steps"] + o["curriculum_mix"] >= steps:
        raise SpecError(f"[recall]: curriculum_steps={o['curriculum_steps']} + curriculum_mix={o['curriculum_mix']} "
                        f"leaves no step of the task itself ([train] steps={steps})")
    n, P, Q = o["curriculum_length"], o["curriculum_pairs"], o["curriculum_queries"]
    if Q > P or P > task.pairs or Q > task.queries:
        raise SpecError(f"[recall]: curriculum_pairs={P} and curriculum_queries={Q} must satisfy queries ≤ pairs, "
                        f"pairs ≤ the task's pairs={task.pairs} and queries ≤ its queries={task.queries}")
    need = layout_length(P, Q)
    if not need <= n <= task.train_length:
        raise SpecError(f"[recall]: curriculum_length={n} must lie in [{need}, train_length="
                        f"{task.train_length}] (the layout of {P} pairs and {Q} queries needs {need} tokens)")


def parse_spec(d: dict, source: str = "spec", text: str = "") -> ExperimentSpec:
    """Validate a spec dict (as read from TOML) completely; raise SpecError at the first problem."""
    d = _check_table(source, d, TOP_KEYS)
    name = d.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{source}: key 'name' must be a short identifier (letters, digits, _ . -), got {name!r}")
    task = d.get("task", "recall")
    if task not in ("recall", "lm"):
        raise SpecError(f"{source}: key 'task' must be \"recall\" or \"lm\", got {task!r}")
    other = "lm" if task == "recall" else "recall"
    if other in d:
        raise SpecError(f"{source}: table [{other}] given but task = {task!r}")
    seeds = d.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_int(s) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SpecError(f"{source}: key 'seeds' must be a non-empty list of distinct integers ≥ 0, got {seeds!r}")
    mults = d.get("eval_multiples", [1, 2, 4, 8, 16, 32])
    if not isinstance(mults, list) or not mults or not all(_int(m) and 1 <= m <= 1024 for m in mults) \
            or mults != sorted(set(mults)):
        raise SpecError(f"{source}: key 'eval_multiples' must be an increasing list of integers in 1..1024, "
                        f"got {mults!r}")
    base_own = _check_table("[base]", d.get("base", {}), KNOBS)
    _check_knobs("[base]", base_own)
    base = DEFAULT_BASE | base_own
    train = DEFAULT_TRAIN | _check_table("[train]", d.get("train", {}), TRAIN_KEYS)
    _check_train(train)
    ev = DEFAULT_EVAL | _check_table("[eval]", d.get("eval", {}), EVAL_KEYS)
    for key in ("sequences", "needle_sequences", "batch"):
        if not (_int(ev[key]) and ev[key] > 0):
            raise SpecError(f"[eval]: key {key!r} must be a positive integer, got {ev[key]!r}")
    if not (_num(ev["distractor_density"]) and 0 <= ev["distractor_density"] <= 0.3):
        raise SpecError("[eval]: key 'distractor_density' must be a number in [0, 0.3], "
                        f"got {ev['distractor_density']!r}")

    if task == "recall":
        opts = RECALL_DEFAULTS | _check_table("[recall]", d.get("recall", {}), RECALL_KEYS)
        try:
            rt = RecallTask(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in opts.items()
                               if k not in RECALL_DEFAULTS})
        except (TaskError, TypeError) as e:
            raise SpecError(f"[recall]: {e}") from None
        _check_curriculum(opts, rt, train["steps"])
        opts.setdefault("train_length", RecallTask().train_length)
        if not (_num(opts["distractor_density"]) and 0 <= opts["distractor_density"] <= 0.3):
            raise SpecError(f"[recall]: key 'distractor_density' must be a number in [0, 0.3], "
                            f"got {opts['distractor_density']!r}")
        a, b = opts["distractor_start"], opts["distractor_full"]
        if not (_num(a) and _num(b) and 0 <= a <= b <= 1):
            raise SpecError(f"[recall]: distractor_start={a!r} and distractor_full={b!r} must satisfy "
                            "0 ≤ start ≤ full ≤ 1 (fractions of training steps)")
    else:
        opts = {"train_length": 128, "corpus": None, "vocab_size": 2048, "heldout_frac": 0.1, "eval_windows": 16} | \
            _check_table("[lm]", d.get("lm", {}), LM_KEYS)
        if not (_int(opts["train_length"]) and opts["train_length"] >= 8):
            raise SpecError(f"[lm]: key 'train_length' must be an integer ≥ 8, got {opts['train_length']!r}")
        if not (_int(opts["vocab_size"]) and 256 < opts["vocab_size"] <= 65536):
            raise SpecError(f"[lm]: key 'vocab_size' must be an integer in 257..65536, got {opts['vocab_size']!r}")
        if not (_int(opts["eval_windows"]) and opts["eval_windows"] > 0):
            raise SpecError(f"[lm]: key 'eval_windows' must be a positive integer, got {opts['eval_windows']!r}")

    raw_variants = d.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise SpecError(f"{source}: needs at least one [[variants]] table")
    variants: list[Variant] = []
    names: set[str] = set()
    for i, rv in enumerate(raw_variants):
        if not isinstance(rv, dict):
            raise SpecError(f"{source}: variants[{i}] must be a table, got {rv!r}")
        vname = rv.get("name")
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise SpecError(f"variants[{i}]: key 'name' must be a short identifier (letters, digits, _ . -), "
                            f"got {vname!r}")
        if vname in names:
            raise SpecError(f"variant {vname!r}: duplicate name")
        names.add(vname)
        where = f"variant {vname!r}"
        own = {k: v for k, v in rv.items() if k not in ("name", "from")}
        _check_knobs(where, own)
        parent = rv.get("from")
        if parent is not None:
            if not isinstance(parent, str) or parent not in names or parent == vname:
                raise SpecError(f"{where}: key 'from' = {parent!r} must name a variant defined above it")
            pv = next(v for v in variants if v.name == parent)
            if not pv.trained:
                raise SpecError(f"{where}: key 'from' = {parent!r} names a variant that is itself evaluated "
                                f"'from' {pv.parent!r}; name the trained variant")
            bad = sorted(set(own) - set(INFERENCE_KNOBS))
            if bad:
                raise SpecError(f"{where}: knob {bad[0]!r} = {own[bad[0]]!r} changes training, but the variant is "
                                f"evaluated 'from' {parent!r}; only {list(INFERENCE_KNOBS)} may change at inference")
            knobs = pv.knobs | own
        else:
            knobs = base | own
        _check_combination(where, knobs, own)
        variants.append(Variant(vname, knobs, own, parent))
    spec = ExperimentSpec(name=name, task=task, seeds=list(seeds), eval_multiples=list(mults), base=base,
                          task_options=opts, train=train, eval=ev, variants=variants,
                          description=str(d.get("description", "")), raw=d, source_text=text)
    vocab = opts["vocab_size"] if task == "lm" else spec.recall_task().vocab_size
    for v in variants:
        spec.model_config(v, vocab)                     # every config must build
    return spec


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a TOML spec; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"experiment spec {str(path)!r} does not exist or is not a file")
    text = path.read_text()
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    try:
        return parse_spec(d, str(path), text)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
